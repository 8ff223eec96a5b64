"""What de-identification did to one object, as evidence a reviewer can read.

The evidence names attributes, never values: keywords (``(gggg,eeee)`` for tags the
data dictionary does not know), paths through sequences as ``Keyword>Keyword``, the
options and profile edition applied, and the project's own safe-list entries for
private elements kept. It holds nothing read from the object's values, so it can be
stored and shown beside the pseudonymous data.

The engine records while it decides (from tag and VR, before decoding), so keeping
the evidence costs no decoding; :func:`build_evidence` turns the notes into a
:class:`DeidEvidence` once per object.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydicom.datadict import keyword_for_tag

SCHEMA = 1

# Action categories, in the order a report lists them; the letter is PS3.15's action.
REMOVED = "removed"            # X: the element is not in the output
EMPTIED = "emptied"            # Z: present with an empty value (or empty sequence)
DUMMY = "dummy"                # D: a fixed dummy value ("ANONYMOUS", "Segment 3", ...)
PSEUDONYM = "pseudonym"        # PatientID, PatientName: keyed pseudonyms
UID_REMAPPED = "uid_remapped"  # U: every instance UID replaced by its keyed pseudonym
DATE_SHIFTED = "date_shifted"  # dates moved by the patient's offset (Modified Dates)
AGE_CAPPED = "age_capped"      # ages of 90 years or more became 090Y
CLEANED = "cleaned"            # C: kept after checking against the project vocabulary
KEPT = "kept"                  # K: kept as it was (sequences: kept and cleaned inside)
ADDED = "added"                # markers written by de-identification itself
ACTION_CATEGORIES: tuple[str, ...] = (
    REMOVED, EMPTIED, DUMMY, PSEUDONYM, UID_REMAPPED, DATE_SHIFTED, AGE_CAPPED, CLEANED,
    KEPT, ADDED,
)

# Overlay (60xx) and curve (50xx) groups, named by group number ("6000").
OVERLAYS_REMOVED = "overlays_removed"
OVERLAYS_CLEANED = "overlays_cleaned"
CURVES_REMOVED = "curves_removed"
CURVES_CLEANED = "curves_cleaned"
GRAPHICS_CATEGORIES: tuple[str, ...] = (
    OVERLAYS_REMOVED, OVERLAYS_CLEANED, CURVES_REMOVED, CURVES_CLEANED,
)

_GRAPHICS = frozenset(GRAPHICS_CATEGORIES)
# Categories of what an option can be the reason for.
_OPTIONED = frozenset({KEPT, CLEANED, DATE_SHIFTED, AGE_CAPPED})

_NAMES: dict[int, str] = {}


def element_name(tag: int) -> str:
    """The dictionary keyword of a tag, or ``(gggg,eeee)`` for private and unknown
    tags (cached: the engine asks once per tag per process, not per element)."""
    name = _NAMES.get(tag)
    if name is None:
        name = _NAMES[tag] = keyword_for_tag(tag) or f"({tag >> 16:04X},{tag & 0xFFFF:04X})"
    return name


@dataclass(frozen=True)
class AppliedOption:
    """One CID 7050 code written into DeidentificationMethodCodeSequence.
    ``name`` is the option's settings name (``basic_profile`` and
    ``clean_pixel_data`` for the two codes that are not switches)."""

    name: str
    code: str
    meaning: str


@dataclass(frozen=True)
class KeptPrivate:
    """A private element kept under Retain Safe Private, with the safe-list entry
    that vouched for it (the project's configuration, not the object's data)."""

    path: str
    creator: str
    element: int
    group: int | None = None


@dataclass(frozen=True)
class DeidEvidence:
    """What de-identification did to one object; see the module docstring. Every
    tuple of paths is sorted, so equal evidence serialises to equal JSON."""

    engine: str
    edition: str
    options: tuple[AppliedOption, ...]
    removed: tuple[str, ...] = ()
    emptied: tuple[str, ...] = ()
    dummy: tuple[str, ...] = ()
    pseudonym: tuple[str, ...] = ()
    uid_remapped: tuple[str, ...] = ()
    date_shifted: tuple[str, ...] = ()
    age_capped: tuple[str, ...] = ()
    cleaned: tuple[str, ...] = ()
    kept: tuple[str, ...] = ()
    added: tuple[str, ...] = ()
    # Path -> the option that decided to keep (or clean, shift, cap) it rather than
    # what the basic profile does.
    by_option: tuple[tuple[str, str], ...] = ()
    private_kept: tuple[KeptPrivate, ...] = ()
    private_removed: int = 0
    overlays_removed: tuple[str, ...] = ()
    overlays_cleaned: tuple[str, ...] = ()
    curves_removed: tuple[str, ...] = ()
    curves_cleaned: tuple[str, ...] = ()
    # Paths whose value would have been kept but named a person or identifier the
    # object carries, so it was cleaned, emptied or dropped (the residual-PHI scan),
    # and how many values that was.
    residual_phi: tuple[str, ...] = ()
    residual_phi_values: int = 0
    pixels_masked: bool = False
    # How dates and times were handled: "shifted" (Modified Dates: one per-patient
    # offset for every DA, TM and DT), "table" (Table E.1-1's actions), "kept".
    # Empty in evidence recorded before times were handled.
    temporal: str = ""
    schema: int = field(default=SCHEMA)

    def as_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict, keys and lists in a fixed order."""
        return {
            "schema": self.schema,
            "engine": self.engine,
            "edition": self.edition,
            "options": [
                {"name": o.name, "code": o.code, "meaning": o.meaning} for o in self.options
            ],
            "actions": {c: list(getattr(self, c)) for c in ACTION_CATEGORIES},
            "by_option": dict(self.by_option),
            "private": {
                "kept": [
                    {"path": p.path, "creator": p.creator, "element": p.element,
                     "group": p.group}
                    for p in self.private_kept
                ],
                "removed": self.private_removed,
            },
            "graphics": {c: list(getattr(self, c)) for c in GRAPHICS_CATEGORIES},
            "residual_phi": list(self.residual_phi),
            "residual_phi_values": self.residual_phi_values,
            "pixels_masked": self.pixels_masked,
            "temporal": self.temporal,
        }

    def as_json(self) -> str:
        """:meth:`as_dict` as the index stores it: compact JSON, keys sorted."""
        return _json_of(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DeidEvidence:
        """The inverse of :meth:`as_dict`. Raises ``ValueError`` for another schema
        or a malformed dict."""
        if data.get("schema") != SCHEMA:
            raise ValueError(f"de-identification evidence schema {data.get('schema')!r} "
                             f"is not {SCHEMA}")
        try:
            actions = data["actions"]
            graphics = data["graphics"]
            private = data["private"]
            return cls(
                engine=str(data["engine"]),
                edition=str(data["edition"]),
                options=tuple(
                    AppliedOption(str(o["name"]), str(o["code"]), str(o["meaning"]))
                    for o in data["options"]
                ),
                **{c: _paths(actions.get(c, ())) for c in ACTION_CATEGORIES},
                by_option=tuple(sorted((str(k), str(v)) for k, v in data["by_option"].items())),
                private_kept=tuple(sorted(
                    (KeptPrivate(str(p["path"]), str(p["creator"]), int(p["element"]),
                                 None if p.get("group") is None else int(p["group"]))
                     for p in private["kept"]),
                    key=_private_order,
                )),
                private_removed=int(private["removed"]),
                **{c: _paths(graphics.get(c, ())) for c in GRAPHICS_CATEGORIES},
                residual_phi=_paths(data["residual_phi"]),
                # Absent from evidence recorded before issue 16: nothing counted then.
                residual_phi_values=int(data.get("residual_phi_values", 0)),
                pixels_masked=bool(data["pixels_masked"]),
                temporal=str(data.get("temporal", "")),
            )
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"malformed de-identification evidence: {exc!r}") from None


