"""The Part 10 bytes of a header (preamble, file meta, data set up to its pixels),
exactly as pydicom's ``dcmwrite(..., enforce_file_format=True)`` writes them, for a
fraction of its CPU.

Why not ``dcmwrite`` itself: it deep-copies the file meta, checks it again and writes
every element through pydicom's generic element writer (a buffer object, the
character set and the VR's writer looked up per element), about a millisecond per
CT header on this machine, the largest single cost of the clinical store path. A
series repeats most of its header in every instance (the patient pseudonym, the
study, series and frame-of-reference UIDs, dates, equipment, pixel module), so the
bytes pydicom's own ``write_data_element`` produced for an element are remembered,
keyed by everything that decides them (tag, VR, value, encoding, character set),
and a header is joined mostly from remembered bytes; a sequence whose items differ
is framed here (item and delimiter tags, lengths) around its elements' bytes, and so
is an element still as read (its tag, VR and length around its value's bytes, which
``write_data_element`` writes unchanged). The only values encoded here are a decoded
UID, integer or decimal string holding one value (its text in pydicom's default
encoding, padded as pydicom pads it: the new UIDs de-identification gives every
instance); every other value's bytes are pydicom's or the sender's, and whatever the
fast path does not cover (other decoded numbers, names, encodings pydicom would convert,
items pydicom would correct, file meta that dcmwrite would complete or correct) is
handed to pydicom as it is, or the whole header to ``dcmwrite``.
``tests/test_part10.py`` holds the fast path to dcmwrite's bytes on pydicom's own test
files.
"""

from __future__ import annotations

import struct
from typing import Any

from pydicom.charset import convert_encodings, default_encoding
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import dcmwrite, write_data_element
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32, IS, DSdecimal, DSfloat

#: Remembered element bytes, at most: a series' header repeats a few dozen values, and
#: the per-instance ones (SOP Instance UID, positions) are forgotten when it is full.
MEMO_ENTRIES = 8192
#: Values longer than this are written through pydicom each time, never remembered
#: (a key would hold the whole value).
MEMO_VALUE_BYTES = 512
#: Plain value types whose bytes depend only on the value, VR and character set.
#: Decoded numbers (IS, DSfloat: their original string), names (PersonName), dates
#: and floats (-0.0 == 0.0 as keys, but not as bytes) are not among them: pydicom
#: writes those every time. Sequences are remembered by their items' keys.
_PLAIN = frozenset({str, UID, int, bytes})
#: VRs of decoded values written here when they hold one value of these types
#: (:func:`_decoded_text`), with no memo key.
_DECODED_TEXT = {"UI": (str, UID), "IS": (IS,), "DS": (DSfloat, DSdecimal)}
_PIXEL_DATA = 0x7FE00010
_TAG = struct.Struct("<HH")
_UL = struct.Struct("<L")
_US = struct.Struct("<H")
_UNDEFINED_LENGTH = b"\xff\xff\xff\xff"
#: Item (FFFE,E000) with a length to follow, or of undefined length; the item and
#: sequence delimiters (FFFE,E00D) and (FFFE,E0DD), each with a zero length (PS3.5 7.5).
_ITEM = b"\xfe\xff\x00\xe0"
_ITEM_UNDEFINED = _ITEM + _UNDEFINED_LENGTH
_ITEM_DELIMITER = b"\xfe\xff\x0d\xe0\x00\x00\x00\x00"
_SEQUENCE_DELIMITER = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
#: File meta elements dcmwrite adds (or refuses the file) when they are missing or empty.
_META_REQUIRED = (0x00020001, 0x00020002, 0x00020003, 0x00020010, 0x00020012, 0x00020013)


