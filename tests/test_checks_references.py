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
from pydicom import dcmread
from pydicom.uid import CTImageStorage

from node import status
from node.annotations.grid import SeriesGrid
from node.annotations.seg import read_seg
from node.checks.references import Refusal, check_seg
from node.ingest.types import Source
from node.phantom import Phantom
from tests import annotation_fixtures as fx


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    context = fx.open_node(tmp_path_factory.mktemp("refs"))
    yield context
    context.close()


@pytest.fixture(scope="module")
def served(ctx) -> fx.Served:
    return fx.served(ctx)


def _quarantine_reasons(ctx) -> list[str]:
    with ctx.index.connection() as conn:
        return [r[0] for r in conn.execute("SELECT reason FROM quarantine ORDER BY id")]


def _assert_quarantined_as_refused(ctx, ds, result, check: str) -> None:
    """The newest quarantine entry is this object's refusal, as ``quarantine show`` gives it:
    who sent it, what a release re-applies (its bytes already went through their
    route, so ``deidentified``: stored as they are), what it is, and why."""
    entry = ctx.quarantine.list()[-1]
    assert (entry.reason, entry.status_code) == (result.outcome.comment, 0xA900)
    assert [(f["rule"], f["message"]) for f in entry.findings] == [(check,
                                                                    result.outcome.comment)]
    assert (entry.calling_ae, entry.address, entry.route) == ("ANNOTATOR", "127.0.0.1",
                                                              "deidentified")
    assert (entry.sop_class_uid, entry.sop_instance_uid, entry.series_instance_uid) == (
        str(ds.SOPClassUID), str(ds.SOPInstanceUID), str(ds.SeriesInstanceUID))
    assert (entry.sha256, entry.sealed) == (result.sha256, False)  # de-identified bytes
    assert ctx.quarantine.store_of(entry).local_path(entry.sha256).is_file()


def test_the_catalogue_has_one_variant_per_reference_check() -> None:
    assert tuple(sorted(fx.seg_refusal_variants())) == fx.SEG_REFUSAL_CHECKS
    assert tuple(sorted(fx.overlay_refusal_variants())) == fx.OVERLAY_REFUSAL_CHECKS


#: The checks that fail only because something is not stored (yet): the SEG waits.
WAITS = ("instances", "series")


@pytest.mark.parametrize("check", [c for c in fx.SEG_REFUSAL_CHECKS if c not in WAITS])
def test_each_seg_defect_is_refused_by_its_check(ctx, served, check: str) -> None:
    seg = fx.seg_refusal_variants(served)[check]
    result = fx.ingest(ctx, seg)
    assert result.outcome.status is status.DOES_NOT_MATCH_SOP_CLASS
    assert result.action == "refused"
    assert result.outcome.comment.startswith(f"{check}: ")
    assert len(status.shorten(result.outcome.comment)) <= 64
    _assert_quarantined_as_refused(ctx, seg, result, check)
    annotation = fx.annotation_of(ctx, str(seg.SOPInstanceUID))
    with ctx.index.connection() as conn:
        row = conn.execute("SELECT state FROM annotation WHERE id = ?", (annotation,)).fetchone()
        indexed = conn.execute("SELECT COUNT(*) FROM instance WHERE sop_instance_uid = ?",
                               (str(seg.SOPInstanceUID),)).fetchone()[0]
    assert row[0] == "refused" and indexed == 0


@pytest.mark.parametrize("check", fx.OVERLAY_REFUSAL_CHECKS)
def test_each_overlay_defect_is_refused_by_its_check(ctx, served, check: str) -> None:
    copy_ = fx.overlay_refusal_variants(served)[check]
    result = fx.ingest(ctx, copy_)
    assert result.outcome.status is status.DOES_NOT_MATCH_SOP_CLASS
    assert result.outcome.comment.startswith(f"{check}: ")
    assert "slice 21" in result.outcome.comment
    assert len(result.outcome.comment) <= 64
    _assert_quarantined_as_refused(ctx, copy_, result, check)
    with ctx.index.connection() as conn:
        stored = conn.execute("SELECT blob_sha256 FROM instance WHERE sop_instance_uid = ?",
                              (str(copy_.SOPInstanceUID),)).fetchone()[0]
    again = fx.ingest(ctx, fx.PHANTOM.slice(20), fx.PACS)  # the slice is untouched
    assert (again.action, again.sha256) == ("resend", stored)


def test_plane_position_names_the_frame_and_its_depth(ctx, served) -> None:
    seg = fx.seg_refusal_variants(served)["plane-position"]
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


def test_seg_without_referenced_series_sequence_is_refused(ctx, served) -> None:
    seg = copy.deepcopy(fx.valid_seg(served))
    del seg.ReferencedSeriesSequence
    result = fx.ingest(ctx, seg)
    assert result.outcome.comment == "series: ReferencedSeriesSequence missing"


