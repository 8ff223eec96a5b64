"""Frames and rendered images of stored instances (WADO-RS frames, rendered, thumbnail).

Uncompressed frames of 8 bits or more are read straight from the file at
their offset (nothing decoded, nothing else read); 1-bit frames (binary SEG)
are unpacked and each frame packed again on its own, since frames need not
start on a byte; compressed frames are sent as stored when the client takes
that syntax, or decoded by pydicom's decoders otherwise. Images are rendered
with numpy and Pillow.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.encaps import get_frame
from pydicom.pixels import apply_rescale, pack_bits, pixel_array
from pydicom.uid import UID

from node.dimse.transcode import can_decode
from node.web.errors import WebError

_PIXEL_DATA = 0x7FE00010
#: PS3.18 Table 8.7.3-2: the single-frame media type of each compressed syntax.
FRAME_MEDIA = {
    "1.2.840.10008.1.2.4.50": "image/jpeg", "1.2.840.10008.1.2.4.51": "image/jpeg",
    "1.2.840.10008.1.2.4.57": "image/jpeg", "1.2.840.10008.1.2.4.70": "image/jpeg",
    "1.2.840.10008.1.2.4.80": "image/jls", "1.2.840.10008.1.2.4.81": "image/jls",
    "1.2.840.10008.1.2.4.90": "image/jp2", "1.2.840.10008.1.2.4.91": "image/jp2",
    "1.2.840.10008.1.2.4.201": "image/jphc", "1.2.840.10008.1.2.4.202": "image/jphc",
    "1.2.840.10008.1.2.4.203": "image/jphc", "1.2.840.10008.1.2.5": "image/dicom-rle",
}


@dataclass(frozen=True)
class FrameLayout:
    """What serving an instance's frames needs, worked out once per blob (a blob never
    changes: its name is the hash of its bytes) so that a viewer scrolling a series,
    one frame request per slice, costs a read of the frame and no parse of the file."""

    syntax: UID
    frames: int
    #: Where native frame 1 starts in the file, when frames are read straight from it
    #: (uncompressed, little endian, 8 bits or more); None when they must be decoded.
    offset: int | None
    frame_size: int

    def check(self, numbers: Sequence[int]) -> None:
        missing = [k for k in numbers if not 1 <= k <= self.frames]
        if missing:
            raise WebError(404, f"frame {missing[0]} does not exist (the instance has "
                                f"{self.frames})")

    def read(self, path: Path, numbers: Sequence[int]) -> list[bytes]:
        """The native frames, each read at its offset (needs ``offset``)."""
        assert self.offset is not None
        self.check(numbers)
        fd = os.open(path, os.O_RDONLY)
        try:
            return [os.pread(fd, self.frame_size, self.offset + (k - 1) * self.frame_size)
                    for k in numbers]
        finally:
            os.close(fd)


@lru_cache(maxsize=1 << 16)
def frame_layout(path: Path) -> FrameLayout:
    """The blob file's :class:`FrameLayout` (kept for the 65536 most recently used:
    ~200 bytes each)."""
    return PixelSource.open(path).layout()


@dataclass
class PixelSource:
    """A stored instance opened for its pixels: header parsed, values over 1 KiB deferred."""

    path: Path
    ds: Dataset

    @classmethod
    def open(cls, path: Path) -> PixelSource:
        ds = dcmread(path, defer_size=1024)
        if _PIXEL_DATA not in ds:
            raise WebError(404, "the instance has no pixel data")
        return cls(path, ds)

    @property
    def syntax(self) -> UID:
        return self.ds.file_meta.TransferSyntaxUID

    @property
    def frames(self) -> int:
        try:
            return max(1, int(self.ds.get("NumberOfFrames", 1) or 1))
        except (TypeError, ValueError):
            return 1

    def check(self, numbers: Sequence[int]) -> None:
        self.layout().check(numbers)

    def layout(self) -> FrameLayout:
        ds = self.ds
        bits = int(ds.get("BitsAllocated", 16))
        raw = ds.get_item(_PIXEL_DATA, keep_deferred=True)
        size = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1)) * bits // 8
        direct = (not self.syntax.is_compressed and self.syntax.is_little_endian and bits >= 8
                  and isinstance(raw, RawDataElement) and raw.value is None)
        return FrameLayout(self.syntax, self.frames, raw.value_tell if direct else None, size)

    def stored_frames(self, numbers: Sequence[int]) -> list[bytes]:
        """The frames as stored: encapsulated fragments joined, or native bytes."""
        self.check(numbers)
        if self.syntax.is_compressed:
            data = self.ds.PixelData
            return [get_frame(data, k - 1, number_of_frames=self.frames) for k in numbers]
        return self.native_frames(numbers)

    def native_frames(self, numbers: Sequence[int]) -> list[bytes]:
        """Uncompressed little-endian frames (decoded first when stored compressed)."""
        layout = self.layout()
        layout.check(numbers)
        if layout.offset is not None:
            return layout.read(self.path, numbers)
        bits = int(self.ds.get("BitsAllocated", 16))
        if self.syntax.is_compressed and not can_decode(self.syntax):
            raise WebError(406, f"no decoder for {self.syntax.name} is installed: ask for "
                                f"{FRAME_MEDIA.get(self.syntax, 'the stored syntax')}")
        out = []
        for k in numbers:
            frame = pixel_array(self.path, index=k - 1)
            if bits == 1:
                out.append(pack_bits(frame.astype(np.uint8)))
            else:
                out.append(frame.astype(frame.dtype.newbyteorder("<")).tobytes())
        return out


def parse_window(text: str | None,
                 presets: Mapping[str, tuple[float, float]]) -> tuple[float, float] | None:
    """``window=center,width[,function]`` (PS3.18 8.3.5.1.4; only LINEAR is honoured), or the
    name of one of the labelling protocol's review windows (``window=lung``)."""
    if not text:
        return None
    if text in presets:
        return presets[text]
    parts = text.split(",")
    try:
        center, width = float(parts[0]), float(parts[1])
    except (IndexError, ValueError):
        known = ", ".join(sorted(presets))
        raise WebError(400, f"window must be center,width[,function] or a preset ({known})"
                       ) from None
    if width <= 0:
        raise WebError(400, "window width must be positive")
    return center, width


