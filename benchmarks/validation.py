"""Validation cost: µs per instance, the series check for 300 slices, and ingest throughput
with validation on and off against DCMTK's storescp.

The per-instance figures split the header parse the pipeline always did from
what validation adds (locating the pixel data element, then the rules). The
ingest figures send the same 512×512 CT series with storescu (TCP_NODELAY=1)
into storescp, into Lamina with validation on, and into Lamina with it off,
each into an empty folder, one warm-up then timed repeats.

    .venv/bin/python -m benchmarks.validation [--slices 300] [--repeats 3] [--workers 2]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from pydicom import dcmread

from node.checks.geometry import InstanceGeometry, analyse_series
from node.config import ValidationSettings
from node.context import NodeContext
from node.ingest.iod import IODTables
from node.ingest.types import Source
from node.ingest.validate import Validator, read_received
from node.phantom import Phantom
from node.storage.records import InstanceRecord
from tests.harness import ProcessNode, as_file, free_port, peer, wait_port, write_config

#: storescu's calling AE title, a peer of the node.
DCMTK_AE = "STORESCU"


def _best_us(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times) * 1e6


def per_instance(files: list[Path], cache: Path) -> None:
    """What the pipeline did per instance before validation, and what it does now.

    Both sides read the index record (its decoded values are shared with the
    rules, so the difference is what validation really adds to ingest).
    """
    validator = Validator(ValidationSettings(), IODTables.load(cache))
    n = len(files)

    def before() -> None:
        for f in files:
            InstanceRecord.from_dataset(dcmread(f, stop_before_pixels=True))

    def after() -> None:
        for f in files:
            received = read_received(f)
            validator.check(received)
            InstanceRecord.from_dataset(received.dataset)
            InstanceGeometry.from_dataset(received.dataset)

    received = [read_received(f) for f in files]
    old = _best_us(before, 7) / n
    new = _best_us(after, 7) / n
    rules = _best_us(lambda: [validator.check(r) for r in received], 7) / n
    print(f"per instance (512x512 CT, {n} files):")
    print(f"  parse header + index record (before)  {old:8.0f} µs")
    print(f"  ... + pixel element, rules, geometry  {new:8.0f} µs")
    print(f"  validation adds                       {new - old:8.0f} µs per instance"
          f"  (rules alone on a parsed header: {rules:.0f} µs)")


def series_check(work: Path, slices: int) -> None:
    ph = Phantom(seed="bench-series", slices_count=slices, rows=16, columns=16)
    rows = [(ph.sop_uid(i), i + 1, InstanceGeometry.from_dataset(ph.slice(i)))
            for i in range(slices)]
    pure = _best_us(lambda: analyse_series(rows), 5) / 1000
    settings = write_config(work / "series-node", data=work / "series").settings()
    ctx = NodeContext.open(settings, with_key=True)
    try:
        # The series check is measured, not de-identification: stored as sent.
        source = Source("BENCH", "127.0.0.1", "bench", route="deidentified")
        for i in range(slices):
            ctx.ingest.ingest_bytes(as_file(ph.slice(i)), source)
        full = _best_us(lambda: ctx.series.check(ph.series_uid), 5) / 1000
        state = ctx.series.check(ph.series_uid).state
    finally:
        ctx.close()
    print(f"series check, {slices} slices:")
    print(f"  geometry analysis (sort, gaps, grid)  {pure:8.1f} ms")
    print(f"  whole check (read index, record)      {full:8.1f} ms  -> {state}")


def _storescu(port: int, called: str, files: list[Path]) -> float:
    start = time.perf_counter()
    subprocess.run(["storescu", "-aet", DCMTK_AE, "-aec", called, "127.0.0.1", str(port),
                    *map(str, files)], check=True, capture_output=True,
                   env={**os.environ, "TCP_NODELAY": "1"})
    return time.perf_counter() - start


def _rate_storescp(files: list[Path]) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        proc = subprocess.Popen(["storescp", "-od", tmp, "-aet", "STORESCP", str(port)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env={**os.environ, "TCP_NODELAY": "1"})
        try:
            wait_port(port)
            return len(files) / _storescu(port, "STORESCP", files)
        finally:
            proc.terminate()
            proc.wait()


def _rate_lamina(files: list[Path], workers: int, enabled: bool) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        node = ProcessNode.with_workers(Path(tmp), workers, validation={"enabled": enabled},
                                        peers={"dcmtk": peer(DCMTK_AE, "store")})
        try:
            node.start()
            return len(files) / _storescu(node.port, "LAMINA", files)
        finally:
            node.stop()


def ingest(files: list[Path], repeats: int, workers: int) -> None:
    runs: dict[str, list[float]] = {"storescp": [], "validation on": [], "validation off": []}
    for run in range(repeats + 1):  # run 0 warms caches and the IOD table cache
        rates = {"storescp": _rate_storescp(files),
                 "validation on": _rate_lamina(files, workers, True),
                 "validation off": _rate_lamina(files, workers, False)}
        if run:
            for name, rate in rates.items():
                runs[name].append(rate)
    medians = {name: statistics.median(r) for name, r in runs.items()}
    print(f"ingest, {len(files)} slices, storescu -> server, lamina {workers} workers:")
    for name, rate in medians.items():
        print(f"  {name:<15} median {rate:7.1f} inst/s  (runs: "
              f"{', '.join(f'{r:.0f}' for r in runs[name])})")
    on = medians["validation on"] / medians["storescp"]
    off = medians["validation off"] / medians["storescp"]
    print(f"  ratio to storescp: validation on {on:.2f}, off {off:.2f}"
          f"  (on/off {medians['validation on'] / medians['validation off']:.2f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2, help="lamina receiving processes")
    parser.add_argument("--no-ingest", action="store_true", help="skip the storescu runs")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        files = Phantom(seed="bench-validation", slices_count=args.slices).write(work / "study")
        per_instance(files[:50], work / "cache")
        series_check(work, args.slices)
        if args.no_ingest:
            return
        if not shutil.which("storescu") or not shutil.which("storescp"):
            raise SystemExit("the ingest comparison needs DCMTK (apt-get install dcmtk)")
        ingest(files, args.repeats, args.workers)


if __name__ == "__main__":
    main()
