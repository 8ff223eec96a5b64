"""Stored instances as DICOM JSON (PS3.18 F.2) for WADO-RS metadata, with BulkDataURIs.

Top-level binary values longer than :data:`BULK_THRESHOLD` (the pixel data,
large LUTs) are not read at all: the file is parsed with their values
deferred and each is answered as a BulkDataURI that the bulkdata route
serves. Binary values inside sequences are small in practice and go inline.
"""

from __future__ import annotations

import json
import struct
import threading
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataelem import RawDataElement

#: Values (bytes) at or above this size become BulkDataURIs.
BULK_THRESHOLD = 1024
_BINARY_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "UN", "OB or OW", "US or OW"}
#: Never inlined in metadata: these are big and every viewer fetches them as frames.
_ALWAYS_BULK = {0x7FE00010, 0x7FE00008, 0x7FE00009}
_NO_THRESHOLD = 1 << 62


def metadata(path: Path, root_url: str) -> dict[str, Any]:
    """The instance's data set (no file meta) as a DICOM JSON object; BulkDataURIs are
    under ``root_url`` (the DICOMweb root; "" for URIs relative to it) by the
    instance's own UIDs."""
    ds = dcmread(path, defer_size=BULK_THRESHOLD)
    little = ds.original_encoding[1] if ds.original_encoding else True
    instance_url = (f"{root_url}/studies/{ds.get('StudyInstanceUID', '')}/series/"
                    f"{ds.get('SeriesInstanceUID', '')}/instances/{ds.get('SOPInstanceUID', '')}")
    out: dict[str, Any] = {}
    for tag in ds.keys():  # noqa: SIM118 (keys: iterating converts every raw element)
        raw = ds.get_item(tag, keep_deferred=True)
        key = f"{int(tag):08X}"
        if tag in _ALWAYS_BULK or (isinstance(raw, RawDataElement) and _bulky(raw)):
            vr = raw.VR or "UN"
            out[key] = {"vr": "OW" if vr in ("OB or OW", "US or OW") else vr,
                        "BulkDataURI": f"{instance_url}/bulkdata/{key}"}
            continue
        fast = _plain(raw, little) if isinstance(raw, RawDataElement) else None
        out[key] = fast if fast is not None else ds[tag].to_json_dict(None, _NO_THRESHOLD)
    return out


#: Values pydicom would convert that are plain ASCII (or plain binary numbers): written
#: straight from the raw bytes, which halves the time of a first metadata request (the
#: element conversion is most of it). Anything else goes through pydicom.
_ASCII_VRS = {"AE", "AS", "CS", "DA", "DT", "TM", "UI", "IS", "DS"}
_TEXT_VRS = {"LO", "SH", "PN", "ST", "LT", "UT", "UC"}
_SINGLE_TEXT_VRS = {"ST", "LT", "UT"}
_BINARY_NUMBERS = {"US": ("H", 2), "UL": ("I", 4), "SS": ("h", 2), "SL": ("i", 4),
                   "FL": ("f", 4), "FD": ("d", 8)}


def _plain(raw: RawDataElement, little: bool) -> dict[str, Any] | None:
    vr, value = raw.VR, raw.value
    if value is None or not isinstance(value, bytes):
        return None
    if vr in _TEXT_VRS:
        # Every character set a data set may declare reads ASCII bytes as ASCII
        # (ISO 2022 escapes start with ESC, which is ASCII too: refused below).
        if b"\x1b" in value:
            return None
        try:
            text = value.decode("ascii")
        except UnicodeDecodeError:
            return None
        if vr in _SINGLE_TEXT_VRS:
            text = text.rstrip(" \0")
            return {"vr": vr, "Value": [text]} if text else {"vr": vr}
        items = [v.rstrip(" \0") for v in text.split("\\")]
        if not any(items):
            return {"vr": vr}
        if any(not v for v in items):
            return None
        if vr == "PN":
            return {"vr": vr, "Value": [_person(v) for v in items]}
        return {"vr": vr, "Value": items}
    if vr in _ASCII_VRS:
        try:
            text = value.decode("ascii")
        except UnicodeDecodeError:
            return None
        items = [v.rstrip(" \0") for v in text.split("\\")]
        if not any(items):
            return {"vr": vr}
        try:
            if vr == "IS":
                values: list[Any] = [int(v) if v else None for v in items]
            elif vr == "DS":
                values = [float(v) if v else None for v in items]
            else:
                if any(not v for v in items):
                    return None  # empty values inside a list: pydicom's rules
                values = items
        except ValueError:
            return None
        return {"vr": vr, "Value": values}
    if vr in _BINARY_NUMBERS and little:
        code, size = _BINARY_NUMBERS[vr]
        if not value:
            return {"vr": vr}
        if len(value) % size:
            return None
        return {"vr": vr, "Value": list(struct.unpack(f"<{len(value) // size}{code}", value))}
    return None


