"""Test data for the annotation tests: a small phantom series, its spheres as
ground-truth masks, SEGs built with highdicom, and overlay copies built the
way the Horos/OsiriX pipeline builds them (seed 004: one ROI per group 6000 +
2j, same SOP Instance UID, same pixels)."""

from __future__ import annotations

import copy

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.pixels import pack_bits
from pydicom.tag import Tag

from node.phantom import Phantom, Sphere

#: 40 slices of 256×256 at 1.4 mm (the phantom's 358 mm field), 2.5 mm apart:
#: every sphere fits, and a script hard-coding 512×512 overlays is wrong here.
PHANTOM = Phantom(seed="annotations", slices_count=40, rows=256, columns=256, pixel_spacing=1.4)

NODULE = hd.sr.CodedConcept("27925004", "SCT", "Nodule")
ABNORMAL = hd.sr.CodedConcept("49755003", "SCT", "Morphologically Abnormal Structure")
VESSEL = hd.sr.CodedConcept("59820001", "SCT", "Blood Vessel")
ANATOMY = hd.sr.CodedConcept("91723000", "SCT", "Anatomical Structure")


def sphere_mask(phantom: Phantom, sphere: Sphere) -> np.ndarray:
    """The voxels the phantom fills with ``sphere`` (the same rule as its pixels)."""
    x = phantom.origin[0] + np.arange(phantom.columns) * phantom.pixel_spacing
    y = phantom.origin[1] + np.arange(phantom.rows) * phantom.pixel_spacing
    xx, yy = np.meshgrid(x, y)
    out = np.zeros((phantom.slices_count, phantom.rows, phantom.columns), dtype=bool)
    for k in range(phantom.slices_count):
        dz2 = (phantom.z_of(k) - sphere.center_mm[2]) ** 2
        if dz2 < sphere.radius_mm ** 2:
            out[k] = (xx - sphere.center_mm[0]) ** 2 + (yy - sphere.center_mm[1]) ** 2 \
                < sphere.radius_mm ** 2 - dz2
    return out


def truth(phantom: Phantom = PHANTOM) -> list[np.ndarray]:
    """Ground truth of the three spheres: big soft tissue, bone, small nodule."""
    return [sphere_mask(phantom, s) for s in phantom.spheres]


def headers(phantom: Phantom = PHANTOM) -> list[Dataset]:
    out = []
    for k in range(phantom.slices_count):
        ds = phantom.slice(k)
        del ds.PixelData
        out.append(ds)
    return out


def description(number: int, label: str, category=ABNORMAL, type_=NODULE) -> hd.seg.SegmentDescription:
    return hd.seg.SegmentDescription(
        segment_number=number, segment_label=label, segmented_property_category=category,
        segmented_property_type=type_, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL)


def make_seg(masks: list[np.ndarray], labels: list[str], *, seg_type: str = "BINARY",
             omit_empty: bool = True, phantom: Phantom = PHANTOM, codes=None,
             fractional: np.ndarray | None = None) -> hd.seg.Segmentation:
    """A SEG of ``masks`` (full-grid bool arrays) on the phantom series.

    FRACTIONAL uses ``fractional`` (slices, rows, cols, segments) floats when given.
    """
    codes = codes or [(ABNORMAL, NODULE)] * len(masks)
    descriptions = [description(i + 1, label, *codes[i]) for i, label in enumerate(labels)]
    if seg_type == "LABELMAP":
        pixels = np.zeros(masks[0].shape, dtype=np.uint8)
        for i, m in enumerate(masks):
            pixels[m] = i + 1
    elif seg_type == "FRACTIONAL" and fractional is not None:
        pixels = fractional.astype(np.float32)
    else:
        pixels = np.stack(masks, axis=-1).astype(np.uint8 if seg_type == "BINARY" else np.float32)
    return hd.seg.Segmentation(
        source_images=headers(phantom), pixel_array=pixels,
        segmentation_type=getattr(hd.seg.SegmentationTypeValues, seg_type),
        segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=100,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="Lamina tests",
        manufacturer_model_name="fixtures", software_versions="1", device_serial_number="1",
        content_creator_name="Reader^One", omit_empty_frames=omit_empty,
        max_fractional_value=255)


def permute_frames(seg: Dataset, seed: int = 7) -> Dataset:
    """The same SEG with its frames (pixels and per-frame groups) in a shuffled order."""
    parsed = hd.seg.Segmentation.from_dataset(copy.deepcopy(seg), copy=True)
    frames = np.stack([parsed.get_stored_frame(i + 1) for i in range(int(seg.NumberOfFrames))])
    order = np.random.default_rng(seed).permutation(len(frames))
    out = copy.deepcopy(seg)
    out.PerFrameFunctionalGroupsSequence = [seg.PerFrameFunctionalGroupsSequence[i] for i in order]
    shuffled = frames[order]
    if int(seg.BitsAllocated) == 1:
        out.PixelData = pack_bits(shuffled.ravel())
    else:
        out.PixelData = shuffled.astype(np.uint8).tobytes()
    return out


def overlay_copy(k: int, rois: list[tuple[int, str | None, np.ndarray]],
                 phantom: Phantom = PHANTOM, size: tuple[int, int] | None = None) -> Dataset:
    """The annotator's copy of slice ``k``: same UID and pixels, one ROI per overlay group.

    ``rois`` are (group, label or None, rows × columns bool plane). ``size``
    overrides OverlayRows/Columns (the 512×512 hard-coding of scripts in the wild).
    """
    ds = phantom.slice(k)
    for group, label, plane in rois:
        rows, cols = size or plane.shape
        data = np.zeros((rows, cols), dtype=np.uint8)
        r, c = min(rows, plane.shape[0]), min(cols, plane.shape[1])
        data[:r, :c] = plane[:r, :c]
        ds.add_new(Tag(group, 0x0010), "US", rows)
        ds.add_new(Tag(group, 0x0011), "US", cols)
        ds.add_new(Tag(group, 0x0040), "CS", "R")
        ds.add_new(Tag(group, 0x0050), "SS", [1, 1])
        ds.add_new(Tag(group, 0x0100), "US", 1)
        ds.add_new(Tag(group, 0x0102), "US", 0)
        if label is not None:
            ds.add_new(Tag(group, 0x0022), "LO", label)
            ds.add_new(Tag(group, 0x1500), "LO", label)
        ds.add_new(Tag(group, 0x3000), "OW", pack_bits(data.ravel(), pad=True))
    return ds
