"""Which index backend serves a node: :func:`open_index` picks the configured one.

Everything above the storage package sees only :mod:`node.storage.interface`.
"""

from __future__ import annotations

from pathlib import Path

from node.storage.interface import Index

#: The values ``[index] backend`` accepts.
BACKENDS = ("sqlite", "postgresql")


def open_index(backend: str, path: Path, busy_timeout_ms: int, *,
               must_exist: bool = False, dsn: str = "") -> Index:
    """The configured index backend: an SQLite file at ``path``, or the PostgreSQL database
    ``dsn`` names. ``must_exist``: refuse (IndexUnavailable) rather than create an index where
    there is none (read-only tools on a wrong data folder or database)."""
    if backend == "postgresql":
        from node.storage.postgresql.index import PostgresIndex

        if must_exist:
            return PostgresIndex.open_existing(dsn, busy_timeout_ms)
        return PostgresIndex(dsn, busy_timeout_ms)
    if backend != "sqlite":
        raise ValueError(f"index.backend: unknown backend {backend!r}")
    from node.storage.sqlite.index import SqliteIndex

    if must_exist:
        return SqliteIndex.open_existing(path, busy_timeout_ms)
    return SqliteIndex(path, busy_timeout_ms)


def target_version(backend: str) -> int:
    """The newest schema version this package ships for ``backend`` (what ``migrate`` reaches)."""
    if backend == "postgresql":
        from node.storage.postgresql.index import migrations
    else:
        from node.storage.sqlite.index import migrations
    return max((number for number, _name, _sql in migrations()), default=0)
