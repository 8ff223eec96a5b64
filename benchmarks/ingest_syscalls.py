"""System calls and context switches per stored instance: counts, not times.

On a shared 2-core machine the CPU time of a change that saves a tenth of a millisecond
per instance varies more from run to run than it moves (issue 15's notes: ±15 %). What a
receiving process asks of the kernel does not: the same code storing the same series
makes the same calls. So this starts a one-worker node on a route, sends it a phantom CT
series with DCMTK's ``storescu`` twice (after a warm-up), and prints

* the context switches per instance of each thread that lives through the first series
  (``/proc/PID/task/TID/status``, sampled around it): a background thread woken per
  instance shows here (``py-spy dump --pid PID`` names the threads);
* the system calls per instance, by name, during the second series (``strace -c -f``
  attached to the node; tracing makes every call a switch, hence two series): page
  reads an index connection repeats, spool files, fsyncs, thread hand-offs (``futex``).

Run it in two checkouts to compare a change (``git worktree add ../before HEAD~1``).
Needs ``strace`` and ``storescu`` (Debian: strace, dcmtk); says so and stops without them.

    .venv/bin/python -m benchmarks.ingest_syscalls [--route clinical] [--slices 200]
"""

from __future__ import annotations

import argparse
import shutil
import signal
import subprocess
import tempfile
import time
from contextlib import suppress
from pathlib import Path

from benchmarks.ingest import _tree, send
from node.phantom import Phantom
from tests.harness import TEST_AET, ProcessNode, context_switches, free_port, peer

WARM = 10


def _switches(pids: list[int]) -> dict[int, int]:
    """Context switches so far, per thread of ``pids``."""
    found = {}
    for pid in pids:
        for task in Path(f"/proc/{pid}/task").iterdir():
            with suppress(OSError):  # the thread ended meanwhile
                found[int(task.name)] = context_switches(pid, int(task.name))
    return found


def _summary(path: Path) -> list[tuple[str, int]]:
    """(system call, calls) from an ``strace -c`` summary, most called first."""
    rows = []
    for line in path.read_text().splitlines():
        cols = line.split()
        if len(cols) >= 5 and cols[-1].isidentifier() and cols[3].isdigit() \
                and cols[-1] != "total":
            rows.append((cols[-1], int(cols[3])))
    return sorted(rows, key=lambda row: -row[1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--route", default="clinical",
                        choices=["clinical", "deidentified", "annotator"])
    parser.add_argument("--slices", type=int, default=200)
    args = parser.parse_args()
    missing = [tool for tool in ("strace", "storescu") if shutil.which(tool) is None]
    if missing:
        print(f"not measured: {', '.join(missing)} not installed (apt-get install strace dcmtk)")
        return 0
    with tempfile.TemporaryDirectory(prefix="lamina-bench-") as tmp:
        work = Path(tmp)
        n = args.slices
        series = Phantom(seed="syscalls", slices_count=WARM + 2 * n).write(work / "in")
        node = ProcessNode.with_workers(work / "node", 1, http={"port": free_port()}, peers={
            "bench": peer(TEST_AET, "store", route=args.route)}).start()
        try:
            send("LAMINA", node.port, [series[:WARM]], [node.pid])
            pids = _tree([node.pid])
            before = _switches(pids)
            send("LAMINA", node.port, [series[WARM:WARM + n]], [node.pid])
            after = _switches(pids)
            out = work / "strace.txt"
            tracer = subprocess.Popen(
                ["strace", "-c", "-f", "-o", str(out),
                 *[arg for pid in pids for arg in ("-p", str(pid))]],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1.0)  # attached to every thread before the first PDU
            send("LAMINA", node.port, [series[WARM + n:]], [node.pid])
            tracer.send_signal(signal.SIGINT)
            tracer.wait(timeout=60)
        finally:
            node.stop()
        print(f"{n} slices of 512x512 CT on the {args.route} route, one worker; "
              "per stored instance:")
        print(f"context switches of the threads of process {pids[0]} that lived through the "
              "series, busiest first (the association's own threads end with it):")
        for tid in sorted(after, key=lambda t: before.get(t, 0) - after[t]):
            if tid in before and after[tid] > before[tid]:
                print(f"  thread {tid:<8d} {(after[tid] - before[tid]) / n:8.2f}")
        print("system calls (strace -c -f):")
        for name, calls in _summary(out)[:20]:
            print(f"  {name:18s} {calls / n:8.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
