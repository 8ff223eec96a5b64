"""What the index keeps of an instance, and the statements that keep it.

Attribute values come from the header only (``stop_before_pixels``). Column
names are DICOM keywords in snake_case so the query matcher can map a key to
a column by rule.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass

from pydicom.dataset import Dataset

from node.storage import pn


def _text(ds: Dataset, keyword: str) -> str | None:
    """A single-valued attribute as text, or None when absent or empty."""
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    if isinstance(value, (list, tuple)) or getattr(value, "VM", 1) > 1:
        return "\\".join(str(v) for v in value)
    return str(value)


def _int(ds: Dataset, keyword: str) -> int | None:
    value = ds.get(keyword)
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


@dataclass(frozen=True)
class InstanceRecord:
    """The index row of one instance, across the four query levels."""

    patient_id: str
    issuer_of_patient_id: str
    patient_name: str | None
    patient_birth_date: str | None
    patient_sex: str | None
    study_instance_uid: str
    study_date: str | None
    study_time: str | None
    accession_number: str | None
    study_id: str | None
    study_description: str | None
    referring_physician_name: str | None
    series_instance_uid: str
    modality: str | None
    series_number: int | None
    series_description: str | None
    sop_instance_uid: str
    sop_class_uid: str
    instance_number: int | None
    series_date: str | None = None
    series_time: str | None = None
    content_date: str | None = None
    content_time: str | None = None
    acquisition_date_time: str | None = None

    @classmethod
    def from_dataset(cls, ds: Dataset) -> InstanceRecord:
        """Read the indexed attributes; raises ValueError when a key UID is missing."""
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"):
            if not _text(ds, keyword):
                raise ValueError(f"{keyword} is missing or empty")
        return cls(
            patient_id=_text(ds, "PatientID") or "",
            issuer_of_patient_id=_text(ds, "IssuerOfPatientID") or "",
            patient_name=_text(ds, "PatientName"),
            patient_birth_date=_text(ds, "PatientBirthDate"),
            patient_sex=_text(ds, "PatientSex"),
            study_instance_uid=str(ds.StudyInstanceUID),
            study_date=_text(ds, "StudyDate"),
            study_time=_text(ds, "StudyTime"),
            accession_number=_text(ds, "AccessionNumber"),
            study_id=_text(ds, "StudyID"),
            study_description=_text(ds, "StudyDescription"),
            referring_physician_name=_text(ds, "ReferringPhysicianName"),
            series_instance_uid=str(ds.SeriesInstanceUID),
            modality=_text(ds, "Modality"),
            series_number=_int(ds, "SeriesNumber"),
            series_description=_text(ds, "SeriesDescription"),
            sop_instance_uid=str(ds.SOPInstanceUID),
            sop_class_uid=str(ds.SOPClassUID),
            instance_number=_int(ds, "InstanceNumber"),
            series_date=_text(ds, "SeriesDate"),
            series_time=_text(ds, "SeriesTime"),
            content_date=_text(ds, "ContentDate"),
            content_time=_text(ds, "ContentTime"),
            acquisition_date_time=_text(ds, "AcquisitionDateTime"),
        )


@dataclass(frozen=True)
class Receipt:
    """Where and how an object arrived: stored with every row it produces."""

    blob_sha256: str
    blob_size: int
    transfer_syntax_uid: str
    calling_ae: str
    association_id: str
    received_at: str


def stored_blob_of(conn: sqlite3.Connection, sop_instance_uid: str) -> str | None:
    """The blob hash already indexed for this SOP Instance UID, if any."""
    row = conn.execute(
        "SELECT blob_sha256 FROM instance WHERE sop_instance_uid = ?", (sop_instance_uid,)
    ).fetchone()
    return row[0] if row else None


def insert_instance(conn: sqlite3.Connection, rec: InstanceRecord, receipt: Receipt) -> int:
    """Insert one new instance, creating its patient/study/series rows as needed.

    Runs inside the caller's write transaction. Existing patient/study/series
    rows keep their first-seen attributes (the validation step decides what a
    disagreeing resend means).
    """
    patient_fk = _upsert_id(
        conn,
        "SELECT id FROM patient WHERE patient_id = ? AND issuer_of_patient_id = ?",
        (rec.patient_id, rec.issuer_of_patient_id),
        _PATIENT_INSERT, _patient_values(rec),
    )
    study_fk = _upsert_id(
        conn,
        "SELECT id FROM study WHERE study_instance_uid = ?",
        (rec.study_instance_uid,),
        _STUDY_INSERT, _study_values(rec, patient_fk),
    )
    series_row = conn.execute(
        "SELECT id FROM series WHERE series_instance_uid = ?", (rec.series_instance_uid,)
    ).fetchone()
    if series_row:
        series_fk = series_row[0]
    else:
        series_fk = conn.execute(_SERIES_INSERT, _series_values(rec, study_fk)).lastrowid
        _add_modality(conn, study_fk, rec.modality)
    return conn.execute(_INSTANCE_INSERT, _instance_values(rec, receipt, series_fk)).lastrowid


_PATIENT_INSERT = (
    "INSERT INTO patient (patient_id, issuer_of_patient_id, patient_name, patient_birth_date,"
    " patient_sex, patient_name_key, patient_name_ideographic_key, patient_name_phonetic_key)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)
_STUDY_INSERT = (
    "INSERT INTO study (patient_fk, study_instance_uid, study_date, study_time,"
    " accession_number, study_id, study_description, referring_physician_name,"
    " referring_physician_name_key, referring_physician_name_ideographic_key,"
    " referring_physician_name_phonetic_key) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_SERIES_INSERT = (
    "INSERT INTO series (study_fk, series_instance_uid, modality, series_number,"
    " series_description, series_date, series_time) VALUES (?, ?, ?, ?, ?, ?, ?)"
)
_INSTANCE_INSERT = (
    "INSERT INTO instance (series_fk, sop_instance_uid, sop_class_uid, instance_number,"
    " blob_sha256, blob_size, transfer_syntax_uid, calling_ae, association_id, received_at,"
    " content_date, content_time, acquisition_date_time)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


def _patient_values(rec: InstanceRecord) -> tuple:
    return (rec.patient_id, rec.issuer_of_patient_id, rec.patient_name,
            rec.patient_birth_date, rec.patient_sex, *pn.keys(rec.patient_name))


def _study_values(rec: InstanceRecord, patient_fk: int) -> tuple:
    return (patient_fk, rec.study_instance_uid, rec.study_date, rec.study_time,
            rec.accession_number, rec.study_id, rec.study_description,
            rec.referring_physician_name, *pn.keys(rec.referring_physician_name))


def _series_values(rec: InstanceRecord, study_fk: int) -> tuple:
    return (study_fk, rec.series_instance_uid, rec.modality, rec.series_number,
            rec.series_description, rec.series_date, rec.series_time)


def _instance_values(rec: InstanceRecord, receipt: Receipt, series_fk: int) -> tuple:
    return (series_fk, rec.sop_instance_uid, rec.sop_class_uid, rec.instance_number,
            receipt.blob_sha256, receipt.blob_size, receipt.transfer_syntax_uid,
            receipt.calling_ae, receipt.association_id, receipt.received_at,
            rec.content_date, rec.content_time, rec.acquisition_date_time)


def bulk_insert(conn: sqlite3.Connection, items: Iterable[tuple[InstanceRecord, Receipt]]) -> int:
    """Insert many new instances in the caller's transaction; returns how many.

    The same rows :func:`insert_instance` writes, for loading an index in bulk
    (benchmarks, large test sets, a rebuild from the blob store): parent ids
    are cached, instances go in with ``executemany``, and ModalitiesInStudy is
    brought up to date once per study at the end instead of once per series.
    Instances whose SOP Instance UID is already indexed are skipped.
    """
    patients: dict[tuple[str, str], int] = {}
    studies: dict[str, int] = {}
    series: dict[str, int] = {}
    touched: set[int] = set()
    pending: list[tuple] = []
    count = 0
    for rec, receipt in items:
        key = (rec.patient_id, rec.issuer_of_patient_id)
        patient_fk = patients.get(key)
        if patient_fk is None:
            patient_fk = patients[key] = _upsert_id(
                conn, "SELECT id FROM patient WHERE patient_id = ? AND issuer_of_patient_id = ?",
                key, _PATIENT_INSERT, _patient_values(rec))
        study_fk = studies.get(rec.study_instance_uid)
        if study_fk is None:
            study_fk = studies[rec.study_instance_uid] = _upsert_id(
                conn, "SELECT id FROM study WHERE study_instance_uid = ?",
                (rec.study_instance_uid,), _STUDY_INSERT, _study_values(rec, patient_fk))
        series_fk = series.get(rec.series_instance_uid)
        if series_fk is None:
            series_fk = series[rec.series_instance_uid] = _upsert_id(
                conn, "SELECT id FROM series WHERE series_instance_uid = ?",
                (rec.series_instance_uid,), _SERIES_INSERT, _series_values(rec, study_fk))
            touched.add(study_fk)
        pending.append(_instance_values(rec, receipt, series_fk))
        if len(pending) >= 10_000:
            count += _insert_instances(conn, pending)
            pending.clear()
    count += _insert_instances(conn, pending)
    for study_fk in touched:
        conn.execute(
            "UPDATE study SET modalities_in_study = coalesce((SELECT group_concat(modality, '\\')"
            " FROM (SELECT DISTINCT modality FROM series WHERE study_fk = ?1"
            " AND modality IS NOT NULL AND modality <> '' ORDER BY modality)), '')"
            " WHERE id = ?1", (study_fk,))
    return count


def _insert_instances(conn: sqlite3.Connection, rows: list[tuple]) -> int:
    before = conn.total_changes
    conn.executemany(_INSTANCE_INSERT.replace("INSERT", "INSERT OR IGNORE", 1), rows)
    return conn.total_changes - before


def insert_conflict(
    conn: sqlite3.Connection, rec: InstanceRecord, receipt: Receipt, stored_sha256: str
) -> int:
    """Record different bytes under a known SOP Instance UID; idempotent per bytes."""
    conn.execute(
        "INSERT OR IGNORE INTO conflict (sop_instance_uid, sop_class_uid, blob_sha256,"
        " blob_size, transfer_syntax_uid, stored_blob_sha256, calling_ae, association_id,"
        " received_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (rec.sop_instance_uid, rec.sop_class_uid, receipt.blob_sha256, receipt.blob_size,
         receipt.transfer_syntax_uid, stored_sha256, receipt.calling_ae,
         receipt.association_id, receipt.received_at),
    )
    return conn.execute(
        "SELECT id FROM conflict WHERE sop_instance_uid = ? AND blob_sha256 = ?",
        (rec.sop_instance_uid, receipt.blob_sha256),
    ).fetchone()[0]


def _upsert_id(
    conn: sqlite3.Connection, select: str, key: tuple, insert: str, values: tuple
) -> int:
    row = conn.execute(select, key).fetchone()
    if row:
        return row[0]
    return conn.execute(insert, values).lastrowid


def _add_modality(conn: sqlite3.Connection, study_fk: int, modality: str | None) -> None:
    """Keep ModalitiesInStudy current as series of new modalities arrive."""
    if not modality:
        return
    current = conn.execute(
        "SELECT modalities_in_study FROM study WHERE id = ?", (study_fk,)
    ).fetchone()[0]
    modalities = set(filter(None, current.split("\\"))) | {modality}
    conn.execute(
        "UPDATE study SET modalities_in_study = ? WHERE id = ?",
        ("\\".join(sorted(modalities)), study_fk),
    )
