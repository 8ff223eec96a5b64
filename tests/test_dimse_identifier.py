"""The direct C-FIND identifier encoder writes exactly what pydicom would."""

from __future__ import annotations

import pytest
from pydicom.tag import Tag
from pynetdicom.dsutils import encode

from node.dimse.identifier import encode_match
from node.storage.query import Match

CHARSET, LEVEL = Tag(0x00080005), Tag(0x00080052)

CASES = {
    "ascii, odd lengths padded": [
        (LEVEL, "CS", "STUDY"), (Tag(0x00100010), "PN", "DOE^JOHN^A"),
        (Tag(0x00100020), "LO", "PID1"), (Tag(0x0020000D), "UI", "1.2.345"),
        (Tag(0x00201208), "IS", 20)],
    "multi-valued and empty": [
        (LEVEL, "CS", "STUDY"), (Tag(0x00080061), "CS", ["CT", "SR"]),
        (Tag(0x00081110), "SQ", None), (Tag(0x00100021), "LO", None),
        (Tag(0x00101000), "LO", "")],
    "latin-1": [
        (CHARSET, "CS", "ISO_IR 100"), (LEVEL, "CS", "PATIENT"),
        (Tag(0x00100010), "PN", "Müller^Jürgen")],
    "utf-8, three groups": [
        (CHARSET, "CS", "ISO_IR 192"), (LEVEL, "CS", "PATIENT"),
        (Tag(0x00100010), "PN", "Yamada^Tarou=山田^太郎=やまだ^たろう")],
    "long-length VRs, binary VRs empty": [
        (LEVEL, "CS", "IMAGE"), (Tag(0x00081030), "LO", "x"), (Tag(0x00189361), "UT", None),
        (Tag(0x00280106), "US", None), (Tag(0x7FE00010), "OB", None)],
    "ISO 2022 code extensions (handed to pydicom)": [
        (CHARSET, "CS", ["ISO 2022 IR 6", "ISO 2022 IR 87"]), (LEVEL, "CS", "PATIENT"),
        (Tag(0x00100010), "PN", "Yamada^Tarou=山田^太郎")],
}


@pytest.mark.parametrize("implicit", [True, False], ids=["implicit", "explicit"])
@pytest.mark.parametrize("name", CASES)
def test_bytes_equal_pydicoms(name, implicit):
    match = Match(CASES[name])
    expected = bytes(encode(match.dataset(), implicit, True))
    assert encode_match(match, implicit) == expected
    assert len(expected) % 2 == 0