class HeaderEncoder:
    """Encodes headers; one per ingest service (its memo is shared by its threads:
    dict reads and writes are atomic, and two threads filling one key write the
    same bytes)."""

    def __init__(self) -> None:
        self._memo: dict[tuple[Any, ...], bytes] = {}

    def encode(self, ds: Dataset, stop_before: int = _PIXEL_DATA) -> bytes:
        """The Part 10 bytes of ``ds`` without its elements from ``stop_before`` on
        (the pixel data, whose bytes the caller copies from the received file)."""
        fast = self._fast(ds, stop_before)
        if fast is not None:
            return fast
        header = ds
        if any(tag >= stop_before for tag in ds._dict):
            header = Dataset({t: e for t, e in ds._dict.items() if t < stop_before})
            implicit, little = ds.original_encoding
            header.set_original_encoding(implicit, little, ds.original_character_set)
            # What pydicom's deferred read looks for on the dataset holding the element.
            for name in ("file_meta", "preamble", "filename", "buffer", "fileobj_type",
                         "timestamp"):
                if hasattr(ds, name):
                    setattr(header, name, getattr(ds, name))
        buffer = DicomBytesIO()
        dcmwrite(buffer, header, enforce_file_format=True)
        return buffer.getvalue()

    def _fast(self, ds: Dataset, stop_before: int) -> bytes | None:
        """The bytes dcmwrite would write, or None where it would do more than write
        (complete or correct the file meta, convert the encoding, deflate, raise)."""
        if stop_before > _PIXEL_DATA and _PIXEL_DATA in ds._dict:
            return None  # dcmwrite sets the pixel element's undefined length first
        meta = getattr(ds, "file_meta", None)
        if not isinstance(meta, FileMetaDataset) or any(
                e.is_raw or not e.VR or len(e.VR) != 2 for e in meta._dict.values()):
            # Undecoded meta (read from a file): dcmwrite decides on a decoded copy,
            # which is not worked out here (decoding it would change the caller's).
            return None
        if any(tag not in meta or meta[tag].is_empty for tag in _META_REQUIRED):
            return None
        if any(tag >> 16 != 2 for tag in meta._dict) or any(
                tag >> 16 in (0, 2) for tag in ds._dict):
            return None
        syntax = UID(str(meta[0x00020010].value))
        if (syntax.is_private or not syntax.is_transfer_syntax
                or syntax == DeflatedExplicitVRLittleEndian):
            return None
        encoding = (syntax.is_implicit_VR, syntax.is_little_endian)
        if encoding == (True, False) or ds.original_encoding != encoding \
                or ds.original_character_set != ds._character_set:
            return None  # write_dataset would convert every element
        for meta_tag, keyword in ((0x00020002, "SOPClassUID"), (0x00020003, "SOPInstanceUID")):
            own = ds.get(keyword, None)
            if own and own != meta[meta_tag].value:
                return None  # dcmwrite writes the data set's UID into the meta
        preamble = getattr(ds, "preamble", None) or b"\x00" * 128
        if len(preamble) != 128:
            return None
        elements = self._elements(meta, (False, True), "iso8859", skip=0x00020000)
        length = DataElement(0x00020000, "UL", len(elements))
        charset = ds.get("SpecificCharacterSet", "iso8859")
        return b"".join((preamble, b"DICM", self._element(length, (False, True), "iso8859"),
                         elements, self._elements(ds, encoding, charset, stop_before=stop_before)))

    def _elements(self, ds: Dataset, encoding: tuple[bool, bool], charset: Any,
                  skip: int | None = None, stop_before: int = 0x100000000) -> bytes:
        """The data set's elements in tag order, as ``write_dataset`` writes them
        (``skip``: the meta's group length, written first with its new value)."""
        # Plain ints: sorting and comparing pydicom's tags runs Python-level methods.
        elements = {int(tag): elem for tag, elem in ds._dict.items()}
        parts = []
        for tag in sorted(elements):
            if tag >= stop_before:
                break
            if tag == skip or (tag & 0xFFFF == 0 and tag >> 16 > 6):
                continue  # retired group lengths: write_dataset leaves them out
            elem = elements[tag]
            if elem.is_raw and elem.value is None:  # deferred: get_item reads it
                elem = ds.get_item(BaseTag(tag))
            parts.append(self._element(elem, encoding, charset))
        return b"".join(parts)

    def _element(self, elem: DataElement | RawDataElement, encoding: tuple[bool, bool],
                 charset: Any) -> bytes:
        if elem.is_raw:
            framed = _raw_element(elem, encoding)
            if framed is not None:
                return framed
        elif elem.VR in _DECODED_TEXT:
            framed = _decoded_text(elem, encoding)
            if framed is not None:
                return framed
        key = _key(elem, encoding, charset)
        if key is not None:
            done = self._memo.get(key)
            if done is not None:
                return done
        sequence = None if elem.is_raw or elem.VR != "SQ" else self._sequence(
            elem, encoding, charset)
        if sequence is not None:
            done = sequence
        else:
            buffer = DicomBytesIO()
            buffer.is_implicit_VR, buffer.is_little_endian = encoding
            write_data_element(buffer, elem, charset)
            done = buffer.getvalue()
        if key is not None:
            if len(self._memo) >= MEMO_ENTRIES:
                self._memo.clear()
            self._memo[key] = done
        return done

    def _sequence(self, elem: DataElement, encoding: tuple[bool, bool],
                  charset: Any) -> bytes | None:
        """A sequence as ``write_data_element`` writes it, its items' elements joined from
        :meth:`_element` (so remembered where they repeat), or None where pydicom would do
        more than write the items as they are.

        Why: a sequence whose items differ from instance to instance (a referenced image,
        a content item) has no key of its own, and pydicom writes it through a new
        buffer, a sort of pydicom tags and a character set conversion per item and
        element. On ``benchmarks.anonymize``'s corpus (de-identified CT headers with
        nested sequences that differ per slice) a header took 0.89 ms to encode through
        pydicom's sequence writer and takes 0.42 ms this way (best of 15 rounds of 60
        headers, ``HeaderEncoder.encode``, same bytes). The bytes are pydicom's (PS3.5
        7.5): the item tag, its length (or undefined, then an item delimiter), the
        elements in tag order without retired group lengths; the sequence's length the
        items' bytes (or undefined, then a sequence delimiter).
        Left to pydicom: big endian, an item with a character set of its own (the
        item's elements are written in it), and an item holding an element of an
        ambiguous VR or none (``write_dataset`` corrects those from the item's context
        before writing).
        """
        items = elem.value
        implicit, little = encoding
        if type(items) is not Sequence or not little:
            return None
        # What write_data_element hands write_sequence, and each item's elements get.
        item_charset = convert_encodings(charset or [default_encoding])
        parts = []
        for item in items:
            if 0x00080005 in item._dict or any(
                    not e.VR or " or " in e.VR for e in item._dict.values()):
                return None
            content = self._elements(item, encoding, item_charset)
            if getattr(item, "is_undefined_length_sequence_item", False):
                parts += (_ITEM_UNDEFINED, content, _ITEM_DELIMITER)
            else:
                parts += (_ITEM, _UL.pack(len(content)), content)
        value = b"".join(parts)
        tag = _TAG.pack(elem.tag >> 16, elem.tag & 0xFFFF)
        vr = b"" if implicit else b"SQ\0\0"
        if elem.is_undefined_length:
            return b"".join((tag, vr, _UNDEFINED_LENGTH, value, _SEQUENCE_DELIMITER))
        return b"".join((tag, vr, _UL.pack(len(value)), value))


