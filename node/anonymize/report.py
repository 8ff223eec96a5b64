"""The de-identification report of one study, from its instances' evidence.

Input is what the node stored per instance: :meth:`DeidEvidence.as_dict`. Output is
the same content twice: :func:`study_report_json` as data, and :func:`study_report`
as plain text a regulatory reviewer can read (which profile edition and options,
what was removed, emptied, replaced, remapped, shifted, cleaned and kept, in how
many instances each; private elements kept and the safe-list entry that vouched for
each; residual-PHI scan hits; pixel masking). Like the evidence it is built from,
the report names attributes only, never their values.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

from node.anonymize.evidence import (
    ACTION_CATEGORIES,
    GRAPHICS_CATEGORIES,
    DeidEvidence,
)
from node.anonymize.profile import OPTION_CODES

_TITLES = {
    "removed": "Removed (X), absent from the stored object",
    "emptied": "Emptied (Z), present with an empty value",
    "dummy": "Replaced with a dummy value (D)",
    "pseudonym": "Replaced with the patient's keyed pseudonym",
    "uid_remapped": "UIDs replaced with keyed pseudonyms (U)",
    "date_shifted": "Dates shifted by the patient's offset",
    "age_capped": "Ages of 90 years or more recorded as 090Y",
    "cleaned": "Cleaned (C), kept after checking against the project vocabulary",
    "kept": "Kept (K)",
    "added": "Added by de-identification",
    "overlays_removed": "Overlay groups removed",
    "overlays_cleaned": "Overlay groups kept, text cleaned (Clean Graphics)",
    "curves_removed": "Curve groups removed",
    "curves_cleaned": "Curve groups kept, text cleaned (Clean Graphics)",
}


def study_report_json(evidences: Iterable[Mapping[str, Any]], *, study_uid: str) -> dict[str, Any]:
    """The report of one study as a JSON-serialisable dict, in a fixed order.
    ``evidences`` are the instances' ``DeidEvidence.as_dict()``; raises
    ``ValueError`` for one that is not evidence of the known schema."""
    items = [DeidEvidence.from_dict(e) for e in evidences]
    options: dict[tuple[str, str, str], int] = Counter()
    actions = {c: Counter() for c in ACTION_CATEGORIES}
    graphics = {c: Counter() for c in GRAPHICS_CATEGORIES}
    by_option: dict[str, set[str]] = {}
    private: dict[tuple[str, int, int | None], dict[str, Any]] = {}
    residual: Counter[str] = Counter()
    temporal: Counter[str] = Counter()
    private_removed = private_removed_instances = masked = residual_values = 0
    for evidence in items:
        for option in evidence.options:
            options[(option.name, option.code, option.meaning)] += 1
        for category in ACTION_CATEGORIES:
            actions[category].update(getattr(evidence, category))
        for category in GRAPHICS_CATEGORIES:
            graphics[category].update(getattr(evidence, category))
        for path, option in evidence.by_option:
            by_option.setdefault(path, set()).add(option)
        seen_entries: set[tuple[str, int, int | None]] = set()
        for kept in evidence.private_kept:
            entry = (kept.creator, kept.element, kept.group)
            row = private.setdefault(entry, {"tags": set(), "instances": 0})
            row["tags"].add(kept.path)
            if entry not in seen_entries:
                seen_entries.add(entry)
                row["instances"] += 1
        private_removed += evidence.private_removed
        private_removed_instances += evidence.private_removed > 0
        residual.update(evidence.residual_phi)
        residual_values += evidence.residual_phi_values
        temporal[evidence.temporal or "unrecorded"] += 1
        masked += evidence.pixels_masked
    return {
        "study_uid": study_uid,
        "instances": len(items),
        "engines": _counts(Counter(e.engine for e in items)),
        "editions": _counts(Counter(e.edition for e in items)),
        "options": [
            {"name": name, "code": code, "meaning": meaning, "instances": count}
            for (name, code, meaning), count in sorted(
                options.items(), key=lambda kv: (kv[0][1], kv[0][0])
            )
        ],
        "actions": {c: _counts(actions[c]) for c in ACTION_CATEGORIES},
        "by_option": {p: sorted(by_option[p]) for p in sorted(by_option)},
        "private": {
            "kept": [
                {"creator": creator, "element": element, "group": group,
                 "tags": sorted(row["tags"]), "instances": row["instances"]}
                for (creator, element, group), row in sorted(
                    private.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2] or -1)
                )
            ],
            "removed": private_removed,
            "removed_instances": private_removed_instances,
        },
        "graphics": {c: _counts(graphics[c]) for c in GRAPHICS_CATEGORIES},
        "residual_phi": _counts(residual),
        "residual_phi_values": residual_values,
        "temporal": _counts(temporal),
        "pixels_masked": masked,
    }


def study_report(evidences: Iterable[Mapping[str, Any]], *, study_uid: str) -> str:
    """The report of one study as plain text (the content of
    :func:`study_report_json`)."""
    data = study_report_json(evidences, study_uid=study_uid)
    n = data["instances"]
    lines = [
        "De-identification report",
        f"Study Instance UID: {study_uid}",
        f"Instances: {n}",
        "Profile: DICOM PS3.15 Annex E, Basic Application Level Confidentiality Profile, "
        "Table E.1-1 edition " + _joined(data["editions"], n),
        "Engine: " + _joined(data["engines"], n),
        "",
        "Dates and times: " + "; ".join(
            f"{_TEMPORAL.get(k, k)}{_of(c, n)}" for k, c in data["temporal"].items()
        ),
        "",
        "Profile and options applied (DICOM CID 7050):",
    ]
    lines += [f"  {o['code']} {o['meaning']}{_of(o['instances'], n)}" for o in data["options"]]
    if not data["options"]:
        lines.append("  none")
    lines += ["", "Attributes: each line gives the number of instances it applies to, then "
                  "the attribute. Paths go through sequences as Sequence>Attribute; "
                  "(gggg,eeee) is a tag the data dictionary does not name."]
    for category in ACTION_CATEGORIES:
        counts = data["actions"][category]
        lines += ["", f"{_TITLES[category]}: "
                      + (f"{len(counts)} attribute(s)" if counts else "none")]
        for path, count in counts.items():
            because = data["by_option"].get(path) if category != "removed" else None
            note = f"  (under {', '.join(map(_option_meaning, because))})" if because else ""
            lines.append(f"  {count:>5}  {path}{note}")
    lines += ["", "Private elements:"]
    private = data["private"]
    if private["kept"]:
        lines.append("  kept, each vouched for by a safe-list entry of the project's "
                     "configuration (Retain Safe Private):")
        for row in private["kept"]:
            group = "any odd group" if row["group"] is None else f"group {row['group']:04X}"
            lines.append(f"    creator \"{row['creator']}\", element xx{row['element']:02X}, "
                         f"{group}: {', '.join(row['tags'])} in {row['instances']} instance(s)")
    else:
        lines.append("  none kept")
    lines.append(f"  removed: {private['removed']} element(s) in "
                 f"{private['removed_instances']} instance(s)")
    lines += ["", "Overlay (60xx) and curve (50xx) groups:"]
    shown = False
    for category in GRAPHICS_CATEGORIES:
        for group, count in data["graphics"][category].items():
            lines.append(f"  {_TITLES[category]}: {group} in {count} instance(s)")
            shown = True
    if not shown:
        lines.append("  none present")
    lines += ["", "Residual-PHI scan (values that would have been kept but named a person "
                  "or identifier the object carries, cleaned, emptied or removed instead; "
                  f"{data['residual_phi_values']} value(s)):"]
    if data["residual_phi"]:
        lines += [f"  {path}: {count} instance(s)" for path, count in data["residual_phi"].items()]
    else:
        lines.append("  no hits")
    lines += ["", "Pixel data: " + (
        f"configured regions masked (Clean Pixel Data) in {data['pixels_masked']} of {n} "
        "instance(s)" if data["pixels_masked"] else "not modified"
    )]
    return "\n".join(lines) + "\n"


_TEMPORAL = {
    "shifted": "every date and time shifted by one per-patient offset (Modified Dates)",
    "table": "removed, emptied or replaced as Table E.1-1 says",
    "kept": "kept as they were (Full Dates)",
    "unrecorded": "not recorded (evidence from before times were handled)",
}


def _counts(counter: Counter[str]) -> dict[str, int]:
    return {key: counter[key] for key in sorted(counter)}


def _joined(counts: Mapping[str, int], n: int) -> str:
    if not counts:
        return "unknown"
    return "; ".join(f"{value}{_of(count, n)}" for value, count in counts.items())


def _of(count: int, n: int) -> str:
    return f" ({count} of {n} instances)"


def _option_meaning(name: str) -> str:
    code = OPTION_CODES.get(name)
    return name if code is None else code.meaning
