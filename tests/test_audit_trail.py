"""The audit trail catches every kind of tampering: edit, delete, reorder, truncate."""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from pathlib import Path

import pytest
from click.testing import Result

from node.atomic_file import spare_of
from node.audit.trail import Actor, AuditEntry, HeadCheckpoint
from node.config import load
from node.context import NodeContext
from tests.harness import context_switches, exchanges_here, inodes, lamina, write_config


@pytest.fixture
def trail_config(tmp_path: Path) -> Path:
    """A node config whose audit trail holds six events."""
    node = write_config(tmp_path)
    ctx = NodeContext.open(node.settings())
    for i in range(6):
        ctx.audit.record("test.event", Actor(ae_title="TESTSCU", association_id=str(i)),
                         {"n": i})
    ctx.close()
    return node.path


def verify(config: Path) -> Result:
    return lamina("audit", "verify", config=config)


def tamper(config: Path, *statements: str) -> None:
    """What an attacker with write access to the file can do: drop the guards, edit rows."""
    conn = sqlite3.connect(load(config).index_path, isolation_level=None)
    conn.execute("DROP TRIGGER audit_event_no_update")
    conn.execute("DROP TRIGGER audit_event_no_delete")
    for sql in statements:
        conn.execute(sql)
    conn.close()


def test_intact_trail_verifies(trail_config):
    result = verify(trail_config)
    assert result.exit_code == 0
    assert "6 entries" in result.stdout


def test_the_node_itself_cannot_edit_or_delete(trail_config):
    conn = sqlite3.connect(load(trail_config).index_path)
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        conn.execute("UPDATE audit_event SET outcome = 'x' WHERE seq = 1")
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        conn.execute("DELETE FROM audit_event WHERE seq = 1")


@pytest.mark.parametrize(("statements", "first_bad"), [
    (["UPDATE audit_event SET object = '{\"n\":99}' WHERE seq = 3"], "entry 3"),
    (["DELETE FROM audit_event WHERE seq = 4"], "entry 4"),
    # swap the contents of entries 2 and 3, keeping the sequence numbers in place
    (["UPDATE audit_event SET seq = 100 WHERE seq = 2",
      "UPDATE audit_event SET seq = 2 WHERE seq = 3",
      "UPDATE audit_event SET seq = 3 WHERE seq = 100"], "entry 2"),
    (["DELETE FROM audit_event WHERE seq >= 5"], "entry 5"),
], ids=["edit", "delete", "reorder", "truncate"])
def test_tampering_is_caught_naming_the_first_bad_entry(trail_config, statements, first_bad):
    tamper(trail_config, *statements)
    result = verify(trail_config)
    assert result.exit_code == 1
    assert f"BROKEN at {first_bad}" in result.stderr


def test_a_forged_head_is_caught(trail_config):
    settings = load(trail_config)
    head = settings.storage.data / "audit" / "head.json"
    head.write_text(head.read_text().replace('"seq": 6', '"seq": 5'))
    result = verify(trail_config)
    assert result.exit_code == 1 and "signature invalid" in result.stderr


# --- rollback: checkpoints kept outside the data folder -----------------------------------


def rolled_back(tmp_path: Path, external: bool) -> Path:
    """Six events, an approval-style checkpoint at the sixth; then the owner of the data folder
    cuts the last three and puts back the head.json saved after the third."""
    audit = {"checkpoint_path": str(tmp_path / "elsewhere" / "checkpoints.jsonl")} \
        if external else {}
    node = write_config(tmp_path, audit=audit)
    ctx = NodeContext.open(node.settings())
    head = node.data / "audit" / "head.json"
    for i in range(6):
        entry = ctx.audit.record("test.event", Actor(user="tests"), {"n": i})
        if i == 2:
            ctx.audit.checkpoint.flush()
            old_head = head.read_text()
    ctx.audit.committed(entry, checkpoint=True)
    ctx.close()
    tamper(node.path, "DELETE FROM audit_event WHERE seq > 3")
    head.write_text(old_head)
    return node.path


def test_a_cut_tail_under_an_old_head_passes_without_an_external_checkpoint(tmp_path):
    """The gap the external checkpoints close: the data folder alone cannot show it."""
    assert verify(rolled_back(tmp_path, external=False)).exit_code == 0


def test_a_cut_tail_under_an_old_head_is_caught_by_the_external_checkpoint(tmp_path):
    result = verify(rolled_back(tmp_path, external=True))
    assert result.exit_code == 1
    assert "trail rolled back (an external checkpoint is at entry 6, trail ends at 3)" \
        in result.stderr


