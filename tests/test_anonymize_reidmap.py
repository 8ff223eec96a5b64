"""The encrypted re-identification map and re-identification through it."""

from __future__ import annotations

import pytest
from pydicom import config
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from node.anonymize.anonymizer import Deidentifier, PatientEntry
from node.anonymize.keys import ProjectKey
from node.anonymize.reidmap import (
    ReidentificationError,
    ReidentificationMap,
    reidentify_dataset,
    reidentify_uid,
)
from node.anonymize.settings import DeidSettings
from node.anonymize.temporal import TIMES_SHIFTED, TemporalOffset, shift_value
from node.storage.sqlite.index import SqliteIndex

KEY = ProjectKey(b"reid-test-key-0123456789abcdef!!")


@pytest.fixture(autouse=True)
def _quiet_validation(monkeypatch):
    monkeypatch.setattr(config.settings, "reading_validation_mode", config.IGNORE)


@pytest.fixture
def index(tmp_path):
    store = SqliteIndex(tmp_path / "index.sqlite3")
    store.migrate()
    store.migrate()  # migrating again changes nothing
    yield store
    store.close()


class _Rollback(Exception):
    """Raised to leave a transaction without committing it."""


def _recorded(index, entries) -> None:
    with index.transaction() as tx:
        ReidentificationMap(KEY).record(tx, entries)


def _count(index, table: str) -> int:
    with index.connection() as conn:
        return conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]


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


def test_record_is_idempotent_and_leaves_the_transaction_to_the_caller(index):
    result = _deidentified()
    rmap = ReidentificationMap(KEY)
    with pytest.raises(_Rollback), index.transaction() as tx:
        assert rmap.record(tx, result.entries) == len(result.entries) == 5
        assert _count(index, "reid_uid") == 0  # not committed: nothing visible elsewhere
        assert rmap.record(tx, result.entries) == 0
        raise _Rollback
    assert _count(index, "reid_uid") == 0
    _recorded(index, result.entries)
    assert _count(index, "reid_patient") == 1


def test_nothing_identifying_is_stored_in_clear(index):
    result = _deidentified()
    _recorded(index, result.entries)
    with index.connection() as conn:
        dump = "\n".join(conn.iterdump()).encode()
        blobs = b"".join(b for row in conn.execute("SELECT payload FROM reid_uid") for b in row)
    everything = dump + blobs
    for original in (b"Harrowgate", b"Philomena", b"MRN-778899", b"EASTSIDE",
                     b"1.2.826.0.1.7", result.dataset.PatientID.encode()):
        assert original not in everything


def test_lookups_return_the_originals(index):
    result = _deidentified()
    rmap = ReidentificationMap(KEY)
    _recorded(index, result.entries)
    with index.reader() as reader:
        patient = rmap.lookup_patient(reader, result.dataset.PatientID)
        assert (patient.patient_id, patient.patient_name, patient.issuer) == (
            "MRN-778899", "Harrowgate^Philomena", "EASTSIDE")
        assert patient.date_offset_days == KEY.date_offset_days("EASTSIDE", "MRN-778899")
        assert rmap.lookup_uid(reader, result.dataset.StudyInstanceUID) == "1.2.826.0.1.7"
        assert reidentify_uid(reader, rmap, result.dataset.SOPInstanceUID) == "1.2.826.0.1.7.3"
        assert rmap.lookup_uid(reader, "2.25.1") is None
        with pytest.raises(ReidentificationError, match="not a pseudonymous UID"):
            reidentify_uid(reader, rmap, "2.25.1")


def test_a_wrong_key_is_reported_as_such(index):
    result = _deidentified()
    _recorded(index, result.entries)
    other = ReidentificationMap(ProjectKey(b"another-key-0123456789abcdef!!!!"))
    with pytest.raises(ReidentificationError, match=f"written under key {KEY.key_id}"), \
            index.reader() as conn:
        other.lookup_uid(conn, result.dataset.StudyInstanceUID)