def test_a_series_that_is_not_one_grid_refuses_its_annotations(ctx) -> None:
    odd = Phantom(seed="odd-geometry", slices_count=3, rows=64, columns=64, pixel_spacing=5.6)
    slices = [odd.slice(k) for k in range(3)]
    slices[1].ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
    for ds in slices:
        assert fx.ingest(ctx, ds, fx.PACS).action == "stored"  # one slice is not on the grid
    # The annotator draws on the series as the node serves it, on the two slices
    # that share an orientation (highdicom will not build a SEG across orientations).
    headers = []
    for ds in map(dcmread, _stored_blobs(ctx, ctx.key.uid(odd.series_uid))):
        del ds.PixelData
        if [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]:
            headers.append(ds)
    assert len(headers) == 2
    seg = hd.seg.Segmentation(
        headers, (odd.pixels(0)[None] > 1024).repeat(2, axis=0).astype("uint8"),
        hd.seg.SegmentationTypeValues.BINARY, [fx.description(1, "Nodule 1")], hd.UID(), 1,
        hd.UID(), 1, "t", "t", "1", "1")
    result = fx.ingest(ctx, seg)
    assert result.outcome.comment.startswith("series-geometry: ")
    assert "orientation" in result.outcome.comment


def _stored_blobs(ctx, series_uid: str) -> list:
    with ctx.index.connection() as conn:
        return [ctx.blobs.local_path(sha) for (sha,) in conn.execute(
            "SELECT i.blob_sha256 FROM instance i JOIN series s ON s.id = i.series_fk"
            " WHERE s.series_instance_uid = ? ORDER BY i.id", (series_uid,))]


@pytest.mark.parametrize("check", WAITS)
def test_a_seg_whose_images_are_not_stored_waits_pending(ctx, served, check: str) -> None:
    seg = fx.seg_refusal_variants(served)[check]
    result = fx.ingest(ctx, seg)
    assert (result.outcome.status, result.action) == (status.SUCCESS, "annotation")
    annotation = fx.annotation_of(ctx, str(seg.SOPInstanceUID))
    with ctx.index.reader() as r:
        row = r.annotations.get(annotation)
    assert (row["state"], row["state_reason"].split(":")[0]) == ("pending", check)


def test_an_image_with_overlays_that_annotates_nothing_stored(ctx) -> None:
    """From an annotator it is an overlay copy whose slice has not come (yet): it waits,
    not indexed as an image. From a peer that is not an annotator it is an image."""
    other = Phantom(seed="unrelated", slices_count=2, rows=64, columns=64, pixel_spacing=5.6)
    ds = fx.overlay_copy(0, [(0x6000, "Nodule 1", other.pixels(0) > 1024)], other)
    assert ds.SOPClassUID == CTImageStorage
    result = fx.ingest(ctx, ds)  # from the annotator
    assert (result.outcome.status, result.action) == (status.SUCCESS, "annotation")
    with ctx.index.reader() as r:
        row = r.annotations.get(fx.annotation_of(ctx, result.sop_instance_uid))
        assert r.instances.blob_of(result.sop_instance_uid) is None
    assert (row["kind"], row["state"]) == ("overlay", "pending")
    assert row["state_reason"] == "instances: the slice an overlay copy annotates is not stored"
    image = fx.overlay_copy(1, [(0x6000, "Nodule 1", other.pixels(1) > 1024)], other)
    archive = Source("ARCHIVE", "127.0.0.1", "unit-tests", route="deidentified")
    stored = fx.ingest(ctx, image, archive)
    assert stored.action == "stored"
    assert 0x60003000 in dcmread(ctx.blobs.local_path(stored.sha256))


def test_a_seg_whose_pixels_do_not_decode_is_refused_not_crashed_on(ctx, served) -> None:
    seg = fx.undecodable_seg(served)
    result = fx.ingest(ctx, seg)
    assert result.outcome.status is status.DOES_NOT_MATCH_SOP_CLASS
    assert result.outcome.comment.startswith("seg-format: cannot decode"), result.outcome.comment
    assert result.action == "refused"


def _filed(ctx, sop_instance_uid: str) -> tuple[int, int]:
    """(annotation objects, instances) the index holds for a SOP Instance UID."""
    with ctx.index.connection() as conn:
        return tuple(conn.execute(f"SELECT COUNT(*) FROM {table} WHERE sop_instance_uid = ?",
                                  (sop_instance_uid,)).fetchone()[0]
                     for table in ("annotation_object", "instance"))


@pytest.mark.parametrize("defect, comment", [
    ("no SegmentSequence", "SegmentSequence (0062,0002) missing (Type 1)"),
    ("pixel data cut short", "PixelData (7FE0,0010) length 100, expected "),
])
def test_a_seg_that_is_not_its_iod_is_refused_by_validation_first(ctx, served, defect,
                                                                   comment) -> None:
    """Validation runs on every object before its route: a SEG breaking a rejecting
    rule is quarantined with that finding and never reaches the annotation checks."""
    seg = copy.deepcopy(fx.valid_seg(served))
    if defect == "no SegmentSequence":
        del seg.SegmentSequence
    else:
        seg.PixelData = seg.PixelData[:100]
    result = fx.ingest(ctx, seg)
    assert (result.outcome.status, result.action) == (status.DOES_NOT_MATCH_SOP_CLASS,
                                                      "quarantined")
    assert result.outcome.comment.startswith(comment), result.outcome.comment
    assert _quarantine_reasons(ctx)[-1] == result.outcome.comment
    assert _filed(ctx, str(seg.SOPInstanceUID)) == (0, 0)
