"""Reference checks: each defective variant is refused by exactly its check and quarantined.

In-process (the node's own context and services, no sockets) so a failure
points at the check; tests/e2e/test_annotations.py sends the same objects
over real associations.
"""

from __future__ import annotations

import copy

import highdicom as hd
import numpy as np
import pytest
from pydicom.uid import CTImageStorage

from node import status
from node.annotations.grid import SeriesGrid
from node.annotations.seg import read_seg
from node.checks.references import Refusal, check_seg
from node.phantom import Phantom
from tests import annotation_fixtures as fx


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    context = fx.open_node(tmp_path_factory.mktemp("refs"))
    yield context
    context.close()


def _quarantine_reasons(ctx) -> list[str]:
    with ctx.index.read() as conn:
        return [r[0] for r in conn.execute("SELECT reason FROM quarantine ORDER BY id")]


def test_the_catalogue_has_one_variant_per_reference_check() -> None:
    assert tuple(sorted(fx.seg_refusal_variants())) == fx.SEG_REFUSAL_CHECKS
    assert tuple(sorted(fx.overlay_refusal_variants())) == fx.OVERLAY_REFUSAL_CHECKS


@pytest.mark.parametrize("check", fx.SEG_REFUSAL_CHECKS)
def test_each_seg_defect_is_refused_by_its_check(ctx, check: str) -> None:
    seg = fx.seg_refusal_variants()[check]
    result = fx.ingest(ctx, seg)
    assert result.outcome.status is status.DOES_NOT_MATCH_SOP_CLASS
    assert result.action == "refused"
    assert result.outcome.comment.startswith(f"{check}: ")
    assert len(status.shorten(result.outcome.comment)) <= 64
    assert _quarantine_reasons(ctx)[-1] == result.outcome.comment
    annotation = fx.annotation_of(ctx, str(seg.SOPInstanceUID))
    with ctx.index.read() as conn:
        row = conn.execute("SELECT state FROM annotation WHERE id = ?", (annotation,)).fetchone()
        indexed = conn.execute("SELECT COUNT(*) FROM instance WHERE sop_instance_uid = ?",
                               (str(seg.SOPInstanceUID),)).fetchone()[0]
    assert row[0] == "refused" and indexed == 0


@pytest.mark.parametrize("check", fx.OVERLAY_REFUSAL_CHECKS)
def test_each_overlay_defect_is_refused_by_its_check(ctx, check: str) -> None:
    copy_ = fx.overlay_refusal_variants()[check]
    result = fx.ingest(ctx, copy_)
    assert result.outcome.status is status.DOES_NOT_MATCH_SOP_CLASS
    assert result.outcome.comment.startswith(f"{check}: ")
    assert "slice 21" in result.outcome.comment
    assert len(result.outcome.comment) <= 64
    with ctx.index.read() as conn:
        stored = conn.execute("SELECT blob_sha256 FROM instance WHERE sop_instance_uid = ?",
                              (str(copy_.SOPInstanceUID),)).fetchone()[0]
    assert stored == fx.ingest(ctx, fx.PHANTOM.slice(20)).sha256  # the slice is untouched


def test_plane_position_names_the_frame_and_its_depth(ctx) -> None:
    seg = fx.seg_refusal_variants()["plane-position"]
    result = fx.ingest(ctx, seg)
    assert "frame 2 @" in result.outcome.comment and "on no slice" in result.outcome.comment


def test_float32_positions_pass_within_tolerance_and_fail_outside_it() -> None:
    grid = SeriesGrid.from_headers(fx.headers())
    seg = fx.float32_positions(fx.valid_seg())
    obj = read_seg(copy.deepcopy(seg))
    placement = check_seg(obj, grid, 0.01)
    covered = sorted({int(k) for m in fx.truth() for k in np.flatnonzero(m.any(axis=(1, 2)))})
    assert sorted(set(placement.values())) == covered
    with pytest.raises(Refusal, match="plane-position"):
        check_seg(read_seg(copy.deepcopy(seg)), grid, 1e-9)


def test_seg_without_referenced_series_sequence_is_refused(ctx) -> None:
    seg = copy.deepcopy(fx.valid_seg())
    del seg.ReferencedSeriesSequence
    result = fx.ingest(ctx, seg)
    assert result.outcome.comment == "series: ReferencedSeriesSequence missing"


def test_a_series_that_is_not_one_grid_refuses_its_annotations(ctx) -> None:
    odd = Phantom(seed="odd-geometry", slices_count=3, rows=64, columns=64, pixel_spacing=5.6)
    slices = [odd.slice(k) for k in range(3)]
    slices[1].ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
    for ds in slices:
        assert fx.ingest(ctx, ds).action == "stored"
    headers = []
    for ds in [odd.slice(k) for k in range(3)]:
        del ds.PixelData
        headers.append(ds)
    seg = hd.seg.Segmentation(
        headers, (odd.pixels(0)[None] > 1024).repeat(3, axis=0).astype("uint8"),
        hd.seg.SegmentationTypeValues.BINARY, [fx.description(1, "Nodule 1")], hd.UID(), 1,
        hd.UID(), 1, "t", "t", "1", "1")
    result = fx.ingest(ctx, seg)
    assert result.outcome.comment.startswith("series-geometry: ")
    assert "orientation" in result.outcome.comment


def test_an_image_with_overlays_that_annotates_nothing_stored_is_an_instance(ctx) -> None:
    other = Phantom(seed="unrelated", slices_count=1, rows=64, columns=64, pixel_spacing=5.6)
    ds = fx.overlay_copy(0, [(0x6000, "Nodule 1", other.pixels(0) > 1024)], phantom=other)
    assert ds.SOPClassUID == CTImageStorage
    assert fx.ingest(ctx, ds).action == "stored"


def test_a_seg_whose_pixels_do_not_decode_is_refused_not_crashed_on(ctx) -> None:
    seg = copy.deepcopy(fx.valid_seg())
    seg.PixelData = seg.PixelData[:100]
    result = fx.ingest(ctx, seg)
    assert result.outcome.status is status.DOES_NOT_MATCH_SOP_CLASS
    assert result.outcome.comment.startswith("seg-format: ")
