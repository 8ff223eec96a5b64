"""The SQLite repositories: every statement the node runs against its index, outside the matcher.

A :class:`Session` wraps one connection (a read snapshot, or a write
transaction opened by :meth:`SqliteIndex.transaction`) and exposes the
repositories of :mod:`node.storage.interface`. Statements stay portable where
that costs nothing (``INSERT … ON CONFLICT``, ``RETURNING`` instead of
``lastrowid``), so the PostgreSQL backend can mostly share their shape.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from typing import Any

from node.storage import pn
from node.storage.interface import NewQuarantine
from node.storage.records import (
    AnnotationFindingRow,
    AuditRow,
    FindingRow,
    InstanceGeometry,
    InstanceRecord,
    QuarantineRow,
    Receipt,
    RoiRow,
    Row,
    SeriesFindingRow,
    SeriesRows,
    SeriesStateRow,
    SignatureRow,
    StoredRef,
    StructureRow,
    UserRow,
)
from node.storage.sqlite.agreement import SqliteAgreement
from node.storage.sqlite.outbox import SqliteOutbox


class Session:
    """One connection's view of the index, through its repositories."""

    __slots__ = ("agreement", "annotations", "audit", "conn", "evidence", "instances", "outbox",
                 "quarantine", "reid", "reports", "series", "signatures", "users")

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.instances = SqliteInstances(conn)
        self.series = SqliteSeries(conn)
        self.annotations = SqliteAnnotations(conn)
        self.quarantine = SqliteQuarantine(conn)
        self.audit = SqliteAudit(conn)
        self.reid = SqliteReid(conn)
        self.evidence = SqliteEvidence(conn)
        self.reports = SqliteReports(conn)
        self.users = SqliteUsers(conn)
        self.signatures = SqliteSignatures(conn)
        self.outbox = SqliteOutbox(conn)
        self.agreement = SqliteAgreement(conn)


class _Repo:
    __slots__ = ("conn",)

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def _id(self, sql: str, params: tuple) -> int:
        """Run an ``INSERT … RETURNING id`` and return the id."""
        return self.conn.execute(sql, params).fetchone()[0]


# --- instances ----------------------------------------------------------------

