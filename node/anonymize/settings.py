"""De-identification settings: every option of the ``[deidentify]`` config section.

The defaults are the strict end of PS3.15 Annex E (whitelist thinking): no option
that retains information is on, except Retain Longitudinal Temporal Information
with Modified Dates, because the project needs intervals between a patient's
studies to survive and shifting by a keyed per-patient offset keeps them without
keeping the real dates.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

LONGITUDINAL_CHOICES = ("off", "full", "modified")
BURNED_IN_POLICIES = ("quarantine", "accept", "mask")
# What happens to Study/Series Description and the like (node/anonymize/descriptions.py).
DESCRIPTION_CHOICES = ("vocabulary", "remove")


class DeidConfigError(ValueError):
    """A bad ``[deidentify]`` value; the message starts with ``deidentify.<key>:``."""


@dataclass(frozen=True)
class SafePrivateTag:
    """A private element the project vouches for, keyed the way private tags are
    really identified: by the private creator string and the element's low byte
    (the high byte is only the reservation block, which varies between files).
    ``group`` narrows the match to one odd group when the creator is reused."""

    creator: str
    element: int
    group: int | None = None

    def matches(self, group: int, creator: str, element: int) -> bool:
        return (
            self.creator == creator.strip()
            and self.element == (element & 0xFF)
            and (self.group is None or self.group == group)
        )


@dataclass(frozen=True)
class MaskRegion:
    """A rectangle of pixels to blank when the burned-in policy is ``mask``.
    ``rows``/``columns`` restrict it to images of that size, because text
    positions depend on the device's screen layout."""

    x: int
    y: int
    width: int
    height: int
    rows: int | None = None
    columns: int | None = None

    def applies_to(self, rows: int, columns: int) -> bool:
        return (self.rows is None or self.rows == rows) and (
            self.columns is None or self.columns == columns
        )


@dataclass(frozen=True)
class DeidSettings:
    """Options of the Basic Application Level Confidentiality Profile and the
    policies around it. Option names follow PS3.15 Table E.1-1's columns."""

    retain_safe_private: bool = False
    safe_private: tuple[SafePrivateTag, ...] = ()
    retain_uids: bool = False
    retain_device_identity: bool = False
    retain_institution_identity: bool = False
    retain_patient_characteristics: bool = False
    retain_longitudinal: str = "modified"
    clean_descriptors: bool = False
    clean_structured_content: bool = False
    clean_graphics: bool = False
    safe_descriptors: tuple[str, ...] = ()
    descriptions: str = "vocabulary"
    description_terms: tuple[str, ...] = ()
    burned_in_policy: str = "quarantine"
    mask_regions: tuple[MaskRegion, ...] = ()
    key_file: Path | None = None

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> DeidSettings:
        """Build settings from the ``[deidentify]`` TOML table.

        Raises ``DeidConfigError`` (a ``ValueError``) with ``deidentify.<key>: <problem>``
        for anything that is not exactly right, so a typo in the config stops the node instead of
        silently de-identifying with a default the project did not choose."""
        if not isinstance(data, Mapping):
            raise DeidConfigError("deidentify: must be a table")
        known = {f.name for f in fields(cls)}
        for key in data:
            if key not in known:
                raise DeidConfigError(f"deidentify.{key}: unknown setting")
        values: dict[str, Any] = {}
        for name in (
            "retain_safe_private",
            "retain_uids",
            "retain_device_identity",
            "retain_institution_identity",
            "retain_patient_characteristics",
            "clean_descriptors",
            "clean_structured_content",
            "clean_graphics",
        ):
            if name in data:
                values[name] = _bool(name, data[name])
        if "retain_longitudinal" in data:
            values["retain_longitudinal"] = _choice(
                "retain_longitudinal", data["retain_longitudinal"], LONGITUDINAL_CHOICES
            )
        if "burned_in_policy" in data:
            values["burned_in_policy"] = _choice(
                "burned_in_policy", data["burned_in_policy"], BURNED_IN_POLICIES
            )
        if "descriptions" in data:
            values["descriptions"] = _choice(
                "descriptions", data["descriptions"], DESCRIPTION_CHOICES
            )
        if "description_terms" in data:
            values["description_terms"] = _strings("description_terms", data["description_terms"])
        if "safe_descriptors" in data:
            values["safe_descriptors"] = _strings("safe_descriptors", data["safe_descriptors"])
        if "safe_private" in data:
            values["safe_private"] = tuple(
                _safe_private(i, entry) for i, entry in enumerate(_list("safe_private", data))
            )
        if "mask_regions" in data:
            values["mask_regions"] = tuple(
                _mask_region(i, entry) for i, entry in enumerate(_list("mask_regions", data))
            )
        if "key_file" in data:
            if not isinstance(data["key_file"], str) or not data["key_file"].strip():
                raise DeidConfigError("deidentify.key_file: must be a non-empty path string")
            values["key_file"] = Path(data["key_file"]).expanduser()
        settings = cls(**values)
        if settings.burned_in_policy == "mask" and not settings.mask_regions:
            raise DeidConfigError("deidentify.mask_regions: burned_in_policy 'mask' needs regions")
        return settings


