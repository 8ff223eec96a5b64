"""Forwarding approved annotations (node/forward): the outbox written with the approval, the
worker's deliveries to real storage SCPs on 127.0.0.1, retries, dead letters, refusals.

The node here is a NodeContext in this process (not started: each test runs the worker's
passes itself with ``deliver_due``, with no backoff); the destination is pynetdicom's storage
SCP of the harness, or DCMTK's storescp for the re-identified route.
"""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import pytest
from pydicom import dcmread

from node.annotations.states import AnnotationState
from node.config import ConfigError
from node.context import NodeContext
from node.forward.queue import QueueError
from tests import annotation_fixtures as fx
from tests.forward_fixtures import (
    CT_CLASS,
    REVIEWER,
    SEG_CLASS,
    CountingSCP,
    Template,
    approve,
    audit,
    build_template,
    config,
    rows,
)
from tests.harness import free_port, lamina, stop_process, storescp


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Template:
    return build_template(tmp_path_factory.mktemp("forward-template"))


def open_node(template: Template, folder: Path, dest_port: int, rule: dict | None = None,
              **forward) -> NodeContext:
    """The template's node in ``folder`` (see :func:`tests.forward_fixtures.config`). The
    SEG's UID and annotation are ``ctx.seg_uid`` and ``ctx.seg_annotation``."""
    settings = template.copy(folder, dest_port, rule, **forward).settings()
    ctx = NodeContext.open(settings, with_key=True)
    ctx.seg_uid, ctx.seg_annotation = template.seg_uid, template.annotation_id
    return ctx


@pytest.fixture
def scp():
    with CountingSCP("DEST") as server:
        yield server


def test_an_approved_seg_is_queued_with_its_approval_and_delivered_once(template, tmp_path, scp) -> None:
    ctx = open_node(template, tmp_path / "node", scp.port)
    try:
        assert rows(ctx) == []  # checked, not approved: nothing queued
        approve(ctx, ctx.seg_annotation)
        [row] = rows(ctx)
        assert (row["kind"], row["mode"], row["state"], row["sop_instance_uid"]) == \
            ("seg", "stored", "queued", ctx.seg_uid)
        assert audit(ctx, "forward.queued")[0]["queued"][0]["seg"] == 1
        assert ctx.forwarder.deliver_due() == 1
        assert ctx.forwarder.deliver_due() == 0  # sent rows are never sent again
        assert scp.counts == {ctx.seg_uid: 1}
        _syntax, received = scp.got(ctx.seg_uid)
        stored = ctx.blobs.read(rows(ctx)[0]["blob_sha256"])
        assert stored.endswith(received)  # the stored bytes as they are
        [row] = rows(ctx)
        assert (row["state"], row["attempts"], row["last_status"]) == ("sent", 1, 0)
        [export] = audit(ctx, "export.forward")
        assert export["sent"][0]["uid"] == ctx.seg_uid and export["outcome"] == "success"
    finally:
        ctx.close()


def test_the_approval_and_its_rows_roll_back_together(template, tmp_path, scp) -> None:
    ctx = open_node(template, tmp_path / "node", scp.port)
    try:
        with pytest.raises(RuntimeError), ctx.index.transaction() as tx:
            ctx.states.move(tx, ctx.seg_annotation, AnnotationState.APPROVED, REVIEWER)
            assert len(tx.outbox.list()) == 1
            raise RuntimeError("the signature could not be stored")
        assert rows(ctx) == []
        approve(ctx, ctx.seg_annotation)
        with ctx.index.transaction() as tx:  # a second queueing of the same object: no-op
            assert tx.outbox.enqueue_annotation(ctx.seg_annotation, "again", "dest", "stored",
                                                "t", 0.0) == 0
        assert len(rows(ctx)) == 1
    finally:
        ctx.close()