def _raw_element(elem: RawDataElement, encoding: tuple[bool, bool]) -> bytes | None:
    """An element as read, as ``write_data_element`` writes it: its tag, its VR (explicit
    VR), its length and its value's bytes unchanged; or None where pydicom does more
    (big endian, undefined length, no value read, an ambiguous VR, a value too long for
    a 16-bit length, which pydicom writes as UN).

    Why here: framing costs less than the memo's key (a tuple holding the value), and
    the per-instance values a series does not repeat (positions, instance numbers) went
    through pydicom's writer, two buffer objects per element, every time: a phantom CT
    header took 0.233 ms to encode and takes 0.212 (medians of 8 alternations, same
    bytes)."""
    value = elem.value
    if not encoding[1] or type(value) is not bytes or elem.length == 0xFFFFFFFF:
        return None
    return _framed(elem.tag, elem.VR, value, encoding[0])


def _decoded_text(elem: DataElement, encoding: tuple[bool, bool]) -> bytes | None:
    """A decoded UID, integer or decimal string holding one value, as ``write_UI`` and
    ``write_number_string`` write it: the text (a number's as read, when it was read) in
    pydicom's default encoding (ISO 8859-1), padded to an even length with a NUL (UI) or
    a space; or None where pydicom does more (big endian, several values, text it
    cannot encode, which it raises on).

    Why here: de-identification gives every instance new UIDs (its SOP Instance UID, in
    the data set and the file meta) and decodes its instance number, which the memo
    never holds: pydicom's writer took 20-50 µs for each of them. A de-identified phantom
    CT header took 0.44 ms to encode and takes 0.35 (medians of 8 alternations of 200
    headers, same bytes)."""
    value = elem.value
    kind = type(value)
    if not encoding[1] or elem.is_undefined_length or kind not in _DECODED_TEXT[elem.VR]:
        return None
    if kind is str or kind is UID:
        text = value
    else:  # write_number_string's choice: the number's text as read, when it was read
        text = value.original_string if hasattr(value, "original_string") else str(value)
    if len(text) % 2:
        text += "\0" if elem.VR == "UI" else " "
    try:
        data = text.encode("iso8859")  # pydicom's default_encoding
    except UnicodeEncodeError:
        return None
    return _framed(elem.tag, elem.VR, data, encoding[0])


