"""The PostgreSQL repositories: SQLite's portable statements, and PostgreSQL's where they differ.

:class:`PgSession` exposes the same repositories as
:class:`node.storage.sqlite.repos.Session`. Each class here is SQLite's
repository running through :class:`~node.storage.postgresql.connection.PgConnection`,
with the methods whose SQL is not portable written again for PostgreSQL:
``total_changes`` (a per-connection counter PostgreSQL does not have) becomes
the cursor's row count, ``group_concat`` becomes ``string_agg``, ``rowid``
becomes an explicit column, a boolean is compared as a boolean, and a unique
violation is asked for with ``ON CONFLICT`` (an error would abort the whole
transaction in PostgreSQL, where SQLite lets it go on).

The audit chain is one chain across every node on the index: the append
(:meth:`PgAudit.last` then :meth:`PgAudit.insert`, in the event's transaction)
holds a transaction-level advisory lock, so two nodes can never chain two
events to the same predecessor; ``lamina audit verify`` walks one sequence.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

from psycopg.pq import TransactionStatus

from node.storage.postgresql.connection import PgConnection
from node.storage.records import AuditRow, QuarantineRow, Row
from node.storage.sqlite.agreement import SqliteAgreement
from node.storage.sqlite.outbox import SqliteOutbox
from node.storage.sqlite.repos import (
    _AUDIT_COLUMNS,
    _REID_TABLES,
    SqliteAnnotations,
    SqliteAudit,
    SqliteEvidence,
    SqliteInstances,
    SqliteQuarantine,
    SqliteReid,
    SqliteReports,
    SqliteSeries,
    SqliteSignatures,
    SqliteUsers,
    _quarantine_row,
    _rows,
)

#: Advisory lock keys (one 64-bit space per database). Arbitrary, fixed, and documented in
#: node/storage/postgresql/index.py.
WRITER_LOCK = 0x4C414D494E4101   # every write transaction, like SQLite's one writer
AUDIT_LOCK = 0x4C414D494E4102    # the audit chain's append
MIGRATION_LOCK = 0x4C414D494E4103
_IDLE = TransactionStatus.IDLE


class PgSession:
    """One connection's view of the PostgreSQL index, through its repositories."""

    __slots__ = ("agreement", "annotations", "audit", "conn", "evidence", "instances", "outbox",
                 "quarantine", "reid", "reports", "series", "signatures", "users")

    def __init__(self, conn: PgConnection) -> None:
        self.conn = conn
        self.instances = PgInstances(conn)
        self.series = SqliteSeries(conn)
        self.annotations = SqliteAnnotations(conn)
        self.quarantine = PgQuarantine(conn)
        self.audit = PgAudit(conn)
        self.reid = PgReid(conn)
        self.evidence = SqliteEvidence(conn)
        self.reports = PgReports(conn)
        self.users = PgUsers(conn)
        self.signatures = SqliteSignatures(conn)
        self.outbox = SqliteOutbox(conn)
        self.agreement = PgAgreement(conn)


_BULK_COLUMNS = ("series_fk, sop_instance_uid, sop_class_uid, instance_number, blob_sha256,"
                 " blob_size, transfer_syntax_uid, calling_ae, association_id, received_at,"
                 " content_date, content_time, acquisition_date_time")
#: The rows of one bulk batch, in arrival order (``n``); gone at the end of the transaction.
_BULK_TABLE = (
    "CREATE TEMPORARY TABLE IF NOT EXISTS bulk_instance (n BIGINT GENERATED ALWAYS AS IDENTITY,"
    " series_fk BIGINT, sop_instance_uid TEXT, sop_class_uid TEXT, instance_number BIGINT,"
    " blob_sha256 TEXT, blob_size BIGINT, transfer_syntax_uid TEXT, calling_ae TEXT,"
    " association_id TEXT, received_at TEXT, content_date TEXT, content_time TEXT,"
    " acquisition_date_time TEXT) ON COMMIT DROP")