def test_an_annotation_that_is_not_approved_is_never_sent(template, tmp_path, scp) -> None:
    ctx = open_node(template, tmp_path / "node", scp.port, rule={"source_series": True})
    try:
        with ctx.index.transaction() as tx:
            ctx.states.move(tx, ctx.seg_annotation, AnnotationState.REJECTED, REVIEWER,
                            reason="wrong lobe")
        assert rows(ctx) == [] and ctx.forwarder.deliver_due() == 0
        # A row whose annotation is no longer approved (here: forced back by hand).
        with ctx.index.transaction() as tx:
            assert tx.annotations.set_state(ctx.seg_annotation, "rejected", "approved", "t")
            tx.outbox.enqueue_annotation(ctx.seg_annotation, "to_dest", "dest", "stored", "t",
                                         0.0)
            assert tx.annotations.set_state(ctx.seg_annotation, "approved", "checked", "t")
        assert ctx.forwarder.deliver_due() == 0
        assert scp.counts == {}
        [row] = rows(ctx)
        assert row["state"] == "refused" and "not approved" in row["last_error"]
        [refused] = audit(ctx, "forward.refused")
        assert refused["outcome"] == "minor-failure" and refused["items"] == [row["id"]]
    finally:
        ctx.close()


def test_a_rule_for_another_class_queues_nothing(template, tmp_path, scp) -> None:
    ctx = open_node(template, tmp_path / "node", scp.port, rule={"class": "vessel"})
    try:
        approve(ctx, ctx.seg_annotation)  # nodules and bone, no vessel
        assert rows(ctx) == []
    finally:
        ctx.close()


def test_a_rule_naming_a_class_the_protocol_lacks_is_a_config_error(template, tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"forward\.rules\.to_dest\.class: 'liver' is not"):
        NodeContext.open(config(tmp_path, 1, {"class": "liver"}).settings())


def test_a_destination_that_refuses_is_retried_then_dead_lettered_with_its_reason(
        template, tmp_path) -> None:
    with CountingSCP("DEST", syntaxes={CT_CLASS: ["1.2.840.10008.1.2.1"]}) as ct_only:
        ctx = open_node(template, tmp_path / "node", ct_only.port)
        try:
            approve(ctx, ctx.seg_annotation)
            for attempt in (1, 2):
                assert ctx.forwarder.deliver_due() == 0
                [row] = rows(ctx)
                assert (row["state"], row["attempts"]) == ("failed", attempt)
            assert ctx.forwarder.deliver_due() == 0
            [row] = rows(ctx)
            assert (row["state"], row["attempts"]) == ("dead", 3)
            assert SEG_CLASS in row["last_error"] or "Segmentation" in row["last_error"]
            assert ctx.forwarder.deliver_due() == 0  # dead letters stay dead
            [dead] = audit(ctx, "forward.dead-letter")
            assert dead["items"][0]["error"] == row["last_error"]
            assert ct_only.counts == {}
        finally:
            ctx.close()


def test_a_failure_status_is_kept_and_a_warning_counts_as_delivered(template, tmp_path) -> None:
    with CountingSCP("DEST") as scp:
        ctx = open_node(template, tmp_path / "node", scp.port, max_attempts=2)
        try:
            scp.answers[ctx.seg_uid] = 0xA700
            approve(ctx, ctx.seg_annotation)
            ctx.forwarder.deliver_due()
            ctx.forwarder.deliver_due()
            [row] = rows(ctx)
            assert (row["state"], row["last_status"]) == ("dead", 0xA700)
            assert row["last_error"].startswith("0xA700")
            scp.answers[ctx.seg_uid] = 0xB007
            run = lamina("queue", "retry", str(row["id"]), config=tmp_path / "node" / "node.toml")
            assert run.exit_code == 0, run.output
            assert ctx.forwarder.deliver_due() == 1
            [row] = rows(ctx)
            assert (row["state"], row["last_status"], row["warning"]) == \
                ("sent", 0xB007, "0xB007")
            assert scp.counts[ctx.seg_uid] == 3  # two refusals, one delivery with a warning
        finally:
            ctx.close()


