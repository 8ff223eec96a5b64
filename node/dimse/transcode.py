"""Which transfer syntax an outgoing instance travels in, and re-encoding it when it must.

The node keeps every instance in the syntax it arrived in and sends those bytes
as they are whenever the peer accepts that syntax (the fast path: nothing is
decoded). A peer that does not is offered the two uncompressed syntaxes every
storage SCP must support (PS3.5 10.1: Implicit VR Little Endian is the default,
Explicit VR Little Endian nearly universal), and the instance is re-encoded:

* between uncompressed syntaxes (implicit/explicit VR, big endian, deflated)
  always: pydicom reads and writes the data set (the words of a big-endian
  data set's binary values, which pydicom writes as read, are swapped first);
* from a compressed syntax only where one of pydicom's pixel decoders is
  installed for it (numpy for RLE; pyjpegls, pylibjpeg or Pillow for the JPEG
  family): the pixel data is decoded first.

Anything else cannot be sent, and :func:`why_not` says why in one line naming
the SOP class and the syntaxes offered and accepted.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from io import BytesIO
from typing import BinaryIO

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.pixels import get_decoder
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian

#: What a peer lacking the stored syntax is offered, in order of preference.
UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)


class TranscodeError(ValueError):
    """The stored bytes could not be decoded or re-encoded in the target syntax."""


def offered(stored_syntax: str) -> tuple[str, ...]:
    """The transfer syntaxes proposed for an instance: its own first, then the uncompressed ones."""
    return tuple(dict.fromkeys((str(stored_syntax), *UNCOMPRESSED)))


def can_decode(syntax: str) -> bool:
    """Whether pydicom can turn data in ``syntax`` into an uncompressed data set here."""
    uid = UID(syntax)
    if not uid.is_transfer_syntax:
        return False
    if not uid.is_compressed:  # implicit/explicit VR, big endian, deflated
        return True
    try:
        return bool(get_decoder(uid).is_available)
    except (NotImplementedError, ValueError):  # pydicom knows no decoder for it
        return False


def choose(stored_syntax: str, accepted: Collection[str]) -> str | None:
    """The syntax to send in: the stored one if accepted, else an accepted uncompressed one
    the stored data can be re-encoded into; None when neither."""
    if stored_syntax in accepted:
        return str(stored_syntax)
    if not can_decode(stored_syntax):
        return None
    return next((str(s) for s in UNCOMPRESSED if s in accepted), None)


def why_not(sop_class: str, stored_syntax: str, accepted: Collection[str],
            offered_syntaxes: Iterable[str] | None = None, who: str = "the peer") -> str:
    """One line saying why an instance cannot be sent: SOP class, syntaxes offered and accepted.

    ``offered_syntaxes`` is None when the peer made the offer (C-GET: the
    requester proposed the storage contexts).
    """
    line = f"{_name(sop_class)} ({sop_class}) stored as {_name(stored_syntax)}"
    if offered_syntaxes is not None:
        line += (f": offered {', '.join(_name(s) for s in offered_syntaxes)}; {who} accepted "
                 + (", ".join(_name(s) for s in accepted) if accepted else "none of them"))
    else:
        line += f": {who} accepted " + (", ".join(_name(s) for s in accepted) if accepted
                                         else "no storage context for it")
    if accepted and not can_decode(stored_syntax):
        line += f"; no pixel decoder for {_name(stored_syntax)} is installed"
    return line


def _name(uid: str) -> str:
    return UID(uid).name


def transcode(stored: BinaryIO, target_syntax: str) -> bytes:
    """The data set of a stored DICOM file (``stored``, from its start) encoded in
    ``target_syntax`` (an uncompressed little-endian syntax), without file meta.

    Raises TranscodeError when the file cannot be read, its pixel data decoded or
    the data set written.
    """
    target = UID(target_syntax)
    if target not in UNCOMPRESSED:
        raise TranscodeError(f"cannot encode into {target.name}")
    try:
        ds = dcmread(stored)
        stored_syntax = ds.file_meta.TransferSyntaxUID
        if stored_syntax.is_compressed:
            # The same instance in another transfer syntax: its UID stays (pydicom
            # would make a new one by default).
            ds.decompress(generate_instance_uid=False)
        elif not stored_syntax.is_little_endian:
            _words_to_little_endian(ds)
        out = DicomBytesIO()
        out.is_little_endian = True
        out.is_implicit_VR = target.is_implicit_VR
        write_dataset(out, ds)
        return out.getvalue()
    except Exception as exc:  # pydicom raises many kinds; all mean "cannot transcode"
        raise TranscodeError(f"cannot re-encode the stored instance as {target.name}: "
                             f"{type(exc).__name__}: {str(exc)[:200]}") from exc


#: Binary VRs whose values are words of this many bytes (PS3.5 Table 7.1-1): pydicom
#: writes their bytes as read, so a big-endian data set's must be swapped first.
_WORD_VRS = {"OW": 2, "OF": 4, "OL": 4, "OD": 8, "OV": 8}


def _words_to_little_endian(ds: Dataset) -> None:
    """Swap the words of a big-endian data set's binary values (pixel data, LUTs, overlays):
    the other values pydicom parsed, and writes in the new byte order itself.

    Pixel Data in OW holds pixel cells of Bits Allocated (32 or 64 bits are
    swapped whole); sequences are walked item by item.
    """
    for elem in ds:
        if elem.VR == "SQ":
            for item in elem.value or ():
                _words_to_little_endian(item)
            continue
        if elem.VR == "UN" and elem.value:
            raise ValueError(f"{elem.tag} has an unknown VR: its byte order cannot be changed")
        width = _WORD_VRS.get(elem.VR)
        if elem.tag == 0x7FE00010 and elem.VR == "OW":
            width = max(2, int(ds.get("BitsAllocated", 16)) // 8)
        if width and elem.value:
            if len(elem.value) % width:
                raise ValueError(f"{elem.tag} ({elem.VR}) is not a whole number of words")
            words = np.frombuffer(elem.value, dtype=f">u{width}")
            elem.value = words.astype(f"<u{width}").tobytes()


def file_bytes(sop_class: str, sop_instance: str, syntax: str, dataset: bytes) -> bytes:
    """A DICOM file (preamble, meta, data set) around data set bytes already in ``syntax``."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = syntax
    out = BytesIO()
    out.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(out, meta, enforce_standard=True)
    out.write(dataset)
    return out.getvalue()
