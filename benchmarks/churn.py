"""Association churn: associate / C-ECHO / release, over and over, one cycle at a time.

DCMTK's storescp, Orthanc and ``lamina serve`` in the same run, each driven by
two clients: DCMTK ``echoscu`` (one process per cycle, TCP_NODELAY=1, as a
modality would) and a pynetdicom SCU looping in this process (the cost of the
association itself, without process start-up). Prints cycles/s, the ratio to
Orthanc and the server's CPU milliseconds per cycle (every process under it,
from /proc).

    .venv/bin/python -m benchmarks.churn [--cycles 1000] [--workers 1]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from pynetdicom import AE
from pynetdicom.sop_class import Verification

from benchmarks.ingest import Server, cpu_seconds, lamina, peers
from tests.harness import TEST_AET


def echoscu_cycles(called: str, port: int, cycles: int) -> None:
    env = {**os.environ, "TCP_NODELAY": "1"}
    for _ in range(cycles):
        subprocess.run(["echoscu", "-aet", TEST_AET, "-aec", called, "127.0.0.1", str(port)],
                       env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def pynetdicom_cycles(called: str, port: int, cycles: int) -> None:
    ae = AE(ae_title=TEST_AET)
    ae.add_requested_context(Verification)
    for _ in range(cycles):
        assoc = ae.associate("127.0.0.1", port, ae_title=called)
        if not assoc.is_established:
            raise RuntimeError(f"{called}: association refused")
        status = assoc.send_c_echo()
        assoc.release()
        if status is None or status.Status != 0:
            raise RuntimeError(f"{called}: C-ECHO failed")


Client = Callable[[str, int, int], None]


def measure(server: Server, client: Client, cycles: int) -> tuple[float, float]:
    """Cycles per second and server CPU ms per cycle (after 20 warm-up cycles)."""
    with tempfile.TemporaryDirectory() as tmp, server(Path(tmp)) as (called, port, roots):
        client(called, port, 20)
        before = cpu_seconds(roots)
        start = time.perf_counter()
        client(called, port, cycles)
        seconds = time.perf_counter() - start
        cpu = cpu_seconds(roots) - before
    return cycles / seconds, cpu * 1000 / cycles


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=1, help="lamina receiving processes")
    args = parser.parse_args()
    if not shutil.which("echoscu") or not shutil.which("storescp"):
        raise SystemExit("DCMTK not installed (apt-get install dcmtk)")
    servers = peers()
    servers[f"lamina ({args.workers} worker{'s' if args.workers > 1 else ''})"] = \
        lamina(args.workers)
    clients: dict[str, Client] = {"echoscu": echoscu_cycles, "pynetdicom": pynetdicom_cycles}
    print(f"{args.cycles} associate/C-ECHO/release cycles per client and server;"
          f" load: {os.getloadavg()[0]:.2f}")
    print(f"{'client':<11} {'server':<20} {'cycles/s':>9} {'× orthanc':>10} {'CPU ms/cycle':>13}")
    for client_name, client in clients.items():
        results = {name: measure(server, client, args.cycles) for name, server in servers.items()}
        base = results.get("orthanc", (0.0, 0.0))[0]
        for name, (rate, cpu) in results.items():
            ratio = f"{rate / base:.2f}" if base else "-"
            print(f"{client_name:<11} {name:<20} {rate:>9.1f} {ratio:>10} {cpu:>13.1f}")
    print(f"load after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
