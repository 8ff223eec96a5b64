"""Two senders at once into two workers: the supervisor hands each association to the
least-busy worker (node.acceptor), so each worker serves exactly one. With SO_REUSEPORT
the kernel's hash put both on one worker in a sizeable share of runs."""

from __future__ import annotations

import json
import os
import subprocess
from collections import Counter

from node.phantom import Phantom
from tests.harness import TEST_AET, ProcessNode, require


def _accepted_by_pid(node: ProcessNode) -> Counter:
    lines = (json.loads(line) for line in node.log().splitlines() if line.startswith("{"))
    return Counter(line["pid"] for line in lines if line.get("msg") == "association accepted")


def test_two_senders_land_on_two_workers(tmp_path):
    storescu = require("storescu")
    series = []
    for i in range(2):
        folder = tmp_path / f"series{i}"
        folder.mkdir()
        series.append(Phantom(seed=f"spread-{i}", slices_count=4, rows=64, columns=64)
                      .write(folder))
    with ProcessNode.with_workers(tmp_path / "node", 2) as node:
        workers = node.worker_pids()
        assert len(workers) == 2
        before = _accepted_by_pid(node)
        senders = [subprocess.Popen(
            [storescu, "-aet", TEST_AET, "-aec", "LAMINA", "127.0.0.1", str(node.port),
             *map(str, files)], env={**os.environ, "TCP_NODELAY": "1"},
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for files in series]
        for sender in senders:
            _, err = sender.communicate(timeout=60)
            assert sender.returncode == 0, err.decode()[-500:]
        assert node.rows("SELECT count(*) FROM instance") == [(8,)]
        served = _accepted_by_pid(node) - before
        assert set(served) == workers, served  # both workers served one, none did both
        assert sorted(served.values()) == [1, 1]
