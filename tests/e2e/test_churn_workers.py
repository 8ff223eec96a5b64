"""1,000 associate / C-ECHO / release cycles into a node of two receiving workers leave
each worker's file descriptors, threads and memory where they were (issue 13's churn
test). Sampled in the receiving processes themselves, read from /proc, not in the
parent: a leak in a worker would not show in the supervisor."""

from __future__ import annotations

import os
import time

from pynetdicom import AE
from pynetdicom.sop_class import Verification

from tests.harness import NODE_AET, TEST_AET, ProcessNode, process_status

WARM_UP = 100
CYCLES = 1_000
RSS_GROWTH_LIMIT_KB = 8 * 1024  # far above noise (+0.5 MB measured), far below a leak


def _sample(pid: int) -> tuple[int, int, int]:
    """(open descriptors, threads, resident kB) of one process."""
    status = process_status(pid)
    return len(os.listdir(f"/proc/{pid}/fd")), status["Threads"], status["VmRSS"]


def _settled(workers: list[int], before: dict[int, tuple[int, int, int]],
             timeout: float = 10) -> dict[int, tuple[int, int, int]]:
    """Samples once the last associations' threads and sockets are gone (they end a
    moment after the peer's release returns), or at the timeout: a leak stays."""
    deadline = time.monotonic() + timeout
    while True:
        after = {pid: _sample(pid) for pid in workers}
        settled = all(after[p][0] <= before[p][0] + 2 and after[p][1] <= before[p][1] + 1
                      for p in workers)
        if settled or time.monotonic() > deadline:
            return after
        time.sleep(0.1)


def _cycles(port: int, count: int) -> None:
    ae = AE(ae_title=TEST_AET)
    ae.add_requested_context(Verification)
    for _ in range(count):
        assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AET)
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0
        assoc.release()


def test_a_thousand_association_cycles_leave_the_workers_as_they_were(tmp_path):
    with ProcessNode.with_workers(tmp_path / "node", 2) as node:
        _cycles(node.port, WARM_UP)  # lazily created pools, caches and index connections
        workers = sorted(node.worker_pids())
        assert len(workers) == 2
        before = {pid: _sample(pid) for pid in workers}
        _cycles(node.port, CYCLES)
        after = _settled(workers, before)
        assert sorted(node.worker_pids()) == workers, "a worker was replaced during churn"
        for pid in workers:
            (fds0, threads0, rss0), (fds1, threads1, rss1) = before[pid], after[pid]
            assert fds1 <= fds0 + 2, f"worker {pid}: descriptors {fds0} -> {fds1}"
            assert threads1 <= threads0 + 1, f"worker {pid}: threads {threads0} -> {threads1}"
            assert rss1 - rss0 < RSS_GROWTH_LIMIT_KB, f"worker {pid}: RSS {rss0} -> {rss1} kB"
        assert node.echo() == 0
