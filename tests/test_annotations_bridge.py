"""Bridges: overlay annotations → SEG, SEG/label map → overlay copies, label maps → SEG.

SEGs Lamina writes must pass dciodvfy and read back voxel-identical with
highdicom and with dcmqi's segimage2itkimage. The series comes from the PACS
(stored de-identified); annotations are drawn on the served slices and come
back from the annotator's workstation.
"""

from __future__ import annotations

import subprocess

import highdicom as hd
import numpy as np
import pytest
import SimpleITK as sitk
from pydicom import dcmread

from node.annotations.bridge import BridgeError, label_map_masks, masks_to_seg, overlay_copies
from node.annotations.masks import Annotator
from node.annotations.overlay import read_planes
from tests import annotation_fixtures as fx


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    context = fx.open_node(tmp_path_factory.mktemp("bridge"))
    yield context
    context.close()


@pytest.fixture(scope="module")
def served(ctx) -> fx.Served:
    return fx.served(ctx)


@pytest.fixture(scope="module")
def overlay_annotation(ctx, served) -> int:
    for ds in fx.rotating_overlays(fx.truth(), fx.LABELS, person="Reader^Bridge", series=served):
        assert fx.ingest(ctx, ds).action == "annotation"
    return fx.annotation_of(ctx, served.sop_uid(20))


def _headers(ctx, grid):
    return [ctx.annotations.stored_slice(uid, pixels=False) for uid in grid.sop_instance_uids]


def _dciodvfy_errors(path) -> list[str]:
    binary = fx.tool("dciodvfy", "Debian package dicom3tools")
    run = subprocess.run([binary, str(path)], capture_output=True, text=True, timeout=120)
    return [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]


def _highdicom_read_back(path, grid) -> dict[str, np.ndarray]:
    """highdicom's reading, by the source instances the SEG references (only those)."""
    seg = hd.seg.segread(path)
    uids = [str(i.ReferencedSOPInstanceUID)
            for i in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence]
    pixels = seg.get_pixels_by_source_instance(uids, combine_segments=False, dtype=bool)
    out = {}
    for j, number in enumerate(seg.segment_numbers):
        full = np.zeros(grid.shape, dtype=bool)
        for i, uid in enumerate(uids):
            full[grid.slice_of(uid)] = pixels[i, :, :, j]
        out[seg.get_segment_description(number).segment_label] = full
    return out


def test_overlay_annotation_becomes_a_valid_seg_read_back_identically(ctx, served,
                                                                      overlay_annotation,
                                                                      tmp_path) -> None:
    grid, masks = ctx.annotations.masks_of(overlay_annotation)
    seg = masks_to_seg(masks, grid, _headers(ctx, grid), ctx.annotations.protocol,
                       content_creator="Reader^Bridge")
    path = tmp_path / "from-overlays.dcm"
    seg.save_as(path, enforce_file_format=True)
    assert _dciodvfy_errors(path) == []
    truth = dict(zip(fx.LABELS, fx.truth(), strict=True))
    by_highdicom = _highdicom_read_back(path, grid)
    assert sorted(by_highdicom) == sorted(truth)
    for label, mask in truth.items():
        assert np.array_equal(by_highdicom[label], mask), label
    by_dcmqi = fx.seg_read_back_with_dcmqi(path, tmp_path / "dcmqi", grid)
    for label, mask in truth.items():
        assert np.array_equal(by_dcmqi[label], mask), label
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == served.series_uid
    bone = next(s for s in seg.SegmentSequence if s.SegmentLabel == "Bone")
    assert bone.SegmentedPropertyTypeCodeSequence[0].CodeValue == "272673000"
    result = fx.ingest(ctx, dcmread(path))  # and our own SEG passes our own checks
    assert result.action == "annotation"
    assert fx.current_findings(ctx, fx.annotation_of(ctx, str(seg.SOPInstanceUID))) == []


