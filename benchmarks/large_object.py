"""One large multi-frame object (default ~1 GB: 2,000 frames of 512×512) sent by DCMTK
storescu into ``lamina serve`` (clinical and deidentified routes, one worker) and
Orthanc, same run: time, status, and the receiving process's resident peak growth
(VmHWM after the send minus before). Issue 15's target: < 200 MB on both routes.

    .venv/bin/python -m benchmarks.large_object [--frames 2000]

The object is a Legacy Converted Enhanced CT of phantom slices, made by highdicom in a
temporary folder (``tests/e2e/test_large_object.py`` checks the same at 131 MB).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from benchmarks.ingest import Server, orthanc
from tests.e2e.test_large_object import large_multiframe
from tests.harness import TEST_AET, ProcessNode, peer, process_status


def lamina(route: str) -> Server:
    @contextmanager
    def server(work: Path) -> Iterator[tuple[str, int, list[int]]]:
        peers = {"bench": peer(TEST_AET, "store", route=route)}
        with ProcessNode.with_workers(work / f"lamina-{route}", 1, peers=peers) as node:
            yield "LAMINA", node.port, sorted(node.worker_pids())

    return server


def send(path: Path, aet: str, port: int) -> tuple[float, str]:
    """storescu -R (the file's own SOP class): seconds and the status it reported."""
    started = time.monotonic()
    done = subprocess.run(["storescu", "-R", "-aet", TEST_AET, "-aec", aet, "127.0.0.1",
                           str(port), str(path)], capture_output=True, text=True,
                          env={**os.environ, "TCP_NODELAY": "1"})
    seconds = time.monotonic() - started
    return seconds, "success" if done.returncode == 0 else (done.stderr.strip()[-120:]
                                                              or f"exit {done.returncode}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=2000)
    args = parser.parse_args()
    if not shutil.which("storescu"):
        raise SystemExit("needs DCMTK (apt-get install dcmtk)")
    targets: dict[str, Server] = {"lamina clinical": lamina("clinical"),
                                  "lamina deidentified": lamina("deidentified")}
    if shutil.which("Orthanc"):
        targets["orthanc"] = orthanc
    else:
        print("Orthanc not installed (apt-get install orthanc): not measured")
    with tempfile.TemporaryDirectory(prefix="lamina-large-") as tmp:
        work = Path(tmp)
        path = large_multiframe(work, args.frames)
        size_mb = path.stat().st_size / 1e6
        print(f"{args.frames} frames, {size_mb:.0f} MB, load {os.getloadavg()[0]:.1f}")
        print(f"{'target':22} {'seconds':>8} {'MB/s':>7} {'RSS growth MB':>14}  status")
        for name, target in targets.items():
            with target(work) as (aet, port, pids):
                before = {pid: process_status(pid)["VmHWM"] for pid in pids}
                seconds, outcome = send(path, aet, port)
                growth = max(process_status(pid)["VmHWM"] - before[pid] for pid in pids)
            print(f"{name:22} {seconds:8.1f} {size_mb / seconds:7.0f} {growth / 1024:14.0f}"
                  f"  {outcome}")


if __name__ == "__main__":
    main()
