"""The matcher on PostgreSQL: the plan of :mod:`node.storage.query` in PostgreSQL's dialect.

The same plan SQLite's matcher renders (:mod:`node.storage.sqlite.matcher`:
its module docstring says why each predicate has the shape it has);
:class:`PgRenderer` overrides only the dialect's differences:

* :class:`~node.storage.query.Wildcard` is ``LIKE`` with ``\\`` escaping the
  pattern's own ``%``, ``_`` and ``\\`` (``*`` → ``%``, ``?`` → ``_``), plus the
  same range on the literal prefix; the text columns have the ``C`` collation
  (migration 0011), so the range and the B-tree indexes compare bytes as
  SQLite does and the prefix is served from the index;
* a long :class:`~node.storage.query.UidIn` is ``= ANY(%s)`` over one array
  parameter (SQLite reads a JSON array with ``json_each``);
* the TM/DT comparable forms use ``strpos``/``least``/``rpad``;
* parameters are ``%s``, "no condition" is ``TRUE`` and "no limit" is ``LIMIT NULL``.

Rows stream from a server-side cursor, so the first C-FIND response leaves
before the last row is read, as on SQLite.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import psycopg
from psycopg.rows import tuple_row

from node.storage.sqlite.matcher import SqliteMatcher, SqlRenderer

#: Rows fetched from the server-side cursor per round trip.
FETCH_ROWS = 500


class PgRenderer(SqlRenderer):
    """The query plan as one SELECT in PostgreSQL's dialect."""

    placeholder = "%s"
    true = "TRUE"
    pattern_operator = "LIKE"
    no_limit = None
    dialect = "PostgreSQL"

    def pattern(self, dicom_pattern: str) -> str:
        """A DICOM wildcard pattern as a LIKE pattern with ``\\`` as the escape character."""
        escaped = dicom_pattern.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        return escaped.replace("*", "%").replace("?", "_")

    def long_uid_list(self, column: str, uids: tuple[str, ...]) -> tuple[str, tuple]:
        """Membership in a long UID list: ``= ANY`` over one array parameter."""
        return f"{column} = ANY(%s)", (list(uids),)

    def time_key(self, column: str) -> str:
        """A stored TM as ``HHMMSS`` (colons removed, missing components as zeros)."""
        return f"rpad(substr(replace({column}, ':', ''), 1, 6), 6, '0')"

    def datetime_key(self, column: str) -> str:
        """A stored DT as ``YYYYMMDDHHMMSS``: fraction and offset dropped, missing parts minimal."""
        base = (f"substr({column}, 1, least(14, strpos({column} || '+', '+') - 1,"
                f" strpos({column} || '-', '-') - 1, strpos({column} || '.', '.') - 1))")
        return f"({base} || substr('00000101000000', length({base}) + 1))"


#: PostgreSQL's renderer (tests and benchmarks render statements with it).
RENDERER = PgRenderer()


def explain(conn: psycopg.Connection, sql: str, params: tuple) -> list[str]:
    """PostgreSQL's plan for a statement (benchmarks and tests check that indexes are used)."""
    with conn.cursor(row_factory=tuple_row) as cursor:
        return [row[0] for row in cursor.execute(f"EXPLAIN {sql}", params)]


_cursor_names = itertools.count()


class PgMatcher(SqliteMatcher):
    """Runs queries against the PostgreSQL index and streams the matches
    (a :class:`~node.storage.query.Matcher`); only the renderer and the stream differ
    from SQLite's."""

    renderer = RENDERER

    def _stream(self, sql: str, params: tuple) -> Iterator[tuple]:
        """A server-side cursor inside a read-only transaction; an abandoned stream ends
        the transaction and returns the connection (the ``with`` blocks)."""
        with self.connection() as conn, conn.transaction():
            conn.execute("SET TRANSACTION READ ONLY")
            name = f"lamina_match_{next(_cursor_names)}"
            with conn.cursor(name, row_factory=tuple_row) as cursor:
                cursor.itersize = FETCH_ROWS
                cursor.execute(sql, params)
                yield from cursor
