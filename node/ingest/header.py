"""A received header parsed in memory into the very dataset pydicom's ``dcmread`` gives.

Why not ``dcmread`` alone (issue 15): its element generator reads a file-like object
twice per element (the element's header, then its value), asks the buffer its byte
order per element and builds a tag object for each stop check. On a CT slice's header
(47 elements) walking the same bytes with one ``struct`` unpack per element takes a
fifth of dcmread's time; with the datasets still built by pydicom's classes, as
dcmread builds them, the whole parse took 0.21-0.36 ms against dcmread's 0.33-0.51
(six alternations of 2,000 headers, thread CPU time): about 0.1 ms less per received
instance on both routes.

Only the common case is walked here: a Part 10 file ("DICM"), its file meta in
explicit VR little endian, a data set in implicit or explicit VR little endian whose
elements before the pixel data have valid VRs and defined lengths, or are sequences
of undefined length (read by pydicom's own ``read_sequence``). Everything else
(other undefined lengths, a VR pydicom would correct, a command group, big endian,
deflate, private syntaxes, a value running past the bytes given) returns None and
``dcmread`` parses it. What is returned is built with pydicom's own classes, in
``dcmread``'s order, so every element, offset, encoding and character set is the one
``dcmread(buffer, stop_before_pixels=True, defer_size=...)`` gives:
``tests/test_ingest_header.py`` holds it to that on pydicom's test files and on
hospital-shaped slices.
"""

from __future__ import annotations

import io
import struct
from typing import Any

from pydicom.charset import convert_encodings, default_encoding
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import (
    DataElement,
    RawDataElement,
    convert_raw_data_element,
    empty_value_for_VR,
)
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.filereader import read_sequence
from pydicom.tag import BaseTag
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
    PrivateTransferSyntaxes,
)
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32, VR
from pydicom.values import convert_string

#: An element's header read in one unpack: tag and 32-bit length (implicit VR), or tag,
#: VR and 16-bit length (explicit VR; the VR's reserved bytes when its length is 32-bit).
_IMPLICIT_HEAD = struct.Struct("<HHL")
_EXPLICIT_HEAD = struct.Struct("<HH2sH")
_UL = struct.Struct("<L")
#: One tag object per tag number, shared by every header parsed (a tag is an immutable
#: int): building pydicom's ``BaseTag`` cost more than looking it up. Bounded, since a
#: sender chooses its private tags.
_TAGS: dict[int, BaseTag] = {}
_TAGS_KEPT = 1 << 16
#: Every VR pydicom knows, as its two bytes: any other is a VR pydicom reads otherwise.
_VRS = {vr.encode("ascii"): vr.value for vr in VR}
_LONG = frozenset(vr.encode("ascii") for vr in EXPLICIT_VR_LENGTH_32)
#: Where ``dcmread(stop_before_pixels=True)`` stops (pydicom's ``_at_pixel_data``).
_PIXEL_TAGS = frozenset({0x7FE00010, 0x7FE00009, 0x7FE00008})
_CHARSET = 0x00080005
_UNDEFINED = 0xFFFFFFFF
_META_START = 132  # preamble and "DICM"


def read_header(buffer: io.BytesIO, defer_size: int) -> FileDataset | None:
    """The header in ``buffer`` (a file's first bytes from offset 0, named like the
    file) as ``dcmread(buffer, stop_before_pixels=True, defer_size=defer_size)`` reads
    it, with ``buffer`` left where that parse leaves it; None where it is not the
    common case (the module docstring): then ``dcmread`` must parse it."""
    data = buffer.getvalue()
    if len(data) < _META_START or data[128:_META_START] != b"DICM":
        return None
    walked = _elements(buffer, data, _META_START, False, True, None)
    if walked is None:
        return None
    meta_elements, at = walked
    file_meta = _file_meta(meta_elements)
    if file_meta is None or at + 8 > len(data) or data[at:at + 2] == b"\0\0":
        return None  # nothing after the meta, or a command group (0000,eeee) first
    encoding = _encoding(file_meta.get("TransferSyntaxUID"))
    if encoding is None:
        return None
    implicit, little = encoding
    if implicit != (not (0x40 < data[at + 4] < 0x5B and 0x40 < data[at + 5] < 0x5B)):
        return None  # pydicom would switch encodings (with a warning)
    walked = _elements(buffer, data, at, implicit, False, defer_size)
    if walked is None:
        return None
    elements, at = walked
    dataset = Dataset(elements, parent_encoding=default_encoding)
    charset: Any = default_encoding
    if _CHARSET in elements:
        charset = convert_encodings(convert_raw_data_element(elements[_CHARSET]).value)
    dataset.set_original_encoding(implicit, little, charset)
    buffer.seek(at)
    ds = FileDataset(buffer, dataset, data[:128], file_meta, implicit, little)
    ds.set_original_encoding(implicit, little, dataset._character_set)
    return ds


