"""The planted-PHI corpus end to end: no leaks, references intact, pseudonyms stable."""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
import zlib
from collections import defaultdict
from datetime import date
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.uid import DeflatedExplicitVRLittleEndian

from node.anonymize.anonymizer import BurnedInTextRisk, Deidentifier, encode
from node.anonymize.keys import decode_key, encode_key
from node.anonymize.settings import DeidSettings
from tests.phi_corpus import PATIENTS, STUDIES, UNKNOWN_PUBLIC_UID_TAG

KEY_TEXT = encode_key(b"corpus-test-key-0123456789abcdef")


pytestmark = pytest.mark.usefixtures("quiet_pydicom_validation")


@pytest.fixture(scope="module")
def outputs(corpus) -> dict[Path, bytes]:
    engine = Deidentifier(DeidSettings(), decode_key(KEY_TEXT))
    return {path: encode(engine.deidentify(dcmread(path)).dataset) for path in corpus.files}


def _parsed(data: bytes) -> Dataset:
    return dcmread(DicomBytesIO(data))


def _searchable(data: bytes) -> bytes:
    """Output bytes with a deflated body inflated, so planted text cannot hide."""
    meta_end = 144 + struct.unpack("<I", data[140:144])[0]
    if DeflatedExplicitVRLittleEndian.encode() in data[132:meta_end]:
        return data[:meta_end] + zlib.decompress(data[meta_end:], -15)
    return data


def _walk(ds: Dataset):
    for elem in ds:
        yield elem
        if elem.VR == "SQ":
            for item in elem.value:
                yield from _walk(item)


def test_corpus_really_plants_phi(corpus):
    found = set()
    for path in corpus.files:
        text = _searchable(path.read_bytes()).lower()
        found |= {v for v in corpus.planted if v.lower().encode() in text}
    assert found == corpus.planted  # every planted value is in the input somewhere
    assert len(corpus.planted) > 100


def test_no_planted_value_survives_anywhere_in_the_output_bytes(corpus, outputs):
    leaks = {
        (path.name, value)
        for path, data in outputs.items()
        for value in corpus.planted
        if value.lower().encode() in _searchable(data).lower()
    }
    assert leaks == set()


def test_every_reference_resolves(corpus, outputs):
    parsed = {path: _parsed(data) for path, data in outputs.items()}
    instances = {ds.SOPInstanceUID for ds in parsed.values()}
    series = {ds.SeriesInstanceUID for ds in parsed.values()}
    frames = {ds.FrameOfReferenceUID for ds in parsed.values() if "FrameOfReferenceUID" in ds}
    references = 0
    for ds in parsed.values():
        for elem in _walk(ds):
            if elem.keyword == "ReferencedSOPInstanceUID":
                assert elem.value in instances
                references += 1
            elif elem.keyword == "SeriesInstanceUID":
                assert elem.value in series
        if UNKNOWN_PUBLIC_UID_TAG in ds:
            assert ds[UNKNOWN_PUBLIC_UID_TAG].value.rstrip(b"\x00").decode() in instances
            references += 1
    assert references > 40
    seg = parsed[corpus.seg]
    ct = parsed[corpus.ct[("A", 1)][0]]
    assert seg.FrameOfReferenceUID == ct.FrameOfReferenceUID in frames
    assert seg.StudyInstanceUID == ct.StudyInstanceUID
    assert seg.PatientID == ct.PatientID
    referenced = {i.ReferencedSOPInstanceUID
                  for s in seg.ReferencedSeriesSequence for i in s.ReferencedInstanceSequence}
    assert referenced == {parsed[p].SOPInstanceUID for p in corpus.ct[("A", 1)]}


def test_unknown_public_uid_from_implicit_vr_is_remapped_with_its_target(corpus, outputs):
    paths = corpus.ct[("A", 2)]  # the implicit VR little endian study
    first = _parsed(outputs[paths[0]])
    for path in paths:
        assert dcmread(path)[UNKNOWN_PUBLIC_UID_TAG].VR == "UN"
        value = _parsed(outputs[path])[UNKNOWN_PUBLIC_UID_TAG].value.rstrip(b"\x00").decode()
        assert value == first.SOPInstanceUID


def test_pseudonyms_are_consistent_across_files_and_distinct_across_patients(corpus, outputs):
    by_patient: dict[str, set[str]] = defaultdict(set)
    by_study: dict[tuple[str, int], set[str]] = defaultdict(set)
    for (patient, study), paths in corpus.ct.items():
        for path in paths:
            ds = _parsed(outputs[path])
            by_patient[patient].add(ds.PatientID)
            by_study[(patient, study)].add(ds.StudyInstanceUID)
            assert ds.PatientName == "LAMINA^" + ds.PatientID.split("-", 1)[1]
    assert all(len(ids) == 1 for ids in by_patient.values())
    assert all(len(uids) == 1 for uids in by_study.values())
    assert len({next(iter(ids)) for ids in by_patient.values()}) == len(PATIENTS)
    assert by_study[("A", 1)] != by_study[("A", 2)]


