"""De-identifying files in bulk (``lamina anonymize``): the header is the work, the pixel
data only moves.

Every decision of the engine is made on the header; the pixel data of a CT slice is
97 % of its bytes and is copied unchanged. So each file is read up to its pixel data
element, the header dataset (with the pixel data as a deferred element the engine keeps
without reading it) goes through the same :class:`Deidentifier` as the node's, the new
header is encoded by pydicom, and the pixel value is copied from the input file to the
output file by the kernel (``copy_file_range``), never passing through Python. The bytes
are the ones ``encode(engine.deidentify(dcmread(path)).dataset)`` gives (the golden test
in ``tests/test_anonymize_commands.py`` holds that); any file the shortcut does not fit
(deflated, pixel data not the last element, compressed pixel data of undefined length,
pixels the engine masks) takes exactly that whole-file route.

Output files are named by the SHA-256 of their bytes (never from input names or UIDs,
which may carry PHI), so the pixel value is hashed, through a read-only map of the input.

Measured (benchmarks/anonymize.py's corpus, 512x512 CT with planted PHI, in process):
moving the pixels this way saves well under a millisecond of CPU per file; of the
3.4 ms left, the engine takes 1.3 ms (its walk over the nested sequences the corpus
plants in every slice, which differ per slice), encoding the header 0.7 ms (about half
that since :mod:`node.part10` joins those sequences from element bytes), hashing
and writing 0.85 ms (SHA-256 of the pixels 0.3 ms, the kernel's copy 0.3 ms) and
reading the header 0.45 ms.
"""

from __future__ import annotations

import errno
import hashlib
import mmap
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileDataset
from pydicom.errors import InvalidDicomError
from pydicom.tag import BaseTag
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32

from node.anonymize.anonymizer import (
    BurnedInTextRisk,
    DeidentificationError,
    Deidentifier,
    DeidResult,
    ReidEntry,
    encode,
)
from node.part10 import HeaderEncoder

_PIXEL_DATA = 0x7FE00010
_UNDEFINED = 0xFFFFFFFF
NOT_DICOM = "not a readable DICOM file"
# What copy_file_range says when it cannot copy between these two files (another file
# system, an old kernel, a file system without support): sendfile can, then plain I/O.
_NO_KERNEL_COPY = frozenset({errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL})


@dataclass(frozen=True)
class _Tail:
    """Where the pixel data value lies in the input file."""

    offset: int
    length: int


@dataclass(frozen=True)
class Outcome:
    """One file's result: why it was skipped (None if written) and the re-identification
    entries to record (empty unless asked for)."""

    skipped: str | None
    entries: tuple[ReidEntry, ...] = ()


class BulkAnonymizer:
    """One engine and one output folder; :meth:`run` handles one input file.

    Built once in the parent process before the workers fork, so the engine's resolved
    profile and caches are inherited, never pickled."""

    def __init__(self, engine: Deidentifier, out_dir: Path, *, with_entries: bool) -> None:
        self._engine = engine
        #: dcmwrite's bytes for the header, mostly joined from remembered element bytes
        #: (a series repeats most of its header): a fifth of pydicom's cost per file.
        self._encoder = HeaderEncoder()
        self._out_dir = out_dir
        self._with_entries = with_entries

    def run(self, path: Path) -> Outcome:
        """De-identify ``path`` into the output folder."""
        try:
            fp = open(path, "rb")
        except OSError:
            return Outcome(NOT_DICOM)
        with fp:
            try:
                ds, tail = _read_header(fp)
            except (InvalidDicomError, OSError, ValueError, EOFError):
                return Outcome(NOT_DICOM)
            if tail is None:
                return self._whole(path)
            result = self._deidentify(ds)
            if isinstance(result, Outcome):
                return result
            out = result.dataset
            pixels = out.get_item(_PIXEL_DATA, keep_deferred=True)
            if pixels is not ds.get_item(_PIXEL_DATA, keep_deferred=True) \
                    or not isinstance(pixels, RawDataElement) or pixels.value is not None \
                    or max(out.keys()) != _PIXEL_DATA:
                # The engine read or changed the pixels (masking) or wrote something
                # after them: the whole-file route encodes exactly that.
                return self._whole(path)
            head = self._encoder.encode(out, stop_before=_PIXEL_DATA) \
                + _element_header(pixels, tail.length)
            self._write_with_tail(head, fp.fileno(), tail)
        return self._written(result)

    def _whole(self, path: Path) -> Outcome:
        """The whole-file route: read everything, de-identify, encode, write."""
        try:
            ds = dcmread(path)
        except (InvalidDicomError, OSError, ValueError, EOFError):
            return Outcome(NOT_DICOM)
        result = self._deidentify(ds)
        if isinstance(result, Outcome):
            return result
        data = encode(result.dataset)
        target = self._target(hashlib.sha256(data).hexdigest())
        if target is not None:
            _replace(target, lambda fd: _write_all(fd, data))
        return self._written(result)

    def _deidentify(self, ds: Dataset) -> DeidResult | Outcome:
        """The engine's result, or the outcome of a refused object (the reason names no
        PHI: the engine's messages never quote values)."""
        try:
            return self._engine.deidentify(ds)
        except BurnedInTextRisk as exc:
            return Outcome(f"quarantine: {exc}")
        except DeidentificationError as exc:
            return Outcome(str(exc))

    def _written(self, result: DeidResult) -> Outcome:
        return Outcome(None, result.entries if self._with_entries else ())

    def _write_with_tail(self, head: bytes, source: int, tail: _Tail) -> None:
        digest = hashlib.sha256(head)
        if tail.length:
            # A read-only map hashes the pixel value where the page cache holds it.
            with mmap.mmap(source, 0, access=mmap.ACCESS_READ) as view, memoryview(view) as whole:
                digest.update(whole[tail.offset:tail.offset + tail.length])
        target = self._target(digest.hexdigest())
        if target is None:
            return

        def write(fd: int) -> None:
            _write_all(fd, head)
            _copy_range(source, fd, tail.offset, tail.length)

        _replace(target, write)

    def _target(self, digest: str) -> Path | None:
        """The output path for these bytes, or None when a file of them is there already
        (the same input again: same bytes, same name)."""
        target = self._out_dir / f"{digest}.dcm"
        return None if target.exists() else target


