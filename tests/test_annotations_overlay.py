"""Overlay intake: Horos-pipeline copies become structures grouped by label across slices.

The series comes in from the PACS and is stored de-identified; the annotator
draws on the slices the node serves and sends the copies back from its
workstation (the ``annotator`` route, which keeps their overlays).
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from node import config
from node.annotations.overlay import read_planes
from node.annotations.settle import SettleQueue
from node.audit.trail import Actor
from node.context import NodeContext
from tests import annotation_fixtures as fx


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    context = fx.open_node(tmp_path_factory.mktemp("overlay"))
    yield context
    context.close()


@pytest.fixture(scope="module")
def served(ctx) -> fx.Served:
    return fx.served(ctx)


def _send_all(ctx, copies) -> int:
    for ds in copies:
        result = fx.ingest(ctx, ds)
        assert (result.outcome.status.code, result.action) == (0x0000, "annotation"), \
            result.outcome.comment
    return fx.annotation_of(ctx, str(copies[-1].SOPInstanceUID))


def test_planes_are_read_with_their_labels_and_fallback_names() -> None:
    plane = fx.truth()[0][20]
    ds = fx.overlay_copy(20, [(0x6000, "Nodule 1", plane), (0x6004, None, plane)])
    planes = read_planes(ds)
    assert [(p.group, p.structure_label) for p in planes] == [(0x6000, "Nodule 1"),
                                                               (0x6004, "overlay 6004")]
    assert all(p.length_fits for p in planes)


def test_rois_switching_groups_form_one_structure_per_label(ctx, served) -> None:
    copies = fx.rotating_overlays(fx.truth(), fx.LABELS, series=served)
    groups_of_bone = {p.group for ds in copies for p in read_planes(ds) if p.label == "Bone"}
    assert len(groups_of_bone) > 1  # the same ROI sits in different groups on different slices
    annotation = _send_all(ctx, copies)
    assert fx.current_findings(ctx, annotation) == []
    _, masks = ctx.annotations.masks_of(annotation)
    by_label = {m.label: m for m in masks}
    assert sorted(by_label) == sorted(fx.LABELS)
    for label, truth in zip(fx.LABELS, fx.truth(), strict=True):
        assert np.array_equal(by_label[label].array, truth), label
        assert by_label[label].annotator.person == "Reader^Horos"
    assert by_label["Bone"].type.value == "272673000"  # the protocol class's code
    with ctx.index.connection() as conn:
        stored = conn.execute("SELECT COUNT(*) FROM instance").fetchone()[0]
        row = conn.execute("SELECT kind, state, annotator_person FROM annotation WHERE id = ?",
                           (annotation,)).fetchone()
    assert stored == fx.PHANTOM.slices_count  # no copy became (or replaced) an instance
    assert tuple(row) == ("overlay", "checked", "Reader^Horos")


def test_a_missing_slice_is_a_gap_and_a_newer_copy_supersedes(ctx, served) -> None:
    copies = fx.overlay_gap_copies(served)
    annotation = _send_all(ctx, copies)
    findings = fx.current_findings(ctx, annotation)
    assert [(f["check"], [s["slice"] for s in f["slices"]]) for f in findings] \
        == [("slice-gap", [15])]
    assert findings[0]["structure_id"] == "roi Nodule 2"
    fixed = fx.rotating_overlays([fx.truth()[2]], ["Nodule 2"], person="Reader^Gap",
                                 series=served)
    missing = next(c for c in fixed if int(c.InstanceNumber) == 15)
    assert fx.ingest(ctx, missing).action == "annotation"
    assert fx.current_findings(ctx, annotation) == []
    redrawn = fx.overlay_copy(14, [(0x6000, "Nodule 2", np.zeros((256, 256), bool))], served)
    redrawn.OperatorsName = "Reader^Gap"
    assert fx.ingest(ctx, redrawn).action == "annotation"  # slice 15 redrawn empty
    assert [f["check"] for f in fx.current_findings(ctx, annotation)] == ["slice-gap"]
    with ctx.index.connection() as conn:
        states = [r[0] for r in conn.execute(
            "SELECT state FROM annotation_object WHERE annotation_fk = ? AND slice_index = 14"
            " ORDER BY id", (annotation,))]
    assert states == ["superseded", "current"]


def test_identical_copy_resent_is_idempotent(ctx, served) -> None:
    copy_ = fx.rotating_overlays([fx.truth()[1]], ["Bone"], person="Reader^Twice",
                                 series=served)[0]
    assert fx.ingest(ctx, copy_).action == "annotation"
    assert fx.ingest(ctx, copy_).action == "annotation-resend"


def test_the_stored_slice_itself_resent_is_not_an_annotation(ctx, served) -> None:
    result = fx.ingest(ctx, served.slice(3))  # the annotator pushes the served slice back
    assert (result.outcome.status.code, result.action) == (0x0000, "resend")
    result = fx.ingest(ctx, fx.PHANTOM.slice(3), fx.PACS)  # the PACS sends it again
    assert (result.outcome.status.code, result.action) == (0x0000, "resend")


def test_a_copy_without_overlays_but_other_bytes_is_still_a_conflict(ctx, served) -> None:
    ds = served.slice(3)
    ds.SeriesDescription = "edited"
    assert fx.ingest(ctx, ds).action == "conflict"


def test_a_set_stays_received_until_it_settles_and_a_restart_checks_it(tmp_path) -> None:
    ctx = fx.open_node(tmp_path, settle_seconds=3600)
    try:
        served = fx.served(ctx)
        for ds in fx.overlay_gap_copies(served):
            assert fx.ingest(ctx, ds).action == "annotation"
        annotation = fx.annotation_of(ctx, served.sop_uid(13))
        with ctx.index.connection() as conn:
            state = conn.execute("SELECT state FROM annotation WHERE id = ?",
                                 (annotation,)).fetchone()[0]
        assert state == "received"
    finally:
        ctx.index.close()  # "crash": the pending check is never run by this context
    restarted = NodeContext.open(config.load(tmp_path / "node.toml"))
    try:
        assert restarted.annotations.check_received(Actor(user="test")) == 1
        assert [f["check"] for f in fx.current_findings(restarted, annotation)] == ["slice-gap"]
    finally:
        restarted.close()


def test_settle_queue_runs_a_job_once_per_burst_after_the_quiet_time() -> None:
    calls: list[tuple[str, object]] = []
    done = threading.Event()

    def job(key, context):
        calls.append((key, context))
        done.set()

    queue = SettleQueue(job, settle_seconds=0.2)
    queue.start()
    for i in range(5):
        queue.touch("set-1", i)
    assert queue.pending() == 1 and calls == []
    assert done.wait(5)
    assert calls == [("set-1", 4)]
    queue.touch("set-2")
    queue.flush()
    assert calls[-1] == ("set-2", None) and queue.pending() == 0
    queue.stop()
