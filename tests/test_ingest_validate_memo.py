"""A validator that has checked other instances finds exactly what a fresh one finds.

Validator remembers some rules' results by the undecoded bytes they read
(node.ingest.validate.Validator._remembered). Over one series and many variants of its
slices (every rule broken, other encodings, character sets, sequences), each checked by
a fresh validator and then by one validator in one order and the reverse, the findings
are the same, message and detail alike.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ImplicitVRLittleEndian, MRImageStorage, RLELossless

from node.config import ValidationSettings
from node.ingest import validate
from node.ingest.iod import IODTables
from node.ingest.validate import Validator, read_received
from node.phantom import Phantom
from tests.harness import as_file


def _slice(index: int) -> Dataset:
    return Phantom(seed="memo", slices_count=6, rows=16, columns=16).slice(index)


def _code_without_meaning(ds: Dataset) -> None:
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator = "T-D0050", "SRT"
    ds.AnatomicRegionSequence = [code]


def _whole_code(ds: Dataset) -> None:
    _code_without_meaning(ds)
    ds.AnatomicRegionSequence[0].CodeMeaning = "Chest"


def _two_codes(ds: Dataset) -> None:
    _whole_code(ds)
    second = Dataset()
    second.CodeValue, second.CodingSchemeDesignator = "T-D4000", "SRT"  # no CodeMeaning
    ds.AnatomicRegionSequence.append(second)


def _undefined_length_codes(ds: Dataset) -> None:
    _two_codes(ds)
    ds["AnatomicRegionSequence"].is_undefined_length = True  # decoded as it is read


def _implicit(ds: Dataset) -> None:
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian


def _latin1(ds: Dataset) -> None:
    ds.SpecificCharacterSet = "ISO_IR 100"


def _latin1_implicit(ds: Dataset) -> None:
    _latin1(ds)
    _implicit(ds)


def _rle_3_frames(ds: Dataset) -> None:
    ds.compress(RLELossless)
    ds.NumberOfFrames = 3


def _mr_class(ds: Dataset) -> None:
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = MRImageStorage


def _set(**values) -> Callable[[Dataset], None]:
    def change(ds: Dataset) -> None:
        for keyword, value in values.items():
            setattr(ds, keyword, value)
    return change


def _del(*keywords: str) -> Callable[[Dataset], None]:
    def change(ds: Dataset) -> None:
        for keyword in keywords:
            delattr(ds, keyword)
    return change


VARIANTS: dict[str, Callable[[Dataset], None]] = {
    "clean": lambda ds: None,
    "implicit": _implicit,
    "latin1": _latin1,
    "latin1-implicit": _latin1_implicit,
    "no-rows": _del("Rows"),
    "rows-empty": _set(Rows=None),
    "bits-8": _set(BitsAllocated=8, BitsStored=8, HighBit=7),
    "frames-2": _set(NumberOfFrames=2),
    "frames-0": _set(NumberOfFrames=0),
    "ybr-422": _set(PhotometricInterpretation="YBR_FULL_422", SamplesPerPixel=3),
    "samples-3": _set(SamplesPerPixel=3),
    "short-pixels": lambda ds: setattr(ds, "PixelData", ds.PixelData[:256]),
    "no-pixels": _del("PixelData"),
    "rle": lambda ds: ds.compress(RLELossless),
    "rle-3-frames": _rle_3_frames,
    "modality-mr": _set(Modality="MR"),
    "modality-empty": _set(Modality=""),
    "mr-class": _mr_class,
    "iop-5": _set(ImageOrientationPatient=[1, 0, 0, 0, 1]),
    "iop-skew": _set(ImageOrientationPatient=[1, 0, 0, 0.6, 0.8, 0]),
    "iop-zero": _set(ImageOrientationPatient=[0, 0, 0, 0, 0, 0]),
    "spacing-negative": _set(PixelSpacing=[0.7, -1]),
    "spacing-one": _set(PixelSpacing=[0.7]),
    "thickness-negative": _set(SliceThickness="-1"),
    "thickness-empty": _set(SliceThickness=None),
    "no-thickness": _del("SliceThickness"),
    "no-sex": _del("PatientSex"),
    "no-type1s": _del("Rows", "Columns", "Modality"),
    "sequence": _code_without_meaning,
    "sequence-whole": _whole_code,  # the same tags present as "sequence", no finding
    "sequence-two": _two_codes,
    "sequence-undefined-length": _undefined_length_codes,
    "bad-series-uid": _set(SeriesInstanceUID="1.2..3"),
}


def files(tmp_path: Path) -> dict[str, Path]:
    out = {}
    for index in range(3):  # the same variant on other slices: remembered results are used
        for name, change in VARIANTS.items():
            ds = _slice(index)
            change(ds)
            path = tmp_path / f"{name}-{index}.dcm"
            path.write_bytes(as_file(ds))
            out[f"{name}-{index}"] = path
    return out


@pytest.fixture(scope="module")
def tables(tmp_path_factory) -> IODTables:
    return IODTables.load(tmp_path_factory.mktemp("cache"))


def test_a_seasoned_validator_finds_what_a_fresh_one_finds(tmp_path, tables, monkeypatch):
    paths = files(tmp_path)
    fresh = {name: Validator(ValidationSettings(), tables).check(read_received(path))
             for name, path in paths.items()}
    assert len({repr(f) for f in fresh.values()}) >= 20  # the variants differ in findings

    runs = []
    original = validate._pixels
    monkeypatch.setattr(validate, "_pixels", lambda *a: runs.append(1) or original(*a))
    seasoned = Validator(ValidationSettings(), tables)
    for order in (list(paths), list(reversed(paths))):
        for name in order:
            assert seasoned.check(read_received(paths[name])) == fresh[name], name
    assert len(runs) < len(paths)  # results were remembered, not run again each time


def test_the_memo_is_bounded(tmp_path, tables, monkeypatch):
    monkeypatch.setattr(validate, "MEMO_ENTRIES", 3)
    validator = Validator(ValidationSettings(), tables)
    for name, path in files(tmp_path).items():
        validator.check(read_received(path))
        assert len(validator._memo) <= 3, name
