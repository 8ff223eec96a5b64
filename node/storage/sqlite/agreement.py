"""The SQLite repository of agreement, double reading, categorical ratings and adjudication
(issue 10; the tables of migration 0010)."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable

from node.storage.records import AgreementStructureRow, RatingRow, Row

#: Annotation states in which a reading counts for agreement (checked or further on).
READING_STATES = ("checked", "needs-adjudication", "adjudicated", "approved")


def _rows(cursor: sqlite3.Cursor) -> list[Row]:
    return [dict(r) for r in cursor.fetchall()]


class SqliteAgreement:
    __slots__ = ("conn",)

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    # --- raters and readings ------------------------------------------------

    def set_rater(self, annotation_id: int, rater: str) -> None:
        self.conn.execute("UPDATE annotation SET rater = ? WHERE id = ?", (rater, annotation_id))

    def readings(self, series_uid: str) -> list[Row]:
        """The series' annotations that have a current check, with their rater, oldest first."""
        marks = ", ".join("?" * len(READING_STATES))
        return _rows(self.conn.execute(
            f"SELECT id, kind, rater, annotator_ae, state, current_check_fk, source_series_uid"
            f" FROM annotation WHERE source_series_uid = ? AND current_check_fk IS NOT NULL"
            f" AND state IN ({marks}) ORDER BY id", (series_uid, *READING_STATES)))

    def study_of_series(self, series_uid: str) -> str | None:
        row = self.conn.execute(
            "SELECT st.study_instance_uid FROM series se JOIN study st ON st.id = se.study_fk"
            " WHERE se.series_instance_uid = ?", (series_uid,)).fetchone()
        return row[0] if row else None

    def raters_of_study(self, study_uid: str) -> list[str]:
        """Distinct raters with a checked reading of any series of the study."""
        marks = ", ".join("?" * len(READING_STATES))
        return [r[0] for r in self.conn.execute(
            f"SELECT DISTINCT a.rater FROM annotation a JOIN series se"
            f" ON se.series_instance_uid = a.source_series_uid JOIN study st ON st.id = se.study_fk"
            f" WHERE st.study_instance_uid = ? AND a.current_check_fk IS NOT NULL"
            f" AND a.state IN ({marks}) ORDER BY a.rater", (study_uid, *READING_STATES))]

    # --- comparisons ----------------------------------------------------------

    def record(self, series_uid: str, study_uid: str, pair: tuple[Row, Row],
               protocol_sha256: str, reasons: list[str],
               structures: Iterable[AgreementStructureRow], now: str) -> int:
        """Store (or replace) the comparison of two readings; its id."""
        a, b = pair
        verdict = "disagree" if reasons else "agree"
        agreement_id = self.conn.execute(
            "INSERT INTO agreement (series_uid, study_uid, annotation_a, annotation_b, check_a,"
            " check_b, rater_a, rater_b, protocol_sha256, verdict, reasons, computed_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (annotation_a, annotation_b) DO UPDATE SET check_a = excluded.check_a,"
            " check_b = excluded.check_b, rater_a = excluded.rater_a, rater_b = excluded.rater_b,"
            " protocol_sha256 = excluded.protocol_sha256, verdict = excluded.verdict,"
            " reasons = excluded.reasons, computed_at = excluded.computed_at RETURNING id",
            (series_uid, study_uid, a["id"], b["id"], a["current_check_fk"],
             b["current_check_fk"], a["rater"], b["rater"], protocol_sha256, verdict,
             json.dumps(reasons), now)).fetchone()[0]
        self.conn.execute("DELETE FROM agreement_structure WHERE agreement_fk = ?",
                          (agreement_id,))
        self.conn.executemany(
            "INSERT INTO agreement_structure (agreement_fk, class_key, structure_a, structure_b,"
            " answer_a, answer_b, question, classes_differ, dice, jaccard, hausdorff_mm, hd95_mm,"
            " volume_a_mm3, volume_b_mm3) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [(agreement_id, s.class_key, s.structure_a, s.structure_b, s.answer_a, s.answer_b,
              s.question, int(s.classes_differ), s.dice, s.jaccard, s.hausdorff_mm, s.hd95_mm,
              s.volume_a_mm3, s.volume_b_mm3) for s in structures])
        return agreement_id

    def get(self, agreement_id: int) -> Row | None:
        row = self.conn.execute("SELECT * FROM agreement WHERE id = ?",
                                (agreement_id,)).fetchone()
        return dict(row) if row else None

    def comparisons(self) -> list[Row]:
        return _rows(self.conn.execute("SELECT * FROM agreement ORDER BY id"))

    def structures(self, agreement_id: int | None = None) -> list[Row]:
        """Structures of one comparison, or of all (with the comparison's time), oldest first."""
        sql = ("SELECT s.*, a.computed_at, a.rater_a, a.rater_b FROM agreement_structure s"
               " JOIN agreement a ON a.id = s.agreement_fk")
        if agreement_id is None:
            return _rows(self.conn.execute(sql + " ORDER BY a.computed_at, a.id"))
        return _rows(self.conn.execute(sql + " WHERE s.agreement_fk = ? ORDER BY s.rowid",
                                       (agreement_id,)))

    # --- categorical ratings --------------------------------------------------

    def rated(self, question: str, item: str, rater: str) -> bool:
        return self.conn.execute(
            "SELECT 1 FROM rating WHERE question = ? AND item = ? AND rater = ?",
            (question, item, rater)).fetchone() is not None

    def insert_ratings(self, rows: Iterable[RatingRow], now: str) -> int:
        """Insert answers; a second answer by a rater to one item raises (the caller checks
        with :meth:`rated` first, and the transaction rolls back on a race)."""
        cursor = self.conn.executemany(
            "INSERT INTO rating (question, item, study_uid, rater, answer, source, recorded_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            [(r.question, r.item, r.study_uid, r.rater, r.answer, r.source, now) for r in rows])
        return cursor.rowcount

    def ratings(self) -> list[Row]:
        return _rows(self.conn.execute("SELECT * FROM rating ORDER BY question, item, rater"))

    def study_known(self, study_uid: str) -> bool:
        return self.conn.execute("SELECT 1 FROM study WHERE study_instance_uid = ?",
                                 (study_uid,)).fetchone() is not None

    def study_of_instance(self, sop_instance_uid: str) -> str | None:
        row = self.conn.execute(
            "SELECT st.study_instance_uid FROM instance i JOIN series se ON se.id = i.series_fk"
            " JOIN study st ON st.id = se.study_fk WHERE i.sop_instance_uid = ?",
            (sop_instance_uid,)).fetchone()
        return row[0] if row else None

    def finding_counts(self) -> list[Row]:
        """Findings of every annotation's current check, by rater and check name."""
        return _rows(self.conn.execute(
            "SELECT a.rater, f.check_name, COUNT(*) AS findings FROM annotation a"
            " JOIN annotation_finding f ON f.check_fk = a.current_check_fk"
            " GROUP BY a.rater, f.check_name ORDER BY a.rater, f.check_name"))

    def readings_by_rater(self) -> list[Row]:
        """Annotations per rater and state."""
        return _rows(self.conn.execute(
            "SELECT rater, state, COUNT(*) AS annotations FROM annotation"
            " GROUP BY rater, state ORDER BY rater, state"))

    # --- double reading -------------------------------------------------------

    def choose(self, study_uid: str, now: str) -> bool:
        """Put a study on the double-read list; False when it already was."""
        return self.conn.execute(
            "INSERT INTO double_read (study_uid, state, chosen_at) VALUES (?, 'waiting', ?)"
            " ON CONFLICT (study_uid) DO NOTHING", (study_uid, now)).rowcount == 1

    def complete(self, study_uid: str, now: str) -> bool:
        """Both readings are in; False when the study was not waiting."""
        return self.conn.execute(
            "UPDATE double_read SET state = 'complete', completed_at = ?"
            " WHERE study_uid = ? AND state = 'waiting'", (now, study_uid)).rowcount == 1

    def double_reads(self, state: str | None = None) -> list[Row]:
        if state is None:
            return _rows(self.conn.execute("SELECT * FROM double_read ORDER BY chosen_at"))
        return _rows(self.conn.execute(
            "SELECT * FROM double_read WHERE state = ? ORDER BY chosen_at", (state,)))

    def blinded_series(self, ae_title: str) -> list[str]:
        """Series of stored annotation instances (SEGs) in studies still waiting for their
        second reading, made by a peer other than ``ae_title``: what it must not see."""
        return [r[0] for r in self.conn.execute(
            "SELECT DISTINCT se.series_instance_uid FROM double_read d"
            " JOIN study st ON st.study_instance_uid = d.study_uid"
            " JOIN series se ON se.study_fk = st.id"
            " JOIN instance i ON i.series_fk = se.id"
            " JOIN annotation_object o ON o.sop_instance_uid = i.sop_instance_uid"
            " JOIN annotation a ON a.id = o.annotation_fk"
            " WHERE d.state = 'waiting' AND a.annotator_ae != ?", (ae_title,))]

    # --- adjudication ---------------------------------------------------------

    def open_adjudication(self, agreement_id: int, now: str) -> int:
        """The open adjudication of a comparison, opened now if there is none."""
        row = self.conn.execute("SELECT id FROM adjudication WHERE agreement_fk = ?",
                                (agreement_id,)).fetchone()
        if row is not None:
            return row[0]
        return self.conn.execute(
            "INSERT INTO adjudication (agreement_fk, state, opened_at) VALUES (?, 'open', ?)"
            " RETURNING id", (agreement_id, now)).fetchone()[0]

    def decide(self, adjudication_id: int, decision: str, chosen: int | None, by: str,
               now: str) -> bool:
        """Record the decision; False when it was no longer open (compare-and-set)."""
        return self.conn.execute(
            "UPDATE adjudication SET state = 'decided', decision = ?, chosen_annotation = ?,"
            " decided_by = ?, decided_at = ? WHERE id = ? AND state = 'open'",
            (decision, chosen, by, now, adjudication_id)).rowcount == 1

    def adjudications(self, state: str | None = None) -> list[Row]:
        sql = ("SELECT j.*, a.series_uid, a.study_uid, a.annotation_a, a.annotation_b,"
               " a.rater_a, a.rater_b, a.reasons FROM adjudication j"
               " JOIN agreement a ON a.id = j.agreement_fk")
        if state is None:
            return _rows(self.conn.execute(sql + " ORDER BY j.id"))
        return _rows(self.conn.execute(sql + " WHERE j.state = ? ORDER BY j.id", (state,)))

    def adjudication(self, adjudication_id: int) -> Row | None:
        row = self.conn.execute(
            "SELECT j.*, a.series_uid, a.study_uid, a.annotation_a, a.annotation_b, a.rater_a,"
            " a.rater_b, a.reasons FROM adjudication j JOIN agreement a ON a.id = j.agreement_fk"
            " WHERE j.id = ?", (adjudication_id,)).fetchone()
        return dict(row) if row else None
