"""Names and identifiers typed where they do not belong.

A staff member's or the patient's name typed into a code string, a kernel name, a
code meaning or a kept description survives any table of attributes. Before an
object is written, every text value the engine keeps is scanned for every person
name and identifier the same object carries anywhere: all PN values at any depth
(patient, relatives, physicians, operators), IDs, institution and station names.

:meth:`TextMatcher.from_dataset` compiles one pattern per object (the scan must
cost a small fraction of de-identification, see ``benchmarks/anonymize.py``);
:func:`clean_text` is the one cleaner, also for annotation text (Segment Label,
Overlay Description) that must not name the patient.

Matching is case-insensitive and whole-word: a term's words may be joined in the
text by any of the common separators (``^``, space, comma, dot, hyphen,
underscore) or none (``SMITH_J``, ``Smith, J.``, ``PAT-0012`` for ``PAT0012``).
Name words shorter than three characters and IDs shorter than four are not
terms, so initials and series numbers do not blank every value.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from functools import cache, lru_cache
from typing import Any

from pydicom.charset import decode_bytes
from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

# What a match is replaced with in free text; short enough for SH.
REPLACEMENT = "REMOVED"
_SEPARATORS = r"[\^\s,.\-_']*"
_WORDS = re.compile(r"[^\W_]+")
# Preceded or followed by a letter or digit (of any script): not a whole word.
_BEFORE = r"(?<![^\W_])"
_AFTER = r"(?![^\W_])"
# Names: family, given and middle components (prefixes and suffixes are titles).
_NAME_COMPONENTS = 3
_MIN_NAME_WORD = 3
_MIN_ID = 4
_ID_VRS = frozenset({"LO", "SH", "CS"})
_PLACE_KEYWORDS = frozenset({"InstitutionName", "InstitutionalDepartmentName", "StationName"})
# Undecoded sequences whose terms a caller's memo keeps (from_dataset's ``sequences``),
# at most, and the longest kept; emptied when full.
_SEQUENCES = 1024
_SEQUENCE_BYTES = 8192
# Bytes that end an ISO 2022 escape sequence's scope in text values: \ ^ =.
_DELIMITERS = {0x5C, 0x5E, 0x3D}


class TextMatcher:
    """A compiled pattern of one object's names and identifiers (false when the
    object carries none)."""

    __slots__ = ("_pattern",)

    def __init__(self, terms: Iterable[str]) -> None:
        alternatives = sorted({_term_pattern(t) for t in terms if t}, key=lambda p: (-len(p), p))
        self._pattern = (
            re.compile(f"{_BEFORE}(?:{'|'.join(alternatives)}){_AFTER}", re.IGNORECASE)
            if alternatives else None
        )

    def __bool__(self) -> bool:
        return self._pattern is not None

    @property
    def key(self) -> str | None:
        """The pattern's text: equal keys match the same texts (flags are fixed), so
        a result worked out with one matcher holds for any matcher of the same key."""
        return None if self._pattern is None else self._pattern.pattern

    def search(self, text: str) -> bool:
        """Does ``text`` name one of the object's persons or identifiers?"""
        return self._pattern is not None and self._pattern.search(text) is not None

    def sub(self, text: str) -> tuple[str, int]:
        """``text`` with every match replaced by :data:`REPLACEMENT`, and the count."""
        if self._pattern is None:
            return text, 0
        return self._pattern.subn(REPLACEMENT, text)

    @classmethod
    def from_dataset(cls, ds: Dataset, *, skip: frozenset[int] = frozenset(),
                     sequences: dict[tuple[Any, ...], tuple[str, ...]] | None = None
                     ) -> TextMatcher:
        """The matcher of everything ``ds`` says about persons, at any depth.
        ``skip`` holds tags not to take terms from (attributes the project keeps
        under an option, which would otherwise match themselves).

        ``sequences``: the terms of undecoded sequences already seen, for one ``skip``
        (the engine keeps one). A series repeats most of its sequences byte for byte;
        their terms are a function of those bytes, their encoding and character set,
        so a sequence seen before is not decoded again here (the engine's walk decodes
        it if its action needs the items). A sequence not seen before is decoded in
        ``ds``, as without ``sequences``."""
        terms: list[str] = []
        _collect(ds, skip, terms, sequences)
        return _matcher(cls, tuple(terms))


