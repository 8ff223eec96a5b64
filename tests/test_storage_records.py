"""Index records (and geometry) read off undecoded headers (remembered per element bytes) are the
records of the same headers decoded: on pydicom's test files, character sets included,
and twice in a row (the second time from what was remembered). Both are what reading
every value with ``ds.get`` gives (the reading the shortcuts stand for)."""

from __future__ import annotations

from pathlib import Path

import pydicom.data
from pydicom import dcmread

from node.storage import records
from node.storage.records import InstanceGeometry, InstanceRecord


def _plainly(reader, ds, keyword):
    """What records._read stands for: the reader of the value ds.get gives."""
    return reader(ds.get(keyword)) if keyword in ds else None


def test_records_off_undecoded_headers_equal_records_off_decoded_ones(monkeypatch):
    folder = Path(pydicom.data.__file__).parent / "test_files"
    paths = sorted(p for p in folder.rglob("*") if p.is_file()
                   and p.stat().st_size < (1 << 20) and p.suffix in ("", ".dcm"))
    compared = 0
    for path in paths:
        try:
            decoded = dcmread(path, stop_before_pixels=True)
            decoded.walk(lambda _ds, _elem: None)  # every element decoded
            expected = (InstanceRecord.from_dataset(decoded),
                        InstanceGeometry.from_dataset(decoded))
        except Exception:
            continue  # no key UIDs, or not a dataset pydicom decodes whole
        with monkeypatch.context() as plain:
            plain.setattr(records, "_read", _plainly)
            assert (InstanceRecord.from_dataset(decoded), InstanceGeometry.from_dataset(
                decoded)) == expected, path
            undecoded = dcmread(path, stop_before_pixels=True)
            assert (InstanceRecord.from_dataset(undecoded), InstanceGeometry.from_dataset(
                undecoded)) == expected, path
        for _ in range(2):
            undecoded = dcmread(path, stop_before_pixels=True)
            assert (InstanceRecord.from_dataset(undecoded),
                    InstanceGeometry.from_dataset(undecoded)) == expected, path
        deferred = dcmread(path, stop_before_pixels=True, defer_size=2)  # values left on disk
        assert (InstanceRecord.from_dataset(deferred),
                InstanceGeometry.from_dataset(deferred)) == expected, path
        compared += 1
    assert compared > 40
