"""Index statements for validation: findings, instance geometry, series state and checks.

Every function runs inside the caller's transaction (``Index.write()`` for
writes), so a stored instance, its geometry, its findings and its audit event
commit together or not at all.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass

from node.audit.trail import utc_now
from node.checks.geometry import InstanceGeometry, SeriesFinding, VolumeGeometry
from node.ingest.validate import Finding


def patient_of_study(conn: sqlite3.Connection, study_instance_uid: str) -> tuple[str, str] | None:
    """(PatientID, IssuerOfPatientID) the study is stored under, if it is known."""
    row = conn.execute(
        "SELECT p.patient_id, p.issuer_of_patient_id FROM study s"
        " JOIN patient p ON p.id = s.patient_fk WHERE s.study_instance_uid = ?",
        (study_instance_uid,),
    ).fetchone()
    return (row[0], row[1]) if row else None


def insert_instance_geometry(conn: sqlite3.Connection, instance_fk: int,
                             geometry: InstanceGeometry) -> None:
    conn.execute(
        "INSERT INTO instance_geometry (instance_fk, image_position_patient,"
        " image_orientation_patient, pixel_spacing, rows, columns, frame_of_reference_uid,"
        " number_of_frames, acquisition_number, number_of_series_related_instances,"
        " images_in_acquisition) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (instance_fk, geometry.image_position_patient, geometry.image_orientation_patient,
         geometry.pixel_spacing, geometry.rows, geometry.columns,
         geometry.frame_of_reference_uid, geometry.number_of_frames,
         geometry.acquisition_number, geometry.number_of_series_related_instances,
         geometry.images_in_acquisition),
    )


def insert_instance_findings(conn: sqlite3.Connection, instance_fk: int,
                             findings: Iterable[tuple[Finding, str]]) -> None:
    """(finding, severity) pairs recorded against a stored instance."""
    now = utc_now()
    conn.executemany(
        "INSERT INTO finding (instance_fk, rule, severity, keyword, tag, message, created_at)"
        " VALUES (?, ?, ?, ?, ?, ?, ?)",
        [(instance_fk, f.rule, severity, f.keyword, f.tag, f.message, now)
         for f, severity in findings],
    )


def mark_receiving(conn: sqlite3.Connection, series_instance_uid: str, now: float) -> None:
    """A new instance arrived: the series is receiving and its quiet period restarts."""
    conn.execute(
        "INSERT INTO series_state (series_fk, state, last_received)"
        " SELECT id, 'receiving', ? FROM series WHERE series_instance_uid = ?"
        " ON CONFLICT (series_fk) DO UPDATE SET state = 'receiving',"
        " last_received = excluded.last_received",
        (now, series_instance_uid),
    )


def quiet_series(conn: sqlite3.Connection, older_than: float) -> list[str]:
    """Series still receiving whose newest instance arrived before ``older_than``."""
    return [r[0] for r in conn.execute(
        "SELECT s.series_instance_uid FROM series_state st JOIN series s ON s.id = st.series_fk"
        " WHERE st.state = 'receiving' AND st.last_received <= ? ORDER BY st.last_received",
        (older_than,),
    )]


@dataclass(frozen=True)
class SeriesRows:
    """A series' index id, its state and the geometry rows of its instances."""

    series_fk: int
    state: str | None
    last_received: float | None
    instances: list[tuple[str, int | None, InstanceGeometry]]  # (SOP UID, number, geometry)


def series_rows(conn: sqlite3.Connection, series_instance_uid: str) -> SeriesRows | None:
    row = conn.execute(
        "SELECT s.id, st.state, st.last_received FROM series s"
        " LEFT JOIN series_state st ON st.series_fk = s.id WHERE s.series_instance_uid = ?",
        (series_instance_uid,),
    ).fetchone()
    if row is None:
        return None
    instances = [
        (r["sop_instance_uid"], r["instance_number"], InstanceGeometry(
            r["image_position_patient"], r["image_orientation_patient"], r["pixel_spacing"],
            r["rows"], r["columns"], r["frame_of_reference_uid"], r["number_of_frames"],
            r["acquisition_number"], r["number_of_series_related_instances"],
            r["images_in_acquisition"]))
        for r in conn.execute(
            "SELECT i.sop_instance_uid, i.instance_number, g.* FROM instance i"
            " LEFT JOIN instance_geometry g ON g.instance_fk = i.id WHERE i.series_fk = ?"
            " ORDER BY i.id", (row[0],))
    ]
    return SeriesRows(row[0], row[1], row[2], instances)


def insert_series_check(conn: sqlite3.Connection, series_fk: int, trigger: str, state: str,
                        instances: int, geometry: VolumeGeometry | None,
                        findings: Iterable[tuple[SeriesFinding, str]],
                        last_received: float | None) -> int:
    """Record one check with its findings and point the series state at it."""
    now = utc_now()
    check_id = conn.execute(
        "INSERT INTO series_check (series_fk, checked_at, trigger, state, instances, geometry)"
        " VALUES (?, ?, ?, ?, ?, ?)",
        (series_fk, now, trigger, state, instances,
         json.dumps(geometry.as_dict()) if geometry else None),
    ).lastrowid
    conn.executemany(
        "INSERT INTO finding (series_check_fk, rule, severity, message, positions, created_at)"
        " VALUES (?, ?, ?, ?, ?, ?)",
        [(check_id, f.rule, severity, f.message, json.dumps(list(f.positions)), now)
         for f, severity in findings],
    )
    conn.execute(
        "INSERT INTO series_state (series_fk, state, last_received, check_fk)"
        " VALUES (?, ?, ?, ?) ON CONFLICT (series_fk) DO UPDATE SET state = excluded.state,"
        " check_fk = excluded.check_fk",
        (series_fk, state, last_received or 0.0, check_id),
    )
    return check_id