def test_a_restart_gives_byte_identical_output(corpus, outputs):
    fresh = Deidentifier(DeidSettings(), decode_key(KEY_TEXT))  # new process, same key
    for path in corpus.files:
        assert encode(fresh.deidentify(dcmread(path)).dataset) == outputs[path]


def test_output_is_deterministic_for_the_same_input(corpus, outputs):
    engine = Deidentifier(DeidSettings(), decode_key(KEY_TEXT))
    path = corpus.seg
    assert encode(engine.deidentify(dcmread(path)).dataset) == outputs[path]
    assert encode(engine.deidentify(dcmread(path)).dataset) == outputs[path]


def test_pixel_data_and_transfer_syntax_are_unchanged(corpus, outputs):
    for path, data in outputs.items():
        original, result = dcmread(path), _parsed(data)
        assert result.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
        assert bytes(result.PixelData) == bytes(original.PixelData)


def test_intervals_between_a_patients_studies_survive(corpus, outputs):
    def day(value: str) -> date:
        return date(int(value[:4]), int(value[4:6]), int(value[6:8]))

    first = _parsed(outputs[corpus.ct[("A", 1)][0]]).StudyDate
    second = _parsed(outputs[corpus.ct[("A", 2)][0]]).StudyDate
    original = day(STUDIES[1].study_date) - day(STUDIES[0].study_date)
    assert day(second) - day(first) == original
    assert first != STUDIES[0].study_date


def test_screen_captures_are_refused_and_clean_ultrasound_is_not(corpus):
    engine = Deidentifier(DeidSettings(), decode_key(KEY_TEXT))
    with pytest.raises(BurnedInTextRisk, match="Secondary Capture"):
        engine.deidentify(dcmread(corpus.screen_capture))
    assert engine.deidentify(dcmread(corpus.ultrasound_no_text)).dataset.PatientID


def test_clean_graphics_keeps_overlays_but_not_their_planted_labels(corpus):
    engine = Deidentifier(DeidSettings(clean_graphics=True), decode_key(KEY_TEXT))
    path = corpus.ct[("A", 1)][0]
    original = dcmread(path)
    data = encode(engine.deidentify(original).dataset)
    result = _parsed(data)
    assert result[0x60003000].value == original[0x60003000].value
    assert 0x60001500 not in result and 0x60000022 not in result
    assert not {v for v in corpus.planted if v.lower().encode() in data.lower()}


def test_safe_private_from_implicit_vr_is_kept_with_its_uid_remapped(corpus, outputs):
    from node.anonymize.settings import SafePrivateTag
    from tests.phi_corpus import PRIVATE_CREATOR

    settings = DeidSettings(retain_safe_private=True, safe_private=(
        SafePrivateTag(PRIVATE_CREATOR, 0x03), SafePrivateTag(PRIVATE_CREATOR, 0x04),
        SafePrivateTag(PRIVATE_CREATOR, 0x01)))
    engine = Deidentifier(settings, decode_key(KEY_TEXT))
    paths = corpus.ct[("A", 2)]  # implicit VR: private elements arrive as UN
    result = engine.deidentify(dcmread(paths[0])).dataset
    target = _parsed(outputs[paths[1]]).SOPInstanceUID  # element 0x03 references slice 1
    assert result[0x00090010].value == PRIVATE_CREATOR
    assert result[0x00091003].value.rstrip(b"\x00").decode() == target
    assert result[0x00091004].value == b"\x07\x00"
    assert 0x00091001 not in result  # safe-listed, but it names the patient
    assert 0x00091005 not in result and 0x00111010 not in result


def _errors(path: Path) -> set[str]:
    # dciodvfy exits non-zero whenever it reports anything; the messages are the result.
    run = subprocess.run(["dciodvfy", str(path)], check=False, capture_output=True, text=True,
                         timeout=60)
    lines = (run.stdout + run.stderr).splitlines()
    # Messages quote values; compare what is wrong, not with which value.
    return {re.sub(r"<[^>]*>|= '.'.*$", "", line).strip()
            for line in lines if line.startswith("Error")}


@pytest.mark.skipif(shutil.which("dciodvfy") is None,
                    reason="dciodvfy not installed (Debian package dicom3tools)")
def test_dciodvfy_reports_no_new_errors(corpus, outputs, tmp_path):
    for path in (corpus.ct[("A", 1)][1], corpus.seg):
        out = tmp_path / path.name
        out.write_bytes(outputs[path])
        assert _errors(out) <= _errors(path), path.name