def _read_header(fp: BinaryIO) -> tuple[FileDataset, _Tail | None]:
    """The dataset up to the pixel data, with the pixel data as a deferred element (its
    value is read only if asked for, from the file), and where its value lies; no tail
    when the file does not end with one pixel data element of defined length in a
    transfer syntax whose bytes are the file's (deflated is not)."""
    ds = dcmread(fp, stop_before_pixels=True)
    start = fp.tell()
    syntax = ds.file_meta.get("TransferSyntaxUID")
    if syntax is None or syntax.is_deflated:
        return ds, None
    implicit, little = ds.original_encoding
    if implicit is None or little is None:
        return ds, None
    endian = "<" if little else ">"
    header = os.pread(fp.fileno(), 12, start)
    if len(header) < 8:
        return ds, None
    group, element = struct.unpack(f"{endian}HH", header[:4])
    if (group << 16 | element) != _PIXEL_DATA:
        return ds, None
    if implicit:
        vr, (length,), size = None, struct.unpack(f"{endian}L", header[4:8]), 8
    else:
        vr = header[4:6].decode("ascii", "replace")
        if vr not in EXPLICIT_VR_LENGTH_32 or len(header) < 12:
            return ds, None
        (length,), size = struct.unpack(f"{endian}L", header[8:12]), 12
    offset = start + size
    if length == _UNDEFINED or offset + length != os.fstat(fp.fileno()).st_size:
        return ds, None
    # As pydicom's reader yields it with a defer size below the value's length.
    ds[_PIXEL_DATA] = RawDataElement(BaseTag(_PIXEL_DATA), vr, length, None, offset,
                                     implicit, little)
    return ds, _Tail(offset, length)


def _element_header(pixels: RawDataElement, length: int) -> bytes:
    """The pixel data element's tag, VR and length as pydicom's writer encodes a raw
    element (filewriter.write_data_element), so head + header + value is byte for byte
    what encoding the whole dataset gives."""
    endian = "<" if pixels.is_little_endian else ">"
    tag = struct.pack(f"{endian}HH", _PIXEL_DATA >> 16, _PIXEL_DATA & 0xFFFF)
    if pixels.is_implicit_VR:
        return tag + struct.pack(f"{endian}L", length)
    return tag + pixels.VR.encode("ascii") + struct.pack(f"{endian}HL", 0, length)


def _replace(target: Path, write: Callable[[int], None]) -> None:
    """Write through a temporary name and rename into place, so a file under its final
    name is always complete; workers racing on identical copies each rename their own."""
    temporary = target.with_suffix(f".{os.getpid()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        try:
            write(fd)
        finally:
            os.close(fd)
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _copy_range(source: int, target: int, offset: int, length: int) -> None:
    """Append ``length`` bytes of ``source`` from ``offset`` to ``target``, in the kernel:
    copy_file_range, else sendfile, else (no kernel copy between these files) read and
    write."""
    done = 0
    for copy in (_copy_file_range, _sendfile, _read_write):
        try:
            while done < length:
                n = copy(source, target, offset + done, length - done)
                if n == 0:
                    raise EOFError("the input file ended before its pixel data")
                done += n
            return
        except OSError as exc:
            if exc.errno not in _NO_KERNEL_COPY:
                raise


def _copy_file_range(source: int, target: int, offset: int, count: int) -> int:
    if not hasattr(os, "copy_file_range"):  # not Linux
        raise OSError(errno.ENOSYS, "no copy_file_range")
    return os.copy_file_range(source, target, count, offset)


def _sendfile(source: int, target: int, offset: int, count: int) -> int:
    return os.sendfile(target, source, offset, count)


def _read_write(source: int, target: int, offset: int, count: int) -> int:
    data = os.pread(source, min(count, 1 << 22), offset)
    _write_all(target, data)
    return len(data)