def test_a_tampered_or_swapped_row_does_not_decrypt(index):
    result = _deidentified()
    rmap = ReidentificationMap(KEY)
    _recorded(index, result.entries)
    study, series = result.dataset.StudyInstanceUID, result.dataset.SeriesInstanceUID
    with index.connection() as conn:
        conn.execute(
            "UPDATE reid_uid SET nonce = (SELECT nonce FROM reid_uid WHERE lookup = ?),"
            " payload = (SELECT payload FROM reid_uid WHERE lookup = ?) WHERE lookup = ?",
            (KEY.lookup("uid", series), KEY.lookup("uid", series), KEY.lookup("uid", study)),
        )
    with pytest.raises(ReidentificationError, match="does not decrypt"), \
            index.reader() as conn:
        rmap.lookup_uid(conn, study)


def test_record_rejects_foreign_objects(index):
    with pytest.raises(TypeError), index.transaction() as tx:
        ReidentificationMap(KEY).record(tx, ["not an entry"])


def test_reidentify_dataset_restores_identifiers_references_and_dates(index):
    result = _deidentified()
    rmap = ReidentificationMap(KEY)
    _recorded(index, result.entries)
    with index.reader() as conn:
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


def test_objects_made_after_deidentification_keep_their_own_dates_and_uids(index):
    result = _deidentified()
    rmap = ReidentificationMap(KEY)
    _recorded(index, result.entries)
    seg = Dataset()
    seg.PatientID = result.dataset.PatientID
    seg.SOPInstanceUID = "2.25.4242"
    seg.ContentDate = "20240101"
    ref = Dataset()
    ref.ReferencedSOPInstanceUID = result.dataset.SOPInstanceUID
    seg.ReferencedImageSequence = Sequence([ref])
    with index.reader() as conn:
        restored = reidentify_dataset(conn, rmap, seg)
    assert restored.SOPInstanceUID == "2.25.4242"
    assert restored.ContentDate == "20240101"
    assert restored.ReferencedImageSequence[0].ReferencedSOPInstanceUID == "1.2.826.0.1.7.3"
    assert restored.PatientID == "MRN-778899"



def _timed_ct() -> Dataset:
    ds = _ct()
    ds.StudyTime = "234500"
    ds.SeriesDate, ds.SeriesTime = "20210406", "001000.5"
    ds.AcquisitionDateTime = "20210406001500"
    return ds


@pytest.mark.parametrize("old_row", [False, True])
def test_dates_and_times_map_back_also_from_rows_without_minutes(index, old_row):
    """Rows recorded before times were shifted hold no minutes: the key gives them."""
    result = Deidentifier(DeidSettings(), KEY).deidentify(_timed_ct())
    patient, *uids = result.entries
    if old_row:
        patient = PatientEntry(**{**vars(patient), "time_offset_minutes": None})
    _recorded(index, [patient, *uids])
    assert result.dataset.StudyTime != "234500"
    with index.reader() as reader:
        back = reidentify_dataset(reader, ReidentificationMap(KEY), result.dataset)
    original = _timed_ct()
    for keyword in ("StudyDate", "StudyTime", "SeriesDate", "SeriesTime", "AcquisitionDateTime"):
        assert back[keyword].value == original[keyword].value, keyword


def test_objects_from_before_times_were_shifted_keep_their_times(index):
    result = Deidentifier(DeidSettings(), KEY).deidentify(_timed_ct())
    _recorded(index, result.entries)
    legacy = result.dataset
    legacy.DeidentificationMethod = [m for m in legacy.DeidentificationMethod
                                     if m != TIMES_SHIFTED]
    legacy.StudyTime = "234500"  # as de-identification left times then
    with index.reader() as reader:
        back = reidentify_dataset(reader, ReidentificationMap(KEY), legacy)
    assert back.StudyTime == "234500"
    # The date moves back by the days alone (the pair was shifted by days then).
    offset = KEY.temporal_offset("EASTSIDE", "MRN-778899")
    assert back.StudyDate == shift_value("DA", legacy.StudyDate, TemporalOffset(offset.days),
                                         reverse=True)
