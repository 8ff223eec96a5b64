"""SEG intake: every kind of SEG becomes the same masks, voxel for voxel, with no finding.

The reading tests draw on the phantom series itself; the intake tests send SEGs
drawn on the series the node serves (stored de-identified from the PACS) from
the annotator's workstation.
"""

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


#: Each builder takes the series the SEG is drawn on.
VALID = {
    **fx.VALID_SEGS,
    "labelmap, frames permuted": lambda s: fx.permute_frames(fx.valid_seg(s, seg_type="LABELMAP")),
}


@pytest.mark.parametrize("variant", list(VALID))
def test_every_seg_variant_reads_as_the_ground_truth(variant: str) -> None:
    masks = _masks(VALID[variant](fx.PHANTOM))
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


@pytest.fixture(scope="module")
def served(ctx) -> fx.Served:
    return fx.served(ctx)


@pytest.mark.parametrize("variant", list(VALID))
def test_valid_segs_are_stored_indexed_and_checked_without_findings(ctx, served,
                                                                    variant: str) -> None:
    seg = VALID[variant](served)
    result = fx.ingest(ctx, seg)
    assert (result.outcome.status.code, result.action) == (0x0000, "annotation")
    annotation = fx.annotation_of(ctx, str(seg.SOPInstanceUID))
    assert fx.current_findings(ctx, annotation) == []
    with ctx.index.connection() as conn:
        state, person = conn.execute("SELECT state, annotator_person FROM annotation WHERE id = ?",
                                     (annotation,)).fetchone()
        indexed = conn.execute("SELECT COUNT(*) FROM instance WHERE sop_instance_uid = ?",
                               (str(seg.SOPInstanceUID),)).fetchone()[0]
    assert (state, person, indexed) == ("checked", "Reader^One", 1)
    again = fx.ingest(ctx, seg)
    assert (again.outcome.status.code, again.action) == (0x0000, "annotation-resend")


def test_a_seg_uid_resent_with_other_bytes_is_a_conflict(ctx, served) -> None:
    seg = fx.valid_seg(served)
    assert fx.ingest(ctx, seg).action == "annotation"
    changed = copy.deepcopy(seg)
    changed.ContentLabel = "CHANGED"
    result = fx.ingest(ctx, changed)
    assert (result.outcome.status.code, result.action) == (0x0111, "conflict")


def test_a_seg_drawn_on_the_pacs_original_is_moved_onto_the_pseudonyms(ctx, served) -> None:
    """The annotator's tool had the study from the PACS: its SEG references the original
    UIDs and names the patient. The annotator route moves it onto the stored study,
    de-identifies it, and keeps what that learnt, as for any instance it stores."""
    seg = fx.valid_seg(fx.PHANTOM)
    result = fx.ingest(ctx, seg)
    assert (result.outcome.status.code, result.action) == (0x0000, "annotation")
    uid = ctx.key.uid(str(seg.SOPInstanceUID))
    assert result.sop_instance_uid == uid
    stored = ctx.annotations.stored_slice(uid, pixels=False)
    assert stored.ReferencedSeriesSequence[0].SeriesInstanceUID == served.series_uid
    assert (stored.PatientID, stored.StudyInstanceUID) == (served.slice(0).PatientID,
                                                           served.study_uid)
    assert fx.current_findings(ctx, fx.annotation_of(ctx, uid)) == []
    with ctx.index.reader() as reader:
        assert ctx.ingest.router.reid_map.knows_uid(reader, uid)  # `lamina reidentify` finds it
    with ctx.index.connection() as conn:
        route = conn.execute("SELECT route FROM deid_evidence WHERE sop_instance_uid = ?",
                             (uid,)).fetchone()
    assert route is not None and route[0] == "annotator"  # `lamina deid report` lists it
