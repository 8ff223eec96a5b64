"""The Annex E table as data: complete, from the standard, resolved correctly."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from node.anonymize.profile import (
    BASIC_PROFILE_CODE,
    CLEAN_PIXEL_DATA_CODE,
    LAMINA_ROWS,
    OPTION_CODES,
    ProfileRow,
    effective_action,
    enabled_options,
    load_table,
    plan,
)
from node.anonymize.settings import DeidSettings

ROOT = Path(__file__).resolve().parent.parent
ACTIONS = {"D", "Z", "X", "K", "C", "U", "Z/D", "X/Z", "X/D", "X/Z/D", "X/Z/U*"}


def _row(tag: str) -> ProfileRow:
    return next(r for r in load_table().rows if r.tag == tag)


def test_table_is_the_2024b_edition_with_all_621_rows():
    table = load_table()
    data = json.loads((ROOT / "node/anonymize/data/confidentiality_profile.json").read_text())
    assert table.edition == "2024b"
    assert len(table.rows) == 621 == data["row_count"]
    assert len({r.tag for r in table.rows}) == 621
    assert [r.tag for r in table.rows] == sorted(r.tag for r in table.rows)


def test_cid_7050_codes_equal_pydicoms():
    """The codes are written out (importing pydicom.sr costs ~16 MB per process): they
    must stay those of pydicom's copy of PS3.16, keyword for keyword."""
    from pydicom.sr.codedict import codes

    ours = {"BasicApplicationConfidentialityProfile": BASIC_PROFILE_CODE,
            "CleanPixelDataOption": CLEAN_PIXEL_DATA_CODE}
    for code in OPTION_CODES.values():
        ours["".join(code.meaning.replace("UIDs", "Uids").split())] = code
    assert len(ours) == 12
    for keyword, code in ours.items():
        theirs = getattr(codes.DCM, keyword)
        assert (code.value, code.scheme_designator, code.meaning) == (
            theirs.value, theirs.scheme_designator, theirs.meaning), keyword


def test_every_cell_is_an_action_of_the_standard():
    for row in load_table().rows:
        assert row.basic in ACTIONS, row.tag
        assert set(row.options) <= set(OPTION_CODES), row.tag
        assert set(row.options.values()) <= {"K", "C", "X"}, row.tag


@pytest.mark.parametrize(
    ("tag", "basic", "options"),
    [
        ("00100010", "Z", {}),  # Patient's Name
        ("00080018", "U", {"retain_uids": "K"}),  # SOP Instance UID
        ("00080020", "Z", {"retain_longitudinal_full_dates": "K",
                           "retain_longitudinal_modified_dates": "C"}),  # Study Date
        ("00081140", "X/Z/U*", {"retain_uids": "K"}),  # Referenced Image Sequence
        ("00080080", "X/Z/D", {"retain_institution_identity": "K"}),  # Institution Name
        ("ggggeeee", "X", {"retain_safe_private": "C"}),
        ("50xxxxxx", "X", {"clean_graphics": "C"}),
        ("60xx3000", "X", {"clean_graphics": "C"}),
    ],
)
def test_known_rows(tag, basic, options):
    row = _row(tag)
    assert row.basic == basic
    assert dict(row.options) == options


def test_rows_missing_from_the_older_copy_get_only_the_options_defined_by_vr():
    row = _row("00080012")  # Instance Creation Date: in 2024b, not in the innolitics copy
    assert row.source == "2024b"
    assert row.basic == "X/D"
    assert dict(row.options) == {
        "retain_longitudinal_full_dates": "K",
        "retain_longitudinal_modified_dates": "C",
    }
    annotation = _row("006A0006")  # Annotation Group Description: no option retains it
    assert dict(annotation.options) == {}


def test_option_precedence_and_compound_actions():
    row = ProfileRow("00000000", "t", "X/Z/D", {"clean_descriptors": "C", "retain_uids": "K"}, "t")
    assert effective_action(row, ()) == "D"
    assert effective_action(row, ("clean_descriptors",)) == "C"
    assert effective_action(row, ("clean_descriptors", "retain_uids")) == "K"
    assert effective_action(ProfileRow("0", "t", "X/Z", {}, "t"), ()) == "Z"
    assert effective_action(ProfileRow("0", "t", "X/Z/U*", {}, "t"), ()) == "U"


