"""The embedded index: one SQLite file in WAL mode, its connections, transactions and migrations.

Why plain ``sqlite3`` here rather than sqlite-utils: the hot path (one short
write transaction per received instance, from many threads and processes)
needs explicit ``BEGIN IMMEDIATE`` control and prepared statements, which the
standard library gives directly (the read-only reports need nothing more either, so
sqlite-utils is not a dependency).

Writer coordination belongs to this backend, not to its callers: WAL mode,
so readers never block the writer, and writers queue on a lock before they
ask SQLite: a thread lock within one process and an ``flock`` on
``<index>.writelock`` across receiving processes. SQLite's own busy handler
backs off in sleeps of up to 100 ms, which serialised two receiving
processes to less than one's throughput; the kernel hands a released flock
to the next waiter at once. ``BEGIN IMMEDIATE`` plus the busy timeout still
guards against writers that do not take the lock. Transactions are short:
everything slow (hashing, fsync of blobs, parsing) happens before one opens.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import threading
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path

from node.storage.interface import IndexUnavailable
from node.storage.sqlite.matcher import SqliteMatcher
from node.storage.sqlite.repos import Session, evidence_sha256


def migrations() -> list[tuple[int, str, str]]:
    """The schema migrations shipped with the package, as (version, name, sql)."""
    found = []
    for entry in resources.files("node.storage.sqlite").joinpath("migrations").iterdir():
        name = entry.name
        if name.endswith(".sql") and name[:4].isdigit():
            found.append((int(name[:4]), name, entry.read_text(encoding="utf-8")))
    return sorted(found)


class SqliteIndex:
    """Owns the index file and hands out pooled connections, sessions and transactions."""

    def __init__(self, path: Path, busy_timeout_ms: int = 10_000) -> None:
        self.path = path
        self.busy_timeout_ms = busy_timeout_ms
        #: Idle connections, the last one returned on top (a stack, not a queue). In WAL
        #: mode a connection drops its whole page cache when another connection wrote
        #: since its last transaction: handed out in turn, every connection found its
        #: cache stale and read back each page it touched (about 30 reads per stored
        #: instance). Taking the last one back, one thread's next transaction finds
        #: the pages it left. append() and pop() on a deque are atomic.
        self._pool: deque[sqlite3.Connection] = deque()
        self._write_lock = threading.Lock()
        self._lock_fd: int | None = None

    @classmethod
    def open_existing(cls, path: Path, busy_timeout_ms: int = 10_000) -> SqliteIndex:
        """An index that must already exist and be readable: IndexUnavailable otherwise,
        and nothing is created (status, verify and fsck on a wrong or damaged folder)."""
        if not path.is_file():
            raise IndexUnavailable(f"no index at {path}")
        # Read the header before SQLite opens the file: connecting would turn an
        # empty or foreign file into a WAL database (and create its -wal/-shm).
        try:
            with open(path, "rb") as f:
                header = f.read(100)
        except OSError as exc:
            raise IndexUnavailable(f"index {path} cannot be read: {exc.strerror}") from None
        if len(header) < 100 or not header.startswith(b"SQLite format 3\x00"):
            raise IndexUnavailable(f"index {path} is damaged or not an index"
                                   f" (not an SQLite database)")
        if header[18] != 2:  # file format write version: 2 is WAL, which every index is in
            raise IndexUnavailable(f"index {path} is not a Lamina index (not in WAL mode)")
        index = cls(path, busy_timeout_ms)
        try:
            version = index.schema_version()
        except IndexUnavailable as exc:
            index.close()
            raise IndexUnavailable(f"index {path} is damaged: {exc}") from None
        if version < 1:
            index.close()
            raise IndexUnavailable(f"index {path} is not a Lamina index (no schema)")
        return index

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
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
    def connection(self) -> Iterator[sqlite3.Connection]:
        """A pooled connection for reads (the matcher streams from it); each statement
        sees a consistent snapshot."""
        try:
            conn = self._pool.pop()
        except IndexError:
            try:
                conn = self._connect()
            except sqlite3.Error as exc:
                raise IndexUnavailable(str(exc)) from exc
        try:
            yield conn
        except sqlite3.Error as exc:
            raise IndexUnavailable(str(exc)) from exc
        finally:
            self._pool.append(conn)

    @contextmanager
    def reader(self) -> Iterator[Session]:
        """Reads through the repositories, on one connection."""
        with self.connection() as conn:
            yield Session(conn)

    @contextmanager
    def _process_lock(self) -> Iterator[None]:
        """The cross-process writer lock (held only by this thread: see _write_lock)."""
        if self._lock_fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._lock_fd = os.open(f"{self.path}.writelock", os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """One short write transaction: committed on exit, rolled back on error."""
        with self._write_lock, self._process_lock(), self.connection() as conn:
            try:
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise IndexUnavailable(str(exc)) from exc
            try:
                yield Session(conn)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

    def lease(self, name: str) -> AlwaysHeld:
        """One node per SQLite index (``lamina serve`` locks the data folder), so its
        supervisor holds every lease."""
        return AlwaysHeld()

    def matcher(self, retrieve_ae_title: str) -> SqliteMatcher:
        return SqliteMatcher(self.connection, retrieve_ae_title)

    def migrate(self) -> int:
        """Bring the schema to the newest version; returns the version reached.

        Each migration runs in its own exclusive transaction that re-reads the
        version, so several processes starting at once apply it exactly once.
        """
        with self.connection() as conn:
            # Migration 0012 finds the evidence texts it moves by the repository's key.
            conn.create_function("lamina_sha256", 1, evidence_sha256, deterministic=True)
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            for number, name, sql in migrations():
                if number > version:
                    version = _apply(conn, number, name, sql)
        return version

    def schema_version(self) -> int:
        with self.connection() as conn:
            return conn.execute("PRAGMA user_version").fetchone()[0]

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        while True:
            try:
                self._pool.pop().close()
            except IndexError:
                return


class AlwaysHeld:
    """The lease of a one-node index."""

    def held(self) -> bool:
        return True

    def release(self) -> None:
        return None


FOREIGN_KEYS_OFF = "-- lamina: foreign-keys-off"


def _apply(conn: sqlite3.Connection, number: int, name: str, sql: str) -> int:
    """Apply one migration unless another process already did; returns the version reached.

    A migration whose first line is :data:`FOREIGN_KEYS_OFF` rebuilds a table
    (SQLite cannot alter a constraint): it runs with foreign keys off, which
    SQLite only allows outside a transaction, and is refused if
    ``foreign_key_check`` finds a dangling reference before the commit.
    """
    keys_off = sql.startswith(FOREIGN_KEYS_OFF)
    if keys_off:
        conn.execute("PRAGMA foreign_keys=OFF")
    conn.execute("BEGIN EXCLUSIVE")
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version < number:
            for statement in _split_sql(sql):
                conn.execute(statement)
            if keys_off and conn.execute("PRAGMA foreign_key_check").fetchone():
                raise sqlite3.IntegrityError(f"migration {name} leaves a dangling reference")
            conn.execute(f"PRAGMA user_version={number}")
            version = number
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    finally:
        if keys_off:
            conn.execute("PRAGMA foreign_keys=ON")
    return version


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
