"""SEG intake: every kind of SEG becomes the same masks, voxel for voxel, with no finding."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from node.annotations.grid import SeriesGrid
from node.annotations.masks import Annotator
from node.annotations.seg import SegFormatError, read_seg, seg_masks
from node.checks.references import check_seg
from tests import annotation_fixtures as fx

GRID = SeriesGrid.from_headers(fx.headers())


def _masks(seg):
    obj = read_seg(copy.deepcopy(seg))
    placement = check_seg(obj, GRID, 0.01)
    return seg_masks(obj, placement, GRID.shape, annotator=Annotator("T"),
                     source_series_uid=GRID.series_instance_uid, provenance="0" * 64,
                     fractional_threshold=0.5)


VALID = {
    "binary": lambda: fx.valid_seg(),
    "binary, empty frames present": lambda: fx.valid_seg(omit_empty=False),
    "binary, frames permuted": lambda: fx.permute_frames(fx.valid_seg()),
    "binary, float32 positions": lambda: fx.float32_positions(fx.valid_seg()),
    "fractional": fx.fractional_seg,
    "labelmap": lambda: fx.valid_seg(seg_type="LABELMAP"),
    "labelmap, frames permuted": lambda: fx.permute_frames(fx.valid_seg(seg_type="LABELMAP")),
}


@pytest.mark.parametrize("variant", list(VALID))
def test_every_seg_variant_reads_as_the_ground_truth(variant: str) -> None:
    masks = _masks(VALID[variant]())
    assert [m.label for m in masks] == fx.LABELS
    for mask, truth in zip(masks, fx.truth(), strict=True):
        assert np.array_equal(mask.array, truth), mask.label
        assert mask.annotator.ae_title == "T"
    assert masks[0].type.value == "27925004" and masks[1].type.value == "272673000"


def test_dcmqi_seg_referencing_only_framed_slices(tmp_path) -> None:
    seg = fx.dcmqi_seg(tmp_path)
    referenced = seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence
    assert len(referenced) < fx.PHANTOM.slices_count  # the trap: only slices with frames
    masks = _masks(seg)
    for mask, truth in zip(masks, fx.truth(), strict=True):
        assert np.array_equal(mask.array, truth), mask.label


def test_an_empty_segment_is_kept_as_an_empty_mask() -> None:
    t = fx.truth()
    masks = _masks(fx.make_seg([t[2], np.zeros_like(t[2])], ["Nodule 2", "Nodule 3"]))
    assert [m.is_empty for m in masks] == [False, True]
    assert masks[1].slices() == []


def test_a_frame_naming_an_undescribed_segment_is_a_format_error() -> None:
    seg = copy.deepcopy(fx.valid_seg())
    seg.PerFrameFunctionalGroupsSequence[0].SegmentIdentificationSequence[0] \
        .ReferencedSegmentNumber = 9
    with pytest.raises(SegFormatError):
        read_seg(seg)


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    context = fx.open_node(tmp_path_factory.mktemp("seg"))
    yield context
    context.close()


@pytest.mark.parametrize("variant", list(VALID))
def test_valid_segs_are_stored_indexed_and_checked_without_findings(ctx, variant: str) -> None:
    seg = VALID[variant]()
    result = fx.ingest(ctx, seg)
    assert (result.outcome.status.code, result.action) == (0x0000, "annotation")
    annotation = fx.annotation_of(ctx, str(seg.SOPInstanceUID))
    assert fx.current_findings(ctx, annotation) == []
    with ctx.index.read() as conn:
        state, person = conn.execute("SELECT state, annotator_person FROM annotation WHERE id = ?",
                                     (annotation,)).fetchone()
        indexed = conn.execute("SELECT COUNT(*) FROM instance WHERE sop_instance_uid = ?",
                               (str(seg.SOPInstanceUID),)).fetchone()[0]
    assert (state, person, indexed) == ("checked", "Reader^One", 1)
    again = fx.ingest(ctx, seg)
    assert (again.outcome.status.code, again.action) == (0x0000, "annotation-resend")


def test_a_seg_uid_resent_with_other_bytes_is_a_conflict(ctx) -> None:
    seg = fx.valid_seg()
    assert fx.ingest(ctx, seg).action == "annotation"
    changed = copy.deepcopy(seg)
    changed.ContentLabel = "CHANGED"
    result = fx.ingest(ctx, changed)
    assert (result.outcome.status.code, result.action) == (0x0111, "conflict")
