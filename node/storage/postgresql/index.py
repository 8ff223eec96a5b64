"""The PostgreSQL index: a pool of connections, transactions, and the migrations.

Selected by ``[index] backend = "postgresql"`` and ``dsn`` (a libpq connection
string or URI); the password may instead come from the environment variable
``LAMINA_PG_PASSWORD`` so it stays out of the config file.

Writer coordination (no ``flock``: the writers may be on other machines):

* every write transaction first takes the transaction-level advisory lock
  :data:`~node.storage.postgresql.repos.WRITER_LOCK`, so write transactions of
  all nodes run one after another, as SQLite's do, each seeing everything
  committed before it (READ COMMITTED). Transactions are as short as on SQLite
  (hashing, fsync of blobs and parsing happen before one opens), so the lock is
  held for milliseconds; readers never wait for it;
* the audit chain is one chain across the nodes: its append also holds
  :data:`~node.storage.postgresql.repos.AUDIT_LOCK` from reading the head to the
  commit (see :mod:`node.storage.postgresql.repos`), so it stays one verifiable
  sequence even if the writer lock is ever narrowed;
* migrations run under the session-level advisory lock
  :data:`~node.storage.postgresql.repos.MIGRATION_LOCK`; each is one transaction
  recorded in ``lamina_migration``, so nodes starting together apply it once.

The advisory lock keys are fixed 64-bit numbers (``LAMINA`` in ASCII, then 1, 2,
3): another application sharing the database must not use them.

A pool per process: connections are kept in a queue and handed to one thread at
a time; a connection that broke (PostgreSQL restarted) is dropped, not reused,
and the next caller connects afresh, so a node recovers without a restart. Any
failure of the database surfaces as :class:`IndexUnavailable`.
"""

from __future__ import annotations

import os
import queue
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources

import psycopg
from psycopg.pq import TransactionStatus

from node.storage.interface import IndexUnavailable
from node.storage.postgresql.connection import PgConnection, PgRow, pg_row
from node.storage.postgresql.lease import PgLease
from node.storage.postgresql.matcher import PgMatcher
from node.storage.postgresql.repos import MIGRATION_LOCK, WRITER_LOCK, PgSession

#: The environment variable that supplies the password when the DSN has none.
PASSWORD_ENV = "LAMINA_PG_PASSWORD"


def migrations() -> list[tuple[int, str, str]]:
    """The PostgreSQL schema migrations shipped with the package, as (version, name, sql)."""
    found = []
    for entry in resources.files("node.storage.postgresql").joinpath("migrations").iterdir():
        name = entry.name
        if name.endswith(".sql") and name[:4].isdigit():
            found.append((int(name[:4]), name, entry.read_text(encoding="utf-8")))
    return sorted(found)


class PostgresIndex:
    """Owns the connection pool and hands out sessions, transactions and the matcher."""

    def __init__(self, dsn: str, busy_timeout_ms: int = 10_000) -> None:
        """``busy_timeout_ms`` bounds how long a statement waits for a lock (the writer
        lock included), as SQLite's busy timeout does: past it, IndexUnavailable."""
        self.dsn = dsn
        self.busy_timeout_ms = busy_timeout_ms
        self._pool: queue.SimpleQueue[psycopg.Connection[PgRow]] = queue.SimpleQueue()

    @classmethod
    def open_existing(cls, dsn: str, busy_timeout_ms: int = 10_000) -> PostgresIndex:
        """An index that must already hold a Lamina schema: IndexUnavailable otherwise,
        and nothing is created."""
        index = cls(dsn, busy_timeout_ms)
        try:
            version = index.schema_version()
        except IndexUnavailable:
            index.close()
            raise
        if version < 1:
            index.close()
            raise IndexUnavailable("the PostgreSQL database holds no Lamina index (no schema)")
        return index

    def _connect(self, **extra: object) -> psycopg.Connection[PgRow]:
        password = os.environ.get(PASSWORD_ENV)
        if password:
            extra["password"] = password
        return psycopg.connect(
            self.dsn, autocommit=True, row_factory=pg_row, connect_timeout=10,
            options=f"-c lock_timeout={self.busy_timeout_ms}", **extra)

    @contextmanager
    def connection(self) -> Iterator[psycopg.Connection[PgRow]]:
        """A pooled connection in autocommit mode; each statement sees a fresh snapshot."""
        try:
            conn = self._pool.get_nowait()
        except queue.Empty:
            conn = None
        try:
            if conn is None or conn.closed:
                conn = self._connect()
            yield conn
        except psycopg.Error as exc:
            raise IndexUnavailable(f"PostgreSQL: {_reason(exc)}") from exc
        finally:
            if conn is not None:
                self._release(conn)

    def _release(self, conn: psycopg.Connection[PgRow]) -> None:
        """Back to the pool when it is healthy and idle; closed otherwise. A broken one
        (the server restarted or went away) closes the whole pool: its other connections
        died the same way, and the next callers should connect afresh rather than each
        find that out with a failed store."""
        if conn.broken:
            conn.close()
            self.close()
        elif not conn.closed and conn.info.transaction_status == TransactionStatus.IDLE:
            self._pool.put(conn)
        else:
            conn.close()

    @contextmanager
    def reader(self) -> Iterator[PgSession]:
        with self.connection() as conn:
            yield PgSession(PgConnection(conn))

    @contextmanager
    def transaction(self) -> Iterator[PgSession]:
        """One write transaction behind the writer lock: committed on exit, rolled back
        on error."""
        with self.connection() as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (WRITER_LOCK,))
            yield PgSession(PgConnection(conn))

    def lease(self, name: str) -> PgLease:
        """A lease held on a connection of its own, with TCP keepalives (see
        :mod:`node.storage.postgresql.lease`)."""
        return PgLease(lambda: self._connect(keepalives=1, keepalives_idle=10,
                                             keepalives_interval=5, keepalives_count=3), name)

    def matcher(self, retrieve_ae_title: str) -> PgMatcher:
        return PgMatcher(self.connection, retrieve_ae_title)

    def migrate(self) -> int:
        """Bring the schema to the newest version under the migration lock; the version."""
        with self.connection() as conn:
            conn.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK,))
            try:
                conn.execute("CREATE TABLE IF NOT EXISTS lamina_migration (version BIGINT"
                             " PRIMARY KEY, name TEXT NOT NULL, applied_at TIMESTAMPTZ NOT NULL"
                             " DEFAULT now())")
                version = _version(conn)
                for number, name, sql in migrations():
                    if number > version:
                        with conn.transaction():
                            conn.execute(sql)
                            conn.execute("INSERT INTO lamina_migration (version, name)"
                                         " VALUES (%s, %s)", (number, name))
                        version = number
            finally:
                if not conn.broken:
                    conn.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK,))
        return version

    def schema_version(self) -> int:
        with self.connection() as conn:
            if conn.execute("SELECT to_regclass('lamina_migration')").fetchone()[0] is None:
                return 0
            return _version(conn)

    def close(self) -> None:
        while True:
            try:
                self._pool.get_nowait().close()
            except queue.Empty:
                return


def _version(conn: psycopg.Connection[PgRow]) -> int:
    return conn.execute("SELECT coalesce(max(version), 0) FROM lamina_migration").fetchone()[0]


def _reason(exc: psycopg.Error) -> str:
    """The first line of the server's or libpq's message (never the DSN or a password)."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
