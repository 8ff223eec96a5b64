"""The SQLite index: connections, transactions and schema migrations.

Why plain ``sqlite3`` here rather than sqlite-utils: the hot path (one short
write transaction per received instance, from many threads and processes)
needs explicit ``BEGIN IMMEDIATE`` control and prepared statements, which the
standard library gives directly. sqlite-utils serves the read-only reports.

Concurrency model: WAL mode, so readers never block the writer. Writers
queue on a lock before they ask SQLite: a thread lock within one process and
an ``flock`` on ``<index>.writelock`` across receiving processes. SQLite's own
busy handler backs off in sleeps of up to 100 ms, which serialised two
receiving processes to less than one's throughput; the kernel hands a
released flock to the next waiter at once. ``BEGIN IMMEDIATE`` plus the busy
timeout still guards against writers that do not take the lock (the CLI's
read-only tools never write). Transactions are short: everything slow (hashing, fsync of
blobs, parsing) happens before the transaction opens.
"""

from __future__ import annotations

import fcntl
import os
import queue
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path


class IndexUnavailable(RuntimeError):
    """The index could not be read or written (locked, full, corrupt)."""


def migrations() -> list[tuple[int, str, str]]:
    """The schema migrations shipped with the package, as (version, name, sql)."""
    found = []
    for entry in resources.files("node.storage").joinpath("migrations").iterdir():
        name = entry.name
        if name.endswith(".sql") and name[:4].isdigit():
            found.append((int(name[:4]), name, entry.read_text(encoding="utf-8")))
    return sorted(found)


class Index:
    """Owns the index file and hands out pooled connections."""

    def __init__(self, path: Path, busy_timeout_ms: int = 10_000) -> None:
        self.path = path
        self.busy_timeout_ms = busy_timeout_ms
        self._pool: queue.SimpleQueue[sqlite3.Connection] = queue.SimpleQueue()
        self._write_lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock_fd: int | None = None

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self.path,
            timeout=self.busy_timeout_ms / 1000,
            isolation_level=None,  # we issue BEGIN/COMMIT ourselves
            check_same_thread=False,  # pooled: used by one thread at a time
        )
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA journal_mode=WAL")
        # FULL: the WAL is fsync'd at every commit, so an answered C-STORE
        # survives power loss, not only a process crash.
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
        return conn

    @contextmanager
    def _connection(self) -> Iterator[sqlite3.Connection]:
        try:
            conn = self._pool.get_nowait()
        except queue.Empty:
            conn = self._connect()
        try:
            yield conn
        finally:
            self._pool.put(conn)

    @contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        """A connection for queries; each statement sees a consistent snapshot."""
        try:
            with self._connection() as conn:
                yield conn
        except sqlite3.Error as exc:
            raise IndexUnavailable(str(exc)) from exc

    @contextmanager
    def _process_lock(self) -> Iterator[None]:
        """The cross-process writer lock (held only by this thread: see _write_lock)."""
        if self._lock_fd is None:
            self._lock_fd = os.open(f"{self.path}.writelock", os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    @contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """One short write transaction: committed on exit, rolled back on error."""
        with self._write_lock, self._process_lock(), self._connection() as conn:
            try:
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise IndexUnavailable(str(exc)) from exc
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException as exc:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                if isinstance(exc, sqlite3.Error):
                    raise IndexUnavailable(str(exc)) from exc
                raise

    def migrate(self) -> int:
        """Bring the schema to the newest version; returns the version reached.

        Runs under an exclusive transaction so that several processes starting
        at once apply each migration exactly once.
        """
        with self._connection() as conn:
            conn.execute("BEGIN EXCLUSIVE")
            try:
                version = conn.execute("PRAGMA user_version").fetchone()[0]
                for number, _name, sql in migrations():
                    if number <= version:
                        continue
                    for statement in _split_sql(sql):
                        conn.execute(statement)
                    conn.execute(f"PRAGMA user_version={number}")
                    version = number
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        return version

    def schema_version(self) -> int:
        with self.read() as conn:
            return conn.execute("PRAGMA user_version").fetchone()[0]

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        while True:
            try:
                self._pool.get_nowait().close()
            except queue.Empty:
                return


def _split_sql(script: str) -> list[str]:
    """Split a migration into statements, keeping trigger bodies whole.

    ``executescript`` would commit our transaction, so statements run one by one;
    ``sqlite3.complete_statement`` knows where a CREATE TRIGGER really ends.
    """
    statements, current = [], ""
    for line in script.splitlines(keepends=True):
        if line.lstrip().startswith("--") and not current.strip():
            continue
        current += line
        if sqlite3.complete_statement(current):
            statements.append(current.strip())
            current = ""
    if current.strip():
        raise ValueError("migration ends inside a statement")
    return statements
