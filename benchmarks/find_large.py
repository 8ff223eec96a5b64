"""C-FIND large answers: milliseconds per match, seen by DCMTK findscu (issue 15).

    python -m benchmarks.find_large                    # 100,000 instances: 250 matches
    python -m benchmarks.find_large --size 1000000     # 1 M instances: 2,500 matches

The index is filled as in :mod:`benchmarks.query` (N/20 studies, 5 % of them with a
PT series). A node (one worker) serves it; DCMTK findscu, quiet (``-q``: its
per-response logging would be most of the time measured) and with TCP_NODELAY,
repeats over one association the study query by ModalitiesInStudy=PT (N/400
matches) and a five-match query by PatientID. Printed per query: wall time
(findscu's run with ``--repeat n+1`` minus its run with one, over n) and the
node's CPU time (utime + stime of its process) over the same runs; then the
cost of each extra match, the large query minus the small one over the
difference in matches. Figures are printed; nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from benchmarks.query import NODELAY, STUDY_KEYS, fill
from tests.harness import ProcessNode, write_config
from tests.studies import QR_VALIDATION, qr_peer


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (fields 14 and 15 of /proc/PID/stat)."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def findscu_args(port: int, **match: str) -> list[str]:
    args = ["findscu", "-aet", "BENCH", "-aec", "LAMINA", "-S", "-q",
            "-k", "QueryRetrieveLevel=STUDY"]
    for keyword in STUDY_KEYS:
        args += ["-k", f"{keyword}={match[keyword]}" if keyword in match else keyword]
    return [*args, "127.0.0.1", str(port)]


def per_query(node: ProcessNode, args: list[str], repeats: int) -> tuple[float, float]:
    """(wall ms, node CPU ms) per query: ``repeats + 1`` runs minus one, over ``repeats``."""
    walls, cpus = [], []
    for n in (1, repeats + 1):
        cpu, started = cpu_seconds(node.pid), time.perf_counter()
        subprocess.run([*args[:-2], "--repeat", str(n), *args[-2:]], env=NODELAY,
                       capture_output=True, check=True)
        walls.append(time.perf_counter() - started)
        cpus.append(cpu_seconds(node.pid) - cpu)
    return ((walls[1] - walls[0]) / repeats * 1000, (cpus[1] - cpus[0]) / repeats * 1000)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=100_000, help="instances in the index")
    parser.add_argument("--repeats", type=int, default=20, help="timed queries of each kind")
    args = parser.parse_args()
    if not shutil.which("findscu"):
        raise SystemExit("DCMTK findscu is not installed")
    work = Path(tempfile.mkdtemp(prefix="lamina-find-large-"))
    try:
        fill(work / "node" / "data", args.size)
        node = ProcessNode(write_config(work / "node", validation=QR_VALIDATION,
                                        peers={"bench": qr_peer("BENCH", "find")}))
        with node:
            large = per_query(node, findscu_args(node.port, ModalitiesInStudy="PT"), args.repeats)
            small = per_query(node, findscu_args(node.port, PatientID="PAT0000007"),
                              args.repeats)
        extra = args.size // 400 - 5
        print(f"{args.size:,} instances, findscu -q, {args.repeats} queries each, "
              f"load {os.getloadavg()[0]:.1f}")
        print(f"  {'query':34} {'matches':>8} {'wall ms':>9} {'node CPU ms':>12}")
        print(f"  {'study by Modality (PT)':34} {args.size // 400:8} {large[0]:9.2f} {large[1]:12.2f}")
        print(f"  {'study by PatientID':34} {5:8} {small[0]:9.2f} {small[1]:12.2f}")
        print(f"  per extra match: wall {(large[0] - small[0]) / extra:.4f} ms,"
              f" node CPU {(large[1] - small[1]) / extra:.4f} ms")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