def test_seg_masks_become_overlay_copies_that_come_back_identical(ctx, served,
                                                                 tmp_path) -> None:
    seg = fx.valid_seg(served)
    grid, masks = ctx.annotations.masks_from_seg(seg, "0" * 64, Annotator("T"))
    copies = overlay_copies(masks, grid,
                            lambda k: ctx.annotations.stored_slice(grid.sop_instance_uids[k]),
                            window=(-600.0, 1500.0))
    covered = sorted({k for m in masks for k in m.slices()})
    assert [k for k, _ in copies] == covered
    k, first = copies[0]
    stored = ctx.annotations.stored_slice(grid.sop_instance_uids[k])
    assert first.SOPInstanceUID == stored.SOPInstanceUID
    assert first.PixelData == stored.PixelData
    assert (first.WindowCenter, first.WindowWidth) == (-600, 1500)
    assert all(p.bits_allocated == 1 and p.length_fits and p.group <= 0x601E
               for _, ds in copies for p in read_planes(ds))
    for _, ds in copies:
        ds.OperatorsName = "Reader^Roundtrip"
        assert fx.ingest(ctx, ds).action == "annotation"
    annotation = fx.annotation_of(ctx, str(copies[0][1].SOPInstanceUID))
    _, back = ctx.annotations.masks_of(annotation)
    for label, truth in zip(fx.LABELS, fx.truth(), strict=True):
        assert np.array_equal(next(m for m in back if m.label == label).array, truth), label


def test_more_than_sixteen_structures_on_a_slice_cannot_be_overlays(ctx, served) -> None:
    grid, masks = ctx.annotations.masks_from_seg(fx.valid_seg(served), "0" * 64,
                                                 Annotator("T"))
    many = [masks[0]] * 17
    with pytest.raises(BridgeError, match="overlays hold 16"):
        overlay_copies(many, grid, lambda k: ctx.annotations.stored_slice(
            grid.sop_instance_uids[k]))


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd"])
def test_label_maps_on_the_series_grid_import_as_a_valid_seg(ctx, served, tmp_path,
                                                            suffix) -> None:
    grid = ctx.annotations.grid(served.series_uid)
    labels = np.zeros(grid.shape, dtype=np.uint16)
    for i, m in enumerate(fx.truth()):
        labels[m] = i + 1
    path = tmp_path / f"labels{suffix}"
    sitk.WriteImage(grid.to_image(labels), str(path))
    names = {1: "Nodule 1", 2: "Bone", 3: "Nodule 2"}
    masks = label_map_masks(path, grid, ctx.annotations.protocol, Annotator("T"), names)
    for mask, truth in zip(masks, fx.truth(), strict=True):
        assert np.array_equal(mask.array, truth), mask.label
    assert masks[1].type.value == "272673000"
    seg = masks_to_seg(masks, grid, _headers(ctx, grid), ctx.annotations.protocol)
    out = tmp_path / "imported.dcm"
    seg.save_as(out, enforce_file_format=True)
    assert _dciodvfy_errors(out) == []
    by_highdicom = _highdicom_read_back(out, grid)
    by_dcmqi = fx.seg_read_back_with_dcmqi(out, tmp_path / "dcmqi", grid)
    for label, truth in zip(fx.LABELS, fx.truth(), strict=True):
        assert np.array_equal(by_highdicom[label], truth), label
        assert np.array_equal(by_dcmqi[label], truth), label


def test_a_label_map_off_the_series_grid_is_refused(ctx, served, tmp_path) -> None:
    grid = ctx.annotations.grid(served.series_uid)
    image = grid.to_image(np.zeros(grid.shape, dtype=np.uint8))
    image.SetSpacing((1.0, 1.0, 2.5))
    path = tmp_path / "off.nrrd"
    sitk.WriteImage(image, str(path))
    with pytest.raises(BridgeError, match="not on the series grid: spacing"):
        label_map_masks(path, grid, ctx.annotations.protocol, Annotator("T"))
