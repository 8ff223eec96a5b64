"""Approve and reject with a signature: one transaction with the state move, every refusal
one line, audited, with nothing else recorded; self-approval refused; lockout."""

from __future__ import annotations

import json

import pytest

from node.config import ReviewSettings
from node.review.service import ReviewRefused, ReviewService
from tests.review_fixtures import ADMIN, PASSPHRASE, REVIEWER, Annotations, open_review_node


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    folder = tmp_path_factory.mktemp("review")
    ctx = open_review_node(folder, audit={"checkpoint_path": str(folder / "elsewhere" / "cp.jsonl")},
                           review={"lock_after": 3})
    ctx.review.users.add("rad1", "Ann Radiologist", PASSPHRASE, ADMIN)
    ctx.review.users.add("reader1", "One Reader", PASSPHRASE, ADMIN)  # 'Reader^One' drew them
    yield ctx, folder
    ctx.close()


@pytest.fixture(scope="module")
def made(node) -> Annotations:
    return Annotations(node[0])


def counts(ctx) -> tuple[int, int]:
    """(signatures, audit events): what a refusal must leave as it was but for one event."""
    with ctx.index.reader() as r:
        return len(r.signatures.list()), r.audit.last()[0]


def events(ctx, prefix: str) -> list[dict]:
    with ctx.index.reader() as r:
        return [{**json.loads(e.object), "outcome": e.outcome} for e in r.audit.of_action(prefix)]


def test_approval_signs_moves_audits_and_checkpoints_outside_the_data_folder(node, made):
    ctx, folder = node
    annotation_id = made.checked()
    signed = ctx.review.decide(annotation_id, "approve", "rad1", PASSPHRASE,
                               "reviewed and approved", REVIEWER)
    assert made.state(annotation_id) == "approved"
    with ctx.index.reader() as r:
        (row,) = r.signatures.list(annotation_id)
        last = r.audit.last()
    manifest = json.loads(row.manifest)
    assert manifest["printed_name"] == "Ann Radiologist" and manifest["user_id"] == "rad1"
    assert manifest["meaning"] == "reviewed and approved" and manifest["signed_at"].endswith("Z")
    assert len(manifest["objects"]) == 1 and len(manifest["check_report_sha256"]) == 64
    (event,) = [e for e in events(ctx, "annotation.approved")
                if e["annotation_id"] == annotation_id]
    assert event["signature_id"] == signed.signature_id
    assert event["manifest_sha256"] == signed.manifest_sha256
    # the approval's checkpoint is already outside the data folder when decide returns
    kept = [json.loads(line) for line in
            (folder / "elsewhere" / "cp.jsonl").read_text().splitlines()]
    assert kept[-1]["seq"] == last[0] and kept[-1]["hash"] == last[1]
    assert [c.ok for c in ctx.review.verify(annotation_id)] == [True]


def test_rejection_needs_a_reason_and_keeps_the_annotation(node, made):
    ctx, _ = node
    annotation_id = made.checked()
    with pytest.raises(ReviewRefused, match="needs a reason"):
        ctx.review.decide(annotation_id, "reject", "rad1", PASSPHRASE, "rejected", REVIEWER)
    ctx.review.decide(annotation_id, "reject", "rad1", PASSPHRASE, "reviewed and rejected",
                      REVIEWER, reason="misses the second nodule")
    assert made.state(annotation_id) == "rejected"
    with ctx.index.reader() as r:
        assert r.annotations.current_objects(annotation_id)  # nothing deleted
    assert [c.ok for c in ctx.review.verify(annotation_id)] == [True]


def test_self_approval_is_refused_by_default_and_audited(node, made):
    ctx, _ = node
    annotation_id = made.checked()
    before = counts(ctx)
    with pytest.raises(ReviewRefused, match="self-approval is not allowed"):
        ctx.review.decide(annotation_id, "approve", "reader1", PASSPHRASE, "approved", REVIEWER)
    assert made.state(annotation_id) == "checked"
    assert counts(ctx) == (before[0], before[1] + 1)
    assert "self-approval" in events(ctx, "review.refused")[-1]["refused"]
    # a project may allow it
    allowing = ReviewService(ctx.index, ctx.blobs, ctx.audit, ctx.states,
                             ReviewSettings(allow_self_approval=True))
    allowing.decide(annotation_id, "approve", "reader1", PASSPHRASE, "approved", REVIEWER)
    assert made.state(annotation_id) == "approved"


