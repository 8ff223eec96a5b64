"""The matcher on SQLite: a :class:`~node.storage.query.Query`'s predicates → SQL → rows.

:mod:`node.storage.query` decides what a query means; this module only says
it in SQLite's dialect and runs it. Nothing here builds SQL from received
text: table and column expressions come from :data:`COLUMNS` and the
constants below, operators from the predicate's class, and every value a
predicate carries travels as a bound parameter.

How each predicate is compiled, and why:

* columns are read through table aliases ``p`` (patient), ``st`` (study),
  ``se`` (series), ``i`` (instance); a query joins its level's table up to the
  highest level a returned key or a condition reads, and no further (a SERIES
  query on StudyInstanceUID never touches the patient table);
* counts are correlated subqueries over aliases ``x``/``y``/``z``; IssuerOfPatientID
  and ModalitiesInStudy are stored as ``''`` when absent and returned through
  ``nullif`` so the response element is empty rather than a zero-length string;
* :class:`~node.storage.query.Wildcard` becomes ``GLOB`` (``*`` and ``?`` mean
  the same there; ``[`` opens a character class in GLOB, so it is escaped as
  ``[[]``) plus a range on the literal prefix, ``col >= 'DOE' AND col < 'DOF'``,
  which SQLite's planner serves from the column's index where GLOB alone
  would scan;
* :class:`~node.storage.query.UidIn` is ``=`` for one UID, ``IN (?, …)`` up to
  :data:`UID_LIST_INLINE`, and beyond that one JSON array parameter read with
  ``json_each`` (a retrieve of thousands of instances would otherwise exceed
  SQLite's bound-parameter limit and prepare a new statement per length);
* :class:`~node.storage.query.Range` compares the stored value's comparable
  form: the column itself for DA, and for TM/DT an expression that reduces the
  stored text to ``HHMMSS`` / ``YYYYMMDDHHMMSS`` the way the predicate's
  docstring defines (so those ranges cannot use an index; DA ranges do);
* :class:`~node.storage.query.PersonName` reads the normalised group-key
  columns the index writer fills (``<name>_key``, ``<name>_ideographic_key``,
  ``<name>_phonetic_key``), each matched like text;
* :class:`~node.storage.query.ModalityInStudy` is ``st.id IN (SELECT
  x.study_fk FROM series x WHERE …)``: the index on ``series(modality,
  study_fk)`` hands over the study ids directly.

The same query compiles to the same SQL text every time, so SQLite's statement
cache reuses the prepared statement (``tests/test_storage_query.py`` pins a few).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, closing

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

#: The SQL expression of each key's stored value (constants have none).
COLUMNS: dict[str, str] = {
    "PatientName": "p.patient_name",
    "PatientID": "p.patient_id",
    "IssuerOfPatientID": "nullif(p.issuer_of_patient_id, '')",
    "PatientBirthDate": "p.patient_birth_date",
    "PatientSex": "p.patient_sex",
    "NumberOfPatientRelatedStudies": "(SELECT count(*) FROM study x WHERE x.patient_fk = p.id)",
    "NumberOfPatientRelatedSeries":
        "(SELECT count(*) FROM study x JOIN series y ON y.study_fk = x.id"
        " WHERE x.patient_fk = p.id)",
    "NumberOfPatientRelatedInstances":
        "(SELECT count(*) FROM study x JOIN series y ON y.study_fk = x.id"
        " JOIN instance z ON z.series_fk = y.id WHERE x.patient_fk = p.id)",
    "StudyInstanceUID": "st.study_instance_uid",
    "StudyDate": "st.study_date",
    "StudyTime": "st.study_time",
    "AccessionNumber": "st.accession_number",
    "StudyID": "st.study_id",
    "StudyDescription": "st.study_description",
    "ReferringPhysicianName": "st.referring_physician_name",
    "ModalitiesInStudy": "nullif(st.modalities_in_study, '')",
    "NumberOfStudyRelatedSeries": "(SELECT count(*) FROM series y WHERE y.study_fk = st.id)",
    "NumberOfStudyRelatedInstances":
        "(SELECT count(*) FROM series y JOIN instance z ON z.series_fk = y.id"
        " WHERE y.study_fk = st.id)",
    "SeriesInstanceUID": "se.series_instance_uid",
    "Modality": "se.modality",
    "SeriesNumber": "se.series_number",
    "SeriesDescription": "se.series_description",
    "SeriesDate": "se.series_date",
    "SeriesTime": "se.series_time",
    "NumberOfSeriesRelatedInstances": "(SELECT count(*) FROM instance z WHERE z.series_fk = se.id)",
    "SOPInstanceUID": "i.sop_instance_uid",
    "SOPClassUID": "i.sop_class_uid",
    "InstanceNumber": "i.instance_number",
    "ContentDate": "i.content_date",
    "ContentTime": "i.content_time",
    "AcquisitionDateTime": "i.acquisition_date_time",
}


def _pn_key_columns(column: str) -> tuple[str, str, str]:
    """The (alphabetic, ideographic, phonetic) normalised key columns of a PN column."""
    return (f"{column}_key", f"{column}_ideographic_key", f"{column}_phonetic_key")


_ALIAS = {Level.PATIENT: "p", Level.STUDY: "st", Level.SERIES: "se", Level.IMAGE: "i"}
_TABLE = {Level.PATIENT: "patient p", Level.STUDY: "study st", Level.SERIES: "series se",
          Level.IMAGE: "instance i"}
#: How each level joins its parent.
_PARENT_JOIN = {Level.STUDY: "JOIN patient p ON p.id = st.patient_fk",
                Level.SERIES: "JOIN study st ON st.id = se.study_fk",
                Level.IMAGE: "JOIN series se ON se.id = i.series_fk"}
#: Longer UID lists are bound as one JSON array.
UID_LIST_INLINE = 50


# --- the query plan → SQL ----------------------------------------------------------


class SqlRenderer:
    """Renders a :class:`~node.storage.query.Query` as one SELECT in SQLite's dialect.

    The plan's shape (joins, predicates, paging) is the same on every backend;
    what differs between dialects is kept to the attributes and the few methods
    below, which :class:`node.storage.postgresql.matcher.PgRenderer` overrides,
    so a change to how a predicate is compiled is made once.
    """

    #: The bound-parameter marker.
    placeholder = "?"
    #: A predicate that always holds ("no condition").
    true = "1"
    #: The operator matching a column against a translated wildcard pattern.
    pattern_operator = "GLOB"
    #: The LIMIT parameter meaning "no limit" when only an OFFSET is asked.
    no_limit: int | None = -1
    #: The dialect's name, for the error on a predicate it has no form for.
    dialect = "SQLite"

    # --- dialect hooks

    def pattern(self, dicom_pattern: str) -> str:
        """A DICOM wildcard pattern as a GLOB pattern (``*`` and ``?`` mean the same)."""
        return dicom_pattern.replace("[", "[[]")

    def long_uid_list(self, column: str, uids: tuple[str, ...]) -> tuple[str, tuple]:
        """Membership in more than :data:`UID_LIST_INLINE` UIDs: one JSON array parameter."""
        return (f"{column} IN (SELECT value FROM json_each({self.placeholder}))",
                (json.dumps(list(uids)),))

    def time_key(self, column: str) -> str:
        """A stored TM as ``HHMMSS`` (colons removed, missing components as zeros)."""
        base = f"substr(replace({column}, ':', ''), 1, 6)"
        return f"({base} || substr('000000', length({base}) + 1))"

    def datetime_key(self, column: str) -> str:
        """A stored DT as ``YYYYMMDDHHMMSS``: fraction and offset dropped, missing parts minimal."""
        base = (f"substr({column}, 1, min(14, instr({column} || '+', '+') - 1,"
                f" instr({column} || '-', '-') - 1, instr({column} || '.', '.') - 1))")
        return f"({base} || substr('00000101000000', length({base}) + 1))"

    # --- predicates

    def compile_condition(self, condition: Condition) -> tuple[str, tuple]:
        """One condition as an SQL predicate over the table aliases, and its parameters."""
        return self.compile(condition.predicate, COLUMNS[condition.keyword])

    def compile(self, predicate: Predicate, column: str) -> tuple[str, tuple]:
        """One predicate over a column expression, and its parameters."""
        match predicate:
            case Exact() | Wildcard():
                return self.match_text(column, predicate)
            case EmptyValue():
                return f"({column} IS NULL OR {column} = '')", ()
            case UidIn(uids):
                return self.uid_in(column, uids)
            case UidNotIn(uids):
                sql, params = self.uid_in(column, uids)
                return f"NOT ({sql})", params
            case IntIn(numbers):
                return self.in_list(column, numbers)
            case Range(form, low, high):
                return self.range(self.comparable(form, column), low, high)
            case PersonName():
                return self.person_name(column, predicate)
            case ModalityInStudy(match):
                sql, params = self.match_text("x.modality", match)
                return f"st.id IN (SELECT x.study_fk FROM series x WHERE {sql})", params
            case AnyOf(predicates):
                parts = [self.compile(p, column) for p in predicates]
                if len(parts) == 1:
                    return parts[0]
                return ("(" + " OR ".join(sql for sql, _ in parts) + ")",
                        tuple(x for _, params in parts for x in params))
        raise TypeError(f"no {self.dialect} form for {predicate!r}")

    def in_list(self, column: str, values: tuple) -> tuple[str, tuple]:
        """``=`` for one value, ``IN (…)`` with one parameter per value otherwise."""
        if len(values) == 1:
            return f"{column} = {self.placeholder}", values
        return f"{column} IN ({', '.join([self.placeholder] * len(values))})", values

    def match_text(self, column: str, match: TextMatch) -> tuple[str, tuple]:
        """Equality, or the pattern operator with a range on the literal prefix so an
        index can serve it."""
        mark = self.placeholder
        if isinstance(match, Exact):
            return f"{column} = {mark}", (match.value,)
        prefix = match.prefix
        if prefix and ord(prefix[-1]) < 0x10FFFF:
            upper = prefix[:-1] + chr(ord(prefix[-1]) + 1)
            return (f"({column} >= {mark} AND {column} < {mark}"
                    f" AND {column} {self.pattern_operator} {mark})",
                    (prefix, upper, self.pattern(match.pattern)))
        return f"{column} {self.pattern_operator} {mark}", (self.pattern(match.pattern),)

    def uid_in(self, column: str, uids: tuple[str, ...]) -> tuple[str, tuple]:
        """A UID list inline up to :data:`UID_LIST_INLINE`, as one parameter beyond."""
        if len(uids) <= UID_LIST_INLINE:
            return self.in_list(column, uids)
        return self.long_uid_list(column, uids)

    def person_name(self, column: str, predicate: PersonName) -> tuple[str, tuple]:
        """Each given component group matched against its normalised key column."""
        parts = [self.match_text(key_column, group)
                 for key_column, group in zip(_pn_key_columns(column), predicate.groups,
                                              strict=True)
                 if group is not None]
        if not parts:
            return self.true, ()
        return (" AND ".join(sql for sql, _ in parts),
                tuple(x for _, params in parts for x in params))

    def range(self, expr: str, low: str | None, high: str | None) -> tuple[str, tuple]:
        """A closed or open-ended range over a comparable expression."""
        mark = self.placeholder
        if low is not None and high is not None:
            if low == high:
                return f"{expr} = {mark}", (low,)
            return f"{expr} BETWEEN {mark} AND {mark}", (low, high)
        if low is not None:
            return f"{expr} >= {mark}", (low,)
        if high is not None:
            return f"{expr} <= {mark}", (high,)
        return self.true, ()

    def comparable(self, form: str, column: str) -> str:
        """The SQL reducing a stored value to the comparable form of a Range."""
        if form == "time":
            return self.time_key(column)
        if form == "datetime":
            return self.datetime_key(column)
        return column

    # --- statements

    def build_select(self, query: Query, columns: list[tuple[Level, str]], *, order: str = "",
                     limit: int | None = None, offset: int = 0) -> tuple[str, tuple]:
        """SELECT trusted ``(level, expression)`` columns for the query's matches.

        Only the tables the columns and conditions read are joined: a SERIES query
        on StudyInstanceUID never touches the patient table.
        """
        levels = [c.level for c in query.conditions] + [level for level, _ in columns]
        top = min([query.level, *levels])
        sql = (f"SELECT {', '.join(expr for _, expr in columns) or 'NULL'}"
               f" FROM {_from_clause(query.level, top)}")
        compiled = [self.compile_condition(c) for c in query.conditions]
        if compiled:
            sql += " WHERE " + " AND ".join(predicate for predicate, _ in compiled)
        if order:
            sql += f" ORDER BY {order}"
        params: tuple = tuple(x for _, p in compiled for x in p)
        if limit is not None or offset:
            sql += f" LIMIT {self.placeholder} OFFSET {self.placeholder}"
            params += (self.no_limit if limit is None else limit, offset)
        return sql, params

    def rows_select(self, query: Query, *, limit: int | None = None,
                    offset: int = 0) -> tuple[str, tuple]:
        """The statement a matcher's ``rows`` runs; paging orders by the level's id."""
        order = f"{_ALIAS[query.level]}.id" if (limit is not None or offset) else ""
        return self.build_select(query, returned_columns(query), order=order, limit=limit,
                                 offset=offset)

    def instances_select(self, query: Query) -> tuple[str, tuple]:
        """The statement a matcher's ``instances`` runs: the query's conditions at IMAGE level."""
        at_image = Query(query.model, Level.IMAGE, query.conditions, (), (), False)
        return self.build_select(at_image, _INSTANCE_COLUMNS, order=_INSTANCE_ORDER)


def _from_clause(level: Level, top: Level) -> str:
    """The level's table joined up to the highest level any key needs."""
    parts = [_TABLE[level]]
    current = level
    while current > top:
        parts.append(_PARENT_JOIN[current])
        current = Level(current - 1)
    return " ".join(parts)


