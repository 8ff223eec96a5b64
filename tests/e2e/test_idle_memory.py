"""An idle node stays small: at most 150 MB resident per process (issue 15).

A memory bound, not a time. The big libraries a node needs only for some
objects (SimpleITK ~100 MB, highdicom and pydicom.sr ~20 MB) are imported where
they are used, not when the node starts; the second test names the one that
came back if the bound is ever broken that way.
"""

from __future__ import annotations

import subprocess
import sys
import time

from tests.harness import REPO, ProcessNode, process_status

IDLE_RSS_LIMIT_MB = 150
LAZY = ("SimpleITK", "highdicom", "pydicom.sr")


def test_idle_node_processes_stay_under_150_mb(tmp_path):
    with ProcessNode.with_workers(tmp_path / "node", 2) as node:
        time.sleep(1)  # the background workers' first rounds have run
        pids = {"supervisor": node.pid,
                **{f"worker {pid}": pid for pid in node.worker_pids() if pid != node.pid}}
        assert len(pids) == 3, pids
        rss = {name: round(process_status(pid)["VmRSS"] / 1024) for name, pid in pids.items()}
    assert all(mb <= IDLE_RSS_LIMIT_MB for mb in rss.values()), rss


def test_starting_a_node_imports_no_heavy_optional_library():
    probe = ("import sys, node.serve, node.context, node.dimse.server;"
             f"print(','.join(m for m in {LAZY!r} if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True,
                            text=True, check=True).stdout.strip()
    assert loaded == "", f"imported at start: {loaded}"