def _framed(tag: int, vr: str | None, value: bytes, implicit: bool) -> bytes | None:
    """An element's tag, its VR (explicit VR) and its length around its value's bytes,
    little endian, as ``write_data_element`` frames them; None where it does more (an
    ambiguous VR, a value too long for a 16-bit length, which pydicom writes as UN)."""
    tag_bytes = _TAG.pack(tag >> 16, tag & 0xFFFF)
    if implicit:
        return b"".join((tag_bytes, _UL.pack(len(value)), value))
    if not vr or len(vr) != 2 or not vr.isascii():
        return None
    if vr in EXPLICIT_VR_LENGTH_32:
        return b"".join((tag_bytes, vr.encode("ascii"), b"\0\0", _UL.pack(len(value)), value))
    if len(value) > 0xFFFF:
        return None
    return b"".join((tag_bytes, vr.encode("ascii"), _US.pack(len(value)), value))


def _sequence_key(elem: DataElement, encoding: tuple[bool, bool],
                  charset_key: Any) -> tuple[Any, ...] | None:
    """A sequence's key: its items' element keys, when every element of every item is
    a plain decoded one (as the engine's de-identification code sequence is). Items
    with their own character set, or with undecoded elements (which pydicom may decode
    and correct when the item's encoding differs), are written by pydicom each time."""
    items = elem.value
    if type(items) is not Sequence or len(items) > 16:
        return None
    parts = []
    for item in items:
        elements = {int(tag): e for tag, e in item._dict.items()}
        if 0x00080005 in elements:
            return None
        keys = []
        for tag in sorted(elements):
            if tag & 0xFFFF == 0 and tag >> 16 > 6:
                continue
            e = elements[tag]
            if e.is_raw or not e.VR or len(e.VR) != 2:
                return None
            key = _key(e, encoding, charset_key)
            if key is None:
                return None
            keys.append(key)
        parts.append((bool(getattr(item, "is_undefined_length_sequence_item", False)),
                      tuple(keys)))
    return ("SQ", int(elem.tag), elem.is_undefined_length, encoding, charset_key, tuple(parts))


def _key(elem: DataElement | RawDataElement, encoding: tuple[bool, bool],
         charset: Any) -> tuple[Any, ...] | None:
    """What decides an element's bytes, or None when they are not to be remembered."""
    value = elem.value
    if elem.is_raw:
        if type(value) is not bytes or len(value) > MEMO_VALUE_BYTES:
            return None
        return (True, int(elem.tag), elem.VR, value, elem.length == 0xFFFFFFFF, encoding)
    charset_key = tuple(charset) if isinstance(charset, list | MultiValue) else charset
    if elem.VR == "SQ":
        return _sequence_key(elem, encoding, charset_key)
    kind = type(value)
    if kind in _PLAIN:
        if kind is not int and len(value) > MEMO_VALUE_BYTES:
            return None
    elif kind is list or kind is MultiValue:
        if len(value) > 64 or any(type(v) not in _PLAIN for v in value):
            return None
        value = tuple((type(v), v) for v in value)
    elif value is not None:
        return None
    if elem.VR == "PN" and value is not None:  # an empty name is no bytes, in any encoding
        return None
    return (False, int(elem.tag), elem.VR, kind, value, elem.is_undefined_length, encoding,
            charset_key)

