"""The audit trail catches every kind of tampering: edit, delete, reorder, truncate."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from click.testing import Result

from node.audit.trail import Actor
from node.config import load
from node.context import NodeContext
from tests.harness import lamina, write_config


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
