"""The annotation state machine: allowed moves only, compare-and-set, audited,
listeners in the same transaction."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from node.annotations.states import (
    TRANSITIONS,
    AnnotationState,
    AnnotationStates,
    Transition,
    TransitionRefused,
)
from node.audit.trail import Actor, AuditTrail, HeadCheckpoint
from node.storage.interface import Transaction
from node.storage.sqlite.index import SqliteIndex, migrations

S = AnnotationState
REVIEWER = Actor(user="reviewer-1")


@pytest.fixture
def index(tmp_path):
    idx = SqliteIndex(tmp_path / "index.sqlite3")
    idx.migrate()
    yield idx
    idx.close()


@pytest.fixture
def states(index, tmp_path) -> AnnotationStates:
    trail = AuditTrail(index, HeadCheckpoint(tmp_path / "head.json", tmp_path / "audit.key"))
    yield AnnotationStates(trail)
    trail.close()


def new_annotation(index: SqliteIndex, state: S) -> int:
    with index.transaction() as tx:
        annotation_id, _ = tx.annotations.upsert("seg", f"seg|1.2.{state}", "1.2.3", "ANN", "a",
                                                 "", "2026-01-01T00:00:00Z", accepted=True)
        if state is not S.RECEIVED:
            assert tx.annotations.set_state(annotation_id, "received", state, "t")
    return annotation_id


def state_of(index: SqliteIndex, annotation_id: int) -> str:
    with index.reader() as r:
        return r.annotations.get(annotation_id)["state"]


def test_every_state_is_in_the_table_and_approval_is_final() -> None:
    assert set(TRANSITIONS) == set(AnnotationState)
    assert TRANSITIONS[S.APPROVED] == frozenset()
    assert S.APPROVED not in TRANSITIONS[S.RECEIVED]  # nothing unchecked is approved
    assert S.APPROVED not in TRANSITIONS[S.NEEDS_ADJUDICATION]


def test_an_allowed_move_is_stored_and_audited(index, states) -> None:
    annotation_id = new_annotation(index, S.CHECKED)
    with index.transaction() as tx:
        entry = states.move(tx, annotation_id, S.REJECTED, REVIEWER, reason="wrong lobe")
    states.audit.committed(entry)
    assert state_of(index, annotation_id) == "rejected"
    with index.reader() as r:
        (event,) = r.audit.of_action("annotation.rejected")
    assert '"from":"checked"' in event.object and '"reason":"wrong lobe"' in event.object
    assert "reviewer-1" in event.actor


@pytest.mark.parametrize("before,after", [(S.RECEIVED, S.APPROVED), (S.APPROVED, S.REJECTED),
                                          (S.REFUSED, S.APPROVED), (S.PENDING, S.APPROVED)])
def test_a_move_the_table_does_not_allow_is_refused_and_writes_nothing(index, states, before,
                                                                       after) -> None:
    annotation_id = new_annotation(index, before)
    with pytest.raises(TransitionRefused, match=f"is {before}, it cannot become {after}"), \
            index.transaction() as tx:
        states.move(tx, annotation_id, after, REVIEWER)
    assert state_of(index, annotation_id) == before
    with index.reader() as r:
        assert r.audit.of_action("annotation.") == []


def test_an_unknown_annotation_is_refused(index, states) -> None:
    with pytest.raises(TransitionRefused, match="annotation 99 does not exist"), \
            index.transaction() as tx:
        states.move(tx, 99, S.APPROVED, REVIEWER)


def test_a_listener_runs_in_the_same_transaction_and_its_failure_rolls_back(index,
                                                                             states) -> None:
    seen: list[Transition] = []

    class Outbox:
        fail = False

        def on_transition(self, tx: Transaction, transition: Transition) -> None:
            assert tx.annotations.get(transition.annotation_id)["state"] == transition.after
            seen.append(transition)
            if self.fail:
                raise RuntimeError("outbox full")

    outbox = Outbox()
    states.listen(outbox)
    first, second = new_annotation(index, S.CHECKED), new_annotation(index, S.ADJUDICATED)
    with index.transaction() as tx:
        states.move(tx, first, S.APPROVED, REVIEWER, detail={"signature_id": 7})
    assert seen[0].before is S.CHECKED and seen[0].detail == {"signature_id": 7}
    outbox.fail = True
    with pytest.raises(RuntimeError), index.transaction() as tx:
        states.move(tx, second, S.APPROVED, REVIEWER)
    assert state_of(index, second) == "adjudicated"
    with index.reader() as r:
        assert len(r.audit.of_action("annotation.approved")) == 1


def test_the_rebuild_migration_keeps_every_annotation_and_its_references(tmp_path: Path) -> None:
    """0007 rebuilds the annotation table (SQLite cannot alter a CHECK): rows, ids and
    the objects that reference them survive, and the new states are accepted."""
    path = tmp_path / "old.sqlite3"
    conn = sqlite3.connect(path, isolation_level=None)
    for number, _name, sql in migrations():
        if number >= 7:
            break
        conn.executescript(sql)
        conn.execute(f"PRAGMA user_version={number}")
    conn.execute("INSERT INTO annotation (id, kind, key, source_series_uid, annotator_ae,"
                 " annotator_address, state, created_at, updated_at)"
                 " VALUES (5, 'seg', 'seg|9', '1.2', 'ANN', 'a', 'checked', 't', 't')")
    conn.execute("INSERT INTO annotation_object (annotation_fk, sop_instance_uid, sop_class_uid,"
                 " blob_sha256, blob_size, transfer_syntax_uid, state, calling_ae,"
                 " association_id, received_at) VALUES (5, '9', 'c', 'h', 1, 'ts', 'current',"
                 " 'ANN', 'x', 't')")
    conn.close()
    index = SqliteIndex(path)
    try:
        assert index.migrate() == migrations()[-1][0]
        with index.transaction() as tx:
            assert tx.annotations.get(5)["state"] == "checked"
            assert len(tx.annotations.current_objects(5)) == 1
            assert tx.annotations.set_state(5, "checked", "needs-adjudication", "t")
        with index.connection() as conn2:
            assert conn2.execute("PRAGMA foreign_keys").fetchone()[0] == 1
            assert conn2.execute("PRAGMA foreign_key_check").fetchall() == []
            with pytest.raises(sqlite3.IntegrityError):
                conn2.execute("UPDATE annotation SET state = 'approve' WHERE id = 5")
    finally:
        index.close()


def test_the_services_automatic_changes_go_through_the_machine(tmp_path) -> None:
    """received → checked, a corrected copy (checked → received) and its check: each an
    audited move of the one state machine, none a silent write by the storage layer."""
    import copy
    import json

    from tests import annotation_fixtures as fx

    ctx = fx.open_node(tmp_path / "node")
    try:
        served = fx.served(ctx)
        copies = fx.rotating_overlays(fx.truth(), fx.LABELS, person="Reader^Again",
                                      series=served)
        for ds in copies:
            assert fx.ingest(ctx, ds).action == "annotation"
        ctx.annotations.flush()
        annotation_id = fx.annotation_of(ctx, str(copies[0].SOPInstanceUID))
        revised = copy.deepcopy(copies[0])
        revised.ImageComments = "revised"
        assert fx.ingest(ctx, revised).action == "annotation"
        with ctx.index.reader() as r:
            assert r.annotations.get(annotation_id)["state"] == "received"
        ctx.annotations.flush()
        with ctx.index.connection() as conn:
            moves = [json.loads(o) for (o,) in conn.execute(
                "SELECT object FROM audit_event WHERE action LIKE 'annotation.%' ORDER BY seq")]
        assert [(m["from"], m["to"]) for m in moves
                if m.get("annotation_id") == annotation_id and "from" in m] == [
            ("received", "checked"), ("checked", "received"), ("received", "checked")]
    finally:
        ctx.close()
