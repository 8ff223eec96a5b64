"""Double reading in-process (node.annotations.reading): who the rater is, which studies
are chosen, a consensus reading settling an adjudication, and the refusals."""

from __future__ import annotations

import json

import pytest

from node.annotations.reading import AdjudicationError, chosen_for_double_read, rater_id
from node.anonymize.keys import ProjectKey
from node.audit.trail import Actor
from node.context import NodeContext
from tests import annotation_fixtures as fx
from tests.harness import lamina, write_config

ADJUDICATOR = Actor(user="adjudicator")


def test_the_rater_is_the_user_identity_else_the_person_else_the_ae_title():
    assert rater_id("reader.a", "Reader^A", "WS1") == "reader.a"
    assert rater_id("", "Reader^A", "WS1") == "Reader^A"
    assert rater_id("", "", "WS1") == "WS1"


def test_the_double_read_choice_is_keyed_deterministic_and_near_its_fraction():
    key, other = ProjectKey(b"k" * 32), ProjectKey(b"o" * 32)
    uids = [f"2.25.{n}" for n in range(4000)]
    chosen = {u for u in uids if chosen_for_double_read(key, u, 0.12)}
    assert 0.10 < len(chosen) / len(uids) < 0.14
    assert chosen == {u for u in uids if chosen_for_double_read(ProjectKey(b"k" * 32), u, 0.12)}
    assert chosen != {u for u in uids if chosen_for_double_read(other, u, 0.12)}
    assert not any(chosen_for_double_read(key, u, 0.0) for u in uids)
    assert all(chosen_for_double_read(key, u, 1.0) for u in uids)


@pytest.fixture
def ctx(tmp_path):
    """A node context (not started: after-commit work inline) reading every study twice,
    with the phantom stored from the PACS."""
    folder = tmp_path / "node"
    folder.mkdir()
    (folder / "protocol.toml").write_text(fx.TEST_PROTOCOL)
    config = write_config(folder, peers=fx.PEERS, annotations={
        "protocol": str(folder / "protocol.toml"), "double_read_fraction": 1.0})
    context = NodeContext.open(config.settings(), with_key=True)
    for k in range(fx.PHANTOM.slices_count):
        assert context.ingest.ingest_bytes(fx.encode(fx.PHANTOM.slice(k)), fx.PACS).action \
            == "stored"
    yield context
    context.close()


def reading(ctx, seg, creator: str) -> int:
    seg.ContentCreatorName = creator
    assert fx.ingest(ctx, seg).action == "annotation"
    return fx.annotation_of(ctx, str(seg.SOPInstanceUID))


def states(ctx) -> dict[int, str]:
    with ctx.index.reader() as r:
        return {row["id"]: row["state"] for row in r.annotations.list()}


def test_a_consensus_reading_settles_the_adjudication(ctx):
    served = fx.served(ctx)
    a = reading(ctx, fx.valid_seg(served), "Reader^A")
    shifted = [m.copy() for m in fx.truth()]
    shifted[0] = fx.np.roll(shifted[0], 6, axis=2)  # A's big structure, moved by 8.4 mm
    b = reading(ctx, fx.make_seg(shifted, fx.LABELS, codes=fx.CODES, series=served), "Reader^B")
    assert states(ctx) == {a: "needs-adjudication", b: "needs-adjudication"}
    with ctx.index.reader() as r:
        [item] = r.agreement.adjudications("open")
        [comparison] = r.agreement.comparisons()
        rows = r.agreement.structures(comparison["id"])
    assert json.loads(comparison["reasons"])[0].startswith("nodule: Dice 0.")
    assert (comparison["rater_a"], comparison["rater_b"]) == ("Reader^A", "Reader^B")
    assert {(s["answer_a"], s["answer_b"]) for s in rows} == {
        ("SCT:27925004", "SCT:27925004"), ("SCT:272673000", "SCT:272673000")}

    # The adjudicator's consensus SEG is a reading of the same series, not compared.
    c = reading(ctx, fx.valid_seg(served), "Adjudicator")
    assert states(ctx)[c] == "checked"
    with ctx.index.reader() as r:
        assert len(r.agreement.comparisons()) == 1

    with pytest.raises(AdjudicationError, match="no adjudication 99"):
        ctx.reading.pick(99, c, ADJUDICATOR, "adjudicator")
    with pytest.raises(AdjudicationError, match="no annotation 999"):
        ctx.reading.pick(item["id"], 999, ADJUDICATOR, "adjudicator")
    decided = ctx.reading.pick(item["id"], c, ADJUDICATOR, "adjudicator")
    assert (decided["decision"], decided["chosen_annotation"]) == ("consensus", c)
    assert states(ctx) == {a: "rejected", b: "rejected", c: "adjudicated"}
    with pytest.raises(AdjudicationError, match="already decided"):
        ctx.reading.pick(item["id"], a, ADJUDICATOR, "adjudicator")
    assert states(ctx) == {a: "rejected", b: "rejected", c: "adjudicated"}
    with ctx.index.reader() as r:
        events = [row.action for row in r.audit.of_action("annotation.")]
    assert events.count("annotation.rejected") == 2
    assert events.count("annotation.adjudicated") == 1


