"""Leases: background work on exactly one node of an index, taken over when its holder dies
(PostgreSQL: advisory locks on a connection of the holder's own; SQLite: one node, held)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from node.leases import LeasedWork
from node.storage.postgresql.index import PostgresIndex
from node.storage.sqlite.index import SqliteIndex
from tests.harness import REPO


def wait_for(condition, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


@pytest.fixture
def dsn(pg_cluster) -> str:
    return pg_cluster.database()


def test_one_holder_at_a_time_and_released_on_release(dsn):
    a, b = PostgresIndex(dsn), PostgresIndex(dsn)
    first, second = a.lease("background"), b.lease("background")
    assert first.held() and first.held()  # asking again keeps it
    assert not second.held()
    assert b.lease("other").held()  # leases are per name
    first.release()
    assert second.held() and not first.held()
    second.release()
    a.close()
    b.close()


def test_a_killed_holder_loses_its_lease_at_once(dsn):
    """kill -9 of the holding process: PostgreSQL ends its session and the lock with it."""
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time\n"
         "from node.storage.postgresql.index import PostgresIndex\n"
         "lease = PostgresIndex(sys.argv[1]).lease('background')\n"
         "assert lease.held()\n"
         "print('held', flush=True)\n"
         "time.sleep(120)\n", dsn],
        cwd=REPO, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "held"
        mine = PostgresIndex(dsn).lease("background")
        assert not mine.held()
        os.kill(holder.pid, signal.SIGKILL)
        assert wait_for(mine.held)
        mine.release()
    finally:
        holder.kill()
        holder.wait()


def test_leased_work_moves_to_the_other_node_when_its_holder_stops(dsn):
    events: list[str] = []
    nodes = [PostgresIndex(dsn) for _ in range(2)]
    work = [LeasedWork(n.lease("background"), lambda k=k: events.append(f"start{k}"),
                       lambda k=k: events.append(f"stop{k}"), "background", poll=0.1)
            for k, n in enumerate(nodes)]
    work[0].start()
    work[1].start()
    time.sleep(0.5)
    assert events == ["start0"] and work[0].active and not work[1].active
    work[0].stop()
    assert wait_for(lambda: work[1].active)
    assert events == ["start0", "stop0", "start1"]
    work[1].stop()
    for n in nodes:
        n.close()


def test_a_lease_lost_with_the_server_stops_the_work_and_is_taken_again(pg_cluster):
    """The server restarts under the holder: its work stops (another node may take it), and
    is started again once the lease can be held again."""
    from tests.harness import PostgresCluster, postgres_bindir

    cluster = PostgresCluster(postgres_bindir()).start()
    try:
        index = PostgresIndex(cluster.database())
        events: list[str] = []
        work = LeasedWork(index.lease("background"), lambda: events.append("start"),
                          lambda: events.append("stop"), "background", poll=0.1)
        work.start()
        assert events == ["start"]
        cluster.stop(remove=False)
        assert wait_for(lambda: events == ["start", "stop"])
        cluster.start()
        assert wait_for(lambda: events == ["start", "stop", "start"])
        work.stop()
        index.close()
    finally:
        cluster.stop()


def test_sqlite_has_one_node_and_it_holds_every_lease(tmp_path):
    index = SqliteIndex(tmp_path / "index.sqlite3")
    started: list[str] = []
    work = LeasedWork(index.lease("background"), lambda: started.append("start"),
                      lambda: started.append("stop"), "background")
    work.start()
    assert started == ["start"]  # at once, before the node serves
    work.stop()
    assert started == ["start", "stop"]
    index.close()