def parse_viewport(text: str | None) -> tuple[int, int] | None:
    """``viewport=vw,vh`` (the region parameters are not supported)."""
    if not text:
        return None
    parts = text.split(",")
    try:
        vw, vh = int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        raise WebError(400, "viewport must be width,height") from None
    if not (1 <= vw <= 4096 and 1 <= vh <= 4096):
        raise WebError(400, "viewport must be between 1 and 4096 pixels each way")
    return vw, vh


def render(path: Path, frame: int, media: str, window: tuple[float, float] | None,
           viewport: tuple[int, int] | None) -> bytes:
    """One frame as PNG or JPEG (:func:`frame_image`), fitted into ``viewport``."""
    image = frame_image(path, frame, window)
    if viewport:
        image.thumbnail(viewport)
    return encode_image(image, media)


def frame_image(path: Path, frame: int, window: tuple[float, float] | None) -> Image.Image:
    """One frame as an 8-bit image: rescaled, windowed (``window``, else the instance's
    first, else its value range), MONOCHROME1 inverted. The review page draws on it."""
    source = PixelSource.open(path)
    source.check([frame])
    ds = source.ds
    if source.syntax.is_compressed and not can_decode(source.syntax):
        raise WebError(406, f"no decoder for {source.syntax.name} is installed")
    arr = pixel_array(path, index=frame - 1)
    if int(ds.get("SamplesPerPixel", 1)) == 1:
        values = apply_rescale(arr, ds).astype(np.float64)
        center, width = window or _stored_window(ds) or _range_window(values)
        low = center - width / 2
        img = np.clip((values - low) / width * 255.0, 0, 255).astype(np.uint8)
        if str(ds.get("PhotometricInterpretation", "")) == "MONOCHROME1":
            img = 255 - img
        return Image.fromarray(img, mode="L")
    if arr.dtype != np.uint8:
        arr = (arr.astype(np.float64) / max(1.0, float(arr.max())) * 255).astype(np.uint8)
    return Image.fromarray(arr, mode="RGB")


def encode_image(image: Image.Image, media: str) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG" if media == "image/png" else "JPEG")
    return out.getvalue()


def _stored_window(ds: Dataset) -> tuple[float, float] | None:
    try:
        center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
        if center is None or width is None:
            return None
        center = float(center[0] if isinstance(center, Sequence) and not isinstance(center, str)
                       else center)
        width = float(width[0] if isinstance(width, Sequence) and not isinstance(width, str)
                      else width)
        return (center, width) if width > 0 else None
    except (TypeError, ValueError, IndexError):
        return None


def _range_window(values: np.ndarray) -> tuple[float, float]:
    low, high = float(values.min()), float(values.max())
    return (low + high) / 2, max(high - low, 1.0)
