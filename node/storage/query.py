"""The one matcher's plan: a DICOM identifier → a backend-neutral :class:`Query`.

C-FIND answers with it, C-MOVE and C-GET use it to list the instances a
retrieve names, and QIDO-RS will call it too, so every front end matches the
same way (PS3.4 C.2.2.2). This module decides what a query means: which keys
are known and at which level, which values are valid, and which abstract
predicate each key's values stand for. A storage backend's matcher
(:mod:`node.storage.sqlite.matcher`, :mod:`node.storage.postgresql.matcher`) only translates those predicates
into its own query language and streams the rows back: the DICOM semantics
live here once, so a second backend cannot drift from the first one. Received
values reach a backend only as data inside a predicate, never as query text.

Matching, per key kind:

* universal: an empty value, or ``*`` alone, matches everything (and asks
  for the value back); no predicate is made for it;
* single value: exact and case-sensitive (:class:`Exact`), except PN (below);
* wildcard ``*`` / ``?`` on text and PN keys (:class:`Wildcard`): ``*`` is any
  run of characters, ``?`` exactly one, every other character is literal;
  runs of ``*`` are one ``*`` and the number of wildcards is capped, since a
  wildcard matcher backtracks once per star. Backends are expected to serve
  the literal prefix (``DOE`` of ``DOE*``) from an index;
* list of UIDs (``uid1\\uid2``, :class:`UidIn`): any of them; other keys given
  several values match any of the values (:class:`AnyOf`; ModalitiesInStudy
  ``CT\\MR`` is the common case);
* range on DA, TM and DT (``a-b``, ``a-``, ``-b``, :class:`Range`); a partial
  TM or DT value covers its whole period (``11`` is 11:00:00 to 11:59:59),
  times compare to the second, and DT timezone offsets are ignored;
* empty value (``""``, :class:`EmptyValue`): entities where the attribute is
  empty or absent;
* PN (:class:`PersonName`): insensitive to case, accents and empty trailing
  components (see :mod:`node.storage.pn`); each component group in the
  query (``alphabetic=ideographic=phonetic``) must match the same group;
* ModalitiesInStudy (:class:`ModalityInStudy`): a study matches when one of
  its series has the modality.

Keys at levels above the query level are matched whether or not the SCU
negotiated relational queries, and higher-level unique keys are not
required: being lenient serves SCUs that skip them. Keys the matcher does not
know, keys below the query level and values given for return-only keys
(counts, RetrieveAETitle) are answered empty or ignored and flagged as
unsupported (status 0xFF01), never refused.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from enum import Enum, IntEnum
from functools import cached_property
from typing import Literal, Protocol

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
    """An attribute the matcher matches and returns: its level and how it compares.

    Where the value is stored is the backend's business (a column per keyword);
    every key whose ``kind`` is not ``constant`` has a stored value.
    """

    keyword: str
    level: Level
    kind: str  # text | pn | uid | date | time | datetime | int | modalities | count | constant
    unique: bool = False

    @cached_property
    def tag(self) -> BaseTag:
        return Tag(tag_for_keyword(self.keyword))

    @cached_property
    def vr(self) -> str:
        return dictionary_VR(self.keyword)


_P, _ST, _SE, _I = Level.PATIENT, Level.STUDY, Level.SERIES, Level.IMAGE

KEYS: dict[str, Key] = {k.keyword: k for k in (
    Key("PatientName", _P, "pn"),
    Key("PatientID", _P, "text", unique=True),
    Key("IssuerOfPatientID", _P, "text"),
    Key("PatientBirthDate", _P, "date"),
    Key("PatientSex", _P, "text"),
    Key("NumberOfPatientRelatedStudies", _P, "count"),
    Key("NumberOfPatientRelatedSeries", _P, "count"),
    Key("NumberOfPatientRelatedInstances", _P, "count"),
    Key("StudyInstanceUID", _ST, "uid", unique=True),
    Key("StudyDate", _ST, "date"),
    Key("StudyTime", _ST, "time"),
    Key("AccessionNumber", _ST, "text"),
    Key("StudyID", _ST, "text"),
    Key("StudyDescription", _ST, "text"),
    Key("ReferringPhysicianName", _ST, "pn"),
    Key("ModalitiesInStudy", _ST, "modalities"),
    Key("NumberOfStudyRelatedSeries", _ST, "count"),
    Key("NumberOfStudyRelatedInstances", _ST, "count"),
    Key("SeriesInstanceUID", _SE, "uid", unique=True),
    Key("Modality", _SE, "text"),
    Key("SeriesNumber", _SE, "int"),
    Key("SeriesDescription", _SE, "text"),
    Key("SeriesDate", _SE, "date"),
    Key("SeriesTime", _SE, "time"),
    Key("NumberOfSeriesRelatedInstances", _SE, "count"),
    Key("SOPInstanceUID", _I, "uid", unique=True),
    Key("SOPClassUID", _I, "uid"),
    Key("InstanceNumber", _I, "int"),
    Key("ContentDate", _I, "date"),
    Key("ContentTime", _I, "time"),
    Key("AcquisitionDateTime", _I, "datetime"),
    # Filled by the matcher at every level; never matched.
    Key("RetrieveAETitle", _P, "constant"),
    Key("InstanceAvailability", _P, "constant"),
)}

UNIQUE_KEY = {Level.PATIENT: KEYS["PatientID"], Level.STUDY: KEYS["StudyInstanceUID"],
              Level.SERIES: KEYS["SeriesInstanceUID"], Level.IMAGE: KEYS["SOPInstanceUID"]}

_SKIPPED = {Tag(0x0008, 0x0005), Tag(0x0008, 0x0052)}  # SpecificCharacterSet, QueryRetrieveLevel
#: Bounds on received values (the longest standard key values are 64 characters).
MAX_VALUE_LENGTH = 256
MAX_VALUES = 10_000  # UID lists in a retrieve of many instances
MAX_WILDCARDS = 16


# --- predicates ---------------------------------------------------------------
#
# What a condition asks of one key's stored value, decided here and carried as
# data: a backend compiles each class to its own syntax and binds every value
# as a parameter. "The stored value" is the key's value for the entity at the
# key's level (for a PN key, see PersonName).


@dataclass(frozen=True)
class Exact:
    """The stored value equals ``value`` (case-sensitive; no wildcard in it)."""

    value: str


@dataclass(frozen=True)
class Wildcard:
    """The stored value matches ``pattern``: ``*`` any run of characters (also none),
    ``?`` exactly one character, every other character literal (``[``, ``%``, ``_`` and
    ``\\`` included: a backend whose pattern syntax gives them meaning escapes them)."""

    pattern: str

    @property
    def prefix(self) -> str:
        """The literal text before the first wildcard ("" when the pattern starts with one):
        every match starts with it, so an index range on it narrows the candidates."""
        return re.split(r"[*?]", self.pattern, maxsplit=1)[0]


#: A single text value as matched: exact, or with wildcards.
TextMatch = Exact | Wildcard


@dataclass(frozen=True)
class EmptyValue:
    """The attribute is empty or absent (the query value ``""``); for a PN key, the whole
    name as stored, for ModalitiesInStudy the list the study keeps."""


@dataclass(frozen=True)
class PersonName:
    """Each given component group matches the same group of the stored name.

    Values are already normalised with :mod:`node.storage.pn` (the alphabetic
    group by :func:`~node.storage.pn.alphabetic_key`, the others by
    :func:`~node.storage.pn.other_key`) and are matched against the stored
    names' group keys, which the index writer normalised the same way (so
    matching is exact on them, case and accents already folded). None leaves a
    group unconstrained; all three None matches every entity.
    """

    alphabetic: TextMatch | None
    ideographic: TextMatch | None
    phonetic: TextMatch | None

    @property
    def groups(self) -> tuple[TextMatch | None, TextMatch | None, TextMatch | None]:
        return (self.alphabetic, self.ideographic, self.phonetic)


@dataclass(frozen=True)
class UidIn:
    """The stored UID is one of ``uids`` (one, or a list of up to :data:`MAX_VALUES`)."""

    uids: tuple[str, ...]


@dataclass(frozen=True)
class UidNotIn:
    """The stored UID is none of ``uids``: entities a peer must not see (see :func:`hiding`)."""

    uids: tuple[str, ...]


@dataclass(frozen=True)
class IntIn:
    """The stored integer is one of ``numbers``."""

    numbers: tuple[int, ...]


@dataclass(frozen=True)
class Range:
    """The stored value, in its comparable form, lies in ``[low, high]`` (None: open end).

    The bounds are already in the comparable form, a partial query value
    widened to its whole period. A backend reduces the stored value the same way:

    * ``date`` (DA): as stored, ``YYYYMMDD``;
    * ``time`` (TM): ``HHMMSS`` — colons removed, cut to six characters (the
      fraction dropped), missing trailing components as zeros (``14`` is
      ``140000``);
    * ``datetime`` (DT): ``YYYYMMDDHHMMSS`` — the fraction and UTC offset
      dropped, missing trailing components at their minimum (month and day
      ``01``, time ``00``).

    The forms are fixed-width digit strings, so text order is time order.
    ``low == high`` is an equality; both None matches every stored value.
    """

    form: Literal["date", "time", "datetime"]
    low: str | None
    high: str | None


@dataclass(frozen=True)
class ModalityInStudy:
    """A study matches when one of its series has a Modality that ``match`` accepts
    (not a test of the study's stored ModalitiesInStudy text, which lists them all)."""

    match: TextMatch


@dataclass(frozen=True)
class AnyOf:
    """Any of several values (a backslash list on a key other than a UID key)."""

    predicates: tuple[Predicate, ...]


Predicate = (Exact | Wildcard | EmptyValue | PersonName | UidIn | UidNotIn | IntIn | Range
             | ModalityInStudy | AnyOf)


@dataclass(frozen=True)
class Condition:
    """One key's predicate: the entities to keep."""

    key: Key
    predicate: Predicate

    @property
    def keyword(self) -> str:
        return self.key.keyword

    @property
    def level(self) -> Level:
        """The level whose entity holds the value (a backend joins up to it)."""
        return self.key.level


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
        return sorted({c.keyword for c in self.conditions
                       if not isinstance(c.predicate, UidNotIn)})

    @property
    def row_keys(self) -> tuple[Key, ...]:
        """The returned keys whose values a backend reads, in the order its rows hold them
        (every returned key but the constants the matcher fills itself)."""
        return tuple(k for k in self.returns if k.kind != "constant")


def hiding(query: Query, series_uids: Sequence[str], *, retrieve: bool = False) -> Query:
    """``query`` with these series left out (an annotator blinded to another reader's
    annotation until both readings are in): out of every retrieve (whose instances are
    always selected at IMAGE level), and out of SERIES and IMAGE matches. A PATIENT or
    STUDY match is not narrowed: its counts may still include them."""
    if not series_uids or (not retrieve and query.level < Level.SERIES):
        return query
    hidden = Condition(KEYS["SeriesInstanceUID"], UidNotIn(tuple(sorted(set(series_uids)))))
    return replace(query, conditions=(*query.conditions, hidden))


@dataclass(frozen=True)
class StoredInstance:
    """What a retrieve needs to send one instance as stored."""

    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    blob_sha256: str


class Matcher(Protocol):
    """What the search and retrieve services call; each storage backend provides one.

    Both methods stream: results come as the backend reads them, and closing
    the iterator early releases what the backend holds (its connection).
    """

    def matches(self, query: Query, *, limit: int | None = None,
                offset: int = 0) -> Iterator[Match]:
        """One :class:`Match` per matching entity at ``query.level``; with ``limit`` or
        ``offset`` (paging, QIDO-RS) in a stable order, the entities' insertion order."""
        ...

    def instances(self, query: Query) -> Iterator[StoredInstance]:
        """The stored instances under every match, study by study, series by series
        (SeriesNumber), in InstanceNumber order."""
        ...


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
        # Runs of "*" mean one "*"; a wildcard matcher backtracks once per star, so cap them.
        values = [re.sub(r"\*+", "*", v) for v in values]
        if any(v.count("*") + v.count("?") > MAX_WILDCARDS for v in values):
            raise QueryError(status.IDENTIFIER_DOES_NOT_MATCH,
                             f"{key.keyword}: at most {MAX_WILDCARDS} wildcards")
    if key.kind == "uid":
        return Condition(key, UidIn(tuple(values)))
    if key.kind == "int":
        return Condition(key, _int_predicate(key, values))
    builders = {"text": _text_predicate, "pn": _pn_predicate, "date": _date_predicate,
                "time": _time_predicate, "datetime": _datetime_predicate,
                "modalities": _modality_predicate}
    parts = tuple(builders[key.kind](key, v) for v in values)
    return Condition(key, parts[0] if len(parts) == 1 else AnyOf(parts))


def _int_predicate(key: Key, values: list[str]) -> IntIn:
    try:
        return IntIn(tuple(int(v) for v in values))
    except ValueError:
        raise QueryError(status.IDENTIFIER_DOES_NOT_MATCH,
                         f"{key.keyword} must be an integer") from None


def _is_empty_value_match(value: str) -> bool:
    return value == '""'


def _text(value: str) -> TextMatch:
    return Wildcard(value) if "*" in value or "?" in value else Exact(value)


def _text_predicate(key: Key, value: str) -> Predicate:
    if _is_empty_value_match(value):
        return EmptyValue()
    return _text(value)


def _pn_predicate(key: Key, value: str) -> Predicate:
    if _is_empty_value_match(value):
        return EmptyValue()
    groups = ([*value.split("="), "", ""])[:3]
    normalise = (pn.alphabetic_key, pn.other_key, pn.other_key)
    alphabetic, ideographic, phonetic = (
        _text(norm(group)) if group.strip() and norm(group) != "*" else None
        for norm, group in zip(normalise, groups, strict=True))
    return PersonName(alphabetic, ideographic, phonetic)


def _split_range(value: str) -> tuple[str | None, str | None] | None:
    if "-" not in value:
        return None
    lo, hi = (part.strip() for part in value.split("-", 1))
    return (lo or None, hi or None)


def _date_predicate(key: Key, value: str) -> Predicate:
    if _is_empty_value_match(value):
        return EmptyValue()
    bounds = _split_range(value) or (value, value)
    for bound in bounds:
        if bound is not None and not _DA.fullmatch(bound):
            raise QueryError(status.IDENTIFIER_DOES_NOT_MATCH,
                             f"{key.keyword} must be a date (YYYYMMDD) or a date range")
    return Range("date", *bounds)


def _time_bound(key: Key, value: str, ceiling: bool) -> str:
    """A query TM as the first or last ``HHMMSS`` of the period it names."""
    m = _TM.fullmatch(value.replace(":", ""))
    if not m:
        raise QueryError(status.IDENTIFIER_DOES_NOT_MATCH,
                         f"{key.keyword} must be a time (HHMMSS) or a time range")
    digits = "".join(g or "" for g in m.groups()[:3])
    return digits + ("595959" if ceiling else "000000")[len(digits):]


def _time_predicate(key: Key, value: str) -> Predicate:
    if _is_empty_value_match(value):
        return EmptyValue()
    lo, hi = _split_range(value) or (value, value)
    return Range("time", _time_bound(key, lo, False) if lo else None,
                 _time_bound(key, hi, True) if hi else None)


def _datetime_bound(key: Key, value: str, ceiling: bool) -> str:
    """A query DT as the first or last ``YYYYMMDDHHMMSS`` of the period it names."""
    m = _DT.fullmatch(value)
    if not m:
        raise QueryError(status.IDENTIFIER_DOES_NOT_MATCH,
                         f"{key.keyword} must be a date-time or a date-time range")
    digits = m.group(1)
    return digits + ("00001231235959" if ceiling else "00000101000000")[len(digits):]


def _datetime_predicate(key: Key, value: str) -> Predicate:
    if _is_empty_value_match(value):
        return EmptyValue()
    if _DT.fullmatch(value):
        lo = hi = value
    else:
        m = _DT_RANGE.fullmatch(value)
        if not m:
            raise QueryError(status.IDENTIFIER_DOES_NOT_MATCH,
                             f"{key.keyword} must be a date-time or a date-time range")
        lo, hi = m.group("lo"), m.group("hi")
    return Range("datetime", _datetime_bound(key, lo, False) if lo else None,
                 _datetime_bound(key, hi, True) if hi else None)


def _modality_predicate(key: Key, value: str) -> Predicate:
    if _is_empty_value_match(value):
        return EmptyValue()
    return ModalityInStudy(_text(value))


# --- responses ----------------------------------------------------------------


def responses(query: Query, rows: Iterable[tuple], retrieve_ae_title: str) -> Iterator[Match]:
    """The :class:`Match` of each backend row (the values of ``query.row_keys``, in order).

    Shared by every backend's :meth:`Matcher.matches`, so responses are laid
    out one way: constants filled, unsupported keys empty, ModalitiesInStudy
    split into its values, a character set chosen for every match.
    """
    layout = _Layout(query, retrieve_ae_title)
    for row in rows:
        yield layout.match(row)


#: A response element: (tag, VR, value); value None means zero length. Tags are plain
#: ints, not pydicom's BaseTag: its comparisons run in Python, once per element per match.
Element = tuple[int, str, object]
_CHARSET_TAG = 0x00080005
_LEVEL_TAG = 0x00080052


@dataclass(frozen=True)
class Match:
    """One matching entity as the elements of its response identifier, in tag order.

    Front ends serialise it their own way: DIMSE to bytes
    (:mod:`node.dimse.identifier`), QIDO-RS to DICOM JSON via :meth:`dataset`.
    """

    elements: list[Element]

    @property
    def charset(self) -> tuple[str, ...]:
        """The Specific Character Set the text values are to be encoded in."""
        for tag, _vr, value in self.elements:  # in tag order: (0008,0005) comes early
            if tag == _CHARSET_TAG:
                return tuple(value) if isinstance(value, list) else (str(value),)
            if tag > _CHARSET_TAG:
                break
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
        # (tag, VR, index into the backend row, or None for a fixed value, the fixed value)
        slots: list[tuple[int, str, int | None, object]] = []
        column = 0
        for key in query.returns:
            if key.kind == "constant":
                value = ae_title if key.keyword == "RetrieveAETitle" else "ONLINE"
                slots.append((int(key.tag), key.vr, None, value))
            else:
                slots.append((int(key.tag), key.vr, column, None))
                column += 1
        slots += [(int(tag), vr, None, None) for tag, vr in query.empty]
        slots.append((_LEVEL_TAG, "CS", None, query.level.name))
        self.slots = sorted(slots, key=lambda slot: slot[0])
        self.splits = {int(key.tag) for key in query.returns if key.kind == "modalities"}

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
