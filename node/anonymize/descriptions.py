"""Study and series descriptions annotators can read, without free text.

Under the basic profile, Study Description, Series Description, Protocol Name and
Performed Procedure Step Description are removed, so a viewer shows blank names
and a lung-window series cannot be told from a soft-tissue one. With
``descriptions = "vocabulary"`` (the default) a descriptor is kept when every
token of it is a protocol, technique or anatomy term of the shipped vocabulary
(``data/description_vocabulary.txt``), a term the project added
(``description_terms``), or a measurement (``2.5MM``, ``120KV``, ``5``); any
other descriptor is replaced by a neutral text built from what is known to be
safe: Modality, SeriesNumber (series-level descriptors only) and the tokens that
did match. ``descriptions = "remove"`` keeps the basic profile's behaviour.

The risk, stated in ``config/node.toml``: a vocabulary word that is also a name
(a patient called "Head") would be kept, which is why the object's own names and
identifiers (:mod:`node.anonymize.textscan`) are never counted as vocabulary.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from functools import cache
from importlib import resources

from pydicom.dataset import Dataset

from node.anonymize.textscan import TextMatcher

# Descriptors this module decides; the series-level ones also get the SeriesNumber.
DESCRIPTOR_KEYWORDS = frozenset({
    "StudyDescription", "SeriesDescription", "ProtocolName",
    "PerformedProcedureStepDescription",
})
SERIES_LEVEL_KEYWORDS = frozenset({"SeriesDescription", "ProtocolName"})

_SPLIT = re.compile(r"[\s^,;:_()\[\]+=]+")
# A number with an optional unit: slice thickness, kV, mAs, b-values, field strength.
# At most three digits before the point, so a year or an ID is never a measurement.
_MEASURE = re.compile(r"\d{1,3}(\.\d{1,3})?(MM|CM|KV|KVP|MAS|MA|MS|S|T|MIN|SEC|ML|MG|%)?")
_LO_MAX = 64
# Vocabulary words that only join others: fine inside a kept descriptor, noise in a
# neutral one ("CT CHEST FOR"). Negations (NO, W/O, WITHOUT) carry meaning and stay.
_CONNECTORS = frozenset({"AND", "OR", "OF", "THE", "FOR", "TO", "ON", "IN", "AT", "BY",
                         "PER"})


@cache
def default_terms() -> frozenset[str]:
    """The shipped vocabulary, upper case (read once per process)."""
    text = resources.files("node.anonymize").joinpath(
        "data/description_vocabulary.txt"
    ).read_text(encoding="utf-8")
    terms = set()
    for line in text.splitlines():
        line = line.split("#", 1)[0]
        terms.update(t.upper() for t in line.split())
    return frozenset(terms)


class Vocabulary:
    """The tokens a kept descriptor may consist of: the shipped ones plus the
    project's ``extra`` terms."""

    __slots__ = ("_terms",)

    def __init__(self, extra: Iterable[str] = ()) -> None:
        self._terms = default_terms() | {t.strip().upper() for t in extra if t.strip()}

    def known(self, token: str) -> bool:
        """A term, a measurement, or a hyphenated compound of them (T2-FLAIR)."""
        if token in self._terms or _MEASURE.fullmatch(token) is not None:
            return True
        parts = token.split("-")
        return len(parts) > 1 and all(
            p in self._terms or _MEASURE.fullmatch(p) is not None for p in parts)


def tokens(text: str) -> list[str]:
    """A descriptor's tokens, upper case; ``/``, ``.`` and ``-`` stay inside tokens
    (``W/O``, ``2.5MM``, ``T-SPINE``)."""
    return [t for t in _SPLIT.split(text.upper()) if t]


def describe(value: str, vocabulary: Vocabulary, matcher: TextMatcher, ds: Dataset, *,
             series_level: bool) -> tuple[str, bool]:
    """The descriptor to write for ``value`` and whether it is ``value`` itself.

    Kept when every token is known and none names a person or identifier of the
    object; otherwise the neutral text (``CT SERIES 3 CHEST LUNG`` for a series,
    ``CHEST LUNG`` for a study, whose description must not differ between its
    series)."""
    words = tokens(value)
    known = [w for w in words if vocabulary.known(w) and not matcher.search(w)]
    if words and len(known) == len(words) and not matcher.search(value):
        return value, True
    parts: list[str] = []
    if series_level:
        modality = str(ds.get("Modality", "") or "").strip().upper()
        number = str(ds.get("SeriesNumber", "") or "").strip()
        parts += [p for p in (modality, f"SERIES {number}" if number else "") if p]
    for word in known:
        if word not in _CONNECTORS and word not in " ".join(parts).split():
            parts.append(word)
    return " ".join(parts)[:_LO_MAX].strip(), False