def test_wrong_passphrases_lock_the_user_with_a_security_alert(node, made):
    ctx, _ = node
    ctx.review.users.add("rad2", "Bo Radiologist", PASSPHRASE, ADMIN)
    annotation_id = made.checked()
    before = counts(ctx)
    for attempt in (1, 2, 3):
        with pytest.raises(ReviewRefused, match="wrong passphrase") as exc:
            ctx.review.decide(annotation_id, "approve", "rad2", "not it at all", "ok", REVIEWER)
        assert ("now locked" in str(exc.value)) == (attempt == 3)
    (alert,) = events(ctx, "security.alert")
    assert (alert["user_id"], alert["failures"], alert["outcome"]) == ("rad2", 3,
                                                                        "serious-failure")
    failures = [e for e in events(ctx, "user.authentication") if e["user_id"] == "rad2"]
    assert [e["failures"] for e in failures] == [1, 2, 3]
    # locked: the right passphrase no longer signs
    with pytest.raises(ReviewRefused, match="user is locked"):
        ctx.review.decide(annotation_id, "approve", "rad2", PASSPHRASE, "ok", REVIEWER)
    assert made.state(annotation_id) == "checked"
    assert counts(ctx)[0] == before[0]


def test_a_right_passphrase_resets_the_count(node, made):
    ctx, _ = node
    ctx.review.users.add("rad3", "Cy Radiologist", PASSPHRASE, ADMIN)
    annotation_id = made.checked()
    for _ in range(2):
        with pytest.raises(ReviewRefused):
            ctx.review.decide(annotation_id, "approve", "rad3", "wrong one!", "ok", REVIEWER)
    ctx.review.decide(annotation_id, "approve", "rad3", PASSPHRASE, "ok", REVIEWER)
    with ctx.index.reader() as r:
        assert r.users.get("rad3").failed_attempts == 0


@pytest.mark.parametrize("case", ["unknown annotation", "unknown user", "approved twice",
                                  "pending", "refused", "disabled user", "no meaning",
                                  "damaged bytes"])
def test_bad_requests_are_refused_audited_and_record_nothing(node, made, case):
    ctx, _ = node
    annotation_id, user = made.checked(), "rad1"
    expected = {"unknown annotation": "unknown annotation 9999", "unknown user": "unknown user",
                "approved twice": "is approved, it cannot become approved",
                "pending": "is pending, it cannot become approved",
                "refused": "is refused, it cannot become approved",
                "disabled user": "user is disabled", "no meaning": "meaning",
                "damaged bytes": "stored bytes of .* are damaged"}[case]
    if case == "unknown annotation":
        annotation_id = 9999
    elif case == "unknown user":
        user = "nobody"
    elif case == "approved twice":
        ctx.review.decide(annotation_id, "approve", user, PASSPHRASE, "ok", REVIEWER)
    elif case in ("pending", "refused"):
        with ctx.index.transaction() as tx:  # as the annotation service would leave it
            assert tx.annotations.set_state(annotation_id, "checked", case, "t")
    elif case == "disabled user":
        ctx.review.users.add(f"gone{annotation_id}", "Gone Reviewer", PASSPHRASE, ADMIN)
        user = f"gone{annotation_id}"
        ctx.review.users.disable(user, ADMIN)
    elif case == "damaged bytes":
        with ctx.index.reader() as r:
            (obj,) = r.annotations.current_objects(annotation_id)
        path = ctx.blobs.local_path(obj["blob_sha256"])
        path.chmod(0o600)
        data = path.read_bytes()
        path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    before, state = counts(ctx), made.state(annotation_id) if case != "unknown annotation" \
        else None
    with pytest.raises(ReviewRefused, match=expected) as exc:
        ctx.review.decide(annotation_id, "approve", user, PASSPHRASE,
                          "" if case == "no meaning" else "ok", REVIEWER)
    assert "\n" not in str(exc.value)
    assert counts(ctx) == (before[0], before[1] + 1)  # one event: the refusal
    if state:
        assert made.state(annotation_id) == state


def test_two_reviewers_racing_one_signature_is_recorded(node, made):
    import threading

    ctx, _ = node
    ctx.review.users.add("rad4", "Di Radiologist", PASSPHRASE, ADMIN)
    annotation_id = made.checked()
    outcomes: list[str] = []

    def approve(user: str) -> None:
        try:
            ctx.review.decide(annotation_id, "approve", user, PASSPHRASE, "approved", REVIEWER)
            outcomes.append("signed")
        except ReviewRefused as exc:
            outcomes.append(str(exc))

    threads = [threading.Thread(target=approve, args=(u,)) for u in ("rad1", "rad4")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes)[-1] == "signed" and outcomes.count("signed") == 1, outcomes
    with ctx.index.reader() as r:
        assert len(r.signatures.list(annotation_id)) == 1
    assert [c.ok for c in ctx.review.verify(annotation_id)] == [True]
