"""Per-instance validation: every received object is checked before anything is kept.

The header is parsed once (``stop_before_pixels``) and the pixel data is never
loaded: its declared length, and for encapsulated data its fragment items, are
read from the file at the offset where the header parse stopped. That keeps
validation to a small fraction of the cost of receiving an instance.

Findings speak in keywords and tags, expected and found, and never quote the
value of a patient attribute (no PHI in error comments, logs or the audit trail).
"""

from __future__ import annotations

import functools
import io
import os
import re
import struct
import zlib
from array import array
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from pydicom import dcmread
from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileDataset
from pydicom.encaps import parse_basic_offsets, parse_fragments
from pydicom.filereader import read_dataset, read_file_meta_info, read_preamble
from pydicom.pixels.utils import get_expected_length
from pydicom.tag import BaseTag
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

from node.config import ValidationSettings
from node.ingest.header import read_header
from node.ingest.iod import IOD, IODTables, Requirement
from node.ingest.rules import REJECT
from node.sop_classes import STORAGE_SOP_CLASSES
from node.storage.records import element_text, value_text

#: What the association accepts (``node.dimse.ae``) is what STOW-RS may store too.
ACCEPTED_SOP_CLASSES = frozenset(STORAGE_SOP_CLASSES)

#: The modality an IOD's own series module fixes (PS3.3 enumerated values).
#: Only IODs that fix one are listed; Secondary Capture allows any.
IOD_MODALITIES: dict[str, frozenset[str]] = {
    "ct-image": frozenset({"CT"}),
    "enhanced-ct-image": frozenset({"CT"}),
    "legacy-converted-enhanced-ct-image": frozenset({"CT"}),
    "mr-image": frozenset({"MR"}),
    "enhanced-mr-image": frozenset({"MR"}),
    "enhanced-mr-color-image": frozenset({"MR"}),
    "legacy-converted-enhanced-mr-image": frozenset({"MR"}),
    "mr-spectroscopy": frozenset({"MR"}),
    "positron-emission-tomography-image": frozenset({"PT"}),
    "enhanced-pet-image": frozenset({"PT"}),
    "legacy-converted-enhanced-pet-image": frozenset({"PT"}),
    "computed-radiography-image": frozenset({"CR"}),
    "digital-x-ray-image": frozenset({"DX"}),
    "digital-mammography-x-ray-image": frozenset({"MG"}),
    "digital-intra-oral-x-ray-image": frozenset({"IO"}),
    "nuclear-medicine-image": frozenset({"NM"}),
    "segmentation": frozenset({"SEG"}),
    "ultrasound-image": frozenset({"US"}),
    "ultrasound-multi-frame-image": frozenset({"US"}),
    "rt-structure-set": frozenset({"RTSTRUCT"}),
    "rt-dose": frozenset({"RTDOSE"}),
    "rt-plan": frozenset({"RTPLAN"}),
    "rt-image": frozenset({"RTIMAGE"}),
}

_UID = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")
_PIXEL_TAGS = {0x7FE00010: "PixelData", 0x7FE00009: "DoubleFloatPixelData",
               0x7FE00008: "FloatPixelData"}
_LONG_VRS = {b"OB", b"OW", b"OF", b"OD", b"OL", b"OV", b"UN", b"SQ", b"UC", b"UR", b"UT"}
_UNDEFINED = 0xFFFFFFFF


