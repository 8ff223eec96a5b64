"""The labelling protocol: which classes a project labels and what a good label of each looks like.

Loaded from a TOML file (``config/protocol.toml`` documents every key). The
consistency checks read their thresholds here, the bridges read the codes a
SEG must carry and the window a reviewer should use. A protocol that cannot
be read stops the node at start with one line naming the key, like the node
config does: a typo must not silently turn every check off.
"""

from __future__ import annotations

import hashlib
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from node.annotations.masks import Code

GEOMETRIES = ("any", "volume", "planar")

#: Review windows (center, width) in HU, available to every protocol.
DEFAULT_WINDOWS: dict[str, tuple[float, float]] = {
    "lung": (-600.0, 1500.0),
    "mediastinal": (40.0, 400.0),
    "bone": (300.0, 1500.0),
    "brain": (40.0, 80.0),
}

#: Category and type written for a label the protocol does not know (SCT "Tissue").
GENERIC_CODE = Code("85756007", "SCT", "Tissue")


class ProtocolError(ValueError):
    """The protocol file is missing, not TOML, or has a bad key. The message names the key."""


@dataclass(frozen=True)
class LabelClass:
    """One thing annotators label, and the limits a structure of it must respect."""

    key: str
    label: str
    category: Code
    type: Code
    aliases: tuple[str, ...] = ()
    pattern: re.Pattern[str] | None = None
    window: str | None = None
    geometry: str = "any"
    components: int = 1
    diameter_jump_mm: float = 3.0
    volume_mm3: tuple[float, float] | None = None
    diameter_mm: tuple[float, float] | None = None
    exclusive_with: frozenset[str] = frozenset()
    #: Two readings of this class agree from this Dice up (None: the protocol's ``dice_min``).
    dice_min: float | None = None

    def matches_label(self, label: str) -> bool:
        text = label.strip().casefold()
        names = {self.key.casefold(), self.label.casefold(), *(a.casefold() for a in self.aliases)}
        return text in names or bool(self.pattern and self.pattern.fullmatch(label.strip()))


@dataclass(frozen=True)
class Protocol:
    """A whole protocol. ``Protocol()`` is the one used when none is configured."""

    name: str = "none"
    version: str = ""
    sha256: str = ""
    position_tolerance_mm: float = 0.01
    fractional_threshold: float = 0.5
    components: int = 1
    diameter_jump_mm: float = 3.0
    windows: dict[str, tuple[float, float]] = field(default_factory=lambda: dict(DEFAULT_WINDOWS))
    classes: tuple[LabelClass, ...] = ()
    #: Agreement (issue 10): kappa below ``kappa_min`` flags a class (the guideline needs
    #: revision); a matched pair below ``dice_min`` (or its class's) goes to adjudication.
    kappa_min: float = 0.6
    dice_min: float = 0.7
    #: Categorical questions and their allowed answers (``lamina labels import``); empty:
    #: any question and answer is accepted.
    categories: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def dice_min_for(self, class_key: str) -> float:
        """The Dice from which two readings of a class agree."""
        for cls in self.classes:
            if cls.key == class_key and cls.dice_min is not None:
                return cls.dice_min
        return self.dice_min

    @property
    def knows_labels(self) -> bool:
        """False when no classes are declared: then no label is "unknown"."""
        return bool(self.classes)

    def class_for(self, label: str, type_code: Code | None = None) -> LabelClass | None:
        """The class a structure belongs to: by its label first, else by a unique type code."""
        for cls in self.classes:
            if cls.matches_label(label):
                return cls
        if type_code is not None:
            by_code = [c for c in self.classes
                       if (c.type.scheme, c.type.value) == (type_code.scheme, type_code.value)]
            if len(by_code) == 1:
                return by_code[0]
        return None

    def limits_for(self, cls: LabelClass | None) -> tuple[int, float]:
        """(allowed components, diameter-jump threshold) for a class, or the protocol defaults."""
        if cls is None:
            return self.components, self.diameter_jump_mm
        return cls.components, cls.diameter_jump_mm