@lru_cache(maxsize=256)
def _matcher(cls: type[TextMatcher], terms: tuple[str, ...]) -> TextMatcher:
    """One matcher per list of terms: the objects of a series name the same persons
    and identifiers, and building the pattern is most of a matcher's cost. A matcher
    is only read (its compiled pattern too), so objects can share one."""
    return cls(terms)


def clean_text(value: str, matcher: TextMatcher) -> str:
    """``value`` with every name and identifier of ``matcher`` replaced by
    :data:`REPLACEMENT` (the same string when nothing matched)."""
    return matcher.sub(value)[0]


def _term_pattern(term: str) -> str:
    return _SEPARATORS.join(re.escape(w) for w in _WORDS.findall(term))


@cache
def _role(tag: int) -> str | None:
    """How a tag feeds the matcher: ``sequence`` (look inside), ``name``, ``id``,
    ``place`` or None, from the data dictionary (cached per tag, so the walk reads
    only the few elements that matter; private tags are never in it)."""
    try:
        vr = dictionary_VR(tag)
    except KeyError:
        return None
    if vr == "SQ":
        return "sequence"
    if vr == "PN":
        return "name"
    keyword = keyword_for_tag(tag)
    if keyword in _PLACE_KEYWORDS:
        return "place"
    if vr in _ID_VRS and (keyword.endswith(("ID", "IDs")) or keyword == "AccessionNumber"):
        return "id"
    return None


def _collect(ds: Dataset, skip: frozenset[int], terms: list[str],
             sequences: dict[tuple[Any, ...], tuple[str, ...]] | None) -> None:
    # keys(), not iteration: only person and identifier elements are decoded.
    for tag in ds.keys():  # noqa: SIM118
        # As a plain int: looking a pydicom tag up in _role's cache or in skip calls
        # its Python-level __eq__.
        number = int(tag)
        role = _role(number)
        if role is None or number in skip:
            continue
        if role == "sequence":
            raw = ds.get_item(tag)
            if sequences is not None and isinstance(raw, RawDataElement) \
                    and type(raw.value) is bytes and len(raw.value) <= _SEQUENCE_BYTES:
                terms.extend(_sequence_terms(ds, raw, skip, sequences))
                continue
            for item in ds[tag].value:
                _collect(item, skip, terms, sequences)
            continue
        for text in _texts(ds, tag, ds.get_item(tag)):
            if role == "name":
                terms.extend(_name_words(text))
            elif role == "id":
                if len("".join(_WORDS.findall(text))) >= _MIN_ID:
                    terms.append(text)
            elif len(text) >= _MIN_NAME_WORD:
                terms.append(text)


def _sequence_terms(ds: Dataset, raw: RawDataElement, skip: frozenset[int],
                    sequences: dict[tuple[Any, ...], tuple[str, ...]]) -> tuple[str, ...]:
    """The terms of an undecoded sequence, remembered by what decides them."""
    # The character set Dataset.__getitem__ decodes a (non character set) element with.
    charset = ds.original_character_set or ds._character_set
    key = (int(raw.tag), raw.VR, raw.value, raw.is_implicit_VR, raw.is_little_endian,
           repr(charset))
    found = sequences.get(key)
    if found is None:
        collected: list[str] = []
        for item in ds[raw.tag].value:
            _collect(item, skip, collected, sequences)
        found = tuple(collected)
        if len(sequences) >= _SEQUENCES:
            sequences.clear()
        sequences[key] = found
    return found


def _texts(ds: Dataset, tag: int, raw: object) -> list[str]:
    """The values of a text element. A raw element's bytes are decoded here with
    pydicom's charset decoder rather than by converting the element, which costs
    far more and which the engine would not otherwise pay for an element it drops
    (this is most of what keeps the scan cheap; benchmarks/anonymize.py)."""
    if isinstance(raw, RawDataElement) and isinstance(raw.value, bytes):
        # _character_set: the dataset's encodings, inherited by sequence items.
        text = decode_bytes(raw.value, ds._character_set, _DELIMITERS)
        values = text.split("\\")
    else:
        values = [str(v) for v in _values(ds[tag].value)]
    return [v.strip(" \x00") for v in values]


def _name_words(name: str) -> list[str]:
    words = []
    for group in name.split("="):
        for component in group.split("^")[:_NAME_COMPONENTS]:
            words += [w for w in _WORDS.findall(component) if len(w) >= _MIN_NAME_WORD]
    return words


def _values(value: object) -> list[object]:
    if value is None:
        return []
    if isinstance(value, (list, tuple, MultiValue)):
        return list(value)
    return [value]