def test_plan_resolves_options_from_settings():
    default = plan(DeidSettings())
    assert default.options == ("retain_longitudinal_modified_dates",)
    assert default.by_tag[0x00080020] == "C"
    assert default.by_tag[0x00100010] == "Z"
    assert default.private == default.curve == default.overlay[0x3000] == "X"
    everything = DeidSettings(
        retain_safe_private=True, retain_uids=True, retain_device_identity=True,
        retain_institution_identity=True, retain_patient_characteristics=True,
        retain_longitudinal="full", clean_descriptors=True, clean_structured_content=True,
        clean_graphics=True,
    )
    full = plan(everything)
    assert len(enabled_options(everything)) == 9  # full and modified dates exclude each other
    assert full.by_tag[0x00080018] == "K"
    assert full.by_tag[0x00080020] == "K"
    assert full.by_tag[0x00080080] == "K"
    assert full.private == full.curve == full.overlay[0x3000] == "C"


def test_lamina_additions_cover_seg_and_overlay_text_and_do_not_shadow_the_table():
    table_tags = {r.tag for r in load_table().rows}
    assert {r.tag for r in LAMINA_ROWS} & table_tags == set()
    assert {"00620005", "00620006", "00700080", "00700081", "60xx0022", "60xx1500"} == {
        r.tag for r in LAMINA_ROWS
    }


def _generator():
    spec = importlib.util.spec_from_file_location("gen", ROOT / "tools/gen_deid_profile.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generator_merges_row_set_from_2024b_with_option_columns(tmp_path):
    innolitics = [
        {"name": "Patient ID", "tag": "(0010,0020)", "stdCompIOD": "Y", "basicProfile": "Z",
         "id": "00100020"},
        {"name": "Study Date", "tag": "(0008,0020)", "stdCompIOD": "Y", "basicProfile": "Z",
         "rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C", "id": "00080020"},
        {"name": "Private attributes", "tag": "(GGGG,EEEE) WHERE GGGG IS ODD",
         "stdCompIOD": "N", "basicProfile": "X", "rtnSafePrivOpt": "C",
         "id": "ggggeeee-where-gggg-is-odd"},
    ]
    (tmp_path / "inn.json").write_text(json.dumps(innolitics))
    (tmp_path / "kit.py").write_text(
        "Z_TAGS = [\n    (0x0008, 0x0020),  # Study Date\n]\n"
        "Z_D_TAGS = [\n    (0x0010, 0x0020),  # Patient ID\n]\n"
        "X_D_TAGS = [\n    (0x0008, 0x0012),  # Instance Creation Date\n]\n"
        "X_TAGS = [\n    (0x6000, 0x3000, 0xFF00, 0xFFFF),  # Overlay Data\n]\n"
    )
    table = _generator().build(tmp_path / "inn.json", tmp_path / "kit.py")
    rows = {r[0]: r for r in table["rows"]}
    assert table["row_count"] == 5
    assert rows["00100020"][2] == "Z/D"  # the 2024b action wins
    assert rows["00080020"][3] == {"retain_longitudinal_full_dates": "K",
                                   "retain_longitudinal_modified_dates": "C"}
    assert rows["00080012"][3]["retain_longitudinal_modified_dates"] == "C"
    assert rows["00080012"][4] == "2024b"
    assert rows["ggggeeee"][3] == {"retain_safe_private": "C"}
    assert rows["60xx3000"][2] == "X"


def test_generator_rejects_unknown_actions(tmp_path):
    (tmp_path / "inn.json").write_text(json.dumps([
        {"name": "Odd", "tag": "(0008,0050)", "basicProfile": "Q", "id": "00080050"}
    ]))
    (tmp_path / "kit.py").write_text("")
    with pytest.raises(ValueError, match="unknown action"):
        _generator().build(tmp_path / "inn.json", tmp_path / "kit.py")