_TOP = {"protocol", "windows", "classes", "agreement"}
_AGREEMENT_KEYS = {"kappa_min", "dice_min", "categories"}
_PROTOCOL_KEYS = {"name", "version", "position_tolerance_mm", "fractional_threshold",
                  "components", "diameter_jump_mm"}
_CLASS_KEYS = {"label", "aliases", "pattern", "category", "type", "window", "geometry",
               "components", "diameter_jump_mm", "volume_mm3", "diameter_mm", "exclusive_with",
               "dice_min"}


def load_protocol(path: Path) -> Protocol:
    """Read and check a protocol file."""
    try:
        data = Path(path).read_bytes()
    except OSError:
        raise ProtocolError(f"{path}: protocol file not found") from None
    try:
        raw = tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ProtocolError(f"{path}: not valid TOML ({exc})") from None
    return parse_protocol(raw, hashlib.sha256(data).hexdigest())


def parse_protocol(raw: dict[str, Any], sha256: str = "") -> Protocol:
    for key in raw:
        if key not in _TOP:
            raise ProtocolError(f"{key}: unknown section")
    head = _table(raw, "protocol", "protocol")
    _known(head, _PROTOCOL_KEYS, "protocol")
    defaults = Protocol()
    tolerance = _number(head, "position_tolerance_mm", "protocol", defaults.position_tolerance_mm)
    threshold = _number(head, "fractional_threshold", "protocol", defaults.fractional_threshold)
    if not 0 < tolerance <= 10:
        raise ProtocolError("protocol.position_tolerance_mm: must be in (0, 10] mm")
    if not 0 < threshold <= 1:
        raise ProtocolError("protocol.fractional_threshold: must be in (0, 1]")
    components = _count(head, "components", "protocol", defaults.components)
    jump = _positive(head, "diameter_jump_mm", "protocol", defaults.diameter_jump_mm)

    windows = dict(DEFAULT_WINDOWS)
    for name, spec in _table(raw, "windows", "windows").items():
        where = f"windows.{name}"
        if not isinstance(spec, dict):
            raise ProtocolError(f"{where}: must be a table with center and width")
        _known(spec, {"center", "width"}, where)
        for key in ("center", "width"):
            if key not in spec:
                raise ProtocolError(f"{where}.{key}: missing")
        windows[name] = (_number(spec, "center", where, 0.0), _positive(spec, "width", where, 1.0))

    agreement = _table(raw, "agreement", "agreement")
    _known(agreement, _AGREEMENT_KEYS, "agreement")
    kappa_min = _fraction(agreement, "kappa_min", "agreement", defaults.kappa_min)
    dice_min = _fraction(agreement, "dice_min", "agreement", defaults.dice_min)
    categories = _table(agreement, "categories", "agreement.categories")
    for question, answers in categories.items():
        if (not isinstance(answers, list) or not answers
                or not all(isinstance(a, str) and a.strip() for a in answers)):
            raise ProtocolError(f"agreement.categories.{question}: must be a list of answers")

    classes = [_label_class(key, spec, windows, components, jump)
               for key, spec in _table(raw, "classes", "classes").items()]
    keys = {c.key for c in classes}
    for cls in classes:
        unknown = cls.exclusive_with - keys
        if unknown:
            raise ProtocolError(f"classes.{cls.key}.exclusive_with: unknown class {min(unknown)!r}")
    return Protocol(
        name=_text(head, "name", "protocol", "unnamed"),
        version=_text(head, "version", "protocol", ""),
        sha256=sha256,
        position_tolerance_mm=tolerance,
        fractional_threshold=threshold,
        components=components,
        diameter_jump_mm=jump,
        windows=windows,
        classes=tuple(classes),
        kappa_min=kappa_min,
        dice_min=dice_min,
        categories={q: tuple(a.strip() for a in answers) for q, answers in categories.items()},
    )