_PATIENT_INSERT = (
    "INSERT INTO patient (patient_id, issuer_of_patient_id, patient_name, patient_birth_date,"
    " patient_sex, patient_name_key, patient_name_ideographic_key, patient_name_phonetic_key)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?) RETURNING id"
)
_STUDY_INSERT = (
    "INSERT INTO study (patient_fk, study_instance_uid, study_date, study_time,"
    " accession_number, study_id, study_description, referring_physician_name,"
    " referring_physician_name_key, referring_physician_name_ideographic_key,"
    " referring_physician_name_phonetic_key) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
    " RETURNING id"
)
_SERIES_INSERT = (
    "INSERT INTO series (study_fk, series_instance_uid, modality, series_number,"
    " series_description, series_date, series_time) VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING id"
)
_INSTANCE_COLUMNS = (
    "INSERT INTO instance (series_fk, sop_instance_uid, sop_class_uid, instance_number,"
    " blob_sha256, blob_size, transfer_syntax_uid, calling_ae, association_id, received_at,"
    " content_date, content_time, acquisition_date_time)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_PATIENT_SELECT = "SELECT id FROM patient WHERE patient_id = ? AND issuer_of_patient_id = ?"
_STUDY_SELECT = "SELECT id FROM study WHERE study_instance_uid = ?"
_SERIES_SELECT = "SELECT id FROM series WHERE series_instance_uid = ?"
_SERIES_OF_STUDY_OF_PATIENT = (
    "SELECT se.id FROM series se JOIN study st ON st.id = se.study_fk"
    " JOIN patient p ON p.id = st.patient_fk WHERE se.series_instance_uid = ?"
    " AND st.study_instance_uid = ? AND p.patient_id = ? AND p.issuer_of_patient_id = ?"
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


class SqliteInstances(_Repo):
    __slots__ = ()

    def blob_of(self, sop_instance_uid: str) -> str | None:
        row = self.conn.execute(
            "SELECT blob_sha256 FROM instance WHERE sop_instance_uid = ?", (sop_instance_uid,)
        ).fetchone()
        return row[0] if row else None

    def stored(self, sop_instance_uid: str) -> StoredRef | None:
        row = self.conn.execute(
            "SELECT i.blob_sha256, s.series_instance_uid FROM instance i"
            " JOIN series s ON s.id = i.series_fk WHERE i.sop_instance_uid = ?",
            (sop_instance_uid,)).fetchone()
        return StoredRef(sop_instance_uid, row[0], row[1]) if row else None

    def holds_uid(self, uid: str) -> bool:
        return self.conn.execute(
            "SELECT EXISTS (SELECT 1 FROM study WHERE study_instance_uid = ?)"
            " OR EXISTS (SELECT 1 FROM series WHERE series_instance_uid = ?)"
            " OR EXISTS (SELECT 1 FROM instance WHERE sop_instance_uid = ?)"
            " OR EXISTS (SELECT 1 FROM instance_geometry WHERE frame_of_reference_uid = ?)",
            (uid, uid, uid, uid)).fetchone()[0] == 1

    def patient_of_study(self, study_instance_uid: str) -> tuple[str, str] | None:
        row = self.conn.execute(
            "SELECT p.patient_id, p.issuer_of_patient_id FROM study s"
            " JOIN patient p ON p.id = s.patient_fk WHERE s.study_instance_uid = ?",
            (study_instance_uid,)).fetchone()
        return (row[0], row[1]) if row else None

    def series_members(self, series_instance_uid: str) -> list[tuple[int, str]]:
        return [(r[0], r[1]) for r in self.conn.execute(
            "SELECT i.id, i.blob_sha256 FROM instance i JOIN series s ON s.id = i.series_fk"
            " WHERE s.series_instance_uid = ? ORDER BY i.id", (series_instance_uid,))]

    def insert(self, rec: InstanceRecord, receipt: Receipt) -> int:
        """Existing patient/study/series rows keep their first-seen attributes (the
        validation step decides what a disagreeing resend means).

        Most instances join a series already indexed under the same study and patient:
        one query finds it, where the patient, study and series lookups below would
        each find their row and insert nothing."""
        row = self.conn.execute(_SERIES_OF_STUDY_OF_PATIENT, (
            rec.series_instance_uid, rec.study_instance_uid, rec.patient_id,
            rec.issuer_of_patient_id)).fetchone()
        if row:
            series_fk = row[0]
        else:
            patient_fk = self._upsert_id(_PATIENT_SELECT,
                                         (rec.patient_id, rec.issuer_of_patient_id),
                                         _PATIENT_INSERT, partial(_patient_values, rec))
            study_fk = self._upsert_id(_STUDY_SELECT, (rec.study_instance_uid,),
                                       _STUDY_INSERT, partial(_study_values, rec, patient_fk))
            row = self.conn.execute(_SERIES_SELECT, (rec.series_instance_uid,)).fetchone()
            if row:
                series_fk = row[0]
            else:
                series_fk = self._id(_SERIES_INSERT, _series_values(rec, study_fk))
                self._add_modality(study_fk, rec.modality)
        return self._id(_INSTANCE_COLUMNS + " RETURNING id",
                        _instance_values(rec, receipt, series_fk))

    def bulk_insert(self, items: Iterable[tuple[InstanceRecord, Receipt]]) -> int:
        """The same rows :meth:`insert` writes, for loading an index in bulk: parent ids
        are cached, instances go in with ``executemany``, and ModalitiesInStudy is
        brought up to date once per study at the end instead of once per series.
        Instances whose SOP Instance UID is already indexed are skipped."""
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
                patient_fk = patients[key] = self._upsert_id(
                    _PATIENT_SELECT, key, _PATIENT_INSERT, partial(_patient_values, rec))
            study_fk = studies.get(rec.study_instance_uid)
            if study_fk is None:
                study_fk = studies[rec.study_instance_uid] = self._upsert_id(
                    _STUDY_SELECT, (rec.study_instance_uid,), _STUDY_INSERT,
                    partial(_study_values, rec, patient_fk))
            series_fk = series.get(rec.series_instance_uid)
            if series_fk is None:
                series_fk = series[rec.series_instance_uid] = self._upsert_id(
                    _SERIES_SELECT, (rec.series_instance_uid,), _SERIES_INSERT,
                    partial(_series_values, rec, study_fk))
                touched.add(study_fk)
            pending.append(_instance_values(rec, receipt, series_fk))
            if len(pending) >= 10_000:
                count += self._insert_instances(pending)
                pending.clear()
        count += self._insert_instances(pending)
        for study_fk in touched:
            self._refresh_modalities(study_fk)
        return count

    def _refresh_modalities(self, study_fk: int) -> None:
        """ModalitiesInStudy rebuilt from the study's series (after a bulk insert)."""
        self.conn.execute(
            "UPDATE study SET modalities_in_study = coalesce((SELECT group_concat(modality,"
            " '\\') FROM (SELECT DISTINCT modality FROM series WHERE study_fk = ?1"
            " AND modality IS NOT NULL AND modality <> '' ORDER BY modality)), '')"
            " WHERE id = ?1", (study_fk,))

    def _insert_instances(self, rows: list[tuple]) -> int:
        before = self.conn.total_changes
        self.conn.executemany(_INSTANCE_COLUMNS + " ON CONFLICT (sop_instance_uid) DO NOTHING",
                              rows)
        return self.conn.total_changes - before

    def insert_conflict(self, rec: InstanceRecord, receipt: Receipt, stored_sha256: str) -> int:
        self.conn.execute(
            "INSERT INTO conflict (sop_instance_uid, sop_class_uid, blob_sha256,"
            " blob_size, transfer_syntax_uid, stored_blob_sha256, calling_ae, association_id,"
            " received_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (sop_instance_uid, blob_sha256) DO NOTHING",
            (rec.sop_instance_uid, rec.sop_class_uid, receipt.blob_sha256, receipt.blob_size,
             receipt.transfer_syntax_uid, stored_sha256, receipt.calling_ae,
             receipt.association_id, receipt.received_at))
        return self.conn.execute(
            "SELECT id FROM conflict WHERE sop_instance_uid = ? AND blob_sha256 = ?",
            (rec.sop_instance_uid, receipt.blob_sha256)).fetchone()[0]

    def insert_geometry(self, instance_id: int, geometry: InstanceGeometry) -> None:
        self.conn.execute(
            "INSERT INTO instance_geometry (instance_fk, image_position_patient,"
            " image_orientation_patient, pixel_spacing, rows, columns, frame_of_reference_uid,"
            " number_of_frames, acquisition_number, number_of_series_related_instances,"
            " images_in_acquisition) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (instance_id, geometry.image_position_patient, geometry.image_orientation_patient,
             geometry.pixel_spacing, geometry.rows, geometry.columns,
             geometry.frame_of_reference_uid, geometry.number_of_frames,
             geometry.acquisition_number, geometry.number_of_series_related_instances,
             geometry.images_in_acquisition))

    def insert_findings(self, instance_id: int, findings: Iterable[FindingRow],
                        now: str) -> None:
        rows = [(instance_id, f.rule, f.severity, f.keyword, f.tag, f.message, now)
                for f in findings]
        if not rows:  # most instances: no statement to prepare and run
            return
        self.conn.executemany(
            "INSERT INTO finding (instance_fk, rule, severity, keyword, tag, message, created_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)", rows)

    def _upsert_id(self, select: str, key: tuple, insert: str,
                   values: Callable[[], tuple]) -> int:
        """The row's id, inserting ``values()`` when there is none (only then are they
        worked out: a patient's values include its name keys)."""
        row = self.conn.execute(select, key).fetchone()
        if row:
            return row[0]
        return self._id(insert, values())

    def _add_modality(self, study_fk: int, modality: str | None) -> None:
        """Keep ModalitiesInStudy current as series of new modalities arrive."""
        if not modality:
            return
        current = self.conn.execute(
            "SELECT modalities_in_study FROM study WHERE id = ?", (study_fk,)).fetchone()[0]
        modalities = set(filter(None, current.split("\\"))) | {modality}
        self.conn.execute("UPDATE study SET modalities_in_study = ? WHERE id = ?",
                          ("\\".join(sorted(modalities)), study_fk))


# --- series -------------------------------------------------------------------


class SqliteSeries(_Repo):
    __slots__ = ()

    def mark_receiving(self, series_instance_uid: str, now: float, resolution: float = 0.0
                       ) -> None:
        # An upsert whose WHERE holds for no row writes nothing: the row and its index
        # entry (two of the pages an instance's transaction writes) stay as they are.
        self.conn.execute(
            "INSERT INTO series_state (series_fk, state, last_received)"
            " SELECT id, 'receiving', ? FROM series WHERE series_instance_uid = ?"
            " ON CONFLICT (series_fk) DO UPDATE SET state = 'receiving',"
            " last_received = excluded.last_received"
            " WHERE series_state.state <> 'receiving'"
            " OR series_state.last_received < excluded.last_received - ?",
            (now, series_instance_uid, resolution))

    def quiet(self, older_than: float) -> list[str]:
        return [r[0] for r in self.conn.execute(
            "SELECT s.series_instance_uid FROM series_state st JOIN series s"
            " ON s.id = st.series_fk WHERE st.state = 'receiving' AND st.last_received <= ?"
            " ORDER BY st.last_received", (older_than,))]

    def rows(self, series_instance_uid: str) -> SeriesRows | None:
        row = self.conn.execute(
            "SELECT s.id, st.state, st.last_received FROM series s"
            " LEFT JOIN series_state st ON st.series_fk = s.id WHERE s.series_instance_uid = ?",
            (series_instance_uid,)).fetchone()
        if row is None:
            return None
        instances = [
            (r["sop_instance_uid"], r["instance_number"], InstanceGeometry(
                r["image_position_patient"], r["image_orientation_patient"], r["pixel_spacing"],
                r["rows"], r["columns"], r["frame_of_reference_uid"], r["number_of_frames"],
                r["acquisition_number"], r["number_of_series_related_instances"],
                r["images_in_acquisition"]))
            for r in self.conn.execute(
                "SELECT i.sop_instance_uid, i.instance_number, g.* FROM instance i"
                " LEFT JOIN instance_geometry g ON g.instance_fk = i.id WHERE i.series_fk = ?"
                " ORDER BY i.id", (row[0],))
        ]
        return SeriesRows(row[0], row[1], row[2], instances)

    def insert_check(self, series_fk: int, trigger: str, state: str, instances: int,
                     geometry: dict[str, Any] | None, findings: Iterable[SeriesFindingRow],
                     last_received: float | None, now: str) -> int:
        check_id = self._id(
            "INSERT INTO series_check (series_fk, checked_at, trigger, state, instances,"
            " geometry) VALUES (?, ?, ?, ?, ?, ?) RETURNING id",
            (series_fk, now, trigger, state, instances,
             json.dumps(geometry) if geometry else None))
        self.conn.executemany(
            "INSERT INTO finding (series_check_fk, rule, severity, message, positions,"
            " created_at) VALUES (?, ?, ?, ?, ?, ?)",
            [(check_id, f.rule, f.severity, f.message, json.dumps(list(f.positions)), now)
             for f in findings])
        self.conn.execute(
            "INSERT INTO series_state (series_fk, state, last_received, check_fk)"
            " VALUES (?, ?, ?, ?) ON CONFLICT (series_fk) DO UPDATE SET state = excluded.state,"
            " check_fk = excluded.check_fk",
            (series_fk, state, last_received or 0.0, check_id))
        return check_id

    def state(self, series_instance_uid: str) -> SeriesStateRow | None:
        row = self.conn.execute(
            "SELECT s.id, st.state, c.id AS check_id, c.checked_at, c.geometry,"
            " (SELECT count(*) FROM instance i WHERE i.series_fk = s.id) AS instances"
            " FROM series s LEFT JOIN series_state st ON st.series_fk = s.id"
            " LEFT JOIN series_check c ON c.id = st.check_fk"
            " WHERE s.series_instance_uid = ?", (series_instance_uid,)).fetchone()
        if row is None:
            return None
        found = self.conn.execute(
            "SELECT rule, severity, message, positions FROM finding"
            " WHERE series_check_fk = ? ORDER BY id", (row["check_id"],)).fetchall() \
            if row["check_id"] else []
        findings = tuple(SeriesFindingRow(f["rule"], f["severity"], f["message"],
                                          tuple(json.loads(f["positions"] or "[]")))
                         for f in found)
        geometry = json.loads(row["geometry"]) if row["geometry"] else None
        return SeriesStateRow(row["state"], row["instances"], row["checked_at"], geometry,
                              findings)


# --- annotations --------------------------------------------------------------


def _rows(cursor: sqlite3.Cursor) -> list[Row]:
    return [dict(r) for r in cursor.fetchall()]


class SqliteAnnotations(_Repo):
    __slots__ = ()

    def upsert(self, kind: str, key: str, series_uid: str, annotator_ae: str,
               annotator_address: str, annotator_person: str, now: str, *,
               accepted: bool) -> tuple[int, int]:
        row = self.conn.execute("SELECT id, revision FROM annotation WHERE key = ?",
                                (key,)).fetchone()
        if row is None:
            annotation_id = self._id(
                "INSERT INTO annotation (kind, key, source_series_uid, annotator_ae,"
                " annotator_address, annotator_person, state, revision, created_at, updated_at,"
                " state_since) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
                (kind, key, series_uid, annotator_ae, annotator_address, annotator_person,
                 "received" if accepted else "refused", 1 if accepted else 0, now, now, now))
            return annotation_id, 1 if accepted else 0
        annotation_id, revision = row
        if accepted:
            revision += 1
            self.conn.execute(
                "UPDATE annotation SET revision = ?, updated_at = ?, source_series_uid = ?"
                " WHERE id = ?", (revision, now, series_uid, annotation_id))
        return annotation_id, revision

    def insert_object(self, annotation_id: int, sop_instance_uid: str, sop_class_uid: str,
                      receipt: Receipt, *, slice_index: int | None = None,
                      refusal: tuple[str, str] | None = None,
                      quarantine_id: int | None = None) -> int:
        if slice_index is not None and refusal is None:
            self.conn.execute(
                "UPDATE annotation_object SET state = 'superseded' WHERE annotation_fk = ?"
                " AND state = 'current' AND slice_index = ?", (annotation_id, slice_index))
        return self._id(
            "INSERT INTO annotation_object (annotation_fk, sop_instance_uid, sop_class_uid,"
            " blob_sha256, blob_size, transfer_syntax_uid, slice_index, state, refusal_check,"
            " refusal_reason, quarantine_fk, calling_ae, association_id, received_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
            (annotation_id, sop_instance_uid, sop_class_uid, receipt.blob_sha256,
             receipt.blob_size, receipt.transfer_syntax_uid, slice_index,
             "refused" if refusal else "current", refusal[0] if refusal else None,
             refusal[1] if refusal else None, quarantine_id, receipt.calling_ae,
             receipt.association_id, receipt.received_at))

    def insert_rois(self, object_id: int, rois: Iterable[RoiRow]) -> None:
        self.conn.executemany(
            "INSERT INTO overlay_roi (object_fk, group_number, label, slice_index, row0, col0,"
            " rows, cols, bits) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [(object_id, r.group, r.label, r.slice_index, r.row0, r.col0, r.rows, r.cols,
              r.bits) for r in rois])

    def current_rois(self, annotation_id: int) -> list[tuple[RoiRow, str]]:
        rows = self.conn.execute(
            "SELECT r.group_number, r.label, r.slice_index, r.row0, r.col0, r.rows, r.cols,"
            " r.bits, o.blob_sha256 FROM overlay_roi r JOIN annotation_object o"
            " ON o.id = r.object_fk WHERE o.annotation_fk = ? AND o.state = 'current'"
            " ORDER BY r.slice_index, r.group_number", (annotation_id,)).fetchall()
        return [(RoiRow(g, label, k, r0, c0, nr, nc, bytes(bits)), sha)
                for g, label, k, r0, c0, nr, nc, bits, sha in rows]

    def current_objects(self, annotation_id: int) -> list[Row]:
        return _rows(self.conn.execute(
            "SELECT * FROM annotation_object WHERE annotation_fk = ? AND state = 'current'"
            " ORDER BY slice_index, id", (annotation_id,)))

    def refused_objects(self, annotation_id: int) -> list[Row]:
        return _rows(self.conn.execute(
            "SELECT * FROM annotation_object WHERE annotation_fk = ? AND state = 'refused'"
            " ORDER BY id", (annotation_id,)))

    def object_with_blob(self, sha256: str) -> Row | None:
        row = self.conn.execute(
            "SELECT o.*, a.id AS annotation_id FROM annotation_object o"
            " JOIN annotation a ON a.id = o.annotation_fk"
            " WHERE o.blob_sha256 = ? AND o.state = 'current'", (sha256,)).fetchone()
        return dict(row) if row else None

    def place_object(self, object_id: int, slice_index: int, rois: Iterable[RoiRow]) -> None:
        (annotation_id,) = self.conn.execute(
            "SELECT annotation_fk FROM annotation_object WHERE id = ?", (object_id,)).fetchone()
        newer = self.conn.execute(
            "SELECT 1 FROM annotation_object WHERE annotation_fk = ? AND state = 'current'"
            " AND slice_index = ? AND id > ?", (annotation_id, slice_index, object_id)).fetchone()
        if newer is None:
            self.conn.execute(
                "UPDATE annotation_object SET state = 'superseded' WHERE annotation_fk = ?"
                " AND state = 'current' AND slice_index = ?", (annotation_id, slice_index))
        self.conn.execute(
            "UPDATE annotation_object SET slice_index = ?, state = ? WHERE id = ?",
            (slice_index, "superseded" if newer else "current", object_id))
        self.insert_rois(object_id, rois)

    def refuse_object(self, object_id: int, check: str, reason: str) -> None:
        self.conn.execute(
            "UPDATE annotation_object SET state = 'refused', refusal_check = ?,"
            " refusal_reason = ? WHERE id = ?", (check, reason, object_id))

    def refuse_objects(self, annotation_id: int, check: str, reason: str) -> int:
        return self.conn.execute(
            "UPDATE annotation_object SET state = 'refused', refusal_check = ?,"
            " refusal_reason = ? WHERE annotation_fk = ? AND state = 'current'",
            (check, reason, annotation_id)).rowcount

    def set_state(self, annotation_id: int, before: str, after: str, now: str,
                  reason: str = "") -> bool:
        return self.conn.execute(
            "UPDATE annotation SET state = ?, state_reason = ?, state_since = ?, updated_at = ?"
            " WHERE id = ? AND state = ?",
            (after, reason, now, now, annotation_id, before)).rowcount == 1

    def record_check(self, annotation_id: int, revision: int, protocol_name: str,
                     protocol_sha256: str, structures: list[StructureRow],
                     findings: list[AnnotationFindingRow], now: str) -> int | None:
        current = self.conn.execute("SELECT revision FROM annotation WHERE id = ?",
                                    (annotation_id,)).fetchone()
        if current is None or current[0] != revision:
            return None
        check_id = self._id(
            "INSERT INTO annotation_check (annotation_fk, revision, protocol_name,"
            " protocol_sha256, verdict, checked_at) VALUES (?, ?, ?, ?, ?, ?) RETURNING id",
            (annotation_id, revision, protocol_name, protocol_sha256,
             "findings" if findings else "pass", now))
        self.conn.executemany(
            "INSERT INTO annotation_structure (check_fk, structure_id, label, class_key,"
            " category, type, voxels, volume_mm3, max_diameter_mm, first_slice, last_slice,"
            " slice_count, provenance) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [(check_id, s.structure_id, s.label, s.class_key, s.category, s.type, s.voxels,
              s.volume_mm3, s.max_diameter_mm, s.first_slice, s.last_slice, s.slice_count,
              s.provenance) for s in structures])
        self.conn.executemany(
            "INSERT INTO annotation_finding (check_fk, annotation_fk, check_name, structure_id,"
            " label, slices, detail) VALUES (?, ?, ?, ?, ?, ?, ?)",
            [(check_id, annotation_id, f.check_name, f.structure_id, f.label, f.slices,
              f.detail) for f in findings])
        self.conn.execute(
            "UPDATE annotation SET current_check_fk = ?, updated_at = ? WHERE id = ?",
            (check_id, now, annotation_id))
        return check_id

    def list(self, state: str | None = None, series_uid: str | None = None) -> list[Row]:
        where, args = [], []
        if state:
            where.append("a.state = ?")
            args.append(state)
        if series_uid:
            where.append("a.source_series_uid = ?")
            args.append(series_uid)
        sql = (
            "SELECT a.*, c.verdict, c.checked_at,"
            " (SELECT COUNT(*) FROM annotation_structure s WHERE s.check_fk = a.current_check_fk)"
            "   AS structures,"
            " (SELECT COUNT(*) FROM annotation_finding f WHERE f.check_fk = a.current_check_fk)"
            "   AS findings,"
            " (SELECT COUNT(*) FROM annotation_object o WHERE o.annotation_fk = a.id"
            "   AND o.state = 'current') AS objects,"
            " (SELECT COUNT(*) FROM annotation_object o WHERE o.annotation_fk = a.id"
            "   AND o.state = 'refused') AS refused"
            " FROM annotation a LEFT JOIN annotation_check c ON c.id = a.current_check_fk"
        )
        if where:
            sql += " WHERE " + " AND ".join(where)
        return _rows(self.conn.execute(sql + " ORDER BY a.id", args))

    def get(self, annotation_id: int) -> Row | None:
        row = self.conn.execute(
            "SELECT a.*, c.verdict, c.checked_at, c.protocol_name FROM annotation a"
            " LEFT JOIN annotation_check c ON c.id = a.current_check_fk WHERE a.id = ?",
            (annotation_id,)).fetchone()
        return dict(row) if row else None

    def by_key(self, key: str) -> Row | None:
        row = self.conn.execute("SELECT * FROM annotation WHERE key = ?", (key,)).fetchone()
        return dict(row) if row else None

    def waiting_on_series(self, series_uid: str) -> list[int]:
        return [r[0] for r in self.conn.execute(
            "SELECT id FROM annotation WHERE source_series_uid = ? AND state = 'pending'"
            " ORDER BY id", (series_uid,))]

    def in_state(self, state: str) -> list[int]:
        return [r[0] for r in self.conn.execute(
            "SELECT id FROM annotation WHERE state = ? ORDER BY id", (state,))]

    def structures(self, check_id: int) -> list[Row]:
        return _rows(self.conn.execute(
            "SELECT * FROM annotation_structure WHERE check_fk = ? ORDER BY id", (check_id,)))

    def findings(self, check_id: int) -> list[Row]:
        return _rows(self.conn.execute(
            "SELECT * FROM annotation_finding WHERE check_fk = ? ORDER BY id", (check_id,)))


