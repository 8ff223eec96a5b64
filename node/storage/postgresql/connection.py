"""A psycopg connection shaped like the ``sqlite3`` one the portable repositories were written for.

Most of the index's statements are plain SQL that both databases run as they
are (``INSERT … ON CONFLICT``, ``RETURNING``, ``count(*)``): rather than keep
a second copy of each, :mod:`node.storage.postgresql.repos` reuses SQLite's
repositories through this adapter and overrides only the statements whose
dialect differs. The adapter does two things and no more: it turns qmark
placeholders (``?``) into psycopg's (``%s``), and its rows answer by position
and by column name, as ``sqlite3.Row`` does.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import lru_cache
from typing import Any

import psycopg
from psycopg.rows import RowMaker


class PgRow(tuple):
    """A row readable by index (``row[0]``), by name (``row["id"]``) and as ``dict(row)``."""

    _names: dict[str, int]

    def __new__(cls, values: Iterable[Any], names: dict[str, int]) -> PgRow:
        row = super().__new__(cls, values)
        row._names = names
        return row

    def __getitem__(self, key):  # type: ignore[override]
        if isinstance(key, str):
            return tuple.__getitem__(self, self._names[key])
        return tuple.__getitem__(self, key)

    def keys(self) -> list[str]:
        return list(self._names)


def pg_row(cursor: psycopg.Cursor[Any]) -> RowMaker[PgRow]:
    """psycopg row factory making :class:`PgRow` (one name map per result)."""
    names = {column.name: i for i, column in enumerate(cursor.description or ())}
    return lambda values: PgRow(values, names)


@lru_cache(maxsize=1024)
def placeholders(sql: str) -> str:
    """qmark placeholders as psycopg's; a literal ``%`` doubled. No statement of the
    repositories has a ``?`` inside a string literal (values always travel as parameters)."""
    return sql.replace("%", "%%").replace("?", "%s")


class PgConnection:
    """``execute`` / ``executemany`` with qmark placeholders over one psycopg connection."""

    __slots__ = ("raw",)

    def __init__(self, raw: psycopg.Connection[PgRow]) -> None:
        self.raw = raw

    def execute(self, sql: str, params: tuple | list = ()) -> psycopg.Cursor[PgRow]:
        if not params:
            return self.raw.execute(sql)
        return self.raw.execute(placeholders(sql), params)

    def executemany(self, sql: str, rows: Iterable[tuple]) -> psycopg.Cursor[PgRow]:
        cursor = self.raw.cursor()
        batch = list(rows)
        if batch:
            cursor.executemany(placeholders(sql), batch)
        return cursor