def test_a_destination_down_then_up_gets_the_seg_once(template, tmp_path) -> None:
    port = free_port()
    ctx = open_node(template, tmp_path / "node", port)
    try:
        approve(ctx, ctx.seg_annotation)
        assert ctx.forwarder.deliver_due() == 0
        [row] = rows(ctx)
        assert row["state"] == "failed" and row["last_status"] is None
        assert row["last_error"]  # why: the association could not be opened
        with CountingSCP("DEST", port=port) as scp:
            assert ctx.forwarder.deliver_due() == 1
            assert ctx.forwarder.deliver_due() == 0
        assert scp.counts == {ctx.seg_uid: 1}
        assert rows(ctx)[0]["state"] == "sent"
    finally:
        ctx.close()


def test_the_backoff_doubles_with_jitter_up_to_its_cap(template, tmp_path) -> None:
    ctx = NodeContext.open(config(tmp_path, 1, backoff_seconds=2.0,
                                  backoff_max_seconds=10.0).settings())
    try:
        waits = {n: [ctx.forwarder.backoff(n) for _ in range(200)] for n in (1, 2, 3, 6)}
        for n, cap in ((1, 2.0), (2, 4.0), (3, 8.0), (6, 10.0)):
            assert all(cap / 2 <= w <= cap for w in waits[n])
            assert len(set(waits[n])) > 100  # jittered, not a fixed delay
    finally:
        ctx.close()


def test_reidentified_seg_and_source_series_reach_storescp_on_the_original_uids(
        template, tmp_path) -> None:
    port = free_port()
    out = tmp_path / "received"
    process = storescp(port, out, "-uf", aet="DEST")  # -uf: files named by SOP Instance UID
    ctx = open_node(template, tmp_path / "node", port, rule={"reidentify": True, "source_series": True})
    try:
        approve(ctx, ctx.seg_annotation)
        queued = rows(ctx)
        assert Counter(r["kind"] for r in queued) == {"seg": 1, "source": fx.PHANTOM.slices_count}
        assert ctx.forwarder.deliver_due() == fx.PHANTOM.slices_count + 1
        [reid] = audit(ctx, "patient-record.reidentify")
        trail = json.dumps(audit(ctx, ""))
    finally:
        ctx.close()
        stop_process(process)
    files = {ds.SOPInstanceUID: ds for ds in (dcmread(p) for p in out.iterdir())}
    phantom = fx.PHANTOM
    originals = {phantom.sop_uid(k) for k in range(phantom.slices_count)}
    assert originals < set(files)  # the CT slices under their clinical UIDs
    ct = files[phantom.sop_uid(0)]
    assert (ct.PatientID, str(ct.PatientName), ct.StudyInstanceUID) == \
        (phantom.patient_id, phantom.patient_name, phantom.study_uid)
    [seg] = [ds for ds in files.values() if ds.SOPClassUID == SEG_CLASS]
    assert seg.SOPInstanceUID == ctx.seg_uid  # made after de-identification: its own UID
    assert (seg.StudyInstanceUID, seg.PatientID, seg.FrameOfReferenceUID) == \
        (phantom.study_uid, phantom.patient_id, ct.FrameOfReferenceUID)
    [series_ref] = seg.ReferencedSeriesSequence
    assert series_ref.SeriesInstanceUID == phantom.series_uid
    assert {i.ReferencedSOPInstanceUID for i in series_ref.ReferencedInstanceSequence} <= \
        originals
    frame_refs = {src.ReferencedSOPInstanceUID for frame in seg.PerFrameFunctionalGroupsSequence
                  for derivation in frame.DerivationImageSequence
                  for src in derivation.SourceImageSequence}
    assert frame_refs and frame_refs <= originals
    assert reid["purpose"] == "forward" and len(reid["items"]) == len(queued)
    assert phantom.patient_id not in trail and phantom.study_uid not in trail  # no PHI


