"""Leases on PostgreSQL: a session-level advisory lock held on a connection of its own.

The holder keeps one connection open with ``pg_try_advisory_lock(key)`` taken on
it. PostgreSQL releases the lock when that session ends, so a node that dies
(kill -9, a crash: its socket is closed by its kernel) gives its leases up at
once, and the next node that polls takes them. A machine that vanishes without
closing its sockets is noticed by TCP keepalives (on this connection, and the
server's ``tcp_keepalives_*`` settings). A lease whose connection broke (the
server restarted) is lost; :meth:`PgLease.held` then tries to take it again.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable
from contextlib import suppress

import psycopg


def lease_key(name: str) -> int:
    """The advisory lock key of a lease: 64 bits of SHA-256 over its name (meeting one of
    the three fixed keys of node.storage.postgresql.repos is a 1 in 2^62 chance)."""
    digest = hashlib.sha256(f"lamina-lease:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


class PgLease:
    """One named lease of this process (see the module docstring)."""

    def __init__(self, connect: Callable[[], psycopg.Connection], name: str) -> None:
        """``connect``: opens a new connection to the index (not a pooled one)."""
        self.name = name
        self._connect = connect
        self._key = lease_key(name)
        self._conn: psycopg.Connection | None = None
        self._holding = False
        self._lock = threading.Lock()

    def held(self) -> bool:
        with self._lock:
            try:
                if self._conn is None or self._conn.closed or self._conn.broken:
                    self._drop()
                    self._conn = self._connect()
                if self._holding:
                    self._conn.execute("SELECT 1")  # still alive: still ours
                    return True
                self._holding = bool(self._conn.execute(
                    "SELECT pg_try_advisory_lock(%s)", (self._key,)).fetchone()[0])
            except psycopg.Error:
                self._drop()
            return self._holding

    def release(self) -> None:
        """Unlock (so the next node gets it at once, not when the server notices the
        session is gone) and close the lease's connection."""
        with self._lock:
            if self._holding and self._conn is not None and not self._conn.broken:
                with suppress(psycopg.Error):  # the session is gone: so is the lock
                    self._conn.execute("SELECT pg_advisory_unlock(%s)", (self._key,))
            self._drop()

    def _drop(self) -> None:
        """Close the lease's connection: the lock (if held) goes with the session."""
        self._holding = False
        if self._conn is not None:
            self._conn.close()
            self._conn = None