# --- quarantine ---------------------------------------------------------------


def _quarantine_row(row: sqlite3.Row) -> QuarantineRow:
    return QuarantineRow(
        row["id"], row["received_at"], row["calling_ae"], row["address"],
        row["association_id"], row["status_code"], row["reason"], json.loads(row["findings"]),
        row["blob_sha256"], row["blob_size"], row["area"], row["transfer_syntax_uid"],
        row["sop_class_uid"], row["sop_instance_uid"], row["series_instance_uid"],
        row["released_at"], row["released_by"], row["release_reason"], bool(row["sealed"]),
        row["route"], row["received_sha256"], row["times_received"], row["last_received_at"])


class SqliteQuarantine(_Repo):
    __slots__ = ()

    def insert(self, entry: NewQuarantine) -> int:
        return self._id(
            "INSERT INTO quarantine (blob_sha256, blob_size, reason, status_code, calling_ae,"
            " association_id, received_at, area, address, transfer_syntax_uid,"
            " sop_class_uid, sop_instance_uid, series_instance_uid, findings, sealed, route,"
            " received_sha256, last_received_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
            (entry.sha256, entry.size, entry.reason, entry.status_code, entry.calling_ae,
             entry.association_id, entry.received_at, entry.area, entry.address,
             entry.transfer_syntax_uid, entry.sop_class_uid, entry.sop_instance_uid,
             entry.series_instance_uid, json.dumps(entry.findings), int(entry.sealed),
             entry.route, entry.received_sha256, entry.received_at))

    def seen_again(self, quarantine_id: int, now: str) -> int:
        return self.conn.execute(
            "UPDATE quarantine SET times_received = times_received + 1, last_received_at = ?"
            " WHERE id = ? RETURNING times_received", (now, quarantine_id)).fetchone()[0]

    def with_received(self, received_sha256: str, released: bool) -> QuarantineRow | None:
        if not received_sha256:
            return None
        row = self.conn.execute(
            "SELECT * FROM quarantine WHERE received_sha256 = ? AND (released_at IS NOT NULL) = ?"
            " ORDER BY id LIMIT 1", (received_sha256, int(released))).fetchone()
        return _quarantine_row(row) if row else None

    def mark_released(self, quarantine_id: int, released_at: str, released_by: str,
                      reason: str) -> None:
        self.conn.execute(
            "UPDATE quarantine SET released_at = ?, released_by = ?, release_reason = ?"
            " WHERE id = ?", (released_at, released_by, reason, quarantine_id))

    def list(self, include_released: bool = False) -> list[QuarantineRow]:
        where = "" if include_released else " WHERE released_at IS NULL"
        return [_quarantine_row(r) for r in self.conn.execute(
            f"SELECT * FROM quarantine{where} ORDER BY id")]

    def get(self, quarantine_id: int) -> QuarantineRow | None:
        row = self.conn.execute("SELECT * FROM quarantine WHERE id = ?",
                                (quarantine_id,)).fetchone()
        return _quarantine_row(row) if row else None

    def for_instance(self, sop_instance_uid: str) -> list[QuarantineRow]:
        return [_quarantine_row(r) for r in self.conn.execute(
            "SELECT * FROM quarantine WHERE sop_instance_uid = ? ORDER BY id",
            (sop_instance_uid,))]


