"""The bulk runner of ``lamina anonymize``: header-only work, the same bytes as encoding
the whole de-identified dataset, for every file the shortcut fits and every file it does
not (those take the whole-file route)."""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path

import pydicom.data
import pytest
from pydicom import config, dcmread
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from node.anonymize.anonymizer import Deidentifier, encode
from node.anonymize.bulk import NOT_DICOM, BulkAnonymizer
from node.anonymize.keys import ProjectKey
from node.anonymize.settings import DeidSettings, MaskRegion
from tests.phi_corpus import PATIENTS, STUDIES, Study, write_ct_series

KEY = ProjectKey(bytes(range(32)))
FILES = Path(pydicom.data.__file__).parent / "test_files"  # shipped with pydicom: no download
POLICIES = {
    "quarantine": DeidSettings(),
    "accept": DeidSettings(burned_in_policy="accept"),
    "mask": DeidSettings(burned_in_policy="mask", mask_regions=(MaskRegion(0, 0, 4, 4),)),
}


@pytest.fixture(autouse=True)
def _quiet_pydicom(monkeypatch):
    """As the command does (pydicom's warnings quote values), for this test only."""
    monkeypatch.setattr(config.settings, "reading_validation_mode", config.IGNORE)
    monkeypatch.setattr(config.settings, "writing_validation_mode", config.IGNORE)


def reference(engine: Deidentifier, path: Path) -> str | None:
    """The whole-file route's output name (the SHA-256 of its bytes), or None when the
    file is refused."""
    try:
        data = encode(engine.deidentify(dcmread(path)).dataset)
    except Exception:  # refused or unreadable: compared by outcome below
        return None
    return hashlib.sha256(data).hexdigest() + ".dcm"


def check_same_bytes(engine: Deidentifier, files: list[Path], out: Path) -> int:
    """Every file through the runner gives the reference's file; returns how many were
    written."""
    runner = BulkAnonymizer(engine, out, with_entries=False)
    written = 0
    for path in files:
        expected = reference(engine, path)
        try:
            outcome = runner.run(path)
        except Exception:  # the whole-file route raised as well
            assert expected is None, path.name
            continue
        if expected is None:
            assert outcome.skipped is not None, path.name
            continue
        assert outcome.skipped is None, (path.name, outcome.skipped)
        assert (out / expected).is_file(), path.name
        written += 1
    assert sorted(p.name for p in out.iterdir()) == sorted(
        hashlib.sha256(p.read_bytes()).hexdigest() + ".dcm" for p in out.iterdir())
    return written


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_pydicoms_test_files_give_the_whole_file_bytes(tmp_path, policy):
    """Explicit and implicit VR, big endian, deflated, encapsulated, odd sizes, icons in
    sequences, masked pixels: the runner writes what encoding the whole dataset writes."""
    files = sorted(FILES.glob("*.dcm"))
    written = check_same_bytes(Deidentifier(POLICIES[policy], KEY), files, tmp_path)
    assert written > 10


def test_a_ct_series_takes_the_header_only_route(tmp_path, monkeypatch):
    series = []
    for syntax, index in ((ExplicitVRLittleEndian, 1), (ImplicitVRLittleEndian, 2),
                          (ExplicitVRBigEndian, 3)):
        study = Study(PATIENTS[0], index, "20230314", syntax, n_slices=2)
        series += write_ct_series(study, tmp_path / "in" / str(index), rows=128, columns=128)
    engine = Deidentifier(DeidSettings(), KEY)
    expected = {reference(engine, p) for p in series}

    def whole(self, path):
        raise AssertionError(f"{path.name} took the whole-file route")

    monkeypatch.setattr(BulkAnonymizer, "_whole", whole)
    runner = BulkAnonymizer(engine, tmp_path / "out", with_entries=True)
    (tmp_path / "out").mkdir()
    outcomes = [runner.run(p) for p in series]
    assert all(o.skipped is None and o.entries for o in outcomes)
    assert {p.name for p in (tmp_path / "out").iterdir()} == expected


def test_data_after_the_pixels_and_truncated_pixels_take_the_whole_file_route(tmp_path, out_dir):
    series = write_ct_series(STUDIES[0], tmp_path / "in", rows=64, columns=64)
    ds = dcmread(series[0])
    ds.add_new(0xFFFCFFFC, "OB", b"\x00" * 64)  # DataSetTrailingPadding after the pixels
    ds.save_as(series[0])
    with open(series[1], "r+b") as f:
        f.truncate(os.path.getsize(series[1]) - 100)
    engine = Deidentifier(DeidSettings(), KEY)
    # pydicom reads a short pixel value as it is, and so does the whole-file route.
    assert check_same_bytes(engine, series, out_dir) == len(series)


@pytest.fixture
def out_dir(tmp_path) -> Path:
    out = tmp_path / "out-dir"
    out.mkdir()
    return out


def test_without_a_kernel_copy_the_bytes_are_the_same(tmp_path, out_dir, monkeypatch):
    """Another file system (EXDEV) or a kernel without copy_file_range or sendfile for
    files: the value is still copied, by plain reads and writes."""
    series = write_ct_series(STUDIES[0], tmp_path / "in", rows=64, columns=64)

    def refuse(*args, **kwargs):
        raise OSError(errno.EXDEV, "cross-device")

    monkeypatch.setattr(os, "copy_file_range", refuse)
    monkeypatch.setattr(os, "sendfile", refuse)
    assert check_same_bytes(Deidentifier(DeidSettings(), KEY), series, out_dir) == len(series)


def test_a_file_that_is_not_dicom_is_skipped_with_the_reason(tmp_path, out_dir):
    junk = tmp_path / "notes.txt"
    junk.write_text("Patient: Jane Doe\n")
    runner = BulkAnonymizer(Deidentifier(DeidSettings(), KEY), out_dir, with_entries=False)
    assert runner.run(junk).skipped == NOT_DICOM
    assert runner.run(tmp_path / "gone.dcm").skipped == NOT_DICOM
    assert list(out_dir.iterdir()) == []
