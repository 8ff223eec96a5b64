"""CPU per instance, per stage, of the ingest service in-process (no network).

Feeds N synthetic 512×512 CT slices (node/phantom.py, as the other benchmarks
and tests/studies.py make them) through ``ctx.ingest.ingest_file`` on a scratch
node, once on the clinical route (validate + de-identify) and once on the
deidentified route (stored as received), and prints CPU ms per instance per
stage. Each stage is a wrapper around the function that does it, timed with
``time.thread_time`` and counted as self time (a nested stage's time is taken
out of its caller's), so the stages add up to the ingest call's CPU. What runs
on other threads (the audit-head signer) is the process's CPU minus the
calling thread's.

    .venv/bin/python -m benchmarks.ingest_stages [--instances 200] [--size 512] [--pollers N]
                                                 [--shape phantom|hospital]

``--pollers N`` runs N threads beside the ingest that wake every millisecond, as
pynetdicom's association threads do in a receiving process: every syscall that releases
the GIL (a file read, a lock) then hands it over, which a quiet single thread never
shows. The index transaction's own rows and the route's (the re-identification map and
de-identification evidence, ``Router.record``) are counted apart.

Copying each file into the spool (what the network layer does) is not counted.
The scratch node lives under ``TMPDIR``: ``TMPDIR=/dev/shm`` takes the disk (fsync
waits, other processes' I/O) out of the figures, to compare CPU on a busy machine.
"""

from __future__ import annotations

import argparse
import functools
import shutil
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from benchmarks.common import scratch_context, write_series
from node.audit.trail import AuditTrail
from node.ingest import pipeline
from node.ingest.routes import Router
from node.ingest.types import Source
from node.ingest.validate import Validator
from node.phantom import Phantom
from node.storage.records import InstanceGeometry, InstanceRecord

#: (stage, owner, attribute): the functions each stage's CPU is counted in.
STAGES: list[tuple[str, Any, str]] = [
    ("parse", pipeline, "read_received"),
    ("parse", pipeline, "dcmread"),
    ("validate", Validator, "check"),
    ("validate", InstanceRecord, "from_dataset"),
    ("validate", InstanceGeometry, "from_dataset"),
    ("de-identify", Router, "prepare"),
    ("blob write+fsync", pipeline.IngestService, "_promote"),
    ("index transaction", pipeline.IngestService, "_commit"),
    ("index: route's rows", Router, "record"),
    ("audit", AuditTrail, "append"),
    ("audit", AuditTrail, "committed"),
    ("hooks", pipeline.IngestService, "_classify"),
    ("hooks", pipeline.IngestService, "_after_commit"),
]
#: Instances ingested before the figures (imports, tables, prepared statements).
WARM = 5


class StageClock:
    """Self CPU time per stage on the calling thread (nested stages subtracted)."""

    def __init__(self) -> None:
        self.spent: dict[str, float] = defaultdict(float)
        self._stack: list[list[float]] = []  # per open stage: [time nested stages took]

    def wrap(self, stage: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            self._stack.append([0.0])
            start = time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                took = time.thread_time() - start
                nested = self._stack.pop()[0]
                self.spent[stage] += took - nested
                if self._stack:
                    self._stack[-1][0] += took
        return timed


@contextmanager
def instrumented(clock: StageClock, hooks: tuple[Any, ...]) -> Iterator[None]:
    """Wrap every stage's function (and each hook's ``on_stored``) for the block."""
    saved: list[tuple[Any, str, Any]] = []
    targets = [*STAGES, *(("hooks", h, "on_stored") for h in hooks)]
    for stage, owner, name in targets:
        original = owner.__dict__[name] if name in getattr(owner, "__dict__", {}) else getattr(
            owner, name)
        saved.append((owner, name, original))
        if isinstance(original, staticmethod | classmethod):
            wrapped = type(original)(clock.wrap(stage, original.__func__))
        else:
            wrapped = clock.wrap(stage, original)
        setattr(owner, name, wrapped)
    try:
        yield
    finally:
        for owner, name, original in reversed(saved):
            setattr(owner, name, original)


@contextmanager
def pollers(count: int) -> Iterator[None]:
    """``count`` threads that wake every millisecond for the block (see the module doc)."""
    stop = threading.Event()

    def poll() -> None:
        while not stop.wait(0.001):
            pass

    threads = [threading.Thread(target=poll, daemon=True) for _ in range(count)]
    for thread in threads:
        thread.start()
    try:
        yield
    finally:
        stop.set()
        for thread in threads:
            thread.join()


def run_route(work: Path, files: list[Path], route: str, poll: int = 0) -> tuple[
        dict[str, float], float, float]:
    """Per-stage CPU ms per instance, the ingest calls' CPU ms and the process's CPU ms
    per instance (the latter includes the audit-head thread and any pollers)."""
    ctx = scratch_context(work / route)
    ctx.start()
    source = Source("BENCH", "127.0.0.1", "bench", route=route)
    spool = ctx.blobs.spool_dir
    try:
        for f in files[:WARM]:
            part = spool / "warm.part"
            shutil.copyfile(f, part)
            ctx.ingest.ingest_file(part, source)
            part.unlink(missing_ok=True)
        clock = StageClock()
        total_thread = total_process = 0.0
        with instrumented(clock, ctx.ingest.hooks), pollers(poll):
            for i, f in enumerate(files[WARM:]):
                part = spool / f"{i}.part"
                shutil.copyfile(f, part)
                p0, t0 = time.process_time(), time.thread_time()
                result = ctx.ingest.ingest_file(part, source)
                total_thread += time.thread_time() - t0
                total_process += time.process_time() - p0
                part.unlink(missing_ok=True)
                if result.action != "stored":
                    raise SystemExit(f"{route}: instance {i} was {result.action}: "
                                     f"{result.outcome.comment}")
        ctx.drain()
    finally:
        ctx.stop()
        ctx.close()
    n = len(files) - WARM
    per = {stage: ms * 1000 / n for stage, ms in clock.spent.items()}
    per["other (pipeline glue)"] = total_thread * 1000 / n - sum(per.values())
    return per, total_thread * 1000 / n, total_process * 1000 / n


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=200)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--shape", choices=("phantom", "hospital"), default="phantom",
                        help="hospital: with a scanner's private groups and sequences")
    parser.add_argument("--pollers", type=int, default=0,
                        help="threads waking every millisecond beside the ingest")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="lamina-stages-") as tmp:
        work = Path(tmp)
        files = write_series(Phantom(seed="bench-stages", slices_count=args.instances + WARM,
                                     rows=args.size, columns=args.size),
                             work / "series", args.shape)
        results = {route: run_route(work, files, route, args.pollers)
                   for route in ("clinical", "deidentified")}
    stages = list(dict.fromkeys(s for per, _, _ in results.values() for s in per))
    print(f"{args.instances} {args.shape} instances of {args.size}x{args.size} CT,"
          " CPU ms per instance"
          f"{f', {args.pollers} pollers' if args.pollers else ''}")
    print(f"{'stage':<24}{'clinical':>10}{'deidentified':>14}")
    for stage in stages:
        print(f"{stage:<24}" + "".join(f"{results[r][0].get(stage, 0.0):>{w}.3f}"
                                        for r, w in (("clinical", 10), ("deidentified", 14))))
    print(f"{'ingest call (thread)':<24}{results['clinical'][1]:>10.3f}"
          f"{results['deidentified'][1]:>14.3f}")
    print(f"{'process (all threads)':<24}{results['clinical'][2]:>10.3f}"
          f"{results['deidentified'][2]:>14.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
