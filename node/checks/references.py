"""Reference checks: does an annotation belong to the images it claims?

A failure here means the annotation cannot be placed on the stored series at
all, so it is refused (0xA900) and quarantined, never stored with findings.
Each refusal names its check and the frame or slice concerned, in words fit
for an ErrorComment (no patient data; positions in mm, groups in hex).

Checks, in the order they run:

* ``seg-format``     the object is a SEG highdicom can read (raised by intake);
* ``series``         the referenced series is named and stored;
* ``instances``      every referenced source instance is stored in that series;
                     (these two, when only storage is missing, raise
                     :class:`NotYetStored`: the images may still be on their way)
* ``frame-of-reference``  the annotation's FrameOfReferenceUID is the series';
* ``plane-position`` every SEG frame lies on a source slice (within the
                     protocol's tolerance), in the series' orientation, size
                     and pixel spacing;
* ``overlay-group``  overlays only in the even groups 6000–601E;
* ``overlay-size``   overlay Rows/Columns equal the image's, origin 1\\1;
* ``overlay-data``   1-bit overlays whose OverlayData length fits their size;
* ``pixel-data``     the pixels under an overlay copy are the stored pixels.
"""

from __future__ import annotations

import numpy as np
from pydicom.dataset import Dataset

from node.annotations.grid import SeriesGrid
from node.annotations.overlay import LAST_GROUP, OverlayPlane
from node.annotations.seg import SegObject

_NATIVE = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1"}  # little-endian, uncompressed


class Refusal(Exception):
    """An annotation failed a reference check: refuse it with this check's name and detail."""

    def __init__(self, check: str, detail: str) -> None:
        super().__init__(f"{check}: {detail}")
        self.check = check
        self.detail = detail

    @property
    def reason(self) -> str:
        return f"{self.check}: {self.detail}"


class NotYetStored(Refusal):
    """What the annotation references is not stored (yet): a PACS forwarding a study
    sends its objects in any order, so the annotation waits (``pending``) rather than
    being refused at once; it is refused with this reason only if the images never come."""


def seg_source_series(obj: SegObject) -> str:
    """The one series a SEG is drawn on, from its ReferencedSeriesSequence.

    OHIF shows a SEG only when it carries this sequence, so a SEG without it is
    refused rather than guessed at.
    """
    if not obj.referenced_series:
        raise Refusal("series", "ReferencedSeriesSequence missing")
    if len(obj.referenced_series) > 1:
        raise Refusal("series", f"references {len(obj.referenced_series)} series; one expected")
    return next(iter(obj.referenced_series))


def check_seg(obj: SegObject, grid: SeriesGrid | None, tolerance: float) -> dict[int, int]:
    """Run the SEG reference checks; returns each frame's grid slice (frame number → k)."""
    if grid is None:
        raise NotYetStored("series", "referenced series is not stored")
    listed = obj.referenced_series.get(grid.series_instance_uid, ())
    for n, uid in enumerate(listed, start=1):
        if grid.slice_of(uid) is None:
            raise NotYetStored("instances",
                               f"referenced instance {n} of {len(listed)} is not stored")
    for frame in obj.frames:
        if frame.source_uid is not None and grid.slice_of(frame.source_uid) is None:
            raise NotYetStored("instances", f"frame {frame.number}: source image not stored")
    if obj.frame_of_reference_uid != grid.frame_of_reference_uid:
        raise Refusal("frame-of-reference", "differs from the referenced series'")
    if (obj.rows, obj.columns) != (grid.rows, grid.columns):
        raise Refusal("plane-position", f"frames are {obj.rows}x{obj.columns}, "
                                        f"slices {grid.rows}x{grid.columns}")
    if obj.orientation is None or not grid.orientation_matches(obj.orientation):
        raise Refusal("plane-position", "plane orientation differs from the series'")
    if obj.pixel_spacing is None or not grid.pixel_spacing_matches(obj.pixel_spacing):
        raise Refusal("plane-position", "pixel spacing differs from the series'")
    placement = {}
    for frame in obj.frames:
        source_k = grid.slice_of(frame.source_uid) if frame.source_uid else None
        if frame.position is None:
            if source_k is None:
                raise Refusal("plane-position", f"frame {frame.number} has no plane position")
            placement[frame.number] = source_k
            continue
        k = grid.slice_at(frame.position, tolerance)
        if k is None:
            raise Refusal("plane-position", f"frame {frame.number} @ "
                          f"{grid.depth_of(frame.position):.2f} mm is on no slice")
        if source_k is not None and source_k != k:
            raise Refusal("plane-position", f"frame {frame.number} lies on "
                          f"{grid.describe_slice(k)}, its source on slice {source_k + 1}")
        placement[frame.number] = k
    return placement


def check_overlay_copy(copy: Dataset, stored: Dataset, planes: list[OverlayPlane],
                       where: str) -> None:
    """Run the overlay reference checks on one copy against the stored slice it annotates.

    ``where`` names that slice (``slice 14 @ -15.00 mm``) for the refusal.
    """
    same_uid = str(copy.SOPInstanceUID) == str(stored.SOPInstanceUID)
    if same_uid and str(copy.get("SeriesInstanceUID", "")) != str(stored.SeriesInstanceUID):
        raise Refusal("series", f"{where}: copy names another series")
    if str(copy.get("FrameOfReferenceUID", "")) != str(stored.get("FrameOfReferenceUID", "")):
        raise Refusal("frame-of-reference", f"{where}: differs from the stored slice")
    for plane in planes:
        if plane.group > LAST_GROUP:
            raise Refusal("overlay-group", f"group {plane.group:04X} outside 6000-601E on {where}")
    rows, columns = int(stored.Rows), int(stored.Columns)
    for plane in planes:
        if (plane.rows, plane.columns) != (rows, columns):
            raise Refusal("overlay-size", f"group {plane.group:04X} is {plane.rows}x{plane.columns},"
                                          f" image {rows}x{columns}, {where}")
        if plane.origin != (1, 1):
            raise Refusal("overlay-size", f"group {plane.group:04X} origin "
                                          f"{plane.origin[0]},{plane.origin[1]}, not 1,1, {where}")
    for plane in planes:
        if plane.bits_allocated != 1 or plane.bit_position not in (None, 0):
            raise Refusal("overlay-data", f"group {plane.group:04X} is not a 1-bit overlay, {where}")
        if not plane.length_fits:
            raise Refusal("overlay-data", f"group {plane.group:04X} holds {plane.data_length or 0}"
                                          f" bytes, needs {plane.expected_length}, {where}")
    if not _same_pixels(copy, stored):
        raise Refusal("pixel-data", f"differs from the stored {where}")


def _same_pixels(copy: Dataset, stored: Dataset) -> bool:
    """Byte-identical pixel data; decoded values when the two transfer syntaxes differ."""
    if "PixelData" not in copy:
        return False
    if copy.PixelData == stored.PixelData:
        return True
    syntaxes = {str(copy.file_meta.TransferSyntaxUID), str(stored.file_meta.TransferSyntaxUID)}
    if len(syntaxes) == 1 and syntaxes <= _NATIVE:
        return False
    try:
        return bool(np.array_equal(copy.pixel_array, stored.pixel_array))
    except Exception:  # no codec, or undecodable bytes: cannot show they are the same
        return False
