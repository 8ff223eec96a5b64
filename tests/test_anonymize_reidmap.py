"""The encrypted re-identification map and re-identification through it."""

from __future__ import annotations

import sqlite3
from importlib import resources

import pytest
from pydicom import config
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from node.anonymize.anonymizer import Deidentifier
from node.anonymize.keys import ProjectKey
from node.anonymize.reidmap import (
    ReidentificationError,
    ReidentificationMap,
    reidentify_dataset,
    reidentify_uid,
)
from node.anonymize.settings import DeidSettings

KEY = ProjectKey(b"reid-test-key-0123456789abcdef!!")


@pytest.fixture(autouse=True)
def _quiet_validation(monkeypatch):
    monkeypatch.setattr(config.settings, "reading_validation_mode", config.IGNORE)


@pytest.fixture
def conn():
    connection = sqlite3.connect(":memory:")
    sql = resources.files("node.storage").joinpath(
        "migrations/0004_reidentification.sql").read_text()
    connection.executescript(sql)
    connection.executescript(sql)  # the migration is idempotent
    yield connection
    connection.close()


def _ct() -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.7.3"
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = "1.2.826.0.1.7.3"
    ds.StudyInstanceUID = "1.2.826.0.1.7"
    ds.SeriesInstanceUID = "1.2.826.0.1.7.1"
    ds.PatientName = "Harrowgate^Philomena"
    ds.PatientID = "MRN-778899"
    ds.IssuerOfPatientID = "EASTSIDE"
    ds.StudyDate = "20210405"
    ref = Dataset()
    ref.ReferencedSOPClassUID = CTImageStorage
    ref.ReferencedSOPInstanceUID = "1.2.826.0.1.7.2"
    ds.ReferencedImageSequence = Sequence([ref])
    ds.add_new(0x0012EE42, "UN", b"1.2.826.0.1.7.2\x00")  # unknown tag holding a UID
    return ds


def _deidentified():
    return Deidentifier(DeidSettings(), KEY).deidentify(_ct())


def test_record_is_idempotent_and_leaves_the_transaction_to_the_caller(conn):
    result = _deidentified()
    rmap = ReidentificationMap(KEY)
    assert rmap.record(conn, result.entries) == len(result.entries) == 5
    assert conn.in_transaction
    assert rmap.record(conn, result.entries) == 0
    conn.rollback()
    assert conn.execute("SELECT count(*) FROM reid_uid").fetchone()[0] == 0
    rmap.record(conn, result.entries)
    conn.commit()
    assert conn.execute("SELECT count(*) FROM reid_patient").fetchone()[0] == 1


def test_nothing_identifying_is_stored_in_clear(conn):
    result = _deidentified()
    ReidentificationMap(KEY).record(conn, result.entries)
    conn.commit()
    dump = "\n".join(conn.iterdump()).encode()
    blobs = b"".join(b for row in conn.execute("SELECT payload FROM reid_uid") for b in row)
    everything = dump + blobs
    for original in (b"Harrowgate", b"Philomena", b"MRN-778899", b"EASTSIDE",
                     b"1.2.826.0.1.7", result.dataset.PatientID.encode()):
        assert original not in everything


def test_lookups_return_the_originals(conn):
    result = _deidentified()
    rmap = ReidentificationMap(KEY)
    rmap.record(conn, result.entries)
    patient = rmap.lookup_patient(conn, result.dataset.PatientID)
    assert (patient.patient_id, patient.patient_name, patient.issuer) == (
        "MRN-778899", "Harrowgate^Philomena", "EASTSIDE")
    assert patient.date_offset_days == KEY.date_offset_days("EASTSIDE", "MRN-778899")
    assert rmap.lookup_uid(conn, result.dataset.StudyInstanceUID) == "1.2.826.0.1.7"
    assert reidentify_uid(conn, rmap, result.dataset.SOPInstanceUID) == "1.2.826.0.1.7.3"
    assert rmap.lookup_uid(conn, "2.25.1") is None
    with pytest.raises(ReidentificationError, match="not a pseudonymous UID"):
        reidentify_uid(conn, rmap, "2.25.1")


def test_a_wrong_key_is_reported_as_such(conn):
    result = _deidentified()
    ReidentificationMap(KEY).record(conn, result.entries)
    other = ReidentificationMap(ProjectKey(b"another-key-0123456789abcdef!!!!"))
    with pytest.raises(ReidentificationError, match=f"written under key {KEY.key_id}"):
        other.lookup_uid(conn, result.dataset.StudyInstanceUID)


def test_a_tampered_or_swapped_row_does_not_decrypt(conn):
    result = _deidentified()
    rmap = ReidentificationMap(KEY)
    rmap.record(conn, result.entries)
    study, series = result.dataset.StudyInstanceUID, result.dataset.SeriesInstanceUID
    conn.execute(
        "UPDATE reid_uid SET nonce = (SELECT nonce FROM reid_uid WHERE lookup = ?),"
        " payload = (SELECT payload FROM reid_uid WHERE lookup = ?) WHERE lookup = ?",
        (KEY.lookup("uid", series), KEY.lookup("uid", series), KEY.lookup("uid", study)),
    )
    with pytest.raises(ReidentificationError, match="does not decrypt"):
        rmap.lookup_uid(conn, study)


def test_record_rejects_foreign_objects(conn):
    with pytest.raises(TypeError):
        ReidentificationMap(KEY).record(conn, ["not an entry"])


def test_reidentify_dataset_restores_identifiers_references_and_dates(conn):
    result = _deidentified()
    rmap = ReidentificationMap(KEY)
    rmap.record(conn, result.entries)
    restored = reidentify_dataset(conn, rmap, result.dataset)
    original = _ct()
    for keyword in ("PatientID", "PatientName", "IssuerOfPatientID", "StudyInstanceUID",
                    "SeriesInstanceUID", "SOPInstanceUID", "StudyDate", "SOPClassUID"):
        assert restored[keyword].value == original[keyword].value, keyword
    assert restored.ReferencedImageSequence[0].ReferencedSOPInstanceUID == "1.2.826.0.1.7.2"
    assert result.dataset[0x0012EE42].value != original[0x0012EE42].value
    assert restored[0x0012EE42].value == original[0x0012EE42].value
    assert restored.file_meta.MediaStorageSOPInstanceUID == "1.2.826.0.1.7.3"
    assert "PatientIdentityRemoved" not in restored
    assert result.dataset.PatientID.startswith("LAMINA-")  # the input is left alone


def test_objects_made_after_deidentification_keep_their_own_dates_and_uids(conn):
    result = _deidentified()
    rmap = ReidentificationMap(KEY)
    rmap.record(conn, result.entries)
    seg = Dataset()
    seg.PatientID = result.dataset.PatientID
    seg.SOPInstanceUID = "2.25.4242"
    seg.ContentDate = "20240101"
    ref = Dataset()
    ref.ReferencedSOPInstanceUID = result.dataset.SOPInstanceUID
    seg.ReferencedImageSequence = Sequence([ref])
    restored = reidentify_dataset(conn, rmap, seg)
    assert restored.SOPInstanceUID == "2.25.4242"
    assert restored.ContentDate == "20240101"
    assert restored.ReferencedImageSequence[0].ReferencedSOPInstanceUID == "1.2.826.0.1.7.3"
    assert restored.PatientID == "MRN-778899"