def tag_text(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


@dataclass(frozen=True)
class Finding:
    """One broken rule, in plain words: the attribute, what was expected, what was found.

    ``message`` is written to fit an ErrorComment (LO, 64 characters) whole;
    ``detail`` carries what does not fit (the values compared), for the
    quarantine record.
    """

    rule: str
    message: str
    keyword: str = ""
    tag: str = ""
    detail: str = ""

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


@dataclass(frozen=True)
class PixelElement:
    """Where the pixel data element sits in the received file, read without loading it."""

    tag: int
    length: int  # declared value length; 0xFFFFFFFF for encapsulated data
    available: int  # bytes actually in the file from the value's first byte
    fragments: int = 0  # encapsulated: fragment items found before the delimiter
    offsets: int = 0  # encapsulated: Basic Offset Table entries
    whole: bool = True  # encapsulated: every item fits in the file and a delimiter ends them
    start: int = -1  # native: file offset of the element's tag (lets the pipeline copy it raw)
    value_tell: int = -1  # native: file offset of its value
    vr: str | None = None  # native, explicit VR: the VR the file gives it


class Unparseable(ValueError):
    """The bytes parse as DICOM elements but are not a whole dataset (0xC000)."""


@dataclass(frozen=True)
class Received:
    """A received object's parsed header and the whereabouts of its pixel data."""

    dataset: FileDataset
    pixels: PixelElement | None
    #: The header's elements as read, before any check decoded one (validation decodes
    #: in place): the route starts from these, as from a fresh parse of the file.
    raw: dict[int, Any] = field(default_factory=dict)


class TooLarge(ValueError):
    """Past a size bound (a deflate bomb, an element over max_element): 0xC000, not kept
    (quarantine would read the whole file into memory to seal it)."""


@dataclass(frozen=True)
class ReadLimits:
    """What one received object may make a worker read (``[node]`` max_inflated_mb,
    max_element_mb, max_depth): beyond them it is refused with 0xC000."""

    max_inflated: int = 512 << 20  # bytes a deflated data set may inflate to
    max_element: int = 128 << 20  # bytes of one element's value (pixel data excluded)
    max_depth: int = 64  # sequences nested in sequences


DEFAULT_LIMITS = ReadLimits()
_INFLATE_IN = 64 << 10  # compressed bytes read at a time
_INFLATE_OUT = 1 << 20  # inflated bytes produced at a time (a bomb's 64 KiB can make 64 MB)


def inflated_size(f: BinaryIO, limit: int) -> int:
    """The inflated size of a deflated file's data set, streamed: raises TooLarge past ``limit``.

    pydicom inflates the whole data set in memory before parsing a single
    element, so a few MB of deflated zeros become GBs in the worker. Counting the
    output in bounded pieces first keeps memory flat and refuses early.
    """
    f.seek(0)
    read_preamble(f, False)
    read_dataset(f, is_implicit_VR=False, is_little_endian=True,
                 stop_when=lambda tag, vr, length: tag.group != 0x0002)
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    total = 0
    pending = b""
    while True:
        if not pending:
            pending = f.read(_INFLATE_IN)
            if not pending:
                break
        out = inflater.decompress(pending, _INFLATE_OUT)
        pending = inflater.unconsumed_tail
        total += len(out)
        if total > limit:
            raise TooLarge(f"deflated data set inflates beyond {limit >> 20} MB")
        if inflater.eof:
            break
    return total


def read_received(path: Path, limits: ReadLimits = DEFAULT_LIMITS) -> Received:
    """Parse the header (never the pixels) and locate the pixel data element.

    Raises what pydicom raises for data it cannot parse, or :class:`Unparseable`
    where pydicom reads on regardless (an element longer than the data left,
    bytes that name no SOP instance); the pipeline turns that into 0xC000 and
    quarantines the bytes. Past ``limits`` it raises :class:`TooLarge` (a deflated
    data set, before pydicom inflates it) or :class:`Unparseable` (an element
    longer than ``max_element``, never read into memory; sequences nested deeper
    than ``max_depth``).

    The file's first :data:`HEAD_BYTES` are read in one go and parsed in memory
    (:func:`_read_head`); only what those bytes cannot decide exactly as reading
    the file would is parsed from the file (:func:`_read_file`).
    """
    with open(path, "rb", buffering=0) as f:
        head = f.read(HEAD_BYTES)
        size = os.fstat(f.fileno()).st_size
    received = _read_head(path, head, size, limits)
    return received if received is not None else _read_file(path, limits)


#: Bytes read from the start of a received file and parsed in memory. pydicom
#: parsing a file object makes a syscall of every tell() and read() (about 200 for
#: a CT header), and each releases the GIL: with another thread runnable (the
#: context's worker, the audit signer, other associations) each is a hand-off
#: between threads. A CT or MR header is a few KB; a header longer than this (a
#: large multi-frame's functional groups) is parsed from the file.
HEAD_BYTES = 64 << 10
#: The pixel element's header (tag, VR, reserved, 4-byte length): the most a header
#: parse reads past where it stops.
_ELEMENT_HEADER = 12
_DEFLATED = DeflatedExplicitVRLittleEndian.encode("ascii")


def _read_head(path: Path, head: bytes, size: int, limits: ReadLimits) -> Received | None:
    """:func:`read_received` from the file's first bytes, or None where they cannot
    decide it exactly as reading the file would: the parse would read past them, it
    raised (reading the file raises it again, or reads on where these bytes stop), or
    the data set may be deflated (its bounded inflation reads the file).

    The parse is pydicom's own (or :func:`~node.ingest.header.read_header`, which gives
    the same dataset), on a BytesIO holding the file's bytes from offset 0,
    so every value, offset and error is the one reading the file gives: a parse that
    stops (at the pixel data) with the next element's header inside ``head`` read
    nothing past it.
    """
    if _DEFLATED in head:
        # pydicom inflates a deflated data set whole inside dcmread; the syntax it goes
        # by is read from these bytes, so without its UID in them it inflates nothing.
        return None
    buffer = io.BytesIO(head)
    # pydicom keeps the name as ds.filename (deferred values are read from that file
    # later) and names it in its warnings, as for the open file.
    buffer.name = os.fspath(path)
    try:
        # The common case walked in memory (node.ingest.header), else pydicom's parse.
        ds = (read_header(buffer, limits.max_element)
              or dcmread(buffer, stop_before_pixels=True, defer_size=limits.max_element))
    except Exception:
        return None
    if len(head) < size and buffer.tell() + _ELEMENT_HEADER > len(head):
        return None
    # As if dcmread had opened the file itself: deferred values come from the file.
    ds.buffer, ds.fileobj_type = None, open
    raw = dict(ds.items())  # items(), not iteration: nothing is decoded
    _whole(ds)
    _bounded(ds, limits, size)
    little, implicit = _encoding(ds)
    return Received(ds, _pixel_element_at(buffer, size, little, implicit, path), raw)


def _read_file(path: Path, limits: ReadLimits) -> Received:
    """:func:`read_received` from the file: a deflated data set (inflated under its
    bound first), a header longer than :data:`HEAD_BYTES`, or bytes pydicom refuses."""
    with open(path, "rb") as f:
        meta = read_file_meta_info(path)
        if meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian:
            inflated_size(f, limits.max_inflated)
            f.seek(0)
        # Values over max_element are left on disk ("deferred"), then refused.
        ds = dcmread(f, stop_before_pixels=True, defer_size=limits.max_element)
        raw = dict(ds.items())  # items(), not iteration: nothing is decoded
        size = os.fstat(f.fileno()).st_size
        _whole(ds)
        _bounded(ds, limits, size)
        if ds.file_meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian:
            # pydicom inflates the whole dataset to parse it; the header stop
            # position says nothing about the compressed file, so read it all.
            full = dcmread(f.name)
            return Received(ds, _pixels_of_dataset(full))
        little, implicit = _encoding(ds)
        return Received(ds, _pixel_element_at(f, size, little, implicit, path), raw)


def _encoding(ds: FileDataset) -> tuple[bool, bool]:
    """(little endian, implicit VR) of the data set, by its transfer syntax."""
    return _syntax_encoding(ds.file_meta.get("TransferSyntaxUID"))


@functools.lru_cache(maxsize=64)
def _syntax_encoding(syntax: str | None) -> tuple[bool, bool]:
    """Remembered: a series comes in one syntax, and building a validated UID for its
    properties is a tenth of a header parse. Raises (uncached) for a UID that is no
    transfer syntax."""
    little = syntax is None or UID(syntax).is_little_endian
    implicit = syntax is not None and UID(syntax).is_implicit_VR
    return little, implicit


def with_deferred_pixels(received: Received, defer_size: int) -> FileDataset | None:
    """The whole object as ``dcmread(path, defer_size=defer_size)`` would give it, from
    the header already parsed, or None (encapsulated or missing pixels, bytes after
    them: parse the whole file).

    The header is parsed once: the result holds its elements as read (``raw``: not
    the ones validation decoded, so the route sees exactly what a second parse would
    give and writes the same bytes), plus the native pixel data element: its bytes
    read raw when they are at most ``defer_size`` (as pydicom would), else a
    deferred element that pydicom reads from the spooled file only when a step
    asks for its value.
    """
    pixel = received.pixels
    ds = received.dataset
    if (pixel is None or pixel.value_tell < 0 or pixel.length != pixel.available
            or pixel.length == 0 or not received.raw or not getattr(ds, "filename", None)):
        return None
    implicit, little = ds.original_encoding
    # Built without a file name, which FileDataset would stat for its modification time:
    # the header's, taken when the same file was parsed, is that time.
    whole = FileDataset(None, dict(received.raw), ds.preamble, ds.file_meta,
                        bool(implicit), bool(little))
    whole.filename, whole.fileobj_type, whole.timestamp = str(ds.filename), open, ds.timestamp
    whole.set_original_encoding(bool(implicit), bool(little), ds.original_character_set)
    value = None
    if pixel.length <= defer_size:
        with open(ds.filename, "rb") as f:
            f.seek(pixel.value_tell)
            value = f.read(pixel.length)
    whole[pixel.tag] = RawDataElement(BaseTag(pixel.tag), pixel.vr, pixel.length, value,
                                      pixel.value_tell, bool(implicit), bool(little))
    return whole


def _bounded(ds: Dataset, limits: ReadLimits, size: int) -> None:
    """Refuse an element over ``max_element`` and sequences nested over ``max_depth``.

    Level by level (pydicom parses a sequence when it is first accessed), so a
    deep nest is refused at the bound instead of recursing to Python's limit.
    """
    level, depth = [ds], 0
    while level:
        deeper = []
        for item in level:
            for tag, raw in list(item.items()):  # as read: a deferred value stays unread
                length = getattr(raw, "length", 0)
                if raw.value is None and length != _UNDEFINED and length > limits.max_element:
                    remain = size - raw.value_tell
                    if length > remain:
                        raise Unparseable(f"element {tag_text(tag)} declares {length} bytes,"
                                          f" {remain} remain")
                    raise TooLarge(f"element {tag_text(tag)} of {length} bytes, too long")
                if raw.VR == "SQ":
                    deeper += list(item[tag].value or ())
        if deeper:
            depth += 1
            if depth > limits.max_depth:
                raise Unparseable(f"sequences nested deeper than {limits.max_depth} levels")
        level = deeper


def _whole(ds: Dataset) -> None:
    """pydicom keeps an element cut short by the end of the data: refuse it."""
    for tag, raw in ds.items():  # raw elements as read: nothing is decoded here
        if getattr(raw, "is_raw", False) and raw.value is not None \
                and raw.length != _UNDEFINED and len(raw.value) < raw.length:
            raise Unparseable(f"element {tag_text(tag)} declares {raw.length} bytes,"
                              f" {len(raw.value)} remain")
    if "SOPClassUID" not in ds and "SOPInstanceUID" not in ds:
        raise Unparseable("no SOPClassUID or SOPInstanceUID: not a DICOM dataset")


def _pixels_of_dataset(ds: Dataset) -> PixelElement | None:
    for tag in _PIXEL_TAGS:
        if tag in ds:
            length = len(ds[tag].value or b"")
            return PixelElement(tag, length, length)
    return None


def _pixel_element_at(f: BinaryIO, size: int, little: bool, implicit: bool,
                      path: Path) -> PixelElement | None:
    """Read the element header at the current offset, where the header parse stopped.

    ``f`` holds the file's bytes from offset 0 up to at least that header (the file
    itself or :func:`read_received`'s head); ``size`` is the file's. Encapsulated
    fragments are counted in the file itself.
    """
    start = f.tell()
    head = f.read(8)
    if len(head) < 8:
        return None
    endian = "<" if little else ">"
    group, elem = struct.unpack(f"{endian}HH", head[:4])
    tag = group << 16 | elem
    if tag not in _PIXEL_TAGS:
        return None
    if implicit:
        length = struct.unpack(f"{endian}L", head[4:8])[0]
    elif head[4:6] in _LONG_VRS:
        extra = f.read(4)
        if len(extra) < 4:
            return PixelElement(tag, 0, 0, whole=False)
        length = struct.unpack(f"{endian}L", extra)[0]
    else:
        length = struct.unpack(f"{endian}H", head[6:8])[0]
    value_start = f.tell()
    available = size - value_start
    if length != _UNDEFINED:
        return PixelElement(tag, length, available, start=start, value_tell=value_start,
                            vr=None if implicit else head[4:6].decode("ascii", "replace"))
    with open(path, "rb") as file:
        file.seek(value_start)
        return _encapsulated(file, tag, endian, available)


def _encapsulated(f: BinaryIO, tag: int, endian: str, available: int) -> PixelElement:
    """Count the fragment items after the Basic Offset Table and check they end properly."""
    try:
        offsets = parse_basic_offsets(f, endianness=endian)
        count, positions = parse_fragments(f, endianness=endian)
    except (ValueError, struct.error):
        return PixelElement(tag, _UNDEFINED, available, whole=False)
    end = f.seek(0, 2)
    if positions:
        f.seek(positions[-1] + 4)
        last = f.read(4)
        if len(last) < 4:
            return PixelElement(tag, _UNDEFINED, available, count, len(offsets), False)
        f.seek(positions[-1] + 8 + struct.unpack(f"{endian}L", last)[0])
    delimiter = f.read(4)
    whole = (len(delimiter) == 4 and f.tell() <= end
             and struct.unpack(f"{endian}HH", delimiter) == (0xFFFE, 0xE0DD))
    return PixelElement(tag, _UNDEFINED, available, count, len(offsets), whole)


#: Rule results a validator remembers (emptied when full): a series repeats most of its
#: header in every instance, and decoding the values a rule reads is most of its cost.
#: A series takes five entries; the bounds below keep an entry's key to a few KB.
MEMO_ENTRIES = 2048
#: Longer undecoded values are never part of a remembered key; nor are headers of more
#: top-level elements, or sequences (checked inside) of more bytes in all (a code item
#: takes about a hundred).
_MEMO_BYTES = 256
_MEMO_ELEMENTS = 1024
_MEMO_SEQUENCE_BYTES = 2048
_CHARSET = 0x00080005
#: What each remembered rule reads, besides its arguments: the data set's elements at
#: these tags (``get_expected_length`` reads the first six).
_PIXEL_READS = (0x00280010, 0x00280011, 0x00280100, 0x00280002, 0x00280008, 0x00280004)
_ORIENTATION_READS = (0x00200037,)
_SPACING_READS = (0x00280030, 0x00180050)
_MODALITY_READS = (0x00080060,)


class Validator:
    """Checks one received instance against the IOD tables and the node's rules.

    The rules that read a few elements (pixel data, orientation, spacing, modality)
    and the Type 1/2 checks are remembered, keyed by everything they read: the
    undecoded bytes of those elements (with VR, byte order and the data set's
    character set), or, for the Type 1/2 checks, which tags are present and which
    are empty. A rule is run again when one of them is decoded already or long. A
    remembered rule does not decode its elements into the data set; nothing after
    these rules reads them from it (the route starts from the raw elements).
    """

    def __init__(self, settings: ValidationSettings, tables: IODTables) -> None:
        self.settings = settings
        self.tables = tables
        self._memo: dict[tuple[Any, ...], tuple[Finding, ...]] = {}

    def check(self, received: Received) -> list[Finding]:
        """Every finding for this instance, most fundamental first."""
        ds = received.dataset
        sop_class = str(ds.get("SOPClassUID", ""))
        iod = self.tables.for_sop_class(sop_class)
        pixels = received.pixels
        # The PixelElement fields _pixels reads (not where the element sits).
        pixel_key = pixels and (pixels.tag, pixels.length, pixels.available, pixels.fragments,
                                pixels.offsets, pixels.whole)
        tolerance = self.settings.orientation_tolerance
        checks: list[tuple[str, Callable[[], list[Finding]]]] = [
            ("sop_class", lambda: _sop_class(sop_class)),
            ("type1_missing", lambda: self._remembered(
                ("required", iod.name), _shape(ds, iod, received.raw),
                lambda: _required(ds, iod, ()))
                if iod else []),
            ("file_meta", lambda: _file_meta(ds)),
            ("uid_syntax", lambda: _uids(ds)),
            ("pixel_data", lambda: self._remembered(
                ("pixels", pixel_key), _raw_key(ds, _PIXEL_READS), lambda: _pixels(ds, pixels))),
            ("orientation", lambda: self._remembered(
                ("orientation", tolerance), _raw_key(ds, _ORIENTATION_READS),
                lambda: _orientation(ds, tolerance))),
            ("spacing", lambda: self._remembered(
                ("spacing",), _raw_key(ds, _SPACING_READS), lambda: _spacing(ds))),
            ("modality", lambda: self._remembered(
                ("modality", iod.name), _raw_key(ds, _MODALITY_READS),
                lambda: _modality(ds, iod.name)) if iod else []),
        ]
        findings: list[Finding] = []
        for rule, check in checks:
            try:
                findings += check()
            except Exception as exc:
                findings.append(Finding(rule, f"{rule} not checkable: values unreadable",
                                        detail=f"{type(exc).__name__}: {str(exc)[:200]}"))
        return findings

    def _remembered(self, rule: tuple[Any, ...], read: tuple[Any, ...] | None,
                    run: Callable[[], list[Finding]]) -> list[Finding]:
        """``run()``, remembered under ``rule`` and what it ``read`` (None: run it). A rule
        that raises is not remembered: the caller reports it, the next instance runs it."""
        if read is None:
            return run()
        key = (rule, read)
        found = self._memo.get(key)
        if found is None:
            found = tuple(run())
            if len(self._memo) >= MEMO_ENTRIES:
                self._memo.clear()
            self._memo[key] = found
        return list(found)

    def split(self, findings: Iterable[Finding]) -> tuple[list[Finding], list[Finding]]:
        """(rejecting, warning) findings by the configured action of their rule."""
        rejecting, warning = [], []
        for finding in findings:
            (rejecting if self.settings.action(finding.rule) == REJECT else warning).append(finding)
        return rejecting, warning


def _charset_key(elements: dict) -> Any:
    """The data set's character set as its decoding depends on it (raw bytes or value)."""
    charset = elements.get(_CHARSET)
    if charset is None:
        return None
    return charset.value if type(charset) is RawDataElement else repr(charset.value)


def _raw_key(ds: Dataset, tags: tuple[int, ...]) -> tuple[Any, ...] | None:
    """Everything decoding ``tags`` in ``ds`` depends on: per tag None (absent) or its
    VR as sent, bytes, length and byte order, plus the character set; None when one is
    decoded already (its bytes are gone) or longer than _MEMO_BYTES."""
    elements = ds._dict
    key: list[Any] = [_charset_key(elements)]
    for tag in tags:
        elem = elements.get(tag)
        if elem is None:
            key.append(None)
            continue
        value = elem.value
        if type(elem) is not RawDataElement or type(value) is not bytes \
                or len(value) > _MEMO_BYTES:
            return None
        key.append((elem.VR, value, elem.length, elem.is_little_endian, elem.is_implicit_VR))
    return tuple(key)


def _shape(ds: Dataset, iod: IOD, raw: dict[int, Any]) -> tuple[Any, ...] | None:
    """What the Type 1/2 checks read: each top-level tag and whether it is empty as
    :func:`_empty` decides (the length on the wire, or the decoded value's emptiness),
    and the bytes each present sequence the IOD has requirements inside was read from
    (``raw``: reading the header decodes sequences to bound their depth, and their items
    are checked too), with byte order and character set; packed, as a remembered key
    is kept. None when a raw element has an undefined length (its emptiness needs
    decoding), such a sequence is decoded already (read with an undefined length), the
    header is over _MEMO_ELEMENTS elements or its sequences over _MEMO_SEQUENCE_BYTES,
    or a decoded value's emptiness cannot be told (the rule then runs and says why)."""
    elements = ds._dict
    if len(elements) > _MEMO_ELEMENTS:
        return None
    tags: list[int] = []
    empty: list[bool] = []
    for tag, elem in elements.items():
        if type(elem) is RawDataElement:
            if elem.length == _UNDEFINED:
                return None
            empty.append(elem.length == 0)
        else:
            try:
                empty.append(bool(elem.is_empty))
            except Exception:
                return None
        tags.append(int(tag))
    present = set(tags)
    nested: list[Any] = []
    sequence_bytes = 0
    for _, tag in iod.children.get((), ()):
        if tag in present:
            elem = raw.get(tag)
            value = getattr(elem, "value", None)
            if type(elem) is not RawDataElement or type(value) is not bytes:
                return None
            sequence_bytes += len(value)
            if sequence_bytes > _MEMO_SEQUENCE_BYTES:
                return None
            nested.append((tag, elem.VR, value, elem.is_little_endian, elem.is_implicit_VR))
    if nested:
        nested.append(_charset_key(elements))
    return (array("I", tags).tobytes(), bytes(empty), tuple(nested))


def _sop_class(sop_class: str) -> list[Finding]:
    if sop_class in ACCEPTED_SOP_CLASSES:
        return []
    return [Finding("sop_class", "SOPClassUID (0008,0016) not a storage class we accept",
                    "SOPClassUID", "(0008,0016)", f"found {sop_class[:64] or 'empty'}")]


def patient_conflict(stored_patient: tuple[str, str] | None, patient_id: str,
                     issuer: str) -> Finding | None:
    """A known study arriving under another PatientID (or issuer) is a conflict.

    Neither ID is quoted: the finding names the attribute, not the patient.
    """
    if stored_patient is None or stored_patient == (patient_id, issuer):
        return None
    which = ("PatientID", "(0010,0020)") if stored_patient[0] != patient_id else (
        "IssuerOfPatientID", "(0010,0021)")
    return Finding("patient_conflict", f"{which[0]} {which[1]} differs from the study's stored"
                   " one", *which, "this StudyInstanceUID is stored under another patient;"
                   " the IDs are not shown")


# --- the rules ---------------------------------------------------------------


def _required(ds: Dataset, iod: IOD, path: tuple[str, ...]) -> list[Finding]:
    """Type 1 / Type 2 attributes at ``path``, then inside any present sequence items."""
    findings = []
    # Plain ints: BaseTag compares in Python, Dataset.__contains__ converts every key.
    present = {int(tag) for tag in ds.keys()}  # noqa: SIM118 - keys only, nothing decoded
    where = "" if not path else f" in {'/'.join(path)}"
    for req in iod.requirements.get(path, ()):
        if req.tag not in present:
            rule = "type1_missing" if req.type == "1" else "type2_missing"
            findings.append(Finding(rule, f"{_named(req)} missing (Type {req.type}){where}",
                                    req.keyword, tag_text(req.tag)))
        elif req.type == "1" and _empty(ds, req):
            findings.append(Finding("type1_empty", f"{_named(req)} empty (Type 1){where}",
                                    req.keyword, tag_text(req.tag)))
    for keyword, tag in iod.children.get(path, ()):
        if tag in present:
            for item in ds[tag].value or ():
                if isinstance(item, Dataset):
                    findings += _required(item, iod, (*path, keyword))
    return findings


def _named(req: Requirement) -> str:
    return f"{req.keyword} {tag_text(req.tag)}"


def _empty(ds: Dataset, req: Requirement) -> bool:
    """Zero-length on the wire (read from the raw element when it is still raw)."""
    elem = ds.get_item(req.tag)
    if getattr(elem, "is_raw", False) and elem.length != _UNDEFINED:
        return elem.length == 0
    return ds[req.tag].is_empty


def _file_meta(ds: FileDataset) -> list[Finding]:
    meta = getattr(ds, "file_meta", None) or Dataset()
    findings = []
    for meta_kw, meta_tag, kw in (("MediaStorageSOPClassUID", "(0002,0002)", "SOPClassUID"),
                                  ("MediaStorageSOPInstanceUID", "(0002,0003)", "SOPInstanceUID")):
        found, expected = str(meta.get(meta_kw, "")), str(ds.get(kw, ""))
        if found != expected:
            findings.append(Finding("file_meta", f"{meta_kw} {meta_tag} does not match dataset",
                                    meta_kw, meta_tag, f"expected {kw} {expected[:64] or 'none'},"
                                    f" found {found[:64] or 'none'}"))
    return findings


def _uid_problem(uid: str) -> str:
    if len(uid) > 64:
        return f"{len(uid)} chars, max 64"
    if _UID.fullmatch(uid):
        return ""
    for part in uid.split("."):
        if not part:
            return "empty component"
        if not part.isdigit() or not part.isascii():
            return "not digits/dots"
        if len(part) > 1 and part[0] == "0":
            return "leading zero"
    return "not a UID"


def _uids(ds: FileDataset) -> list[Finding]:
    """Top-level and file meta UIDs (UI elements) are legal."""
    findings = []
    meta = getattr(ds, "file_meta", None) or Dataset()
    for source in (meta, ds):
        # The elements in hand, tags as plain ints: looking each up again (and hashing
        # pydicom's tags, which compare in Python) was most of this rule's time.
        for tag, elem in [(int(t), e) for t, e in source._dict.items()]:
            if not _is_uid(tag):
                continue
            if elem.is_raw and elem.value is None:  # deferred: as value_text reads it
                elem = source.get_item(tag)
            for value in (element_text(elem) or "").split("\\"):
                problem = _uid_problem(value) if value else ""
                if problem:
                    keyword = keyword_for_tag(tag) or "UID"
                    findings.append(Finding("uid_syntax", f"{keyword} {tag_text(tag)} bad UID:"
                                            f" {problem}", keyword, tag_text(tag),
                                            f"found {value[:80]}"))
    return findings


@functools.lru_cache(maxsize=4096)
def _is_uid(tag: int) -> bool:
    """The standard's VR for the tag is UI (private tags are not checked)."""
    try:
        return dictionary_VR(tag) == "UI"
    except KeyError:
        return False


def _int(ds: Dataset, keyword: str) -> int | None:
    try:
        value = ds.get(keyword)
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _pixels(ds: FileDataset, pixels: PixelElement | None) -> list[Finding]:
    rows, columns, bits = _int(ds, "Rows"), _int(ds, "Columns"), _int(ds, "BitsAllocated")
    if pixels is None:
        if rows and columns and bits:
            return [Finding("pixel_data", "PixelData (7FE0,0010) missing for a Rows x Columns"
                            " image", "PixelData", "(7FE0,0010)")]
        return []
    keyword, tag = _PIXEL_TAGS[pixels.tag], tag_text(pixels.tag)
    if not (rows and columns and bits and _int(ds, "SamplesPerPixel")):
        return []  # the Type 1 checks name the missing image attribute
    frames = _int(ds, "NumberOfFrames") or 1
    if pixels.length != _UNDEFINED:
        expected = get_expected_length(ds, unit="bytes")
        if pixels.length > pixels.available:
            return [Finding("pixel_data", f"{keyword} {tag} truncated: {pixels.available} of"
                            f" {pixels.length} bytes", keyword, tag,
                            f"declared length {pixels.length}, received {pixels.available},"
                            f" image needs {expected}")]
        if pixels.length not in (expected, expected + expected % 2):
            return [Finding("pixel_data", f"{keyword} {tag} length {pixels.length},"
                            f" expected {expected}", keyword, tag,
                            f"Rows {rows} x Columns {columns} x SamplesPerPixel x"
                            f" BitsAllocated {bits} / 8 x {frames} frames = {expected} bytes")]
        return []
    if not pixels.whole:
        return [Finding("pixel_data", f"{keyword} {tag} fragments truncated after"
                        f" {pixels.fragments}", keyword, tag,
                        "an item runs past the end of the data or the sequence"
                        " delimiter is missing")]
    if pixels.fragments < frames:
        return [Finding("pixel_data", f"{keyword} {tag} {pixels.fragments} fragments for"
                        f" {frames} frames", keyword, tag,
                        "encapsulated data needs at least one fragment per frame")]
    if pixels.offsets and pixels.offsets != frames:
        return [Finding("pixel_data", f"{keyword} {tag} offset table has {pixels.offsets},"
                        f" expected {frames}", keyword, tag,
                        f"Basic Offset Table entries {pixels.offsets}, NumberOfFrames {frames}")]
    return []


def _floats(ds: Dataset, tag: int) -> list[float] | None:
    """A numeric multi-value as floats; None when absent or empty, [] when not numbers."""
    text = value_text(ds, tag)
    if text is None:
        return None
    try:
        return [float(v) for v in text.split("\\")]
    except ValueError:
        return []


def _orientation(ds: Dataset, tolerance: float) -> list[Finding]:
    iop = _floats(ds, 0x00200037)
    if iop is None:
        return []
    name = "ImageOrientationPatient (0020,0037)"

    def finding(problem: str) -> list[Finding]:
        return [Finding("orientation", f"{name} {problem}", "ImageOrientationPatient",
                        "(0020,0037)")]

    if len(iop) != 6:
        return finding(f"has {len(iop)} values, not 6")
    row, col = iop[:3], iop[3:]
    for label, vec in (("row", row), ("column", col)):
        norm = sum(v * v for v in vec) ** 0.5
        if abs(norm - 1.0) > tolerance:
            return finding(f"{label} norm {norm:.3g}, not 1")
    dot = sum(a * b for a, b in zip(row, col, strict=True))
    if abs(dot) > tolerance:
        return finding(f"not orthogonal: dot {dot:.3g}")
    return []


def _spacing(ds: Dataset) -> list[Finding]:
    findings = []
    spacing = _floats(ds, 0x00280030)
    if spacing is not None and (len(spacing) != 2 or min(spacing) <= 0):
        shown = "\\".join(f"{v:g}" for v in spacing) or "not numbers"
        findings.append(Finding("spacing", f"PixelSpacing (0028,0030) not 2 positive numbers:"
                                f" {shown[:16]}", "PixelSpacing", "(0028,0030)"))
    thickness = _floats(ds, 0x00180050)
    if thickness is not None and (len(thickness) != 1 or thickness[0] <= 0):
        shown = f"{thickness[0]:g}" if thickness else "not a number"
        # SliceThickness is Type 2 (CT, MR): its own rule, which warns by default.
        findings.append(Finding("slice_thickness", f"SliceThickness (0018,0050) not positive:"
                                f" {shown[:16]}", "SliceThickness", "(0018,0050)"))
    return findings


def _modality(ds: Dataset, iod_name: str) -> list[Finding]:
    allowed = IOD_MODALITIES.get(iod_name)
    modality = str(ds.get("Modality", "") or "")
    if allowed is None or not modality or modality in allowed:
        return []
    return [Finding("modality", f"Modality (0008,0060) {modality[:16]}, expected"
                    f" {'/'.join(sorted(allowed))} for the SOP class", "Modality", "(0008,0060)")]