def test_a_study_read_once_still_waits_and_the_same_rater_is_not_compared(ctx):
    served = fx.served(ctx)
    first = reading(ctx, fx.valid_seg(served), "Reader^A")
    again = reading(ctx, fx.valid_seg(served), "Reader^A")  # a second SEG, same rater
    assert states(ctx) == {first: "checked", again: "checked"}
    with ctx.index.reader() as r:
        assert r.agreement.comparisons() == []
        assert [d["state"] for d in r.agreement.double_reads()] == ["waiting"]
    report = lamina("qa", "report", config=ctx.settings.storage.data.parent / "node.toml")
    assert report.exit_code == 0, report.output
    assert "Double reads: 1 chosen, 1 waiting for a second reader" in report.stdout


def test_a_recheck_after_the_adjudication_does_not_reopen_it(ctx):
    served = fx.served(ctx)
    a = reading(ctx, fx.valid_seg(served), "Reader^A")
    b = reading(ctx, fx.make_seg(list(fx.truth()[:2]), fx.LABELS[:2], codes=fx.CODES[:2],
                                 series=served), "Reader^B")
    with ctx.index.reader() as r:
        [item] = r.agreement.adjudications("open")
    ctx.reading.pick(item["id"], a, ADJUDICATOR, "adjudicator")
    assert states(ctx) == {a: "adjudicated", b: "rejected"}
    ctx.annotations.recheck(b, ADJUDICATOR)  # e.g. after a protocol change
    with ctx.index.reader() as r:
        assert r.agreement.adjudications("open") == []
        assert [c["verdict"] for c in r.agreement.comparisons()] == ["disagree"]
        # The rejected reading is checked again but is no reading any more: the state
        # machine keeps the decision, and nothing is compared or sent back to adjudication.
        assert len(r.audit.of_action("agreement.computed")) == 1
        assert len(r.audit.of_action("annotation.checked")) >= 3
    assert states(ctx) == {a: "adjudicated", b: "rejected"}


def test_a_reading_rejected_at_adjudication_needs_no_signature(ctx):
    served = fx.served(ctx)
    a = reading(ctx, fx.valid_seg(served), "Reader^A")
    b = reading(ctx, fx.make_seg(list(fx.truth()[:2]), fx.LABELS[:2], codes=fx.CODES[:2],
                                 series=served), "Reader^B")
    with ctx.index.reader() as r:
        [item] = r.agreement.adjudications("open")
    ctx.reading.pick(item["id"], a, ADJUDICATOR, "adjudicator")
    assert states(ctx) == {a: "adjudicated", b: "rejected"}
    # The adjudication rejected b (recorded, audited): review verify has nothing to report.
    assert [c.problems for c in ctx.review.verify()] == []
    # Any other rejection without a signature still fails.
    with ctx.index.transaction() as tx:
        tx.annotations.set_state(a, "adjudicated", "rejected", "2026-01-01T00:00:00Z")
    assert [(c.annotation_id, c.problems) for c in ctx.review.verify()] == [
        (a, ["rejected without a signature"])]
