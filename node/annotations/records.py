"""The annotation tables (migration 0005): the statements that write and read them.

Writers run inside the caller's write transaction, like ``node.storage.records``;
readers take any connection. Slices are stored 0-based (grid indices) in the
object and ROI tables, and shown 1-based with their position in findings.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from node.annotations.grid import SeriesGrid
from node.annotations.masks import Annotator, Code, Mask, bounding_box
from node.checks.consistency import Finding, StructureSummary
from node.checks.protocol import Protocol
from node.storage.records import Receipt


@dataclass(frozen=True)
class RoiBox:
    """One overlay plane's mask, cut to its bounding box on slice ``slice_index``."""

    group: int
    label: str
    slice_index: int
    row0: int
    col0: int
    box: np.ndarray  # bool

    @classmethod
    def from_plane(cls, group: int, label: str, slice_index: int, plane: np.ndarray) -> RoiBox:
        bounds = bounding_box(plane)
        if bounds is None:
            return cls(group, label, slice_index, 0, 0, np.zeros((0, 0), dtype=bool))
        r0, r1, c0, c1 = bounds
        return cls(group, label, slice_index, r0, c0, plane[r0:r1, c0:c1].copy())


def upsert_annotation(conn: sqlite3.Connection, kind: str, key: str, series_uid: str,
                      annotator: Annotator, now: str, *, accepted: bool) -> tuple[int, int]:
    """The annotation's id and revision, creating it on first sight.

    An accepted object bumps the revision and puts the annotation back to
    ``received`` until its check is recorded; a refused one leaves an existing
    annotation as it is (a new one starts ``refused``).
    """
    row = conn.execute("SELECT id, revision FROM annotation WHERE key = ?", (key,)).fetchone()
    if row is None:
        annotation_id = conn.execute(
            "INSERT INTO annotation (kind, key, source_series_uid, annotator_ae, annotator_address,"
            " annotator_person, state, revision, created_at, updated_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (kind, key, series_uid, annotator.ae_title, annotator.address, annotator.person,
             "received" if accepted else "refused", 1 if accepted else 0, now, now),
        ).lastrowid
        return annotation_id, 1 if accepted else 0
    annotation_id, revision = row
    if accepted:
        revision += 1
        conn.execute("UPDATE annotation SET state = 'received', revision = ?, updated_at = ?,"
                     " source_series_uid = ? WHERE id = ?",
                     (revision, now, series_uid, annotation_id))
    return annotation_id, revision


def insert_object(conn: sqlite3.Connection, annotation_id: int, sop_instance_uid: str,
                  sop_class_uid: str, receipt: Receipt, *, slice_index: int | None = None,
                  refusal: tuple[str, str] | None = None, quarantine_id: int | None = None) -> int:
    if slice_index is not None and refusal is None:
        conn.execute("UPDATE annotation_object SET state = 'superseded' WHERE annotation_fk = ?"
                     " AND state = 'current' AND slice_index = ?", (annotation_id, slice_index))
    return conn.execute(
        "INSERT INTO annotation_object (annotation_fk, sop_instance_uid, sop_class_uid,"
        " blob_sha256, blob_size, transfer_syntax_uid, slice_index, state, refusal_check,"
        " refusal_reason, quarantine_fk, calling_ae, association_id, received_at)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (annotation_id, sop_instance_uid, sop_class_uid, receipt.blob_sha256, receipt.blob_size,
         receipt.transfer_syntax_uid, slice_index, "refused" if refusal else "current",
         refusal[0] if refusal else None, refusal[1] if refusal else None, quarantine_id,
         receipt.calling_ae, receipt.association_id, receipt.received_at),
    ).lastrowid


def insert_rois(conn: sqlite3.Connection, object_id: int, rois: Iterable[RoiBox]) -> None:
    conn.executemany(
        "INSERT INTO overlay_roi (object_fk, group_number, label, slice_index, row0, col0, rows,"
        " cols, bits) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [(object_id, r.group, r.label, r.slice_index, r.row0, r.col0, r.box.shape[0],
          r.box.shape[1], np.packbits(r.box).tobytes()) for r in rois],
    )


def current_rois(conn: sqlite3.Connection, annotation_id: int) -> list[tuple[RoiBox, str]]:
    """Every plane of the set's current copies, with the hash of the copy it came from."""
    rows = conn.execute(
        "SELECT r.group_number, r.label, r.slice_index, r.row0, r.col0, r.rows, r.cols, r.bits,"
        " o.blob_sha256 FROM overlay_roi r JOIN annotation_object o ON o.id = r.object_fk"
        " WHERE o.annotation_fk = ? AND o.state = 'current' ORDER BY r.slice_index, r.group_number",
        (annotation_id,),
    ).fetchall()
    out = []
    for group, label, k, r0, c0, nr, nc, bits, sha in rows:
        box = np.unpackbits(np.frombuffer(bits, np.uint8), count=nr * nc).astype(bool)
        out.append((RoiBox(group, label, k, r0, c0, box.reshape(nr, nc)), sha))
    return out


