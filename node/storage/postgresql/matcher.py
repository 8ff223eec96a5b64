"""The matcher on PostgreSQL: the plan of :mod:`node.storage.query` in PostgreSQL's dialect.

The same plan SQLite's matcher renders (:mod:`node.storage.sqlite.matcher`:
its module docstring says why each predicate has the shape it has), with the
column expressions and joins shared, and only the dialect differing:

* :class:`~node.storage.query.Wildcard` is ``LIKE`` with ``\\`` escaping the
  pattern's own ``%``, ``_`` and ``\\`` (``*`` → ``%``, ``?`` → ``_``), plus the
  same range on the literal prefix; the text columns have the ``C`` collation
  (migration 0011), so the range and the B-tree indexes compare bytes as
  SQLite does and the prefix is served from the index;
* a long :class:`~node.storage.query.UidIn` is ``= ANY(%s)`` over one array
  parameter (SQLite reads a JSON array with ``json_each``);
* the TM/DT comparable forms use ``strpos``/``least``/``rpad``;
* "no condition" is ``TRUE`` and "no limit" is ``LIMIT NULL``.

Rows stream from a server-side cursor, so the first C-FIND response leaves
before the last row is read, as on SQLite.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, closing

import psycopg
from psycopg.rows import tuple_row

from node.storage.query import (
    AnyOf,
    Condition,
    EmptyValue,
    Exact,
    IntIn,
    Level,
    Match,
    ModalityInStudy,
    PersonName,
    Predicate,
    Query,
    Range,
    StoredInstance,
    TextMatch,
    UidIn,
    UidNotIn,
    Wildcard,
    responses,
)
from node.storage.sqlite.matcher import (
    _ALIAS,
    _INSTANCE_COLUMNS,
    _INSTANCE_ORDER,
    COLUMNS,
    UID_LIST_INLINE,
    _from_clause,
    _pn_key_columns,
    returned_columns,
)

#: Rows fetched from the server-side cursor per round trip.
FETCH_ROWS = 500


def compile_condition(condition: Condition) -> tuple[str, tuple]:
    """One condition as a PostgreSQL predicate over the table aliases, and its parameters."""
    return _compile(condition.predicate, COLUMNS[condition.keyword])


def _compile(predicate: Predicate, column: str) -> tuple[str, tuple]:
    match predicate:
        case Exact() | Wildcard():
            return _match_text(column, predicate)
        case EmptyValue():
            return f"({column} IS NULL OR {column} = '')", ()
        case UidIn(uids):
            return _uid_in(column, uids)
        case UidNotIn(uids):
            sql, params = _uid_in(column, uids)
            return f"NOT ({sql})", params
        case IntIn(numbers):
            if len(numbers) == 1:
                return f"{column} = %s", numbers
            return f"{column} IN ({', '.join(['%s'] * len(numbers))})", numbers
        case Range(form, low, high):
            return _range(_COMPARABLE[form](column), low, high)
        case PersonName():
            return _person_name(column, predicate)
        case ModalityInStudy(match):
            sql, params = _match_text("x.modality", match)
            return f"st.id IN (SELECT x.study_fk FROM series x WHERE {sql})", params
        case AnyOf(predicates):
            parts = [_compile(p, column) for p in predicates]
            if len(parts) == 1:
                return parts[0]
            return ("(" + " OR ".join(sql for sql, _ in parts) + ")",
                    tuple(x for _, params in parts for x in params))
    raise TypeError(f"no PostgreSQL form for {predicate!r}")


def _like(pattern: str) -> str:
    """A DICOM wildcard pattern as a LIKE pattern with ``\\`` as the escape character."""
    escaped = pattern.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped.replace("*", "%").replace("?", "_")


def _match_text(column: str, match: TextMatch) -> tuple[str, tuple]:
    """Equality, or LIKE with a range on the literal prefix so an index can serve it."""
    if isinstance(match, Exact):
        return f"{column} = %s", (match.value,)
    prefix = match.prefix
    if prefix and ord(prefix[-1]) < 0x10FFFF:
        upper = prefix[:-1] + chr(ord(prefix[-1]) + 1)
        return (f"({column} >= %s AND {column} < %s AND {column} LIKE %s)",
                (prefix, upper, _like(match.pattern)))
    return f"{column} LIKE %s", (_like(match.pattern),)


def _uid_in(column: str, uids: tuple[str, ...]) -> tuple[str, tuple]:
    if len(uids) == 1:
        return f"{column} = %s", uids
    if len(uids) <= UID_LIST_INLINE:
        return f"{column} IN ({', '.join(['%s'] * len(uids))})", uids
    return f"{column} = ANY(%s)", (list(uids),)


def _person_name(column: str, predicate: PersonName) -> tuple[str, tuple]:
    parts = [_match_text(key_column, group)
             for key_column, group in zip(_pn_key_columns(column), predicate.groups, strict=True)
             if group is not None]
    if not parts:
        return "TRUE", ()
    return " AND ".join(sql for sql, _ in parts), tuple(x for _, params in parts for x in params)


def _range(expr: str, low: str | None, high: str | None) -> tuple[str, tuple]:
    if low is not None and high is not None:
        if low == high:
            return f"{expr} = %s", (low,)
        return f"{expr} BETWEEN %s AND %s", (low, high)
    if low is not None:
        return f"{expr} >= %s", (low,)
    if high is not None:
        return f"{expr} <= %s", (high,)
    return "TRUE", ()


def _time_key(column: str) -> str:
    """A stored TM as ``HHMMSS`` (colons removed, missing components as zeros)."""
    return f"rpad(substr(replace({column}, ':', ''), 1, 6), 6, '0')"


def _datetime_key(column: str) -> str:
    """A stored DT as ``YYYYMMDDHHMMSS``: fraction and offset dropped, missing parts minimal."""
    base = (f"substr({column}, 1, least(14, strpos({column} || '+', '+') - 1,"
            f" strpos({column} || '-', '-') - 1, strpos({column} || '.', '.') - 1))")
    return f"({base} || substr('00000101000000', length({base}) + 1))"


_COMPARABLE = {"date": lambda column: column, "time": _time_key, "datetime": _datetime_key}


def build_select(query: Query, columns: list[tuple[Level, str]], *, order: str = "",
                 limit: int | None = None, offset: int = 0) -> tuple[str, tuple]:
    """SELECT trusted ``(level, expression)`` columns for the query's matches (the
    tables joined as on SQLite)."""
    levels = [c.level for c in query.conditions] + [level for level, _ in columns]
    top = min([query.level, *levels])
    sql = (f"SELECT {', '.join(expr for _, expr in columns) or 'NULL'}"
           f" FROM {_from_clause(query.level, top)}")
    compiled = [compile_condition(c) for c in query.conditions]
    if compiled:
        sql += " WHERE " + " AND ".join(predicate for predicate, _ in compiled)
    if order:
        sql += f" ORDER BY {order}"
    params: tuple = tuple(x for _, p in compiled for x in p)
    if limit is not None or offset:
        sql += " LIMIT %s OFFSET %s"
        params += (limit, offset)
    return sql, params


def rows_select(query: Query, *, limit: int | None = None,
                offset: int = 0) -> tuple[str, tuple]:
    order = f"{_ALIAS[query.level]}.id" if (limit is not None or offset) else ""
    return build_select(query, returned_columns(query), order=order, limit=limit,
                        offset=offset)


def instances_select(query: Query) -> tuple[str, tuple]:
    at_image = Query(query.model, Level.IMAGE, query.conditions, (), (), False)
    return build_select(at_image, _INSTANCE_COLUMNS, order=_INSTANCE_ORDER)


def explain(conn: psycopg.Connection, sql: str, params: tuple) -> list[str]:
    """PostgreSQL's plan for a statement (benchmarks and tests check that indexes are used)."""
    with conn.cursor(row_factory=tuple_row) as cursor:
        return [row[0] for row in cursor.execute(f"EXPLAIN {sql}", params)]


_cursor_names = itertools.count()


class PgMatcher:
    """Runs queries against the PostgreSQL index and streams the matches
    (a :class:`~node.storage.query.Matcher`)."""

    def __init__(self, connection: Callable[[], AbstractContextManager[psycopg.Connection]],
                 retrieve_ae_title: str) -> None:
        self.connection = connection
        self.retrieve_ae_title = retrieve_ae_title

    def rows(self, query: Query, *, limit: int | None = None,
             offset: int = 0) -> Iterator[tuple]:
        return self._stream(*rows_select(query, limit=limit, offset=offset))

    def matches(self, query: Query, *, limit: int | None = None,
                offset: int = 0) -> Iterator[Match]:
        with closing(self.rows(query, limit=limit, offset=offset)) as rows:
            yield from responses(query, rows, self.retrieve_ae_title)

    def instances(self, query: Query) -> Iterator[StoredInstance]:
        for row in self._stream(*instances_select(query)):
            yield StoredInstance(*row)

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
