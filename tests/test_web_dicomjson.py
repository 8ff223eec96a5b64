"""DICOM JSON as the web front end writes it: query matches agree with pydicom's encoder, and
cached metadata completes its BulkDataURIs per request."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataelem import RawDataElement, convert_raw_data_element
from pydicom.dataset import Dataset
from pydicom.tag import Tag

from node.metadata import _plain, metadata
from node.phantom import Phantom
from node.storage.query import Match
from node.web.dicomjson import MetadataCache, match_json


def test_match_json_agrees_with_pydicom():
    elements = [
        (Tag(0x00080020), "DA", "20240105"), (Tag(0x00080050), "SH", ""),
        (Tag(0x00080061), "CS", ["CT", "MR"]), (Tag(0x00100010), "PN", "Doe^Jane=ド^ジ"),
        (Tag(0x00200011), "IS", 3), (Tag(0x00201208), "IS", "12"),
        (Tag(0x0020000D), "UI", "1.2.3"), (Tag(0x00081030), "LO", None),
        (Tag(0x00280030), "DS", "0.5\\0.5"),
    ]
    ours = match_json(elements)
    theirs = Match(elements).dataset().to_json_dict()
    assert ours == theirs


def test_metadata_cache_makes_bulk_uris_absolute(tmp_path: Path):
    ds: Dataset = Phantom(slices_count=1, rows=32, columns=32).slice(0)
    path = tmp_path / "ct.dcm"
    ds.save_as(path, enforce_file_format=True)
    loads = []
    cache = MetadataCache(lambda sha: loads.append(sha) or metadata(path, ""))
    body = cache.answer([cache.get("x" * 64)], "http://host:1/dicom-web")
    [item] = json.loads(body)
    direct = json.loads(metadata(path, "http://host:1/dicom-web"))
    assert item == direct
    assert item["7FE00010"]["BulkDataURI"] == (
        f"http://host:1/dicom-web/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
        f"/instances/{ds.SOPInstanceUID}/bulkdata/7FE00010")
    assert cache.used > 0 and cache.get("x" * 64) == cache.get("x" * 64)
    assert loads == ["x" * 64]  # loaded once, then answered from memory


def test_metadata_agrees_with_pydicom_for_everything_but_bulk_data(tmp_path: Path):
    """The raw-bytes fast path writes what pydicom's own encoder writes (CT and SEG)."""
    from tests.annotation_fixtures import PHANTOM, valid_seg

    ct = Phantom(slices_count=1, rows=32, columns=32).slice(0)
    for name, ds in (("ct", ct), ("seg", valid_seg(PHANTOM))):
        path = tmp_path / f"{name}.dcm"
        ds.save_as(path, enforce_file_format=True)
        ours = json.loads(metadata(path, "R"))
        theirs = dcmread(path).to_json_dict(1024, lambda elem: "bulk")
        for key, value in theirs.items():
            if "BulkDataURI" in value or key == "7FE00010":
                assert "BulkDataURI" in ours[key]
            else:
                assert ours[key] == value, key
        assert set(ours) == set(theirs)


@pytest.mark.parametrize(("vr", "raw"), [
    ("LO", b"  ab \\ c  "), ("SH", b" x"), ("PN", b"Doe^J=Y^Z "), ("LT", b" text \\ more  "),
    ("CS", b" A\\B "), ("UC", b"a\\b"), ("DS", b"1\\2.5 "), ("IS", b" 3"), ("UI", b"1.2.3\0"),
    ("DA", b"20240101"), ("LO", b""), ("US", b"\x01\x00\x02\x00"), ("FD", b"\0" * 8),
    ("LO", b"caf\xe9"), ("SH", b"a\\\\b"),
])
def test_raw_values_written_as_pydicom_writes_them(vr: str, raw: bytes):
    element = RawDataElement(Tag(0x00081030), vr, len(raw), raw, 0, False, True)
    fast = _plain(element, True)
    if fast is not None:  # None: left to pydicom (non-ASCII text, empty list items)
        assert fast == convert_raw_data_element(element).to_json_dict(None, 1 << 30)