def _bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise DeidConfigError(f"deidentify.{key}: must be true or false")
    return value


def _choice(key: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise DeidConfigError(f"deidentify.{key}: must be one of {', '.join(choices)}")
    return value


def _list(key: str, data: Mapping[str, Any]) -> list[Any]:
    value = data[key]
    if not isinstance(value, list):
        raise DeidConfigError(f"deidentify.{key}: must be a list")
    return value


def _strings(key: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise DeidConfigError(f"deidentify.{key}: must be a list of non-empty strings")
    return tuple(v.strip() for v in value)


def _int(key: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise DeidConfigError(f"deidentify.{key}: must be an integer from {low} to {high}")
    return value


def _safe_private(index: int, entry: Any) -> SafePrivateTag:
    key = f"safe_private[{index}]"
    if not isinstance(entry, Mapping):
        raise DeidConfigError(f"deidentify.{key}: must be a table with creator and element")
    unknown = set(entry) - {"creator", "element", "group"}
    if unknown:
        raise DeidConfigError(f"deidentify.{key}.{min(unknown)}: unknown setting")
    creator = entry.get("creator")
    if not isinstance(creator, str) or not creator.strip():
        raise DeidConfigError(f"deidentify.{key}.creator: must be a non-empty string")
    if "element" not in entry:
        raise DeidConfigError(f"deidentify.{key}.element: missing")
    element = _int(f"{key}.element", entry["element"], 0x00, 0xFF)
    group = None
    if "group" in entry:
        group = _int(f"{key}.group", entry["group"], 0x0009, 0xFFFF)
        if group % 2 == 0:
            raise DeidConfigError(f"deidentify.{key}.group: private groups are odd")
    return SafePrivateTag(creator=creator.strip(), element=element, group=group)


def _mask_region(index: int, entry: Any) -> MaskRegion:
    key = f"mask_regions[{index}]"
    if not isinstance(entry, Mapping):
        raise DeidConfigError(f"deidentify.{key}: must be a table with x, y, width, height")
    unknown = set(entry) - {"x", "y", "width", "height", "rows", "columns"}
    if unknown:
        raise DeidConfigError(f"deidentify.{key}.{min(unknown)}: unknown setting")
    values = {}
    for name, low in (("x", 0), ("y", 0), ("width", 1), ("height", 1)):
        if name not in entry:
            raise DeidConfigError(f"deidentify.{key}.{name}: missing")
        values[name] = _int(f"{key}.{name}", entry[name], low, 65535)
    for name in ("rows", "columns"):
        if name in entry:
            values[name] = _int(f"{key}.{name}", entry[name], 1, 65535)
    return MaskRegion(**values)