def _file_meta(elements: dict[BaseTag, RawDataElement]) -> FileMetaDataset | None:
    """The file meta as ``_read_file_meta_info`` builds it (including the elements it
    decodes on the way), or None where it would do more."""
    # pydicom wraps the Dataset read_dataset made, whose element dict it takes over.
    file_meta = FileMetaDataset(elements)
    file_meta.set_original_encoding(
        is_implicit_vr=False, is_little_endian=True, character_encoding=default_encoding)
    if not file_meta._dict:
        return None
    try:
        file_meta[next(iter(file_meta.elements())).tag]
        if "FileMetaInformationGroupLength" in file_meta:
            file_meta.FileMetaInformationGroupLength  # noqa: B018 (decoded, as pydicom does)
    except Exception:
        return None
    return file_meta


def _encoding(syntax: Any) -> tuple[bool, bool] | None:
    """(implicit VR, little endian) as ``read_partial`` decides them, for the syntaxes
    walked here."""
    if syntax is None or syntax in (ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian) \
            or syntax in PrivateTransferSyntaxes:
        return None
    return syntax == ImplicitVRLittleEndian, True


def _elements(buffer: io.BytesIO, data: bytes, at: int, implicit: bool, meta: bool,
              defer_size: int | None) -> tuple[dict[BaseTag, Any], int] | None:
    """The elements from ``at`` until the end of ``data`` (the bytes of ``buffer``) or
    where ``dcmread`` stops: past the file meta group (``meta``), else at the pixel data;
    as pydicom's ``data_element_generator`` yields them: values of a defined length walked
    here, a sequence of undefined length read by pydicom's ``read_sequence`` as that
    generator reads it; None at anything it would treat otherwise (see the module
    docstring)."""
    elements: dict[BaseTag, Any] = {}
    end = len(data)
    encoding: Any = default_encoding  # the generator's, for sequences read by pydicom
    while at + 8 <= end:
        value_at = at + 8
        if implicit:
            group, element, length = _IMPLICIT_HEAD.unpack_from(data, at)
            vr = None
        else:
            group, element, vr_code, length = _EXPLICIT_HEAD.unpack_from(data, at)
            vr = _VRS.get(vr_code)
            if vr is not None and vr_code in _LONG:
                if at + 12 > end:
                    return None  # pydicom fails on the cut length, even before stopping
                length = _UL.unpack_from(data, at + 8)[0]
                value_at = at + 12
        tag = group << 16 | element
        if (group != 2) if meta else (tag in _PIXEL_TAGS):  # where dcmread stops
            return elements, at
        if vr is None and not implicit:
            # pydicom reads on as implicit VR (the data set after the meta may be): followed
            # here only up to where the walk stops, as above.
            return None
        key = _TAGS.get(tag)
        if key is None:
            key = BaseTag(tag)
            if len(_TAGS) < _TAGS_KEPT:
                _TAGS[tag] = key
        if length == _UNDEFINED:
            if tag == 0xFFFEE00D or not _sequence(tag, vr):
                return None
            try:
                buffer.seek(value_at)
                sequence = read_sequence(buffer, implicit, True, length, encoding)
            except Exception:
                return None
            finally:
                after = buffer.tell()
                buffer.seek(0)
            elements[key] = DataElement(key, "SQ", sequence, value_at, is_undefined_length=True)
            at = after
            continue
        if tag == 0xFFFEE00D or value_at + length > end:
            return None
        if defer_size is not None and length > defer_size and tag != _CHARSET:
            value = None
        elif length:
            value = data[value_at:value_at + length]
        else:
            value = empty_value_for_VR(vr, raw=True)
        if tag == _CHARSET:  # as the generator keeps it, for the sequences after it
            encoding = convert_encodings(convert_string(value or b"", True))
        elements[key] = RawDataElement(key, vr, length, value, value_at, implicit, True)
        at = value_at + length
    return (elements, at) if at == end else None


def _sequence(tag: int, vr: str | None) -> bool:
    """Whether pydicom reads an element of undefined length as a sequence without
    looking ahead: SQ, as read or (implicit VR) from its dictionary."""
    if vr is not None:
        return vr == "SQ"
    try:
        return dictionary_VR(tag) == "SQ"
    except KeyError:
        return False
