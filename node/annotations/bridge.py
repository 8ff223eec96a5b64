"""Bridges between annotation formats, all through the one mask model.

* masks → DICOM-SEG (highdicom), referencing the stored series: overlay
  annotations become the standard format downstream tools read, and label
  maps are imported as SEG;
* masks → overlay copies of the stored slices (one ROI per group 6000 + 2j,
  same SOP Instance UID, same pixels), so a Horos/OsiriX reader sees a SEG,
  a label map or another reader's work;
* NIfTI/NRRD label maps (ITK-SNAP, nnU-Net) on the series grid → masks,
  read with SimpleITK, which also puts NIfTI's RAS axes into DICOM's LPS.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from pydicom.dataset import Dataset
from pydicom.pixels import pack_bits
from pydicom.tag import Tag

from node.annotations.grid import SeriesGrid
from node.annotations.masks import Annotator, Code, Mask, from_array
from node.annotations.overlay import FIRST_GROUP, LAST_GROUP, overlay_groups
from node.checks.protocol import GENERIC_CODE, Protocol

if TYPE_CHECKING:  # highdicom (~20 MB) and SimpleITK (~100 MB) load where a conversion runs
    import highdicom as hd

MAX_OVERLAYS = (LAST_GROUP - FIRST_GROUP) // 2 + 1  # 16: what Horos displays
_LO = 64  # longest LO value (SegmentLabel, OverlayLabel)


class BridgeError(ValueError):
    """The conversion cannot be made faithfully (off-grid label map, too many ROIs on a slice)."""


def masks_to_seg(masks: list[Mask], grid: SeriesGrid, headers: list[Dataset],
                 protocol: Protocol, *, content_creator: str = "",
                 series_number: int = 900) -> hd.seg.Segmentation:
    """A BINARY SEG of ``masks``, referencing the stored series' slices that carry a voxel.

    ``headers`` are the series' slices in grid order (pixel data not needed).
    Empty structures are left out: a SEG segment without frames says nothing.
    Codes come from the mask, else from its protocol class, else a generic one.
    """
    import highdicom as hd  # lazy: ~20 MB per process

    kept = [m for m in masks if not m.is_empty]
    if not kept:
        raise BridgeError("no structure has a voxel")
    covered = sorted({k for m in kept for k in m.slices()})
    pixels = np.zeros((len(covered), grid.rows, grid.columns, len(kept)), dtype=np.uint8)
    for j, mask in enumerate(kept):
        for i, k in enumerate(covered):
            pixels[i, :, :, j] = mask.slice_mask(k)
    descriptions = []
    for number, mask in enumerate(kept, start=1):
        category, type_ = _codes(mask, protocol)
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=number, segment_label=mask.label[:_LO],
            segmented_property_category=hd.sr.CodedConcept(category.value, category.scheme,
                                                           category.meaning),
            segmented_property_type=hd.sr.CodedConcept(type_.value, type_.scheme, type_.meaning),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL))
    return hd.seg.Segmentation(
        source_images=[headers[k] for k in covered],
        pixel_array=pixels,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=series_number,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="Lamina",
        manufacturer_model_name="lamina",
        software_versions=_version(),
        device_serial_number="none",
        content_label="ANNOTATION",
        content_description="Converted by Lamina from annotation masks",
        content_creator_name=content_creator or None,
    )


def overlay_copies(masks: list[Mask], grid: SeriesGrid, stored_slice: Callable[[int], Dataset],
                   window: tuple[float, float] | None = None) -> list[tuple[int, Dataset]]:
    """(slice index, copy) for every slice carrying a voxel, masks as 1-bit overlay planes.

    ``stored_slice(k)`` returns the stored dataset of grid slice ``k``; the
    copy keeps its SOP Instance UID and pixel data, drops any overlay planes it
    had, and gets one group per structure present (6000, 6002, … in mask
    order), with the label in OverlayLabel and OverlayDescription. ``window``
    (center, width) sets the reviewer's window.
    """
    by_slice: dict[int, list[Mask]] = {}
    for mask in masks:
        for k in mask.slices():
            by_slice.setdefault(k, []).append(mask)
    out = []
    for k in sorted(by_slice):
        present = by_slice[k]
        if len(present) > MAX_OVERLAYS:
            raise BridgeError(f"slice {k + 1} carries {len(present)} structures; "
                              f"overlays hold {MAX_OVERLAYS}")
        ds = copy.deepcopy(stored_slice(k))
        for group in overlay_groups(ds):
            for element in [e.tag for e in ds.group_dataset(group)]:
                del ds[element]
        for j, mask in enumerate(present):
            group = FIRST_GROUP + 2 * j
            ds.add_new(Tag(group, 0x0010), "US", grid.rows)
            ds.add_new(Tag(group, 0x0011), "US", grid.columns)
            ds.add_new(Tag(group, 0x0022), "LO", mask.label[:_LO])
            ds.add_new(Tag(group, 0x0040), "CS", "R")
            ds.add_new(Tag(group, 0x0050), "SS", [1, 1])
            ds.add_new(Tag(group, 0x0100), "US", 1)
            ds.add_new(Tag(group, 0x0102), "US", 0)
            ds.add_new(Tag(group, 0x1500), "LO", mask.label[:_LO])
            ds.add_new(Tag(group, 0x3000), "OW",
                       pack_bits(mask.slice_mask(k).astype(np.uint8).ravel(), pad=True))
        if window is not None:
            ds.WindowCenter, ds.WindowWidth = f"{window[0]:g}", f"{window[1]:g}"
        out.append((k, ds))
    return out


def label_map_masks(path: Path, grid: SeriesGrid, protocol: Protocol, annotator: Annotator,
                    names: dict[int, str] | None = None) -> list[Mask]:
    """One mask per non-zero value of a NIfTI/NRRD label map lying on ``grid``.

    A label map on another grid is refused rather than resampled: resampling
    a reader's labels would change what they drew.
    """
    import SimpleITK as sitk  # lazy: ~100 MB per process

    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise BridgeError(f"cannot read label map ({str(exc).strip().splitlines()[-1]})") from None
    if image.GetNumberOfComponentsPerPixel() != 1 or image.GetDimension() != 3:
        raise BridgeError("label map must be a 3D single-component image")
    mismatch = grid.image_mismatch(image, protocol.position_tolerance_mm)
    if mismatch:
        raise BridgeError(f"label map is not on the series grid: {mismatch}")
    array = sitk.GetArrayFromImage(image)
    if np.issubdtype(array.dtype, np.floating):
        if not np.array_equal(array, np.round(array)):
            raise BridgeError("label map holds non-integer values")
        array = array.astype(np.int64)
    provenance = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    names = names or {}
    masks = []
    for value in (int(v) for v in np.unique(array) if v != 0):
        label = names.get(value, f"label {value}")
        cls = protocol.class_for(label)
        masks.append(from_array(
            array == value, structure_id=f"label {value}", label=label,
            category=cls.category if cls else None, type=cls.type if cls else None,
            annotator=annotator, source_series_uid=grid.series_instance_uid,
            provenance=provenance))
    return masks


def _codes(mask: Mask, protocol: Protocol) -> tuple[Code, Code]:
    if mask.category is not None and mask.type is not None:
        return mask.category, mask.type
    cls = protocol.class_for(mask.label, mask.type)
    if cls is not None:
        return cls.category, cls.type
    return GENERIC_CODE, GENERIC_CODE


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lamina")
    except PackageNotFoundError:
        return "unknown"