def _paths(values: Iterable[Any]) -> tuple[str, ...]:
    return tuple(sorted({str(v) for v in values}))


@functools.lru_cache(maxsize=256)
def _json_of(evidence: DeidEvidence) -> str:
    """Remembered per equal evidence: the slices of a series carry the same (it is only
    tags and paths), and serialising it again for each cost more than hashing it."""
    return json.dumps(evidence.as_dict(), sort_keys=True, separators=(",", ":"))


def _private_order(p: KeptPrivate) -> tuple[str, str, int, int]:
    return (p.path, p.creator, p.element, -1 if p.group is None else p.group)


def build_evidence(
    *,
    engine: str,
    edition: str,
    options: tuple[AppliedOption, ...],
    notes: Iterable[tuple[str, str, int]],
    overridden: Mapping[int, str],
    option_for: Callable[[int], str | None],
    tag_cache: dict[int, tuple[str, str | None]],
    private_kept: Iterable[KeptPrivate],
    private_removed: int,
    residual: list[tuple[str, int]],
    pixels_masked: bool,
    temporal: str,
) -> DeidEvidence:
    """Evidence from the engine's notes: ``(category, path prefix, tag)`` per
    decision. ``overridden`` maps top-level tags the engine wrote afterwards
    (pseudonyms, markers) to their final category, replacing whatever was noted
    for them and inside them; ``option_for(tag)`` names the option, if any, that
    decided to keep a tag, and ``tag_cache`` (owned by the engine, whose settings
    ``option_for`` depends on) keeps ``(name, option)`` per tag across objects."""
    names = {t: element_name(t) for t in overridden}
    inside = tuple(names[t] + ">" for t in overridden)
    paths: dict[str, set[str]] = {c: set() for c in ACTION_CATEGORIES + GRAPHICS_CATEGORIES}
    by_option: dict[str, str] = {}
    for category, prefix, tag in notes:
        if prefix:
            if prefix.startswith(inside):
                continue
        elif tag in overridden:
            continue
        if category in _GRAPHICS:
            paths[category].add(f"{prefix}{tag >> 16:04X}")
            continue
        info = tag_cache.get(tag)
        if info is None:
            info = tag_cache[tag] = (element_name(tag), option_for(tag))
        path = prefix + info[0]
        paths[category].add(path)
        if info[1] is not None and category in _OPTIONED:
            by_option[path] = info[1]
    for tag, category in overridden.items():
        paths[category].add(names[tag])
    return DeidEvidence(
        engine=engine,
        edition=edition,
        options=options,
        **{c: tuple(sorted(paths[c])) for c in ACTION_CATEGORIES + GRAPHICS_CATEGORIES},
        by_option=tuple(sorted(by_option.items())),
        private_kept=tuple(sorted(set(private_kept), key=_private_order)),
        private_removed=private_removed,
        residual_phi=tuple(sorted({prefix + element_name(tag) for prefix, tag in residual})),
        residual_phi_values=len(residual),
        pixels_masked=pixels_masked,
        temporal=temporal,
    )

