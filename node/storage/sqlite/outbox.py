"""The forwarding outbox's statements (migration 0011): queue, claim what is due, record.

Kept apart from :mod:`node.storage.sqlite.repos` because it is one job: the
rows a forward worker sends, retries and dead-letters. Rows are queued by
``INSERT … SELECT … ON CONFLICT DO NOTHING`` straight from the annotation's
current objects or the source series' instances, so a 300-slice series is
one statement inside the approval's transaction, and a second rule or a
second approval naming the same (object, destination) adds nothing.
"""

from __future__ import annotations

import sqlite3

from node.storage.records import Row

_COLUMNS = ("annotation_fk, rule, destination, kind, mode, sop_instance_uid, sop_class_uid,"
            " blob_sha256, transfer_syntax_uid, state, next_attempt_at, created_at, updated_at")
_ON_CONFLICT = " ON CONFLICT (sop_instance_uid, destination) DO NOTHING"
#: States a row may still be sent from.
_PENDING = "('queued', 'failed')"


def _rows(cursor: sqlite3.Cursor) -> list[Row]:
    return [dict(r) for r in cursor.fetchall()]


class SqliteOutbox:
    __slots__ = ("conn",)

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    # --- queueing (inside the approval's transaction) ---------------------------------

    def enqueue_annotation(self, annotation_id: int, rule: str, destination: str, mode: str,
                           now: str, at: float) -> int:
        """The annotation's current objects (its SEG); how many rows were new."""
        return self.conn.execute(
            f"INSERT INTO forward_item ({_COLUMNS}) SELECT ?, ?, ?, 'seg', ?, o.sop_instance_uid,"
            " o.sop_class_uid, o.blob_sha256, o.transfer_syntax_uid, 'queued', ?, ?, ?"
            " FROM annotation_object o WHERE o.annotation_fk = ? AND o.state = 'current'"
            " ORDER BY o.id" + _ON_CONFLICT,
            (annotation_id, rule, destination, mode, at, now, now, annotation_id)).rowcount

    def enqueue_to_build(self, annotation_id: int, placeholder_uid: str, sop_class_uid: str,
                         rule: str, destination: str, mode: str, now: str, at: float) -> int:
        """One row for an object made at its first send (an overlay annotation's SEG): no
        blob yet, ``placeholder_uid`` until :meth:`set_object`. How many rows were new."""
        return self.conn.execute(
            f"INSERT INTO forward_item ({_COLUMNS}) VALUES (?, ?, ?, 'seg', ?, ?, ?, '', '',"
            " 'queued', ?, ?, ?)" + _ON_CONFLICT,
            (annotation_id, rule, destination, mode, placeholder_uid, sop_class_uid, at, now,
             now)).rowcount

    def set_object(self, item_id: int, sop_instance_uid: str, sop_class_uid: str,
                   blob_sha256: str, transfer_syntax_uid: str, now: str) -> None:
        """The object made for a row queued by :meth:`enqueue_to_build`."""
        self.conn.execute(
            "UPDATE forward_item SET sop_instance_uid = ?, sop_class_uid = ?, blob_sha256 = ?,"
            " transfer_syntax_uid = ?, updated_at = ? WHERE id = ? AND blob_sha256 = ''",
            (sop_instance_uid, sop_class_uid, blob_sha256, transfer_syntax_uid, now, item_id))

    def enqueue_series(self, annotation_id: int, series_uid: str, rule: str, destination: str,
                       mode: str, now: str, at: float) -> int:
        """Every stored instance of the annotation's source series; how many rows were new."""
        return self.conn.execute(
            f"INSERT INTO forward_item ({_COLUMNS}) SELECT ?, ?, ?, 'source', ?,"
            " i.sop_instance_uid, i.sop_class_uid, i.blob_sha256, i.transfer_syntax_uid,"
            " 'queued', ?, ?, ? FROM instance i JOIN series s ON s.id = i.series_fk"
            " WHERE s.series_instance_uid = ? ORDER BY i.id" + _ON_CONFLICT,
            (annotation_id, rule, destination, mode, at, now, now, series_uid)).rowcount

    def annotation_classes(self, annotation_id: int) -> set[str]:
        """The protocol classes of the structures of the annotation's current check."""
        return {r[0] for r in self.conn.execute(
            "SELECT DISTINCT s.class_key FROM annotation_structure s JOIN annotation a"
            " ON a.current_check_fk = s.check_fk WHERE a.id = ? AND s.class_key IS NOT NULL",
            (annotation_id,))}

    # --- the worker -------------------------------------------------------------------

    def due(self, at: float, limit: int) -> list[Row]:
        """Rows to send now, grouped by destination, oldest first."""
        return _rows(self.conn.execute(
            f"SELECT f.*, a.state AS annotation_state, a.source_series_uid FROM forward_item f"
            f" JOIN annotation a ON a.id = f.annotation_fk WHERE f.state IN {_PENDING}"
            " AND f.next_attempt_at <= ? ORDER BY f.destination, f.id LIMIT ?", (at, limit)))

    def next_due(self) -> float | None:
        """When the earliest row still to send is due (epoch seconds), if any."""
        return self.conn.execute(
            f"SELECT min(next_attempt_at) FROM forward_item WHERE state IN {_PENDING}"
        ).fetchone()[0]

    def mark_sent(self, item_id: int, status: int, warning: str | None, now: str) -> bool:
        """Delivered (a warning status kept in ``warning``); False when no longer pending."""
        return self.conn.execute(
            "UPDATE forward_item SET state = 'sent', attempts = attempts + 1, last_status = ?,"
            " last_error = NULL, warning = ?, sent_at = ?, updated_at = ?"
            f" WHERE id = ? AND state IN {_PENDING}",
            (status, warning, now, now, item_id)).rowcount == 1

    def mark_failed(self, item_id: int, status: int | None, error: str, next_at: float,
                    max_attempts: int, now: str) -> str | None:
        """One more failed attempt: ``failed`` (retried at ``next_at``) or ``dead`` once
        ``max_attempts`` is reached. The state reached; None when no longer pending."""
        row = self.conn.execute(
            "UPDATE forward_item SET attempts = attempts + 1, last_status = ?, last_error = ?,"
            " next_attempt_at = ?, updated_at = ?,"
            " state = CASE WHEN attempts + 1 >= ? THEN 'dead' ELSE 'failed' END"
            f" WHERE id = ? AND state IN {_PENDING} RETURNING state",
            (status, error, next_at, now, max_attempts, item_id)).fetchone()
        return row[0] if row else None

    def refuse(self, item_id: int, reason: str, now: str) -> bool:
        """The object may not leave (its annotation is not approved): never sent."""
        return self.conn.execute(
            "UPDATE forward_item SET state = 'refused', last_error = ?, updated_at = ?"
            f" WHERE id = ? AND state IN {_PENDING}", (reason, now, item_id)).rowcount == 1

    # --- operators ------------------------------------------------------------------

    def retry(self, item_id: int, at: float, now: str) -> bool:
        """A failed, dead or cancelled row queued again now, with its attempts reset."""
        return self.conn.execute(
            "UPDATE forward_item SET state = 'queued', attempts = 0, next_attempt_at = ?,"
            " updated_at = ? WHERE id = ? AND state IN ('failed', 'dead', 'cancelled')",
            (at, now, item_id)).rowcount == 1

    def cancel(self, item_id: int, now: str) -> bool:
        """A row not yet sent is never sent."""
        return self.conn.execute(
            "UPDATE forward_item SET state = 'cancelled', updated_at = ?"
            f" WHERE id = ? AND state IN {_PENDING}", (now, item_id)).rowcount == 1

    def get(self, item_id: int) -> Row | None:
        row = self.conn.execute("SELECT * FROM forward_item WHERE id = ?",
                                (item_id,)).fetchone()
        return dict(row) if row else None

    def list(self, state: str | None = None, destination: str | None = None,
             annotation_id: int | None = None) -> list[Row]:
        where, args = [], []
        for column, value in (("state", state), ("destination", destination),
                              ("annotation_fk", annotation_id)):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        sql = "SELECT * FROM forward_item"
        if where:
            sql += " WHERE " + " AND ".join(where)
        return _rows(self.conn.execute(sql + " ORDER BY id", args))

    def counts(self) -> dict[str, dict[str, int]]:
        """{destination: {state: rows}}."""
        out: dict[str, dict[str, int]] = {}
        for destination, state, n in self.conn.execute(
                "SELECT destination, state, count(*) FROM forward_item"
                " GROUP BY destination, state ORDER BY destination"):
            out.setdefault(destination, {})[state] = n
        return out
