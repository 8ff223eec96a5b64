"""Stored instances' DICOM JSON (PS3.18 F.2, WADO-RS metadata), kept beside their blobs.

Building an instance's DICOM JSON means parsing its file and converting every
element: milliseconds per instance, which a series of hundreds would pay on
each cold metadata request. A blob never changes (its name is the hash of its
bytes), so its JSON is worked out once and kept as a *sidecar*
(``<sha256>.json`` beside the blob, :meth:`BlobStore.put_sidecar`): written by
an after-commit ingest hook when ``http.prepare_metadata`` is on, else on the
first request. A series' metadata is then its sidecars joined.

Top-level binary values longer than :data:`BULK_THRESHOLD` (the pixel data,
large LUTs) are not read at all: the file is parsed with their values
deferred and each is written as a BulkDataURI relative to the DICOMweb root
(``/studies/...``), which the request completes with its own root (the root
depends on the request's host and, behind a proxy, its forwarded headers).
Binary values inside sequences are small in practice and go inline.

Sidecars are made from the stored blob, which on the clinical route is
already de-identified: they hold nothing the blob does not.
"""

from __future__ import annotations

import json
import logging
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from pydicom import dcmread
from pydicom.dataelem import RawDataElement

from node.storage.interface import BlobStore

if TYPE_CHECKING:
    from node.audit.trail import AuditEntry
    from node.ingest.types import Claim, Incoming, Stored
    from node.storage.interface import Transaction

log = logging.getLogger("lamina.metadata")

#: Values (bytes) at or above this size become BulkDataURIs.
BULK_THRESHOLD = 1024
_BINARY_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "UN", "OB or OW", "US or OW"}
#: Never inlined in metadata: these are big and every viewer fetches them as frames.
_ALWAYS_BULK = {0x7FE00010, 0x7FE00008, 0x7FE00009}
_NO_THRESHOLD = 1 << 62


def metadata(source: Path | BinaryIO, root_url: str) -> dict[str, Any]:
    """The instance's data set (no file meta) as a DICOM JSON object; BulkDataURIs are
    under ``root_url`` (the DICOMweb root; "" for URIs relative to it) by the
    instance's own UIDs."""
    ds = dcmread(source, defer_size=BULK_THRESHOLD)
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
            return {"vr": vr, "Value": [person(v) for v in items]}
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


def _bulky(raw: RawDataElement) -> bool:
    return (raw.VR in _BINARY_VRS and raw.length is not None and raw.length != 0xFFFFFFFF
            and raw.length >= BULK_THRESHOLD)


_PN_GROUPS = ("Alphabetic", "Ideographic", "Phonetic")


def person(value: object) -> dict[str, str]:
    groups = str(value).split("=")
    return {name: group for name, group in zip(_PN_GROUPS, groups, strict=False) if group}


_NOTE = "metadata_sidecar"


class MetadataSidecars:
    """Instances' DICOM JSON (compact, BulkDataURIs relative to the DICOMweb root) by blob
    hash, read from the blob's sidecar or built from the blob (and then kept).

    Also an ingest hook (:class:`node.ingest.types.IngestHook`, registered when
    ``http.prepare_metadata`` is on): each newly indexed instance gets its sidecar
    after the answer, on the context's worker, so even the first metadata request of
    a series only reads files.
    """

    def __init__(self, blobs: BlobStore) -> None:
        self.blobs = blobs

    def build(self, sha256: str) -> bytes:
        """The blob's DICOM JSON, worked out from its bytes."""
        with self.blobs.open(sha256) as f:
            return json.dumps(metadata(f, ""), separators=(",", ":")).encode()

    def write(self, sha256: str) -> bytes:
        """Build the blob's JSON and keep it as its sidecar."""
        made = self.build(sha256)
        self.blobs.put_sidecar(sha256, made)
        return made

    def read(self, sha256: str) -> bytes:
        """The sidecar's JSON; a missing or unreadable one is built again from the blob
        (and kept), never an error of its own."""
        try:
            kept = self.blobs.read_sidecar(sha256)
        except OSError:
            kept = None
        if kept is not None and _well_formed(kept):
            return kept
        made = self.build(sha256)
        try:
            self.blobs.put_sidecar(sha256, made)
        except OSError:  # a read-only or full disk: answer anyway, keep nothing
            log.warning("metadata sidecar not kept", extra={"fields": {"sha256": sha256}})
        return made

    # --- the ingest hook --------------------------------------------------------

    def classify(self, obj: Incoming) -> Claim | None:
        return None

    def on_stored(self, tx: Transaction, obj: Stored) -> AuditEntry | None:
        """Ask for an after-commit run for each new indexed instance (not overlay copies:
        WADO-RS serves the slice they annotate)."""
        if obj.instance_id is not None:
            obj.notes[_NOTE] = True
        return None

    def after_commit(self, obj: Stored) -> None:
        if obj.notes.get(_NOTE):
            self.write(obj.incoming.blob.sha256)


def _well_formed(data: bytes) -> bool:
    """A sidecar is renamed into place whole, so only a disk error or a hand edit leaves a
    bad one: checked by its ends (one JSON object), not parsed, since a series' answer
    reads hundreds and parsing each would cost more than the join."""
    return data.startswith(b"{") and data.endswith(b"}")
