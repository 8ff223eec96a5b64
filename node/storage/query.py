"""The one matching engine: a DICOM identifier → parameterised SQL → a stream of matches.

C-FIND answers with it, C-MOVE and C-GET use it to list the instances a
retrieve names, and QIDO-RS will call it too, so every front end matches the
same way (PS3.4 C.2.2.2). The engine never builds SQL from received text:
column expressions and operators come from the :data:`KEYS` table below, and
every received value travels as a bound parameter.

Matching, per key kind:

* universal: an empty value, or ``*`` alone, matches everything (and asks
  for the value back);
* single value: exact and case-sensitive, except PN (below);
* wildcard ``*`` / ``?`` on text and PN keys: SQLite ``GLOB`` plus a range
  on the literal prefix, so ``DOE*`` is an index range scan;
* list of UIDs (``uid1\\uid2``): any of them; other keys given several values
  match any of the values (ModalitiesInStudy ``CT\\MR`` is the common case);
* range on DA, TM and DT (``a-b``, ``a-``, ``-b``); a partial TM or DT value
  covers its whole period (``11`` is 11:00:00 to 11:59:59), times compare
  to the second, and DT timezone offsets are ignored;
* empty value (``""``): entities where the attribute is empty or absent;
* PN: insensitive to case, accents and empty trailing components (see
  :mod:`node.storage.pn`); each component group in the query
  (``alphabetic=ideographic=phonetic``) must match the same group.

Keys at levels above the query level are matched whether or not the SCU
negotiated relational queries, and higher-level unique keys are not
required: being lenient serves SCUs that skip them. Keys the engine does not
know, keys below the query level and values given for return-only keys
(counts, RetrieveAETitle) are answered empty or ignored and flagged as
unsupported (status 0xFF01), never refused.
"""

from __future__ import annotations

import json
import re
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum, IntEnum
from functools import cached_property
from typing import Protocol

from pydicom.charset import convert_encodings
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag, Tag

from node import status
from node.status import Status
from node.storage import pn


