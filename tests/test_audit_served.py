"""Query/retrieve audit events: written in the background, in order, complete, chain intact."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path

import pytest

from node.audit.served import AuditQueue, report
from node.audit.trail import Actor, AuditTrail, HeadCheckpoint
from node.storage.sqlite.index import SqliteIndex
from tests.harness import context_switches


def test_every_event_is_written_in_order_and_the_chain_verifies(tmp_path):
    index = SqliteIndex(tmp_path / "index.sqlite3")
    index.migrate()
    audit = AuditTrail(index, HeadCheckpoint(tmp_path / "head.json", tmp_path / "key.pem"))
    events = AuditQueue(audit)
    events.start()

    def client(n: int) -> None:
        for i in range(50):
            events.put("query.find", Actor(ae_title=f"C{n}"), {"i": i}, "success")

    threads = [threading.Thread(target=client, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert events.flush(timeout=10)
    events.stop()
    with index.connection() as conn:
        rows = conn.execute("SELECT actor, object FROM audit_event ORDER BY seq").fetchall()
    assert len(rows) == 200
    for n in range(4):
        mine = [json.loads(o)["i"] for a, o in rows if json.loads(a)["ae_title"] == f"C{n}"]
        assert mine == list(range(50))  # each client's events in the order it made them
    report_ = audit.verify()
    assert report_.ok and report_.entries == 200
    index.close()


def test_report_logs_the_level_without_clobbering_the_log_level(tmp_path, caplog):
    index = SqliteIndex(tmp_path / "index.sqlite3")
    index.migrate()
    audit = AuditTrail(index, HeadCheckpoint(tmp_path / "head.json", tmp_path / "key.pem"))
    with caplog.at_level(logging.INFO):
        report(AuditQueue(audit), logging.getLogger("lamina.test"), "query.find", Actor(ae_title="X"),
               {"level": "STUDY", "matches": 3}, failed=False)
    [record] = caplog.records
    assert record.fields["query_level"] == "STUDY" and "level" not in record.fields
    index.close()


def _queue(tmp_path):
    index = SqliteIndex(tmp_path / "index.sqlite3")
    index.migrate()
    audit = AuditTrail(index, HeadCheckpoint(tmp_path / "head.json", tmp_path / "key.pem"))
    events = AuditQueue(audit)
    events.start()
    return index, events


def _actions(index) -> list[str]:
    with index.connection() as conn:
        return [a for (a,) in conn.execute("SELECT action FROM audit_event ORDER BY seq")]


def test_flush_writes_events_that_could_wait_longer_at_once(tmp_path):
    index, events = _queue(tmp_path)
    for how in ("accepted", "released"):
        events.put(f"association.{how}", Actor(ae_title="C"), {}, "success", linger=600)
    assert events.flush(timeout=10)  # not after the 600 s the events could have waited
    assert _actions(index) == ["association.accepted", "association.released"]
    events.stop()
    index.close()


def test_a_batch_is_written_by_its_most_urgent_event(tmp_path):
    index, events = _queue(tmp_path)
    events.put("association.accepted", Actor(ae_title="C"), {}, "success", linger=600)
    events.put("query.find", Actor(ae_title="C"), {}, "success")  # within LINGER
    deadline = time.monotonic() + 10
    while len(_actions(index)) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _actions(index) == ["association.accepted", "query.find"]
    events.stop()
    index.close()


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts switches in /proc")
def test_events_that_can_wait_as_long_do_not_wake_the_writer(tmp_path):
    """While a batch waits for its due time, events due no sooner (every association's
    accepted and released) join it without waking the writer; all are then written."""
    index, events = _queue(tmp_path)
    events.put("association.accepted", Actor(ae_title="C"), {}, "success", linger=600)
    writer = next(t for t in threading.enumerate() if t.name == "audit-writer")
    time.sleep(0.1)  # the writer sleeps until the batch is due
    assert writer.native_id is not None
    before = context_switches(os.getpid(), writer.native_id)
    for _ in range(100):  # a few milliseconds apart, as associations come and go
        events.put("association.released", Actor(ae_title="C"), {}, "success", linger=600)
        time.sleep(0.002)
    woken = context_switches(os.getpid(), writer.native_id) - before
    assert woken <= 3, f"the writer was woken {woken} times by 100 events that could wait"
    assert events.flush(timeout=10)
    assert _actions(index) == ["association.accepted"] + ["association.released"] * 100
    events.stop()
    index.close()