def test_a_missing_or_forged_external_checkpoint_is_caught(tmp_path):
    external = tmp_path / "elsewhere" / "checkpoints.jsonl"
    node = write_config(tmp_path, audit={"checkpoint_path": str(external)})
    ctx = NodeContext.open(node.settings())
    ctx.audit.record("test.event", Actor(user="tests"), {"n": 1})
    ctx.close()
    assert verify(node.path).exit_code == 0
    line = external.read_text()
    external.write_text(line.replace('"seq": ', '"seq": 1').replace('"seq": 11', '"seq": 2'))
    assert "signature invalid" in verify(node.path).stderr
    external.write_text(line[: len(line) // 2])  # cut mid-line
    assert "unreadable" in verify(node.path).stderr
    external.unlink()
    assert "external checkpoints missing" in verify(node.path).stderr


def test_an_external_checkpoint_follows_within_the_interval_without_more_events(tmp_path):
    import json
    import time

    external = tmp_path / "elsewhere" / "checkpoints.jsonl"
    node = write_config(tmp_path, audit={"checkpoint_path": str(external),
                                         "checkpoint_interval": 1})
    ctx = NodeContext.open(node.settings())
    try:
        ctx.audit.record("test.event", Actor(user="tests"), {"n": 1})  # the first is copied
        last = ctx.audit.record("test.event", Actor(user="tests"), {"n": 2})  # too soon
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            lines = external.read_text().splitlines() if external.exists() else []
            if lines and json.loads(lines[-1])["seq"] == last.seq:
                break
            time.sleep(0.1)
        assert json.loads(lines[-1])["seq"] == last.seq
    finally:
        ctx.close()


def test_the_external_checkpoint_path_must_be_outside_the_data_folder(tmp_path):
    node = write_config(tmp_path, audit={"checkpoint_path": str(tmp_path / "data" / "cp")})
    result = lamina("audit", "verify", config=node.path)
    assert result.exit_code == 2 and "must be outside the data folder" in result.stderr


def test_an_unwritable_external_path_does_not_stop_the_head(tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the folder should be")
    node = write_config(tmp_path, audit={"checkpoint_path": str(blocker / "cp.jsonl")})
    ctx = NodeContext.open(node.settings())
    try:
        entry = ctx.audit.record("test.event", Actor(user="tests"), {"n": 1})
        ctx.audit.committed(entry, checkpoint=True)  # logged, not raised
        assert ctx.audit.checkpoint.read()[0] == entry.seq  # the head still moved
    finally:
        ctx.close()
    result = verify(node.path)
    assert result.exit_code == 1 and "external checkpoints missing" in result.stderr


def test_a_burst_of_events_signs_few_heads_and_close_writes_the_last(tmp_path, monkeypatch):
    """The head is signed at most every HEAD_MIN_SECONDS while events stream in, yet the
    chain holds every event and the head written at close names the last one."""
    import node.audit.trail as trail

    monkeypatch.setattr(trail, "HEAD_MIN_SECONDS", 5.0)
    node = write_config(tmp_path)
    ctx = NodeContext.open(node.settings())
    signed = []
    original = trail.HeadCheckpoint._message
    monkeypatch.setattr(trail.HeadCheckpoint, "_message", staticmethod(
        lambda seq, hash_: (signed.append(seq), original(seq, hash_))[1]))
    for i in range(40):
        ctx.audit.record("test.event", Actor(ae_title="TESTSCU", association_id=str(i)), {"n": i})
    ctx.close()
    assert 1 <= len(signed) <= 3 and signed[-1] == max(signed)
    result = verify(node.path)
    assert result.exit_code == 0 and "40 entries" in result.stdout, result.stdout


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts switches in /proc")
def test_events_do_not_wake_the_head_writer_while_it_pauses(tmp_path, monkeypatch):
    """Between two heads the writer sleeps: the events arriving meanwhile (one per stored
    instance) leave it asleep, rather than waking it each to sleep again."""
    import node.audit.trail as trail

    monkeypatch.setattr(trail, "HEAD_MIN_SECONDS", 5.0)
    node = write_config(tmp_path)
    ctx = NodeContext.open(node.settings())
    actor = Actor(ae_title="TESTSCU", association_id="1")
    ctx.audit.record("test.event", actor, {"n": 0})
    writer = next(t for t in threading.enumerate() if t.name == "audit-head")
    deadline = time.monotonic() + 10
    while ctx.audit.checkpoint.read() is None and time.monotonic() < deadline:
        time.sleep(0.01)  # the first head is written, the writer now pauses
    time.sleep(0.1)
    assert writer.native_id is not None
    before = context_switches(os.getpid(), writer.native_id)
    for i in range(1, 101):
        ctx.audit.record("test.event", actor, {"n": i})
    woken = context_switches(os.getpid(), writer.native_id) - before
    ctx.close()
    assert woken <= 5, f"the paused head writer was woken {woken} times by 100 events"
    assert verify(node.path).exit_code == 0


def test_signing_the_head_again_frees_no_inode(tmp_path: Path) -> None:
    """Each head write used to create a file and free the old head's inode; on ext4
    without a journal every later file creation walked past such recently freed
    inodes (node.atomic_file). Now the head and its spare swap names."""
    if not exchanges_here(tmp_path):
        pytest.skip("renameat2(RENAME_EXCHANGE) unavailable here: the head is renamed")
    head = HeadCheckpoint(tmp_path / "head.json", tmp_path / "key.pem")
    head.checkpoint(AuditEntry(1, "a" * 64))
    head.checkpoint(AuditEntry(2, "b" * 64))
    kept = inodes(head.head_path, spare_of(head.head_path))
    for seq in range(3, 9):
        head.checkpoint(AuditEntry(seq, f"{seq:064x}"))
        assert inodes(head.head_path, spare_of(head.head_path)) == kept
    assert head.read() is not None and head.read()[0] == 8
    head.close()
