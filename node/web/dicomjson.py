"""Stored instances as DICOM JSON (PS3.18 F.2) for WADO-RS metadata, with BulkDataURIs.

Top-level binary values longer than :data:`BULK_THRESHOLD` (the pixel data,
large LUTs) are not read at all: the file is parsed with their values
deferred and each is answered as a BulkDataURI that the bulkdata route
serves. Binary values inside sequences are small in practice and go inline.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset

#: Values (bytes) at or above this size become BulkDataURIs.
BULK_THRESHOLD = 1024
_BINARY_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "UN", "OB or OW", "US or OW"}
#: Never inlined in metadata: these are big and every viewer fetches them as frames.
_ALWAYS_BULK = {0x7FE00010, 0x7FE00008, 0x7FE00009}
_NO_THRESHOLD = 1 << 62


def metadata(path: Path, root_url: str) -> dict[str, Any]:
    """The instance's data set (no file meta) as a DICOM JSON object; BulkDataURIs are
    under ``root_url`` (the DICOMweb root) by the instance's own UIDs."""
    ds = dcmread(path, defer_size=BULK_THRESHOLD)
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
        out[key] = ds[tag].to_json_dict(None, _NO_THRESHOLD)
    return out


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


def match_json(ds: Dataset) -> dict[str, Any]:
    """A query match (no bulk data) as DICOM JSON."""
    return ds.to_json_dict(None, _NO_THRESHOLD)