# --- audit --------------------------------------------------------------------

_AUDIT_COLUMNS = "seq, time, actor, action, object, outcome, prev_hash, hash"


class SqliteAudit(_Repo):
    __slots__ = ()

    def last(self) -> tuple[int, str] | None:
        row = self.conn.execute(
            "SELECT seq, hash FROM audit_event ORDER BY seq DESC LIMIT 1").fetchone()
        return (row[0], row[1]) if row else None

    def insert(self, row: AuditRow) -> None:
        self.conn.execute(
            f"INSERT INTO audit_event ({_AUDIT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (row.seq, row.time, row.actor, row.action, row.object, row.outcome, row.prev_hash,
             row.hash))

    def rows(self) -> Iterator[AuditRow]:
        for r in self.conn.execute(f"SELECT {_AUDIT_COLUMNS} FROM audit_event ORDER BY rowid"):
            yield AuditRow(*r)

    def of_action(self, prefix: str) -> list[AuditRow]:
        escaped = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        return [AuditRow(*r) for r in self.conn.execute(
            f"SELECT {_AUDIT_COLUMNS} FROM audit_event WHERE action LIKE ? ESCAPE '\\'"
            " ORDER BY seq", (escaped + "%",))]

    def after(self, seq: int, limit: int) -> list[AuditRow]:
        return [AuditRow(*r) for r in self.conn.execute(
            f"SELECT {_AUDIT_COLUMNS} FROM audit_event WHERE seq > ? ORDER BY seq LIMIT ?",
            (seq, limit))]