class PgInstances(SqliteInstances):
    __slots__ = ()

    def _insert_instances(self, rows: list[tuple]) -> int:
        """``COPY`` into a temporary table, then one ``INSERT … SELECT`` that skips indexed
        UIDs: one round trip per batch instead of one per row (1 M rows: minutes → seconds)."""
        if not rows:
            return 0
        raw = self.conn.raw
        raw.execute(_BULK_TABLE)
        raw.execute("TRUNCATE bulk_instance")
        with raw.cursor().copy(f"COPY bulk_instance ({_BULK_COLUMNS}) FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)
        return raw.execute(
            f"INSERT INTO instance ({_BULK_COLUMNS}) SELECT {_BULK_COLUMNS} FROM bulk_instance"
            " ORDER BY n ON CONFLICT (sop_instance_uid) DO NOTHING").rowcount

    def _refresh_modalities(self, study_fk: int) -> None:
        self.conn.execute(
            "UPDATE study SET modalities_in_study = coalesce((SELECT string_agg(modality,"
            " '\\' ORDER BY modality) FROM (SELECT DISTINCT modality FROM series"
            " WHERE study_fk = ? AND modality IS NOT NULL AND modality <> '') m), '')"
            " WHERE id = ?", (study_fk, study_fk))


class PgQuarantine(SqliteQuarantine):
    __slots__ = ()

    def with_received(self, received_sha256: str, released: bool) -> QuarantineRow | None:
        if not received_sha256:
            return None
        row = self.conn.execute(
            "SELECT * FROM quarantine WHERE received_sha256 = ? AND (released_at IS NOT NULL) = ?"
            " ORDER BY id LIMIT 1", (received_sha256, released)).fetchone()
        return _quarantine_row(row) if row else None


class PgAudit(SqliteAudit):
    """The append takes :data:`AUDIT_LOCK` for the rest of its transaction before it reads
    the chain's head, so the head it chains to is the newest committed by any node."""

    __slots__ = ()

    def last(self) -> tuple[int, str] | None:
        if self.conn.raw.info.transaction_status != _IDLE:  # in a write transaction
            self.conn.execute("SELECT pg_advisory_xact_lock(?)", (AUDIT_LOCK,))
        return super().last()

    def insert(self, row: AuditRow) -> None:
        self.conn.execute("SELECT pg_advisory_xact_lock(?)", (AUDIT_LOCK,))
        super().insert(row)

    def rows(self) -> Iterator[AuditRow]:
        for r in self.conn.execute(f"SELECT {_AUDIT_COLUMNS} FROM audit_event ORDER BY seq"):
            yield AuditRow(*r)


class PgReid(SqliteReid):
    __slots__ = ()

    def insert(self, kind: str, rows: list[tuple[bytes, str, bytes, bytes]]) -> int:
        return self.conn.executemany(
            f"INSERT INTO {_REID_TABLES[kind]} (lookup, key_id, nonce, payload)"
            " VALUES (?, ?, ?, ?) ON CONFLICT (lookup) DO NOTHING", rows).rowcount


class PgUsers(SqliteUsers):
    __slots__ = ()

    def insert(self, user_id: str, printed_name: str, rater_ids: list[str],
               public_key: bytes, private_key: bytes, now: str) -> int:
        row = self.conn.execute(
            "INSERT INTO review_user (user_id, printed_name, rater_ids, public_key,"
            " private_key, created_at) VALUES (?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (user_id) DO NOTHING RETURNING id",
            (user_id, printed_name, json.dumps(rater_ids), public_key, private_key,
             now)).fetchone()
        if row is None:
            raise KeyError(user_id)
        return row[0]


class PgReports(SqliteReports):
    __slots__ = ()

    def integrity(self) -> str:
        """``ok``, or the index's indexes PostgreSQL marks invalid (a failed concurrent build);
        table and page consistency is PostgreSQL's own job (checksums, ``amcheck``)."""
        invalid = [r[0] for r in self.conn.execute(
            "SELECT c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid"
            " JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname = current_schema() AND NOT i.indisvalid ORDER BY 1")]
        return "ok" if not invalid else "invalid indexes: " + ", ".join(invalid)


#: agreement_structure's columns as SQLite has them (PostgreSQL's adds ``position``).
_AGREEMENT_STRUCTURE = ", ".join(
    f"s.{c}" for c in ("agreement_fk", "class_key", "structure_a", "structure_b", "answer_a",
                       "answer_b", "question", "classes_differ", "dice", "jaccard",
                       "hausdorff_mm", "hd95_mm", "volume_a_mm3", "volume_b_mm3"))


class PgAgreement(SqliteAgreement):
    __slots__ = ()

    def structures(self, agreement_id: int | None = None) -> list[Row]:
        sql = (f"SELECT {_AGREEMENT_STRUCTURE}, a.computed_at, a.rater_a, a.rater_b"
               " FROM agreement_structure s JOIN agreement a ON a.id = s.agreement_fk")
        if agreement_id is None:
            return _rows(self.conn.execute(sql + " ORDER BY a.computed_at, a.id"))
        return _rows(self.conn.execute(sql + " WHERE s.agreement_fk = ? ORDER BY s.position",
                                       (agreement_id,)))