def _label_class(key: str, spec: Any, windows: dict, components: int, jump: float) -> LabelClass:
    where = f"classes.{key}"
    if not isinstance(spec, dict):
        raise ProtocolError(f"{where}: must be a table")
    _known(spec, _CLASS_KEYS, where)
    for required in ("category", "type"):
        if required not in spec:
            raise ProtocolError(f"{where}.{required}: missing (a SEG needs both codes)")
    aliases = spec.get("aliases", [])
    if not isinstance(aliases, list) or not all(isinstance(a, str) for a in aliases):
        raise ProtocolError(f"{where}.aliases: must be a list of labels")
    pattern = None
    if "pattern" in spec:
        try:
            pattern = re.compile(_text(spec, "pattern", where, ""), re.IGNORECASE)
        except re.error as exc:
            raise ProtocolError(f"{where}.pattern: not a regular expression ({exc})") from None
    window = spec.get("window")
    if window is not None and window not in windows:
        raise ProtocolError(f"{where}.window: unknown window {window!r} "
                            f"(known: {', '.join(sorted(windows))})")
    geometry = _text(spec, "geometry", where, "any")
    if geometry not in GEOMETRIES:
        raise ProtocolError(f"{where}.geometry: must be one of {', '.join(GEOMETRIES)}")
    exclusive = spec.get("exclusive_with", [])
    if not isinstance(exclusive, list) or not all(isinstance(e, str) for e in exclusive):
        raise ProtocolError(f"{where}.exclusive_with: must be a list of class names")
    return LabelClass(
        key=key,
        label=_text(spec, "label", where, key),
        category=_code(spec, "category", where),
        type=_code(spec, "type", where),
        aliases=tuple(aliases),
        pattern=pattern,
        window=window,
        geometry=geometry,
        components=_count(spec, "components", where, components),
        diameter_jump_mm=_positive(spec, "diameter_jump_mm", where, jump),
        volume_mm3=_range(spec, "volume_mm3", where),
        diameter_mm=_range(spec, "diameter_mm", where),
        exclusive_with=frozenset(exclusive),
        dice_min=_fraction(spec, "dice_min", where, 0.0) if "dice_min" in spec else None,
    )


def _table(raw: dict, key: str, where: str) -> dict:
    value = raw.get(key, {})
    if not isinstance(value, dict):
        raise ProtocolError(f"{where}: must be a table")
    return value


def _known(table: dict, allowed: set[str], where: str) -> None:
    for key in table:
        if key not in allowed:
            raise ProtocolError(f"{where}.{key}: unknown key")


def _text(table: dict, key: str, where: str, default: str) -> str:
    value = table.get(key, default)
    if not isinstance(value, str):
        raise ProtocolError(f"{where}.{key}: must be text, got {value!r}")
    return value


def _number(table: dict, key: str, where: str, default: float) -> float:
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ProtocolError(f"{where}.{key}: must be a number, got {value!r}")
    return float(value)


def _fraction(table: dict, key: str, where: str, default: float) -> float:
    """A number in [0, 1] (a kappa or Dice threshold, a sampling fraction)."""
    value = _number(table, key, where, default)
    if not 0 <= value <= 1:
        raise ProtocolError(f"{where}.{key}: must be between 0 and 1, got {value}")
    return value


def _positive(table: dict, key: str, where: str, default: float) -> float:
    value = _number(table, key, where, default)
    if value <= 0:
        raise ProtocolError(f"{where}.{key}: must be positive, got {value}")
    return value


def _count(table: dict, key: str, where: str, default: int) -> int:
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ProtocolError(f"{where}.{key}: must be a whole number ≥ 1, got {value!r}")
    return value


def _range(table: dict, key: str, where: str) -> tuple[float, float] | None:
    if key not in table:
        return None
    value = table[key]
    if (not isinstance(value, list) or len(value) != 2
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
            or not 0 <= value[0] <= value[1]):
        raise ProtocolError(f"{where}.{key}: must be [min, max] with 0 ≤ min ≤ max, got {value!r}")
    return float(value[0]), float(value[1])


def _code(table: dict, key: str, where: str) -> Code:
    spec = table[key]
    if not isinstance(spec, dict):
        raise ProtocolError(f"{where}.{key}: must be {{ scheme, value, meaning }}")
    _known(spec, {"scheme", "value", "meaning"}, f"{where}.{key}")
    parts = []
    for part in ("value", "scheme", "meaning"):
        text = spec.get(part)
        if not isinstance(text, str) or not text.strip():
            raise ProtocolError(f"{where}.{key}.{part}: missing")
        parts.append(text.strip())
    return Code(*parts)