def test_queue_commands_and_status_counts(template, tmp_path) -> None:
    port = free_port()
    ctx = open_node(template, tmp_path / "node", port)
    try:
        approve(ctx, ctx.seg_annotation)
        item = rows(ctx)[0]["id"]
        with pytest.raises(QueueError, match="is queued: only failed, dead or cancelled"):
            ctx.outbox.retry(item, REVIEWER)  # not yet tried
        ctx.forwarder.deliver_due()  # destination down: failed, will retry
    finally:
        ctx.close()
    cfg = tmp_path / "node" / "node.toml"
    listed = lamina("queue", "list", config=cfg)
    assert listed.exit_code == 0, listed.output
    assert f"{item}" in listed.stdout and "failed" in listed.stdout and "dest" in listed.stdout
    shown = lamina("queue", "show", str(item), config=cfg)
    assert shown.exit_code == 0 and "last_error" in shown.stdout
    status = lamina("status", config=cfg)
    assert "forward_dest" in status.stdout and "failed 1" in status.stdout
    cancelled = lamina("queue", "cancel", str(item), config=cfg)
    assert cancelled.exit_code == 0, cancelled.output
    again = lamina("queue", "cancel", str(item), config=cfg)
    assert again.exit_code == 2 and "is cancelled" in again.stderr
    missing = lamina("queue", "show", "999", config=cfg)
    assert missing.exit_code == 2 and "999 does not exist" in missing.stderr
    assert "cancelled 1" in lamina("status", config=cfg).stdout
    retried = lamina("queue", "retry", str(item), config=cfg)
    assert retried.exit_code == 0 and "queued again" in retried.stdout
    assert "queued 1, failed 0" in lamina("status", config=cfg).stdout
    ctx = NodeContext.open(config(tmp_path / "node", port).settings())
    try:
        assert [e["was"] for e in audit(ctx, "forward.cancel")] == ["failed"]
        assert [e["was"] for e in audit(ctx, "forward.retry")] == ["cancelled"]
    finally:
        ctx.close()


def test_an_overlay_annotation_leaves_as_a_seg_made_once(template, tmp_path, scp) -> None:
    ctx = open_node(template, tmp_path / "node", scp.port, {"reidentify": True})
    try:
        served = fx.served(ctx)
        for copy in fx.rotating_overlays(fx.truth(), fx.LABELS, person="Reader^Horos",
                                         series=served):
            assert fx.ingest(ctx, copy).action == "annotation"
        ctx.annotations.flush()
        annotation_id = fx.annotation_of(ctx, served.sop_uid(20))
        approve(ctx, annotation_id)
        [row] = rows(ctx)
        assert (row["kind"], row["blob_sha256"]) == ("seg", "")  # made at its first send
        scp.refuse_all = True
        assert ctx.forwarder.deliver_due() == 0
        scp.refuse_all = False
        assert ctx.forwarder.deliver_due() == 1
        [row] = rows(ctx)
        assert row["state"] == "sent" and row["sop_class_uid"] == SEG_CLASS
        assert set(scp.counts) == {row["sop_instance_uid"]}  # no overlay copy left the node
        first, second = scp.hashes[row["sop_instance_uid"]]
        assert first == second  # the retry sent the same SEG, not a new one
        _syntax, received = scp.got(row["sop_instance_uid"])
        sent = dcmread(io.BytesIO(received), force=True)
        assert (sent.StudyInstanceUID, sent.PatientID) == \
            (fx.PHANTOM.study_uid, fx.PHANTOM.patient_id)  # re-identified on its way out
        assert sent.ReferencedSeriesSequence[0].SeriesInstanceUID == fx.PHANTOM.series_uid
        seg = dcmread(ctx.blobs.open(row["blob_sha256"]))
        assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == served.series_uid
        assert len(seg.SegmentSequence) == 3
    finally:
        ctx.close()
    run = lamina("fsck", config=tmp_path / "node" / "node.toml")
    assert run.exit_code == 0 and "unreferenced" not in run.stdout  # the made SEG is kept


def test_a_destination_refusing_the_stored_syntax_gets_it_re_encoded(template,
                                                                     tmp_path) -> None:
    implicit = "1.2.840.10008.1.2"
    with CountingSCP("DEST", syntaxes={SEG_CLASS: [implicit]}) as scp:
        ctx = open_node(template, tmp_path / "node", scp.port)
        try:
            approve(ctx, ctx.seg_annotation)
            [row] = rows(ctx)
            assert row["transfer_syntax_uid"] != implicit  # stored explicit
            assert ctx.forwarder.deliver_due() == 1
            assert scp.got(ctx.seg_uid)[0] == implicit
            assert rows(ctx)[0]["state"] == "sent"
        finally:
            ctx.close()
