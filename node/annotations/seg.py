"""SEG intake: a DICOM Segmentation (BINARY, FRACTIONAL or LABELMAP) as masks on the source grid.

highdicom reads the object (``Segmentation.from_dataset``) and decodes its
frames one at a time (``get_stored_frame``), whatever the writer's frame
order, bit packing or compression. Which slice a frame belongs to is decided
by its plane position on the :class:`~node.annotations.grid.SeriesGrid` (the
reference checks do that, with a tolerance), not by frame order or by the
writer's source references: dcmqi references only the slices that carry
frames and writes positions as float32 text, and some writers reference no
source instances at all. Decoding frame by frame into bounding boxes keeps a
300-slice, 10-segment SEG far below the memory of its dense 4D array.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from pydicom.dataset import Dataset

from node.annotations.masks import Annotator, Code, Mask, MaskBuilder

if TYPE_CHECKING:  # highdicom (and the pydicom.sr it brings, ~20 MB) loads with the first SEG
    import highdicom as hd

SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
LABELMAP_SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.7"
SEG_SOP_CLASSES = frozenset({SEGMENTATION_STORAGE, LABELMAP_SEGMENTATION_STORAGE})


class SegFormatError(ValueError):
    """The object is not a SEG highdicom can read, or its frames name unknown segments."""


@dataclass(frozen=True)
class SegFrame:
    """What a frame claims about itself; checked against the grid before it is used."""

    number: int  # 1-based, as in DICOM
    segment_number: int | None  # None for LABELMAP: pixel values are segment numbers
    position: tuple[float, float, float] | None
    source_uid: str | None


@dataclass(frozen=True)
class Segment:
    number: int
    label: str
    category: Code | None
    type: Code | None


@dataclass(eq=False)
class SegObject:
    """A parsed SEG: its segments, frames and references, and the highdicom object for pixels."""

    seg: hd.seg.Segmentation
    sop_instance_uid: str
    segmentation_type: str  # BINARY | FRACTIONAL | LABELMAP
    max_fractional_value: int
    segments: dict[int, Segment]
    frames: list[SegFrame]
    referenced_series: dict[str, tuple[str, ...]]  # series UID → referenced instance UIDs
    frame_of_reference_uid: str
    rows: int
    columns: int
    orientation: tuple[float, ...] | None
    pixel_spacing: tuple[float, float] | None
    person: str


def read_seg(ds: Dataset) -> SegObject:
    """Parse a SEG. Any reading failure of this untrusted object is a :class:`SegFormatError`."""
    import highdicom as hd  # lazy: ~20 MB per process

    try:
        seg = hd.seg.Segmentation.from_dataset(ds, copy=False)
    except Exception as exc:  # highdicom raises many types on malformed input
        raise SegFormatError(f"not a readable SEG ({type(exc).__name__})") from None
    segments = {}
    for item in ds.get("SegmentSequence", []):
        number = int(item.SegmentNumber)
        if number == 0:
            continue  # LABELMAP's background (DCM 125040): everything outside the structures
        segments[number] = Segment(
            number, str(item.get("SegmentLabel", f"segment {number}")),
            _code(item, "SegmentedPropertyCategoryCodeSequence"),
            _code(item, "SegmentedPropertyTypeCodeSequence"))
    seg_type = str(ds.SegmentationType)
    frames = list(_frames(ds, seg_type))
    for frame in frames:
        if frame.segment_number is not None and frame.segment_number not in segments:
            raise SegFormatError(f"frame {frame.number} names undescribed segment "
                                 f"{frame.segment_number}")
    referenced = {}
    for item in ds.get("ReferencedSeriesSequence", []):
        referenced[str(item.SeriesInstanceUID)] = tuple(
            str(ref.ReferencedSOPInstanceUID) for ref in item.get("ReferencedInstanceSequence", []))
    orientation = _functional(ds, "PlaneOrientationSequence", "ImageOrientationPatient")
    spacing = _functional(ds, "PixelMeasuresSequence", "PixelSpacing")
    return SegObject(
        seg=seg,
        sop_instance_uid=str(ds.SOPInstanceUID),
        segmentation_type=seg_type,
        max_fractional_value=int(ds.get("MaximumFractionalValue", 1) or 1),
        segments=segments,
        frames=frames,
        referenced_series=referenced,
        frame_of_reference_uid=str(ds.get("FrameOfReferenceUID", "")),
        rows=int(ds.Rows),
        columns=int(ds.Columns),
        orientation=tuple(float(v) for v in orientation) if orientation else None,
        pixel_spacing=(float(spacing[0]), float(spacing[1])) if spacing else None,
        person=str(ds.get("ContentCreatorName", "") or ""),
    )


def seg_masks(obj: SegObject, placement: dict[int, int], shape: tuple[int, int, int], *,
              annotator: Annotator, source_series_uid: str, provenance: str,
              fractional_threshold: float) -> list[Mask]:
    """One mask per described segment (empty ones included: emptiness is a finding).

    ``placement`` maps each frame number to its grid slice, as the reference
    checks established it.
    """
    builders = {number: MaskBuilder(shape) for number in obj.segments}
    for frame in obj.frames:
        pixels = obj.seg.get_stored_frame(frame.number)
        k = placement[frame.number]
        if obj.segmentation_type == "LABELMAP":
            for value in np.unique(pixels):
                if int(value) in builders:
                    builders[int(value)].add(k, pixels == value)
        elif obj.segmentation_type == "FRACTIONAL":
            limit = fractional_threshold * obj.max_fractional_value
            builders[frame.segment_number].add(k, pixels >= limit)
        else:
            builders[frame.segment_number].add(k, pixels != 0)
    return [
        builders[n].build(structure_id=f"segment {n}", label=s.label, category=s.category,
                          type=s.type, annotator=annotator, source_series_uid=source_series_uid,
                          provenance=provenance)
        for n, s in sorted(obj.segments.items())
    ]


def _frames(ds: Dataset, seg_type: str) -> Iterator[SegFrame]:
    shared = (ds.get("SharedFunctionalGroupsSequence") or [Dataset()])[0]
    per_frame = ds.get("PerFrameFunctionalGroupsSequence", [])
    count = int(ds.get("NumberOfFrames", 1) or 1)
    if len(per_frame) != count:
        raise SegFormatError(f"{count} frames but {len(per_frame)} per-frame groups")
    for number, item in enumerate(per_frame, start=1):
        segment = None
        if seg_type != "LABELMAP":
            ident = _first(item, "SegmentIdentificationSequence") or _first(
                shared, "SegmentIdentificationSequence")
            if ident is None:
                raise SegFormatError(f"frame {number} names no segment")
            segment = int(ident.ReferencedSegmentNumber)
        plane = _first(item, "PlanePositionSequence") or _first(shared, "PlanePositionSequence")
        position = None
        if plane is not None and "ImagePositionPatient" in plane:
            position = tuple(float(v) for v in plane.ImagePositionPatient)
        source = None
        derivation = _first(item, "DerivationImageSequence")
        if derivation is not None:
            image = _first(derivation, "SourceImageSequence")
            if image is not None and "ReferencedSOPInstanceUID" in image:
                source = str(image.ReferencedSOPInstanceUID)
        yield SegFrame(number, segment, position, source)


def _first(item: Dataset, keyword: str) -> Dataset | None:
    seq = item.get(keyword)
    return seq[0] if seq else None


def _functional(ds: Dataset, sequence: str, keyword: str) -> list | None:
    """A functional-group value from the shared groups, or else from the first frame's."""
    for groups in (ds.get("SharedFunctionalGroupsSequence"), ds.get("PerFrameFunctionalGroupsSequence")):
        item = _first(groups[0], sequence) if groups else None
        if item is not None and keyword in item:
            return list(item[keyword].value)
    return None


def _code(item: Dataset, keyword: str) -> Code | None:
    code = _first(item, keyword)
    if code is None:
        return None
    return Code(str(code.get("CodeValue", "")), str(code.get("CodingSchemeDesignator", "")),
                str(code.get("CodeMeaning", "")))
