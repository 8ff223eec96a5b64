"""Regenerate node/anonymize/data/confidentiality_profile.json from machine-readable
copies of DICOM PS3.15 Table E.1-1.

Why two sources: the only public machine-readable copy that carries the *option*
columns (innolitics/dicom-standard ``standard/confidentiality_profile_attributes.json``)
is from an older edition and is known to miss rows (innolitics issue #74); a complete
2024b row set with its basic-profile actions exists in KitwareMedical/dicom-anonymizer
``dicomanonymizer/dicomfields_2024b.py``, but without option columns. The generated
table takes the row set and basic-profile actions from the 2024b copy, the option
columns from the innolitics copy, and for rows only the 2024b copy has, derives the
two option columns the standard defines by value representation (E.3.6: dates and
times under Retain Longitudinal; E.3.9: UIDs under Retain UIDs). Every other option
cell of such a row stays empty, which means "this option does not retain it" — the
conservative reading.

Usage (download both files first, at the commits recorded in the output):

    python tools/gen_deid_profile.py INNOLITICS_JSON KITWARE_PY [--out PATH]
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import sys
from pathlib import Path

from pydicom.datadict import dictionary_VR

EDITION = "2024b"
INNOLITICS_COMMIT = "0d01bf11dfc1d0b73b6df85bbf6e1764d3c558a3"
KITWARE_COMMIT = "1424f66151787c1303c133a9de3e6ce74dd20650"

# innolitics column name -> option name used by Lamina (node/anonymize/settings.py).
OPTION_COLUMNS = {
    "rtnSafePrivOpt": "retain_safe_private",
    "rtnUIDsOpt": "retain_uids",
    "rtnDevIdOpt": "retain_device_identity",
    "rtnInstIdOpt": "retain_institution_identity",
    "rtnPatCharsOpt": "retain_patient_characteristics",
    "rtnLongFullDatesOpt": "retain_longitudinal_full_dates",
    "rtnLongModifDatesOpt": "retain_longitudinal_modified_dates",
    "cleanDescOpt": "clean_descriptors",
    "cleanStructContOpt": "clean_structured_content",
    "cleanGraphOpt": "clean_graphics",
}

# Kitware list name -> action in the standard's notation.
KITWARE_LISTS = {
    "D_TAGS": "D",
    "Z_TAGS": "Z",
    "X_TAGS": "X",
    "U_TAGS": "U",
    "Z_D_TAGS": "Z/D",
    "X_Z_TAGS": "X/Z",
    "X_D_TAGS": "X/D",
    "X_Z_D_TAGS": "X/Z/D",
    "X_Z_U_STAR_TAGS": "X/Z/U*",
}

ACTIONS = {"D", "Z", "X", "K", "C", "U", "Z/D", "X/Z", "X/D", "X/Z/D", "X/Z/U*"}
PRIVATE_ROW = "ggggeeee"


def _innolitics_key(row: dict) -> str:
    """Our tag key: 8 upper-case hex digits, or with 'xx' for repeating groups."""
    if row["id"].startswith("gggg"):
        return PRIVATE_ROW
    return row["id"].upper().replace("X", "x")


def _kitware_key(values: tuple[int, ...]) -> str:
    """Kitware writes repeating groups as (group, element, group mask, element mask)."""
    if len(values) == 2:
        return f"{values[0]:04X}{values[1]:04X}"
    group, element, group_mask, element_mask = values
    if (group_mask, element_mask) == (0xFF00, 0x0000):
        return f"{group >> 8:02X}xxxxxx"
    if (group_mask, element_mask) == (0xFF00, 0xFFFF):
        return f"{group >> 8:02X}xx{element:04X}"
    raise ValueError(f"unexpected tag mask {values!r}")


def read_innolitics(path: Path) -> dict[str, dict]:
    rows: dict[str, dict] = {}
    for row in json.loads(path.read_text(encoding="utf-8")):
        key = _innolitics_key(row)
        if key in rows:
            raise ValueError(f"duplicate row {key} in {path.name}")
        rows[key] = {
            "name": " ".join(row["name"].split()),
            "basic": row["basicProfile"],
            "options": {
                OPTION_COLUMNS[col]: row[col] for col in OPTION_COLUMNS if col in row
            },
        }
    return rows


def read_kitware(path: Path) -> dict[str, dict]:
    """Read the *_TAGS list literals without executing the file; names from comments."""
    source = path.read_text(encoding="utf-8")
    lines = source.splitlines()
    rows: dict[str, dict] = {}
    for node in ast.parse(source).body:
        if not (isinstance(node, ast.Assign) and isinstance(node.value, ast.List)):
            continue
        target = node.targets[0]
        if not (isinstance(target, ast.Name) and target.id in KITWARE_LISTS):
            continue
        for element in node.value.elts:
            key = _kitware_key(ast.literal_eval(element))
            comment = re.search(r"#\s*(.*)$", lines[element.end_lineno - 1])
            if key in rows:
                raise ValueError(f"duplicate row {key} in {path.name}")
            rows[key] = {
                "name": comment.group(1).strip() if comment else "",
                "basic": KITWARE_LISTS[target.id],
            }
    return rows


def _derived_options(key: str, basic: str) -> dict[str, str]:
    """Option cells the standard defines by VR, for rows the innolitics copy lacks."""
    options: dict[str, str] = {}
    try:
        vr = dictionary_VR(int(key, 16))
    except (KeyError, ValueError):
        vr = ""
    if vr in ("DA", "DT", "TM"):
        options["retain_longitudinal_full_dates"] = "K"
        options["retain_longitudinal_modified_dates"] = "C"
    if "U" in basic.split("/"):
        options["retain_uids"] = "K"
    return options


def merge(innolitics: dict[str, dict], kitware: dict[str, dict]) -> list[list]:
    rows = []
    for key in sorted(set(innolitics) | set(kitware)):
        inn, kit = innolitics.get(key), kitware.get(key)
        basic = kit["basic"] if kit else inn["basic"]
        if basic not in ACTIONS:
            raise ValueError(f"row {key}: unknown action {basic!r}")
        if inn:
            options, source = inn["options"], "both" if kit else "innolitics"
        else:
            options, source = _derived_options(key, basic), "2024b"
        for action in options.values():
            if action not in ("K", "C", "X"):
                raise ValueError(f"row {key}: unknown option action {action!r}")
        name = (kit or inn)["name"] or inn["name"]
        rows.append([key, name, basic, dict(sorted(options.items())), source])
    return rows


def build(innolitics_path: Path, kitware_path: Path) -> dict:
    innolitics = read_innolitics(innolitics_path)
    kitware = read_kitware(kitware_path)
    rows = merge(innolitics, kitware)
    return {
        "standard": "DICOM PS3.15",
        "table": "E.1-1 Application Level Confidentiality Profile Attributes",
        "edition": EDITION,
        "row_count": len(rows),
        "sources": [
            {
                "repository": "KitwareMedical/dicom-anonymizer",
                "path": "dicomanonymizer/dicomfields_2024b.py",
                "commit": KITWARE_COMMIT,
                "edition": EDITION,
                "rows": len(kitware),
                "gives": "row set and basic-profile actions (no option columns, "
                "no private-attributes row)",
            },
            {
                "repository": "innolitics/dicom-standard",
                "path": "standard/confidentiality_profile_attributes.json",
                "commit": INNOLITICS_COMMIT,
                "edition": "not stated; 2021b or later (has (0018,11BB)) and before "
                "March 2024 (still has the (0008,1120) Retain UIDs error fixed "
                "upstream in 7008b61); incomplete, see innolitics issue #74",
                "rows": len(innolitics),
                "gives": "option columns, the private-attributes row",
            },
        ],
        "row_format": ["tag", "name", "basic_profile", "options", "options_source"],
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("innolitics_json", type=Path)
    parser.add_argument("kitware_py", type=Path)
    default_out = (
        Path(__file__).resolve().parent.parent
        / "node" / "anonymize" / "data" / "confidentiality_profile.json"
    )
    parser.add_argument("--out", type=Path, default=default_out)
    args = parser.parse_args(argv)
    table = build(args.innolitics_json, args.kitware_py)
    text = json.dumps(table, indent=None, separators=(",", ":"), ensure_ascii=True)
    # One row per line keeps diffs between editions readable.
    text = text.replace(',"rows":[[', ',"rows":[\n[').replace("],[", "],\n[")
    args.out.write_text(text + "\n", encoding="utf-8")
    print(f"{table['row_count']} rows, edition {table['edition']} -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
