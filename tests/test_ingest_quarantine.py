"""Quarantine (node.ingest.quarantine): refused bytes are kept with why, nothing is deleted,
release is audited; and the ``lamina quarantine`` commands."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import pytest
from pydicom import dcmread

from node.audit.trail import Actor
from node.config import load
from node.context import NodeContext
from node.ingest.quarantine import QuarantineError
from node.ingest.types import Source
from node.phantom import Phantom
from node.reports import fsck
from tests.harness import TEST_AET, InProcessNode, as_file, lamina, peer, write_config

SOURCE = Source("TESTSCU", "127.0.0.1", "assoc-1")
REVIEWER = Actor(user="reviewer")


def slice_of(seed: str, index: int = 0):
    return Phantom(seed=seed, slices_count=3, rows=16, columns=16).slice(index)


@pytest.fixture
def config(tmp_path: Path) -> Path:
    peers = {"scu": peer(TEST_AET, "store", port=11113),
             "dcmtk": peer("STORESCU", "store", port=11114)}
    return write_config(tmp_path, peers=peers).path


@pytest.fixture
def ctx(config: Path):
    context = NodeContext.open(load(config, environ={}), with_key=True)
    yield context
    context.close()


def refused(ctx: NodeContext, seed: str = "q") -> tuple[int, bytes]:
    ds = slice_of(seed)
    del ds.Rows
    data = as_file(ds)
    result = ctx.ingest.ingest_bytes(data, SOURCE)
    assert result.action == "quarantined" and result.outcome.status.code == 0xA900
    return result.quarantine_id, data


def audit_actions(ctx: NodeContext) -> list[str]:
    with ctx.index.connection() as conn:
        return [a for (a,) in conn.execute("SELECT action FROM audit_event ORDER BY seq")]


def test_refused_instance_is_kept_with_sender_reason_and_findings(ctx):
    qid, data = refused(ctx)
    [entry] = ctx.quarantine.list()
    assert entry.id == qid and entry.status_code == 0xA900
    assert entry.reason == "Rows (0028,0010) missing (Type 1)"
    assert (entry.calling_ae, entry.address, entry.association_id) == (
        "TESTSCU", "127.0.0.1", "assoc-1")
    # The row names the pseudonym: an original UID identifies, and rows are not sealed.
    assert entry.sop_instance_uid == ctx.key.uid(slice_of("q").SOPInstanceUID)
    assert entry.findings[0]["rule"] == "type1_missing"
    # Content-addressed in the quarantine area, not in the blob store that serves
    # retrievals, and sealed: what a clinical peer sent carries PHI.
    path = ctx.quarantine.store_of(entry).local_path(entry.sha256)
    kept = path.read_bytes()
    assert path.name == hashlib.sha256(kept).hexdigest() and entry.sealed
    assert slice_of("q").PatientName.encode() not in kept
    assert ctx.quarantine.bytes_of(entry) == data
    assert "quarantine" in path.parts and not ctx.blobs.exists(entry.sha256)
    assert audit_actions(ctx) == ["instance.quarantined"]


def test_release_reruns_the_pipeline_with_an_audited_override(ctx):
    qid, _ = refused(ctx)
    result = ctx.quarantine.release(qid, "vendor confirmed Rows", REVIEWER, ctx.ingest)
    assert result.action == "stored" and result.outcome.status.is_success
    entry = ctx.quarantine.show(qid)
    assert entry.released_by == "reviewer" and entry.release_reason == "vendor confirmed Rows"
    assert ctx.quarantine.store_of(entry).local_path(entry.sha256).is_file()  # nothing deleted
    assert ctx.quarantine.list() == [] and len(ctx.quarantine.list(include_released=True)) == 1
    with ctx.index.connection() as conn:
        finding = conn.execute("SELECT rule, severity FROM finding").fetchall()
        released = conn.execute("SELECT actor, object FROM audit_event"
                                " WHERE action = 'quarantine.released'").fetchone()
    assert [tuple(f) for f in finding] == [("type1_missing", "reject")]  # kept, overridden
    assert json.loads(released["actor"]) == {"user": "reviewer"}
    assert json.loads(released["object"])["quarantine_id"] == qid
    assert audit_actions(ctx)[-2:] == ["instance.stored", "quarantine.released"]
    assert ctx.audit.verify().ok


def test_release_twice_or_without_reason_is_refused(ctx):
    qid, _ = refused(ctx)
    with pytest.raises(QuarantineError, match="needs a reason"):
        ctx.quarantine.release(qid, "  ", REVIEWER, ctx.ingest)
    ctx.quarantine.release(qid, "checked", REVIEWER, ctx.ingest)
    with pytest.raises(QuarantineError, match="already released"):
        ctx.quarantine.release(qid, "again", REVIEWER, ctx.ingest)
    with pytest.raises(QuarantineError, match="no quarantine entry 99"):
        ctx.quarantine.release(99, "x", REVIEWER, ctx.ingest)


def test_unparseable_bytes_cannot_be_released_and_stay(ctx):
    garbage = b"\x00" * 128 + b"DICM" + b"\x02\x00\x10\x00UI\x04\x00junk" + b"\xff" * 64
    result = ctx.ingest.ingest_bytes(garbage, SOURCE)
    assert result.outcome.status.code == 0xC000 and result.action == "quarantined"
    release = ctx.quarantine.release(result.quarantine_id, "try", REVIEWER, ctx.ingest)
    assert release.outcome.status.code == 0xC000
    entry = ctx.quarantine.show(result.quarantine_id)
    assert entry.released_at is None and ctx.quarantine.bytes_of(entry) == garbage
    assert len(ctx.quarantine.list()) == 1  # no second entry for the failed release


def test_export_copies_the_bytes_and_is_audited(ctx, tmp_path):
    qid, data = refused(ctx)
    target = ctx.quarantine.export(qid, tmp_path, REVIEWER)
    assert target.read_bytes() == data and target.name.endswith(".dcm")
    kept = ctx.quarantine.show(qid)
    assert ctx.quarantine.store_of(kept).local_path(kept.sha256).is_file()
    assert audit_actions(ctx)[-1] == "quarantine.exported"


def test_conflict_found_inside_the_transaction_is_quarantined_without_loss(ctx, config):
    first, second = slice_of("study", 0), slice_of("study", 1)
    second.PatientID = "OTHER"
    assert ctx.ingest.ingest_bytes(as_file(first), SOURCE).action == "stored"
    result = ctx.ingest.ingest_bytes(as_file(second), SOURCE)
    assert result.action == "quarantined" and result.outcome.status.code == 0xA900
    entry = ctx.quarantine.show(result.quarantine_id)
    assert entry.findings[0]["rule"] == "patient_conflict"
    # Refused after de-identification: the kept bytes are the de-identified object.
    kept = dcmread(ctx.quarantine.store_of(entry).local_path(entry.sha256))
    assert not entry.sealed and kept.PatientIdentityRemoved == "YES"
    assert entry.route == "deidentified"  # a release stores these bytes as they are
    assert kept.SOPInstanceUID == ctx.key.uid(second.SOPInstanceUID)
    with ctx.index.connection() as conn:
        assert conn.execute("SELECT count(*) FROM instance").fetchone()[0] == 1
    report = fsck(ctx.settings)
    assert report.clean and report.unreferenced == []


def test_cli_list_show_release_export(ctx, config, tmp_path):
    qid, data = refused(ctx)
    listed = lamina("quarantine", "list", config=config)
    assert listed.exit_code == 0
    assert f"{qid:>6}" in listed.stdout
    assert "0xA900  Rows (0028,0010) missing (Type 1)" in listed.stdout
    shown = lamina("quarantine", "show", str(qid), config=config)
    assert "calling_ae           TESTSCU" in shown.stdout
    assert "[type1_missing] Rows (0028,0010) missing (Type 1)" in shown.stdout
    out = tmp_path / "out.dcm"
    exported = lamina("quarantine", "export", str(qid), str(out), config=config)
    assert exported.exit_code == 0 and out.read_bytes() == data
    released = lamina("quarantine", "release", str(qid), "--reason", "checked",
                      "--user", "reviewer", config=config)
    assert released.exit_code == 0 and "stored (0x0000)" in released.stdout
    again = lamina("quarantine", "release", str(qid), "--reason", "checked", config=config)
    assert again.exit_code == 2 and "already released" in again.stderr
    status = lamina("status", config=config)
    assert "quarantine_waiting     0" in status.stdout
    assert "instance_findings      type1_missing 1" in status.stdout
    instance = lamina("check", "instance", ctx.key.uid(slice_of("q").SOPInstanceUID),
                      config=config)
    assert instance.exit_code == 1 and "stored" in instance.stdout
    assert "reject [type1_missing]" in instance.stdout


def test_validation_can_be_switched_off(ctx, config):
    off = dataclasses.replace(ctx.settings, validation=dataclasses.replace(
        ctx.settings.validation, enabled=False))
    plain = NodeContext.open(off, migrate=False, with_key=True)
    try:
        ds = slice_of("off")
        del ds.Rows
        assert plain.ingest.ingest_bytes(as_file(ds), SOURCE).action == "stored"
    finally:
        plain.close()


def test_identical_refused_resends_are_one_counted_entry_over_real_associations(tmp_path):
    """Three associations send the same refused bytes: one entry received three times;
    once a person releases it, the same bytes again are answered as already stored."""
    ds = slice_of("resent")
    del ds.Rows
    path = tmp_path / "refused.dcm"
    path.write_bytes(as_file(ds))
    config = write_config(tmp_path / "node", peers={"scu": peer(TEST_AET, "store", port=11113)})
    with InProcessNode(config) as node:
        for _ in range(3):
            [response] = node.store([path])
            assert (response.status, response.comment) == (
                0xA900, "Rows (0028,0010) missing (Type 1)")
        [entry] = node.ctx.quarantine.list()
        assert entry.times_received == 3 and entry.last_received_at >= entry.received_at
        assert node.rows("SELECT count(*) FROM quarantine") == [(1,)]
        listed = node.cli("quarantine", "list")
        assert "[received 3 times, last " in listed.stdout and "1 entry" in listed.stdout
        assert node.audit_actions().count("instance.quarantined-again") == 2

        released = node.cli("quarantine", "release", str(entry.id), "--reason", "checked",
                            "--user", "reviewer")
        assert released.exit_code == 0, released.output
        [again] = node.store([path])
        assert (again.status, again.comment) == (0x0000, "")
        assert node.rows("SELECT count(*) FROM quarantine") == [(1,)]
        assert node.rows("SELECT count(*) FROM instance") == [(1,)]
        resend = node.audit_events("instance.resend")[-1]["object"]
        assert resend["released_quarantine_id"] == entry.id
        assert resend["sop_instance_uid"] == node.project_key().uid(ds.SOPInstanceUID)


def test_identical_unparseable_bytes_are_one_entry(ctx):
    garbage = b"\x00" * 128 + b"DICM" + b"\x02\x00\x10\x00UI\x04\x00junk" + b"\xff" * 64
    first = ctx.ingest.ingest_bytes(garbage, SOURCE)
    second = ctx.ingest.ingest_bytes(garbage, SOURCE)
    assert first.quarantine_id == second.quarantine_id
    assert second.outcome.status.code == 0xC000
    [entry] = ctx.quarantine.list()
    assert entry.times_received == 2
    other = ctx.ingest.ingest_bytes(garbage + b"\x00\x00", SOURCE)
    assert other.quarantine_id != first.quarantine_id and len(ctx.quarantine.list()) == 2