# --- reviewers and signatures -------------------------------------------------

_USER_COLUMNS = ("id, user_id, printed_name, rater_ids, public_key, private_key, failed_attempts,"
                 " locked_at, disabled_at, created_at")


def _user(row: sqlite3.Row | None) -> UserRow | None:
    if row is None:
        return None
    values = list(row)
    values[3] = tuple(json.loads(values[3]))
    values[4], values[5] = bytes(values[4]), bytes(values[5])
    return UserRow(*values)


class SqliteUsers(_Repo):
    __slots__ = ()

    def get(self, user_id: str) -> UserRow | None:
        return _user(self.conn.execute(
            f"SELECT {_USER_COLUMNS} FROM review_user WHERE user_id = ?", (user_id,)).fetchone())

    def by_row(self, row_id: int) -> UserRow | None:
        return _user(self.conn.execute(
            f"SELECT {_USER_COLUMNS} FROM review_user WHERE id = ?", (row_id,)).fetchone())

    def list(self) -> list[UserRow]:
        return [_user(r) for r in self.conn.execute(
            f"SELECT {_USER_COLUMNS} FROM review_user ORDER BY id")]

    def insert(self, user_id: str, printed_name: str, rater_ids: list[str],
               public_key: bytes, private_key: bytes, now: str) -> int:
        try:
            return self._id(
                "INSERT INTO review_user (user_id, printed_name, rater_ids, public_key,"
                " private_key, created_at) VALUES (?, ?, ?, ?, ?, ?) RETURNING id",
                (user_id, printed_name, json.dumps(rater_ids), public_key, private_key, now))
        except sqlite3.IntegrityError:
            raise KeyError(user_id) from None

    def disable(self, user_id: str, now: str) -> bool:
        return self.conn.execute(
            "UPDATE review_user SET disabled_at = ? WHERE user_id = ? AND disabled_at IS NULL",
            (now, user_id)).rowcount == 1

    def record_failure(self, user_id: str, lock_after: int, now: str) -> tuple[int, bool]:
        failures = self.conn.execute(
            "UPDATE review_user SET failed_attempts = failed_attempts + 1 WHERE user_id = ?"
            " RETURNING failed_attempts", (user_id,)).fetchone()[0]
        locked = self.conn.execute(
            "UPDATE review_user SET locked_at = ? WHERE user_id = ? AND locked_at IS NULL"
            " AND failed_attempts >= ?", (now, user_id, lock_after)).rowcount == 1
        return failures, locked

    def reset_failures(self, user_id: str) -> None:
        self.conn.execute("UPDATE review_user SET failed_attempts = 0 WHERE user_id = ?",
                          (user_id,))

    def clear_lock(self, user_id: str) -> bool:
        return self.conn.execute(
            "UPDATE review_user SET locked_at = NULL, failed_attempts = 0 WHERE user_id = ?"
            " AND locked_at IS NOT NULL", (user_id,)).rowcount == 1


