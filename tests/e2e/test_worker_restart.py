"""kill -9 of one receiving worker: the supervisor restarts it, audits
``node.worker_restarted``, the node keeps serving, the association slots the dead worker
held are free again (flock'd files: the kernel released them), and the trail verifies."""

from __future__ import annotations

import json
import os
import signal
import time

from pynetdicom import AE
from pynetdicom.sop_class import Verification

from tests.harness import TEST_AET, ProcessNode


def _associate(port: int):
    ae = AE(ae_title=TEST_AET)
    ae.add_requested_context(Verification)
    return ae.associate("127.0.0.1", port, ae_title="LAMINA")


def _accepting_pids(node: ProcessNode) -> list[int]:
    """The worker of each "association accepted" line so far, in order."""
    lines = [json.loads(line) for line in node.log().splitlines() if line.startswith("{")]
    return [line["pid"] for line in lines if line.get("msg") == "association accepted"]


def _associate_and_find_worker(node: ProcessNode):
    """An association and the worker serving it. The worker logs "association accepted"
    just after its A-ASSOCIATE-AC, so the client can be established before the line is
    written: wait for the new line (taking the last one at once could name the worker of
    an earlier association, and kill the wrong one)."""
    before = len(_accepting_pids(node))
    assoc = _associate(node.port)
    deadline = time.monotonic() + 10
    while len(pids := _accepting_pids(node)) <= before and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(pids) == before + 1, node.log()[-2000:]
    return assoc, pids[-1]


def test_killed_worker_is_restarted_and_its_slots_freed(tmp_path):
    node = ProcessNode.with_workers(tmp_path / "node", 2, node={"max_associations": 2})
    with node:
        workers = node.worker_pids()
        held, victim = _associate_and_find_worker(node)  # a slot held by the worker we kill
        assert held.is_established
        assert victim in workers
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while len(node.worker_pids()) < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        replacement = node.worker_pids() - workers
        assert len(replacement) == 1, node.log()[-2000:]
        # both slots usable at once: the dead worker's slot was released with it
        deadline = time.monotonic() + 30
        while True:
            pair = [_associate(node.port) for _ in range(2)]
            if all(a.is_established for a in pair) or time.monotonic() > deadline:
                break
            for a in pair:
                if a.is_established:
                    a.release()
            time.sleep(0.2)
        assert all(a.is_established for a in pair)
        assert all(a.send_c_echo().Status == 0 for a in pair)
        for a in pair:
            a.release()
        held.abort()
        [restarted] = node.audit_events("node.worker_restarted")
        assert restarted["object"]["worker_pid"] == victim
        assert restarted["object"]["new_pid"] in replacement
        assert node.echo() == 0
    assert node.cli("audit", "verify").exit_code == 0
