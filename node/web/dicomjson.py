"""DICOM JSON (PS3.18 F.2) as the web front end writes it: query matches (QIDO-RS), the
instances' metadata (WADO-RS; built and kept by :mod:`node.metadata`) with BulkDataURIs
completed per request, and the bulk values those URIs serve.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from pydicom import dcmread

from node.metadata import BULK_THRESHOLD, person

_BULK_KEY = b'"BulkDataURI":"'


class MetadataCache:
    """Instances' metadata as compact JSON, by blob hash, least recently used out first,
    in front of ``load`` (:meth:`node.metadata.MetadataSidecars.read`).

    A blob never changes, so what was loaded once holds for good: a series opened
    again is answered from memory, without reading its hundreds of sidecars.
    BulkDataURIs are kept relative to the DICOMweb root and completed per request.
    """

    def __init__(self, load: Callable[[str], bytes], budget_bytes: int = 64 << 20) -> None:
        self.load = load
        self.budget = budget_bytes
        self.used = 0
        self._items: OrderedDict[str, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, sha256: str) -> bytes:
        with self._lock:
            found = self._items.get(sha256)
            if found is not None:
                self._items.move_to_end(sha256)
                return found
        made = self.load(sha256)
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
                element["Value"] = [person(v) for v in values]
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


def _number(value: object, kind: type) -> int | float | None:
    try:
        return kind(str(value).strip()) if not isinstance(value, (int, float)) else kind(value)
    except ValueError:
        return None