_SIGNATURE_COLUMNS = "id, annotation_fk, user_fk, decision, meaning, signed_at, manifest, signature"


class SqliteSignatures(_Repo):
    __slots__ = ()

    def insert(self, annotation_id: int, user_fk: int, decision: str, meaning: str,
               signed_at: str, manifest: str, signature: bytes) -> int:
        return self._id(
            "INSERT INTO review_signature (annotation_fk, user_fk, decision, meaning, signed_at,"
            " manifest, signature) VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING id",
            (annotation_id, user_fk, decision, meaning, signed_at, manifest, signature))

    def list(self, annotation_id: int | None = None) -> list[SignatureRow]:
        sql = f"SELECT {_SIGNATURE_COLUMNS} FROM review_signature"
        args: tuple = ()
        if annotation_id is not None:
            sql, args = sql + " WHERE annotation_fk = ?", (annotation_id,)
        return [SignatureRow(*r[:7], bytes(r[7])) for r in self.conn.execute(
            sql + " ORDER BY id", args)]


# --- re-identification map and de-identification evidence ---------------------

_REID_TABLES = {"patient": "reid_patient", "uid": "reid_uid"}


class SqliteReid(_Repo):
    __slots__ = ()

    def insert(self, kind: str, rows: list[tuple[bytes, str, bytes, bytes]]) -> int:
        before = self.conn.total_changes
        self.conn.executemany(
            f"INSERT INTO {_REID_TABLES[kind]} (lookup, key_id, nonce, payload)"
            " VALUES (?, ?, ?, ?) ON CONFLICT (lookup) DO NOTHING", rows)
        return self.conn.total_changes - before

    def get(self, kind: str, lookup: bytes) -> tuple[str, bytes, bytes] | None:
        row = self.conn.execute(
            f"SELECT key_id, nonce, payload FROM {_REID_TABLES[kind]} WHERE lookup = ?",
            (lookup,)).fetchone()
        return (row[0], bytes(row[1]), bytes(row[2])) if row else None

    def exists(self, kind: str, lookup: bytes) -> bool:
        return self.conn.execute(
            f"SELECT 1 FROM {_REID_TABLES[kind]} WHERE lookup = ?", (lookup,)
        ).fetchone() is not None

    def foreign_key_id(self, kind: str, key_id: str) -> str | None:
        row = self.conn.execute(
            f"SELECT key_id FROM {_REID_TABLES[kind]} WHERE key_id != ? LIMIT 1",
            (key_id,)).fetchone()
        return row[0] if row else None


