"""Stored instances' DICOM JSON (PS3.18 F.2, WADO-RS metadata), kept beside their blobs.

Building an instance's DICOM JSON means parsing its file and converting every
element: milliseconds per instance, which a series of hundreds would pay on
each cold metadata request. A blob never changes (its name is the hash of its
bytes), so its JSON is worked out once and kept as a *sidecar*
(``<sha256>.json`` beside the blob, :meth:`BlobStore.put_sidecar`): written on the
first request for it, or right after the instance's commit when
``http.prepare_metadata`` is on. A series' metadata is then its sidecars joined.
A sidecar is derived data: one lost in a crash (sidecars are not fsync'd) is built
again when asked for.

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
import mmap
import os
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset

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


def metadata(source: Path | BinaryIO, root_url: str,
             fragments: dict[tuple[Any, ...], bytes] | None = None) -> bytes:
    """The instance's data set (no file meta) as compact DICOM JSON; BulkDataURIs are
    under ``root_url`` (the DICOMweb root; "" for URIs relative to it) by the
    instance's own UIDs.

    The bytes are ``json.dumps(..., separators=(",", ":"))`` of the object, joined
    from each element's own ``"tag":{...}`` text: ``fragments`` remembers that text
    for short undecoded values, sequences included (bounded, see
    :data:`FRAGMENT_ENTRIES`), because a series
    repeats most of its header in every instance and converting an element is most
    of the work once the file is mapped.
    """
    with _mapped(source) as fp:
        # Deferred values (long texts) are read from the mapping: the loop runs inside.
        ds = dcmread(fp, defer_size=BULK_THRESHOLD)
        return _joined(ds, root_url, fragments if fragments is not None else {})


def _joined(ds: Dataset, root_url: str, memo: dict[tuple[Any, ...], bytes]) -> bytes:
    """The compact JSON of ``ds``, from remembered element texts where it can.

    An element's text is decided by its tag, VR, raw bytes, the data set's encoding
    and character set (a sequence's items are in its bytes), so that is its key."""
    encoding = ds.original_encoding
    little = encoding[1] if encoding else True
    charset = ds.original_character_set
    charset_key = tuple(charset) if isinstance(charset, list) else charset
    instance_url = (f"{root_url}/studies/{ds.get('StudyInstanceUID', '')}/series/"
                    f"{ds.get('SeriesInstanceUID', '')}/instances/{ds.get('SOPInstanceUID', '')}")
    parts = []
    for tag in ds.keys():  # noqa: SIM118 (keys: iterating converts every raw element)
        raw = ds.get_item(tag, keep_deferred=True)
        key = f"{int(tag):08X}"
        if tag in _ALWAYS_BULK or (isinstance(raw, RawDataElement) and _bulky(raw)):
            vr = raw.VR or "UN"
            parts.append(_fragment(key, {"vr": "OW" if vr in ("OB or OW", "US or OW") else vr,
                                         "BulkDataURI": f"{instance_url}/bulkdata/{key}"}))
            continue
        remembered = (int(tag), raw.VR, raw.value, encoding, charset_key) if (
            isinstance(raw, RawDataElement) and type(raw.value) is bytes
            and len(raw.value) <= FRAGMENT_VALUE_BYTES) else None
        if remembered is not None and (done := memo.get(remembered)) is not None:
            parts.append(done)
            continue
        fast = _plain(raw, little) if isinstance(raw, RawDataElement) else None
        done = _fragment(key, fast if fast is not None
                         else ds[tag].to_json_dict(None, _NO_THRESHOLD))
        if remembered is not None:
            if len(memo) >= FRAGMENT_ENTRIES:
                memo.clear()
            memo[remembered] = done
        parts.append(done)
    return b"{" + b",".join(parts) + b"}"


#: Remembered element texts, at most (as :data:`node.part10.MEMO_ENTRIES`: a series'
#: repeated values fit, the per-instance ones are forgotten when it is full).
FRAGMENT_ENTRIES = 8192
#: Values longer than this are converted each time (a key would hold the whole value);
#: short sequences (the de-identification method's codes) fit.
FRAGMENT_VALUE_BYTES = 1024


def _fragment(key: str, value: dict[str, Any]) -> bytes:
    """One member of the compact JSON object, as ``json.dumps`` writes it in the whole."""
    return f'"{key}":{json.dumps(value, separators=(",", ":"))}'.encode()


@contextmanager
def _mapped(source: Path | BinaryIO) -> Iterator[Path | BinaryIO | mmap.mmap]:
    """A local file as a read-only memory map (else ``source`` itself), for pydicom to
    parse in memory: parsing a file object costs a system call per element (its
    ``tell`` and ``read``), each of which releases the GIL, a hand-off to any other
    busy thread (another association's ingest, a web request). Only the pages of
    the header are touched: the pixel data is deferred."""
    if isinstance(source, Path):
        with open(source, "rb") as f, _mapped(f) as fp:
            yield fp
        return
    try:
        fd = source.fileno()
        mappable = os.fstat(fd).st_size > 0
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is an OSError
        mappable = False
    if not mappable:
        yield source
        return
    with mmap.mmap(fd, 0, access=mmap.ACCESS_READ) as view:
        yield view


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




class MetadataSidecars:
    """Instances' DICOM JSON (compact, BulkDataURIs relative to the DICOMweb root) by blob
    hash, read from the blob's sidecar or built from the blob (and then kept).

    Also an ingest hook (:class:`node.ingest.types.IngestHook`, registered when
    ``http.prepare_metadata`` is on): each newly indexed instance gets its sidecar
    right after its commit, so even the first metadata request of a series only
    reads files.
    """

    def __init__(self, blobs: BlobStore) -> None:
        self.blobs = blobs
        #: Element texts remembered across instances (:func:`metadata`), shared by the
        #: storing and request threads: dict reads and writes are atomic, and two threads
        #: filling one key write the same text.
        self._fragments: dict[tuple[Any, ...], bytes] = {}

    def build(self, sha256: str) -> bytes:
        """The blob's DICOM JSON, worked out from its bytes."""
        with self.blobs.open(sha256) as f:
            return metadata(f, "", self._fragments)

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
        """Ask for the sidecar of each new indexed instance (not overlay copies: WADO-RS
        serves the slice they annotate), written right after the commit on the storing
        thread (``right_after``: a fraction of a millisecond of work, cheaper there
        than handed to the worker)."""
        if obj.instance_id is not None:
            obj.right_after.append(lambda: self.write(obj.incoming.blob.sha256))
        return None

    def after_commit(self, obj: Stored) -> None:
        """Nothing: the sidecar is written right after the commit."""


def _well_formed(data: bytes) -> bool:
    """A sidecar is renamed into place whole, so only a disk error or a hand edit leaves a
    bad one: checked by its ends (one JSON object), not parsed, since a series' answer
    reads hundreds and parsing each would cost more than the join."""
    return data.startswith(b"{") and data.endswith(b"}")