def returned_columns(query: Query) -> list[tuple[Level, str]]:
    """``(level, expression)`` of each of ``query.row_keys``, in order."""
    return [(k.level, COLUMNS[k.keyword]) for k in query.row_keys]


_INSTANCE_COLUMNS = [(Level.IMAGE, "i.sop_class_uid"), (Level.IMAGE, "i.sop_instance_uid"),
                     (Level.IMAGE, "i.transfer_syntax_uid"), (Level.IMAGE, "i.blob_sha256")]
_INSTANCE_ORDER = "se.study_fk, se.series_number, se.id, i.instance_number, i.id"

#: SQLite's renderer; the module-level names below are its statements (tests and
#: benchmarks read them).
RENDERER = SqlRenderer()
compile_condition = RENDERER.compile_condition
build_select = RENDERER.build_select
rows_select = RENDERER.rows_select
instances_select = RENDERER.instances_select


def explain(conn: sqlite3.Connection, sql: str, params: tuple) -> list[str]:
    """SQLite's plan for a statement (benchmarks and tests check that indexes are used)."""
    return [row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {sql}", params)]


# --- the matcher -----------------------------------------------------------------


#: Rows fetched per ``fetchmany``: a few hundred matches in memory at a time, at most.
FETCH_ROWS = 256


class SqliteMatcher:
    """Runs queries against the SQLite index and streams the matches
    (a :class:`~node.storage.query.Matcher`).

    Results come straight off an SQLite cursor: the first response can leave
    before the last row is read, and a cancelled or abandoned stream returns
    its connection to the pool (the generator's ``finally``). Another backend
    subclasses it with its own :attr:`renderer` and :meth:`_stream`.
    """

    #: The dialect the queries are rendered in.
    renderer: SqlRenderer = RENDERER

    def __init__(self, connection: Callable[[], AbstractContextManager[sqlite3.Connection]],
                 retrieve_ae_title: str) -> None:
        """``connection``: the index's pooled-connection context manager."""
        self.connection = connection
        self.retrieve_ae_title = retrieve_ae_title

    def rows(self, query: Query, *, limit: int | None = None,
             offset: int = 0) -> Iterator[tuple]:
        """Values of ``query.row_keys`` per match; paging (QIDO-RS) orders by the level's id."""
        return self._stream(*self.renderer.rows_select(query, limit=limit, offset=offset))

    def matches(self, query: Query, *, limit: int | None = None,
                offset: int = 0) -> Iterator[Match]:
        """One :class:`~node.storage.query.Match` per matching entity."""
        with closing(self.rows(query, limit=limit, offset=offset)) as rows:
            yield from responses(query, rows, self.retrieve_ae_title)

    def instances(self, query: Query) -> Iterator[StoredInstance]:
        """The stored instances under every match, series by series in instance order."""
        for row in self._stream(*self.renderer.instances_select(query)):
            yield StoredInstance(*row)

    def _stream(self, sql: str, params: tuple) -> Iterator[tuple]:
        """Plain tuples (the pool's connections make ``sqlite3.Row`` objects: one more
        Python object per match, for values read by position anyway), fetched
        :data:`FETCH_ROWS` at a time: a large answer was half row fetching."""
        with self.connection() as conn:
            cursor = conn.cursor()
            cursor.row_factory = None
            try:
                cursor.execute(sql, params)
                while batch := cursor.fetchmany(FETCH_ROWS):
                    yield from batch
            finally:
                cursor.close()