def evidence_sha256(text: str) -> str:
    """What a de-identification evidence text is found by (``deid_evidence_text.sha256``,
    migration 0012): the hex SHA-256 of its UTF-8 bytes."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class SqliteEvidence(_Repo):
    """Evidence per instance, each distinct text stored once (migration 0012): the slices
    of a series share theirs."""

    __slots__ = ()

    def put(self, sop_instance_uid: str, study_instance_uid: str, route: str,
            evidence: str) -> None:
        digest = evidence_sha256(evidence)
        row = self.conn.execute("SELECT id FROM deid_evidence_text WHERE sha256 = ?",
                                (digest,)).fetchone()
        if row is None:
            # DO NOTHING: another node's transaction may have added the same text since
            # (PostgreSQL); it is then read back.
            row = self.conn.execute(
                "INSERT INTO deid_evidence_text (sha256, evidence) VALUES (?, ?)"
                " ON CONFLICT (sha256) DO NOTHING RETURNING id", (digest, evidence)).fetchone()
            if row is None:
                row = self.conn.execute("SELECT id FROM deid_evidence_text WHERE sha256 = ?",
                                        (digest,)).fetchone()
        self.conn.execute(
            "INSERT INTO deid_evidence (sop_instance_uid, study_instance_uid, route, evidence_fk)"
            " VALUES (?, ?, ?, ?) ON CONFLICT (sop_instance_uid) DO UPDATE SET"
            " study_instance_uid = excluded.study_instance_uid, route = excluded.route,"
            " evidence_fk = excluded.evidence_fk",
            (sop_instance_uid, study_instance_uid, route, row[0]))

    def for_study(self, study_instance_uid: str) -> list[dict[str, Any]]:
        return [json.loads(r[0]) for r in self.conn.execute(
            "SELECT t.evidence FROM deid_evidence e"
            " JOIN deid_evidence_text t ON t.id = e.evidence_fk"
            " WHERE e.study_instance_uid = ? ORDER BY e.sop_instance_uid", (study_instance_uid,))]


# --- reports ------------------------------------------------------------------

_COUNTED = ("patient", "study", "series", "instance", "quarantine", "conflict", "audit_event")


class SqliteReports(_Repo):
    __slots__ = ()

    def counts(self) -> dict[str, int]:
        return {table: self.conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
                for table in _COUNTED}

    def quarantine_waiting(self) -> int:
        return self.conn.execute(
            "SELECT count(*) FROM quarantine WHERE released_at IS NULL").fetchone()[0]

    def series_states(self) -> dict[str, int]:
        return {state: n for state, n in self.conn.execute(
            "SELECT state, count(*) FROM series_state GROUP BY state")}

    def instance_rule_counts(self) -> list[tuple[str, int]]:
        return [(r[0], r[1]) for r in self.conn.execute(
            "SELECT rule, count(*) FROM finding WHERE instance_fk IS NOT NULL"
            " GROUP BY rule ORDER BY rule")]

    def series_rule_counts(self) -> list[tuple[str, int]]:
        return [(r[0], r[1]) for r in self.conn.execute(
            "SELECT f.rule, count(*) FROM finding f JOIN series_state st"
            " ON st.check_fk = f.series_check_fk GROUP BY f.rule ORDER BY f.rule")]

    def instance_findings(self, sop_instance_uid: str) -> tuple[bool, list[FindingRow]]:
        stored = self.conn.execute("SELECT id FROM instance WHERE sop_instance_uid = ?",
                                   (sop_instance_uid,)).fetchone()
        if stored is None:
            return False, []
        return True, [FindingRow(r[1], r[0], r[2]) for r in self.conn.execute(
            "SELECT severity, rule, message FROM finding WHERE instance_fk = ? ORDER BY id",
            (stored[0],))]

    def referenced_blobs(self) -> set[str]:
        return {row[0] for row in self.conn.execute(
            "SELECT blob_sha256 FROM instance UNION SELECT blob_sha256 FROM conflict"
            " UNION SELECT blob_sha256 FROM quarantine WHERE area = 'blobs'"
            " UNION SELECT blob_sha256 FROM annotation_object"
            " UNION SELECT blob_sha256 FROM forward_item WHERE blob_sha256 != ''")}

    def quarantined_blobs(self) -> set[str]:
        return {row[0] for row in self.conn.execute(
            "SELECT blob_sha256 FROM quarantine WHERE area = 'quarantine'")}

    def integrity(self) -> str:
        return self.conn.execute("PRAGMA integrity_check").fetchone()[0]