class QueryError(ValueError):
    """The identifier cannot be answered as asked: a status and the reason, in plain words."""

    def __init__(self, status: Status, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class Level(IntEnum):
    """Query/Retrieve levels, top down, so that ``key.level <= query.level`` reads naturally."""

    PATIENT = 0
    STUDY = 1
    SERIES = 2
    IMAGE = 3


class Model(Enum):
    """The information model: which levels exist and which keys are unique."""

    PATIENT_ROOT = "patient-root"
    STUDY_ROOT = "study-root"

    @property
    def levels(self) -> tuple[Level, ...]:
        if self is Model.PATIENT_ROOT:
            return (Level.PATIENT, Level.STUDY, Level.SERIES, Level.IMAGE)
        return (Level.STUDY, Level.SERIES, Level.IMAGE)


@dataclass(frozen=True)
class Key:
    """An attribute the engine matches and returns: where it lives and how it compares."""

    keyword: str
    level: Level
    kind: str  # text | pn | uid | date | time | datetime | int | modalities | count | constant
    column: str = ""  # SQL expression for the stored value (table aliases p, st, se, i)
    match_columns: tuple[str, ...] = ()  # PN: (alphabetic, ideographic, phonetic) key columns
    unique: bool = False

    @cached_property
    def tag(self) -> BaseTag:
        return Tag(tag_for_keyword(self.keyword))

    @cached_property
    def vr(self) -> str:
        return dictionary_VR(self.keyword)


def _pn(keyword: str, level: Level, column: str) -> Key:
    return Key(keyword, level, "pn", column,
               (f"{column}_key", f"{column}_ideographic_key", f"{column}_phonetic_key"))


_P, _ST, _SE, _I = Level.PATIENT, Level.STUDY, Level.SERIES, Level.IMAGE

KEYS: dict[str, Key] = {k.keyword: k for k in (
    _pn("PatientName", _P, "p.patient_name"),
    Key("PatientID", _P, "text", "p.patient_id", unique=True),
    Key("IssuerOfPatientID", _P, "text", "nullif(p.issuer_of_patient_id, '')"),
    Key("PatientBirthDate", _P, "date", "p.patient_birth_date"),
    Key("PatientSex", _P, "text", "p.patient_sex"),
    Key("NumberOfPatientRelatedStudies", _P, "count",
        "(SELECT count(*) FROM study x WHERE x.patient_fk = p.id)"),
    Key("NumberOfPatientRelatedSeries", _P, "count",
        "(SELECT count(*) FROM study x JOIN series y ON y.study_fk = x.id"
        " WHERE x.patient_fk = p.id)"),
    Key("NumberOfPatientRelatedInstances", _P, "count",
        "(SELECT count(*) FROM study x JOIN series y ON y.study_fk = x.id"
        " JOIN instance z ON z.series_fk = y.id WHERE x.patient_fk = p.id)"),
    Key("StudyInstanceUID", _ST, "uid", "st.study_instance_uid", unique=True),
    Key("StudyDate", _ST, "date", "st.study_date"),
    Key("StudyTime", _ST, "time", "st.study_time"),
    Key("AccessionNumber", _ST, "text", "st.accession_number"),
    Key("StudyID", _ST, "text", "st.study_id"),
    Key("StudyDescription", _ST, "text", "st.study_description"),
    _pn("ReferringPhysicianName", _ST, "st.referring_physician_name"),
    Key("ModalitiesInStudy", _ST, "modalities", "nullif(st.modalities_in_study, '')"),
    Key("NumberOfStudyRelatedSeries", _ST, "count",
        "(SELECT count(*) FROM series y WHERE y.study_fk = st.id)"),
    Key("NumberOfStudyRelatedInstances", _ST, "count",
        "(SELECT count(*) FROM series y JOIN instance z ON z.series_fk = y.id"
        " WHERE y.study_fk = st.id)"),
    Key("SeriesInstanceUID", _SE, "uid", "se.series_instance_uid", unique=True),
    Key("Modality", _SE, "text", "se.modality"),
    Key("SeriesNumber", _SE, "int", "se.series_number"),
    Key("SeriesDescription", _SE, "text", "se.series_description"),
    Key("SeriesDate", _SE, "date", "se.series_date"),
    Key("SeriesTime", _SE, "time", "se.series_time"),
    Key("NumberOfSeriesRelatedInstances", _SE, "count",
        "(SELECT count(*) FROM instance z WHERE z.series_fk = se.id)"),
    Key("SOPInstanceUID", _I, "uid", "i.sop_instance_uid", unique=True),
    Key("SOPClassUID", _I, "uid", "i.sop_class_uid"),
    Key("InstanceNumber", _I, "int", "i.instance_number"),
    Key("ContentDate", _I, "date", "i.content_date"),
    Key("ContentTime", _I, "time", "i.content_time"),
    Key("AcquisitionDateTime", _I, "datetime", "i.acquisition_date_time"),
    # Filled by the engine at every level; never matched.
    Key("RetrieveAETitle", _P, "constant"),
    Key("InstanceAvailability", _P, "constant"),
)}

UNIQUE_KEY = {Level.PATIENT: KEYS["PatientID"], Level.STUDY: KEYS["StudyInstanceUID"],
              Level.SERIES: KEYS["SeriesInstanceUID"], Level.IMAGE: KEYS["SOPInstanceUID"]}

_ALIAS = {Level.PATIENT: "p", Level.STUDY: "st", Level.SERIES: "se", Level.IMAGE: "i"}
_TABLE = {Level.PATIENT: "patient p", Level.STUDY: "study st", Level.SERIES: "series se",
          Level.IMAGE: "instance i"}
#: How each level joins its parent.
_PARENT_JOIN = {Level.STUDY: "JOIN patient p ON p.id = st.patient_fk",
                Level.SERIES: "JOIN study st ON st.id = se.study_fk",
                Level.IMAGE: "JOIN series se ON se.id = i.series_fk"}

_SKIPPED = {Tag(0x0008, 0x0005), Tag(0x0008, 0x0052)}  # SpecificCharacterSet, QueryRetrieveLevel
_UID_LIST_INLINE = 50  # longer UID lists are bound as one JSON array
#: Bounds on received values (the longest standard key values are 64 characters).
MAX_VALUE_LENGTH = 256
MAX_VALUES = 10_000  # UID lists in a retrieve of many instances
MAX_WILDCARDS = 16


@dataclass(frozen=True)
class Condition:
    """One SQL predicate over table aliases, with its bound parameters."""

    keyword: str
    level: Level  # the highest table the predicate reads
    sql: str
    params: tuple


@dataclass(frozen=True)
class Query:
    """A parsed identifier: what to match, what to return, what to answer empty."""

    model: Model
    level: Level
    conditions: tuple[Condition, ...]
    returns: tuple[Key, ...]
    empty: tuple[tuple[BaseTag, str], ...]  # unsupported keys: answered zero-length
    unsupported: bool  # some key was neither matched nor filled: pending status 0xFF01
    charset: tuple[str, ...] = ()  # the request's Specific Character Set

    @property
    def matching_keywords(self) -> list[str]:
        """Keys that constrained the match (names only: audit entries carry no values)."""
        return sorted({c.keyword for c in self.conditions})


@dataclass(frozen=True)
class StoredInstance:
    """What a retrieve needs to send one instance as stored."""

    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    blob_sha256: str


# --- parsing ------------------------------------------------------------------


def parse(identifier: Dataset, model: Model, *, retrieve: bool = False) -> Query:
    """Read a C-FIND / C-MOVE / C-GET identifier into a :class:`Query`.

    With ``retrieve`` only the unique keys of the model's levels select
    (PS3.4 C.4.2.2.1: a retrieve identifier carries unique keys only, so any
    other key is ignored rather than allowed to widen or narrow the set), and
    the level's own unique key must be given: an empty one would mean
    "retrieve everything".
    """
    level = _level(identifier, model)
    charset = _charset(identifier)
    conditions: list[Condition] = []
    returns: dict[str, Key] = {}
    empty: list[tuple[BaseTag, str]] = []
    unsupported = False
    for tag in list(identifier.keys()):
        if tag in _SKIPPED or tag.element == 0:
            continue
        try:
            elem = identifier[tag]
        except Exception as exc:  # pydicom raises many types for a malformed value
            name = keyword_for_tag(tag) or str(tag)
            raise QueryError(status.IDENTIFIER_DOES_NOT_MATCH,
                             f"{name} has a value that cannot be read") from exc
        key = KEYS.get(elem.keyword)
        if key is None or key.level > level:
            # An implicit VR request leaves ambiguous VRs ("US or SS"); for an
            # empty value any of them encodes the same.
            empty.append((elem.tag, elem.VR.split(" or ")[0]))
            unsupported = True
            continue
        if retrieve:
            if key.unique and key.level in model.levels:
                condition = _condition(key, _values(elem.value, key.kind))
                if condition:
                    conditions.append(condition)
            continue
        returns[key.keyword] = key
        values = _values(elem.value, key.kind)
        if key.kind in ("count", "constant"):
            unsupported = unsupported or bool(values)
            continue
        condition = _condition(key, values)
        if condition:
            conditions.append(condition)
    unique = UNIQUE_KEY[level]
    if retrieve and unique.keyword not in {c.keyword for c in conditions}:
        raise QueryError(status.IDENTIFIER_DOES_NOT_MATCH,
                         f"a {level.name} retrieve needs a value for {unique.keyword}")
    if not retrieve:
        returns.setdefault(unique.keyword, unique)
    return Query(model, level, tuple(conditions), tuple(returns.values()), tuple(empty),
                 unsupported, charset)


def _level(identifier: Dataset, model: Model) -> Level:
    try:
        text = str(identifier.get("QueryRetrieveLevel", "") or "").strip().upper()
    except Exception as exc:
        raise QueryError(status.CANNOT_UNDERSTAND, "QueryRetrieveLevel cannot be decoded") from exc
    if not text:
        raise QueryError(status.IDENTIFIER_DOES_NOT_MATCH, "QueryRetrieveLevel is missing")
    level = Level.__members__.get(text)
    if level is None or level not in model.levels:
        known = ", ".join(lv.name for lv in model.levels)
        raise QueryError(status.IDENTIFIER_DOES_NOT_MATCH,
                         f"QueryRetrieveLevel must be one of {known}")
    return level


def _charset(identifier: Dataset) -> tuple[str, ...]:
    value = identifier.get("SpecificCharacterSet")
    if not value:
        return ()
    if isinstance(value, (list, MultiValue)):
        return tuple(str(v).strip() for v in value)
    return (str(value).strip(),)


def _values(value: object, kind: str) -> list[str]:
    """The non-empty values of a key, as text (a backslash list arrives as several)."""
    if value is None or value == "":
        return []
    items = value if isinstance(value, (list, tuple, MultiValue)) else [value]
    out = [str(v).strip().rstrip("\x00") for v in items] if kind == "uid" else [str(v).strip() for v in items]
    return [v for v in out if v]


# --- conditions ---------------------------------------------------------------

_DA = re.compile(r"\d{4}(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])")
_TM = re.compile(r"([01]\d|2[0-3])([0-5]\d)?([0-5]\d|60)?(\.\d{1,6})?")
#: A UTC offset is at most 14 hours, which is what tells "2023-2024" (a range)
#: from "2023-0500" (a year at UTC-5).
_OFFSET = r"[+-](?:0\d|1[0-4])[0-5]\d"
_DT_VALUE = rf"\d{{4}}(?:\d{{2}}){{0,5}}(?:\.\d{{1,6}})?(?:{_OFFSET})?"
_DT = re.compile(rf"(\d{{4}}(?:\d{{2}}){{0,5}})(\.\d{{1,6}})?({_OFFSET})?")
_DT_RANGE = re.compile(rf"(?P<lo>{_DT_VALUE})?-(?P<hi>{_DT_VALUE})?")


def _condition(key: Key, values: list[str]) -> Condition | None:
    """The predicate for a key's values; None when the key matches universally."""
    if not values or (key.kind in ("text", "pn", "uid", "modalities") and "*" in values):
        return None
    if len(values) > MAX_VALUES or any(len(v) > MAX_VALUE_LENGTH for v in values):
        raise QueryError(status.IDENTIFIER_DOES_NOT_MATCH,
                         f"{key.keyword}: at most {MAX_VALUES} values of at most"
                         f" {MAX_VALUE_LENGTH} characters")
    if key.kind in ("text", "pn", "modalities"):
        # Runs of "*" mean one "*"; SQLite's GLOB backtracks once per star, so cap them.
        values = [re.sub(r"\*+", "*", v) for v in values]
        if any(v.count("*") + v.count("?") > MAX_WILDCARDS for v in values):
            raise QueryError(status.IDENTIFIER_DOES_NOT_MATCH,
                             f"{key.keyword}: at most {MAX_WILDCARDS} wildcards")
    if key.kind == "uid":
        return _uid_condition(key, values)
    if key.kind == "int":
        return _int_condition(key, values)
    builders = {"text": _text_predicate, "pn": _pn_predicate, "date": _date_predicate,
                "time": _time_predicate, "datetime": _datetime_predicate,
                "modalities": _modality_predicate}
    parts = [builders[key.kind](key, v) for v in values]
    sql = parts[0][0] if len(parts) == 1 else "(" + " OR ".join(p[0] for p in parts) + ")"
    return Condition(key.keyword, key.level, sql, tuple(x for p in parts for x in p[1]))


def _uid_condition(key: Key, values: list[str]) -> Condition:
    if len(values) == 1:
        return Condition(key.keyword, key.level, f"{key.column} = ?", (values[0],))
    if len(values) <= _UID_LIST_INLINE:
        marks = ", ".join("?" * len(values))
        return Condition(key.keyword, key.level, f"{key.column} IN ({marks})",
                         tuple(values))
    return Condition(key.keyword, key.level,
                     f"{key.column} IN (SELECT value FROM json_each(?))", (json.dumps(values),))


def _int_condition(key: Key, values: list[str]) -> Condition:
    try:
        numbers = tuple(int(v) for v in values)
    except ValueError:
        raise QueryError(status.IDENTIFIER_DOES_NOT_MATCH,
                         f"{key.keyword} must be an integer") from None
    if len(numbers) == 1:
        return Condition(key.keyword, key.level, f"{key.column} = ?", numbers)
    marks = ", ".join("?" * len(numbers))
    return Condition(key.keyword, key.level, f"{key.column} IN ({marks})", numbers)


def _is_empty_value_match(value: str) -> bool:
    return value == '""'


def _empty(column: str) -> tuple[str, tuple]:
    return f"({column} IS NULL OR {column} = '')", ()


def _glob(pattern: str) -> str:
    """A DICOM wildcard pattern as a GLOB pattern (``*`` and ``?`` mean the same)."""
    return pattern.replace("[", "[[]")


def _match_text(column: str, value: str) -> tuple[str, tuple]:
    """Equality, or GLOB with a range on the literal prefix so an index can serve it."""
    if "*" not in value and "?" not in value:
        return f"{column} = ?", (value,)
    prefix = re.split(r"[*?]", value, maxsplit=1)[0]
    if prefix and ord(prefix[-1]) < 0x10FFFF:
        upper = prefix[:-1] + chr(ord(prefix[-1]) + 1)
        return (f"({column} >= ? AND {column} < ? AND {column} GLOB ?)",
                (prefix, upper, _glob(value)))
    return f"{column} GLOB ?", (_glob(value),)


def _text_predicate(key: Key, value: str) -> tuple[str, tuple]:
    if _is_empty_value_match(value):
        return _empty(key.column)
    return _match_text(key.column, value)


def _pn_predicate(key: Key, value: str) -> tuple[str, tuple]:
    if _is_empty_value_match(value):
        return _empty(key.column)
    groups = ([*value.split("="), "", ""])[:3]
    normalise = (pn.alphabetic_key, pn.other_key, pn.other_key)
    parts = [_match_text(column, norm(group))
             for column, norm, group in zip(key.match_columns, normalise, groups, strict=False)
             if group.strip() and norm(group) != "*"]
    if not parts:
        return "1", ()
    return " AND ".join(p[0] for p in parts), tuple(x for p in parts for x in p[1])


def _range(expr: str, lo: str | None, hi: str | None) -> tuple[str, tuple]:
    if lo is not None and hi is not None:
        if lo == hi:
            return f"{expr} = ?", (lo,)
        return f"{expr} BETWEEN ? AND ?", (lo, hi)
    if lo is not None:
        return f"{expr} >= ?", (lo,)
    if hi is not None:
        return f"{expr} <= ?", (hi,)
    return "1", ()


def _split_range(value: str) -> tuple[str | None, str | None] | None:
    if "-" not in value:
        return None
    lo, hi = (part.strip() for part in value.split("-", 1))
    return (lo or None, hi or None)


def _date_predicate(key: Key, value: str) -> tuple[str, tuple]:
    if _is_empty_value_match(value):
        return _empty(key.column)
    bounds = _split_range(value) or (value, value)
    for bound in bounds:
        if bound is not None and not _DA.fullmatch(bound):
            raise QueryError(status.IDENTIFIER_DOES_NOT_MATCH,
                             f"{key.keyword} must be a date (YYYYMMDD) or a date range")
    return _range(key.column, *bounds)


def _time_key(column: str) -> str:
    """A stored TM as ``HHMMSS`` (colons removed, missing components as zeros)."""
    base = f"substr(replace({column}, ':', ''), 1, 6)"
    return f"({base} || substr('000000', length({base}) + 1))"


def _time_bound(key: Key, value: str, ceiling: bool) -> str:
    m = _TM.fullmatch(value.replace(":", ""))
    if not m:
        raise QueryError(status.IDENTIFIER_DOES_NOT_MATCH,
                         f"{key.keyword} must be a time (HHMMSS) or a time range")
    digits = "".join(g or "" for g in m.groups()[:3])
    return digits + ("595959" if ceiling else "000000")[len(digits):]


def _time_predicate(key: Key, value: str) -> tuple[str, tuple]:
    if _is_empty_value_match(value):
        return _empty(key.column)
    lo, hi = _split_range(value) or (value, value)
    return _range(_time_key(key.column),
                  _time_bound(key, lo, False) if lo else None,
                  _time_bound(key, hi, True) if hi else None)


def _datetime_key(column: str) -> str:
    """A stored DT as ``YYYYMMDDHHMMSS``: fraction and offset dropped, missing parts minimal."""
    base = (f"substr({column}, 1, min(14, instr({column} || '+', '+') - 1,"
            f" instr({column} || '-', '-') - 1, instr({column} || '.', '.') - 1))")
    return f"({base} || substr('00000101000000', length({base}) + 1))"


def _datetime_bound(key: Key, value: str, ceiling: bool) -> str:
    m = _DT.fullmatch(value)
    if not m:
        raise QueryError(status.IDENTIFIER_DOES_NOT_MATCH,
                         f"{key.keyword} must be a date-time or a date-time range")
    digits = m.group(1)
    return digits + ("00001231235959" if ceiling else "00000101000000")[len(digits):]


def _datetime_predicate(key: Key, value: str) -> tuple[str, tuple]:
    if _is_empty_value_match(value):
        return _empty(key.column)
    if _DT.fullmatch(value):
        lo = hi = value
    else:
        m = _DT_RANGE.fullmatch(value)
        if not m:
            raise QueryError(status.IDENTIFIER_DOES_NOT_MATCH,
                             f"{key.keyword} must be a date-time or a date-time range")
        lo, hi = m.group("lo"), m.group("hi")
    return _range(_datetime_key(key.column),
                  _datetime_bound(key, lo, False) if lo else None,
                  _datetime_bound(key, hi, True) if hi else None)


def _modality_predicate(key: Key, value: str) -> tuple[str, tuple]:
    """A study matches when one of its series has the modality (the index on
    (modality, study_fk) hands over the study ids directly)."""
    if _is_empty_value_match(value):
        return _empty(key.column)
    predicate, params = _match_text("x.modality", value)
    return f"st.id IN (SELECT x.study_fk FROM series x WHERE {predicate})", params


# --- SQL and the engine --------------------------------------------------------


def _from_clause(level: Level, top: Level) -> str:
    """The level's table joined up to the highest level any key needs."""
    parts = [_TABLE[level]]
    current = level
    while current > top:
        parts.append(_PARENT_JOIN[current])
        current = Level(current - 1)
    return " ".join(parts)


def build_select(query: Query, columns: list[tuple[Level, str]], *, order: str = "",
                 limit: int | None = None, offset: int = 0) -> tuple[str, tuple]:
    """SELECT trusted ``(level, expression)`` columns for the query's matches.

    Only the tables the columns and conditions read are joined: a SERIES query
    on StudyInstanceUID never touches the patient table.
    """
    levels = [c.level for c in query.conditions] + [level for level, _ in columns]
    top = min([query.level, *levels])
    sql = (f"SELECT {', '.join(expr for _, expr in columns) or 'NULL'}"
           f" FROM {_from_clause(query.level, top)}")
    if query.conditions:
        sql += " WHERE " + " AND ".join(c.sql for c in query.conditions)
    if order:
        sql += f" ORDER BY {order}"
    params: tuple = tuple(x for c in query.conditions for x in c.params)
    if limit is not None or offset:
        sql += " LIMIT ? OFFSET ?"
        params += (-1 if limit is None else limit, offset)
    return sql, params


_INSTANCE_COLUMNS = [(Level.IMAGE, "i.sop_class_uid"), (Level.IMAGE, "i.sop_instance_uid"),
                     (Level.IMAGE, "i.transfer_syntax_uid"), (Level.IMAGE, "i.blob_sha256")]
_INSTANCE_ORDER = "se.study_fk, se.series_number, se.id, i.instance_number, i.id"


class Matcher(Protocol):
    """What the search and retrieve services ask of a backend's matcher."""

    def matches(self, query: Query, *, limit: int | None = None,
                offset: int = 0) -> Iterator[Match]: ...
    def instances(self, query: Query) -> Iterator[StoredInstance]: ...


class QueryEngine:
    """Runs queries against the index and streams the matches.

    Results come straight off an SQLite cursor: the first response can leave
    before the last row is read, and a cancelled or abandoned stream returns
    its connection to the pool (the generator's ``finally``).
    """

    def __init__(self, index, retrieve_ae_title: str) -> None:
        self.index = index
        self.retrieve_ae_title = retrieve_ae_title

    def rows(self, query: Query, *, limit: int | None = None,
             offset: int = 0) -> Iterator[tuple]:
        """Values of ``query.returns`` per match; paging (QIDO-RS) orders by the level's id."""
        columns = [(k.level, k.column) for k in query.returns if k.column]
        order = f"{_ALIAS[query.level]}.id" if (limit is not None or offset) else ""
        return self._stream(*build_select(query, columns, order=order, limit=limit,
                                          offset=offset))

    def matches(self, query: Query, *, limit: int | None = None,
                offset: int = 0) -> Iterator[Match]:
        """One :class:`Match` per matching entity, as the response identifier's elements."""
        layout = _Layout(query, self.retrieve_ae_title)
        for row in self.rows(query, limit=limit, offset=offset):
            yield layout.match(row)

    def instances(self, query: Query) -> Iterator[StoredInstance]:
        """The stored instances under every match, series by series in instance order."""
        at_image = Query(query.model, Level.IMAGE, query.conditions, (), (), False)
        sql, params = build_select(at_image, _INSTANCE_COLUMNS, order=_INSTANCE_ORDER)
        for row in self._stream(sql, params):
            yield StoredInstance(*row)

    def _stream(self, sql: str, params: tuple) -> Iterator[tuple]:
        with self.index.connection() as conn:
            cursor = conn.execute(sql, params)
            try:
                yield from cursor
            finally:
                cursor.close()



#: A response element: (tag, VR, value); value None means zero length.
Element = tuple[BaseTag, str, object]
_CHARSET_TAG = Tag(0x0008, 0x0005)
_LEVEL_TAG = Tag(0x0008, 0x0052)


@dataclass(frozen=True)
class Match:
    """One matching entity as the elements of its response identifier, in tag order.

    Front ends serialise it their own way: DIMSE to bytes
    (:mod:`node.handlers.identifier`), QIDO-RS to DICOM JSON via :meth:`dataset`.
    """

    elements: list[Element]

    @property
    def charset(self) -> tuple[str, ...]:
        """The Specific Character Set the text values are to be encoded in."""
        for tag, _vr, value in self.elements:
            if tag == _CHARSET_TAG:
                return tuple(value) if isinstance(value, list) else (str(value),)
        return ()

    def dataset(self) -> Dataset:
        ds = Dataset()
        for tag, vr, value in self.elements:
            ds.add_new(tag, vr, [] if vr == "SQ" and value is None else value)
        return ds


class _Layout:
    """Where each returned value goes in a query's responses, worked out once per query."""

    def __init__(self, query: Query, ae_title: str) -> None:
        self.charset = query.charset
        # (tag, VR, index into the SQL row, or None for a fixed value, the fixed value)
        slots: list[tuple[BaseTag, str, int | None, object]] = []
        column = 0
        for key in query.returns:
            if key.kind == "constant":
                value = ae_title if key.keyword == "RetrieveAETitle" else "ONLINE"
                slots.append((key.tag, key.vr, None, value))
            else:
                slots.append((key.tag, key.vr, column, None))
                column += 1
        slots += [(tag, vr, None, None) for tag, vr in query.empty]
        slots.append((_LEVEL_TAG, "CS", None, query.level.name))
        self.slots = sorted(slots, key=lambda slot: slot[0])
        self.splits = {key.tag for key in query.returns if key.kind == "modalities"}

    def match(self, row: tuple) -> Match:
        elements: list[Element] = []
        texts: list[str] = []
        for tag, vr, index, fixed in self.slots:
            value = fixed if index is None else row[index]
            if isinstance(value, str):
                if not value.isascii():
                    texts.append(value)
                if tag in self.splits:
                    value = value.split("\\")
            elements.append((tag, vr, value))
        charset = _response_charset(self.charset, texts)
        if charset:
            at = next((n for n, e in enumerate(elements) if e[0] > _CHARSET_TAG), len(elements))
            elements.insert(at, (_CHARSET_TAG, "CS", charset))
        return Match(elements)


def _response_charset(requested: tuple[str, ...], texts: list[str]) -> str | list[str] | None:
    """The request's character set when it can carry every value, else UTF-8 (ISO_IR 192)."""
    if not texts:
        return list(requested) if len(requested) > 1 else (requested[0] if requested else None)
    if len(requested) == 1 and requested[0]:
        try:
            codec = convert_encodings([requested[0]])[0]
            for text in texts:
                text.encode(codec)
            return requested[0]
        except (LookupError, UnicodeEncodeError, ValueError):
            pass
    return "ISO_IR 192"


def explain(conn: sqlite3.Connection, sql: str, params: tuple) -> list[str]:
    """SQLite's plan for a statement (benchmarks and tests check that indexes are used)."""
    return [row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {sql}", params)]