_BULK_KEY = b'"BulkDataURI":"'


class MetadataCache:
    """Instances' metadata as compact JSON, by blob hash, least recently used out first.

    A blob never changes (its name is the hash of its bytes), so what was
    worked out once holds for good; parsing a file and converting its
    elements costs milliseconds per instance, which a series of hundreds
    would pay on every viewer open. BulkDataURIs are kept relative to the
    DICOMweb root and completed per request (the root depends on the
    request's host and, behind a proxy, its forwarded headers).
    """

    def __init__(self, budget_bytes: int = 64 << 20) -> None:
        self.budget = budget_bytes
        self.used = 0
        self._items: OrderedDict[str, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, sha256: str, path: Path) -> bytes:
        with self._lock:
            found = self._items.get(sha256)
            if found is not None:
                self._items.move_to_end(sha256)
                return found
        made = json.dumps(metadata(path, ""), separators=(",", ":")).encode()
        with self._lock:
            if sha256 not in self._items and len(made) <= self.budget:
                self._items[sha256] = made
                self.used += len(made)
                while self.used > self.budget:
                    _, dropped = self._items.popitem(last=False)
                    self.used -= len(dropped)
        return made

    @staticmethod
    def answer(items: Iterable[bytes], root_url: str) -> bytes:
        """The JSON array of cached items, BulkDataURIs made absolute under ``root_url``."""
        prefix = _BULK_KEY + root_url.encode()
        return b"[" + b",".join(item.replace(_BULK_KEY + b"/", prefix + b"/")
                                for item in items) + b"]"


def _bulky(raw: RawDataElement) -> bool:
    return (raw.VR in _BINARY_VRS and raw.length is not None and raw.length != 0xFFFFFFFF
            and raw.length >= BULK_THRESHOLD)


def bulk_value(path: Path, tag: int) -> tuple[str, bytes] | None:
    """A top-level element's VR and raw value bytes, or None when the instance lacks it
    (for encapsulated pixel data: the whole encapsulated value, fragments and all)."""
    ds = dcmread(path, defer_size=BULK_THRESHOLD, specific_tags=[tag])
    if tag not in ds:
        return None
    elem = ds[tag]
    value = elem.value
    if not isinstance(value, (bytes, bytearray)):
        return None
    return elem.VR, bytes(value)


_NUMBERS = {"IS": int, "DS": float, "US": int, "UL": int, "SS": int, "SL": int, "SV": int,
            "UV": int, "FL": float, "FD": float}
_PN_GROUPS = ("Alphabetic", "Ideographic", "Phonetic")
#: Tag → its JSON key ("00100010"), worked out once per tag.
_KEYS: dict[int, str] = {}


def match_json(elements: Iterable[tuple[int, str, object]],
               skip: frozenset[int] = frozenset()) -> dict[str, Any]:
    """A query match's elements ``(tag, VR, value)`` as a DICOM JSON object (PS3.18 F.2).

    Written here rather than through a pydicom Dataset because the values are
    few and simple (text, numbers, person names, lists of them; ``skip`` names tags
    to leave out) and pydicom's
    ``to_json_dict`` costs about half a millisecond per match: a 300-instance
    QIDO answer would spend most of its time there.
    """
    out: dict[str, Any] = {}
    for tag, vr, value in elements:
        number = int(tag)
        key = _KEYS.get(number)
        if key is None:
            key = _KEYS[number] = f"{number:08X}"
        if number in skip:
            continue
        element: dict[str, Any] = {"vr": vr}
        values = _values(value)
        if values:
            if vr == "PN":
                element["Value"] = [_person(v) for v in values]
            elif vr in _NUMBERS:
                element["Value"] = [_number(v, _NUMBERS[vr]) for v in values]
            else:
                element["Value"] = [str(v).strip() or None for v in values]
        out[key] = element
    return out


def _values(value: object) -> list[object]:
    if value is None or value == "":
        return []
    if isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(value, str):
        return value.split("\\")
    return [value]


def _person(value: object) -> dict[str, str]:
    groups = str(value).split("=")
    return {name: group for name, group in zip(_PN_GROUPS, groups, strict=False) if group}


def _number(value: object, kind: type) -> int | float | None:
    try:
        return kind(str(value).strip()) if not isinstance(value, (int, float)) else kind(value)
    except ValueError:
        return None