def current_objects(conn: sqlite3.Connection, annotation_id: int) -> list[sqlite3.Row]:
    return conn.execute(
        "SELECT * FROM annotation_object WHERE annotation_fk = ? AND state = 'current'"
        " ORDER BY slice_index, id", (annotation_id,)).fetchall()


def object_with_blob(conn: sqlite3.Connection, sha256: str) -> sqlite3.Row | None:
    """A current annotation object holding exactly these bytes (an identical resend)."""
    return conn.execute(
        "SELECT o.*, a.id AS annotation_id FROM annotation_object o"
        " JOIN annotation a ON a.id = o.annotation_fk"
        " WHERE o.blob_sha256 = ? AND o.state = 'current'", (sha256,)).fetchone()


def settle_refused(conn: sqlite3.Connection, annotation_id: int, now: str) -> None:
    """An annotation none of whose objects was accepted stays (or becomes) ``refused``."""
    conn.execute(
        "UPDATE annotation SET state = 'refused', updated_at = ? WHERE id = ? AND NOT EXISTS"
        " (SELECT 1 FROM annotation_object WHERE annotation_fk = ? AND state = 'current')",
        (now, annotation_id, annotation_id))


def record_check(conn: sqlite3.Connection, annotation_id: int, revision: int,
                 protocol: Protocol, grid: SeriesGrid, masks: list[Mask],
                 summaries: list[StructureSummary], findings: list[Finding],
                 now: str) -> int | None:
    """Store one check run and make it current; None when a newer object arrived meanwhile."""
    current = conn.execute("SELECT revision FROM annotation WHERE id = ?",
                           (annotation_id,)).fetchone()
    if current is None or current[0] != revision:
        return None
    check_id = conn.execute(
        "INSERT INTO annotation_check (annotation_fk, revision, protocol_name, protocol_sha256,"
        " verdict, checked_at) VALUES (?, ?, ?, ?, ?, ?)",
        (annotation_id, revision, protocol.name, protocol.sha256,
         "findings" if findings else "pass", now),
    ).lastrowid
    conn.executemany(
        "INSERT INTO annotation_structure (check_fk, structure_id, label, class_key, category,"
        " type, voxels, volume_mm3, max_diameter_mm, first_slice, last_slice, slice_count,"
        " provenance) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [(check_id, s.structure_id, s.label, s.class_key, _code_json(m.category),
          _code_json(m.type), s.voxels, s.volume_mm3, s.max_diameter_mm,
          s.slices[0] + 1 if s.slices else None, s.slices[-1] + 1 if s.slices else None,
          len(s.slices), m.provenance)
         for m, s in zip(masks, summaries, strict=True)],
    )
    conn.executemany(
        "INSERT INTO annotation_finding (check_fk, annotation_fk, check_name, structure_id, label,"
        " slices, detail) VALUES (?, ?, ?, ?, ?, ?, ?)",
        [(check_id, annotation_id, f.check, f.structure_id, f.label, slices_json(grid, f.slices),
          f.detail) for f in findings],
    )
    conn.execute("UPDATE annotation SET state = 'checked', current_check_fk = ?, updated_at = ?"
                 " WHERE id = ?", (check_id, now, annotation_id))
    return check_id


def slices_json(grid: SeriesGrid, slices: Iterable[int]) -> str:
    return json.dumps([{"slice": k + 1, "position_mm": round(float(grid.depths[k]), 3),
                        "sop_instance_uid": grid.sop_instance_uids[k]} for k in slices])


def _code_json(code: Code | None) -> str | None:
    if code is None:
        return None
    return json.dumps({"value": code.value, "scheme": code.scheme, "meaning": code.meaning})


# --- reading, for the CLI and the bridges ------------------------------------


def list_annotations(conn: sqlite3.Connection, state: str | None = None,
                     series_uid: str | None = None) -> list[sqlite3.Row]:
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
    return conn.execute(sql + " ORDER BY a.id", args).fetchall()


def get_annotation(conn: sqlite3.Connection, annotation_id: int) -> sqlite3.Row | None:
    rows = conn.execute("SELECT a.*, c.verdict, c.checked_at, c.protocol_name FROM annotation a"
                        " LEFT JOIN annotation_check c ON c.id = a.current_check_fk"
                        " WHERE a.id = ?", (annotation_id,)).fetchall()
    return rows[0] if rows else None


def structures(conn: sqlite3.Connection, check_id: int) -> list[sqlite3.Row]:
    return conn.execute("SELECT * FROM annotation_structure WHERE check_fk = ? ORDER BY id",
                        (check_id,)).fetchall()


def findings(conn: sqlite3.Connection, check_id: int) -> list[sqlite3.Row]:
    return conn.execute("SELECT * FROM annotation_finding WHERE check_fk = ? ORDER BY id",
                        (check_id,)).fetchall()


def refused_objects(conn: sqlite3.Connection, annotation_id: int) -> list[sqlite3.Row]:
    return conn.execute("SELECT * FROM annotation_object WHERE annotation_fk = ?"
                        " AND state = 'refused' ORDER BY id", (annotation_id,)).fetchall()
