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
                                                 [--shape phantom|hospital] [--network]

``--pollers N`` runs N threads beside the ingest that wake every millisecond, as
pynetdicom's own association threads did (a receiving process now serves storage
associations on one thread each, :mod:`node.dimse.framed`): every syscall that releases
the GIL (a file read, a lock) then hands it over, which a quiet single thread never
shows. The index transaction's own rows and the route's (the re-identification map and
de-identification evidence, ``Router.record``) are counted apart.

Then two rows of wall time: the ingest call's, and what of it was spent waiting
rather than computing (the fsyncs, the disk, the index's lock), which is what the
durability steps cost a sender beyond the CPU. The last row is how much the index file
grew per instance (its write-ahead log checkpointed into it), in KB: what each stored
instance adds to the index, a count that does not vary with the machine's load.

Copying each file into the spool (what the network layer does) is not counted.
The scratch node lives under ``TMPDIR``: ``TMPDIR=/dev/shm`` takes the disk (fsync
waits, other processes' I/O) out of the figures, to compare CPU on a busy machine.

``--network`` measures the same stages over the network instead: DCMTK ``storescu``
(TCP_NODELAY) sends the series to a one-worker node started in this process
(``tests.harness.InProcessNode``, serving as ``lamina serve`` does), so the receiving
side is counted too (``receiving``: reading the PDUs, writing the spool, the answer; on
the deidentified route the spool file's creation and its SHA-256 too, taken as it is
written), the C-STORE service's and the pipeline's own code are ``pipeline glue``, and
the ``process`` row is the node's whole CPU over the send, every thread. This is the
``benchmarks.ingest`` server's path, stage by stage (issue 15's breakdown).
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

from benchmarks.common import scratch_context, write_series
from node.audit.trail import AuditTrail
from node.context import NodeContext
from node.dimse.framed import FramedAssociation
from node.dimse.handlers.store import StoreService
from node.dimse.receive import StoreReceiver
from node.ingest import pipeline
from node.ingest.routes import Router
from node.ingest.types import Source
from node.ingest.validate import Validator
from node.phantom import Phantom
from node.storage.records import InstanceGeometry, InstanceRecord
from tests.harness import NODE_AET, TEST_AET, InProcessNode, peer, write_config

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
#: The receiving side's functions, counted with ``--network`` (see the module doc).
NETWORK_STAGES: list[tuple[str, Any, str]] = [
    *STAGES,
    ("receiving", FramedAssociation, "_serve"),
    *(("receiving", StoreReceiver, name) for name in (
        "take_pdu", "_read_into", "_p_data", "_command", "_write", "_stored", "_send_command")),
    ("pipeline glue", StoreService, "receive"),  # and ingest_file, _ingest in it
]
#: The routes measured, in the table's column order.
ROUTES = ("clinical", "deidentified")
#: Instances ingested before the figures (imports, tables, prepared statements).
WARM = 5


class StageClock:
    """Self CPU time per stage on each thread that calls one (nested stages subtracted):
    a served node also appends audit events from its audit writer's thread."""

    def __init__(self) -> None:
        self.spent: dict[str, float] = defaultdict(float)
        self._threads = threading.local()  # .stack: per open stage, [time nested ones took]
        self._lock = threading.Lock()

    def wrap(self, stage: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            stack = self._threads.__dict__.setdefault("stack", [])
            stack.append([0.0])
            start = time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                took = time.thread_time() - start
                nested = stack.pop()[0]
                with self._lock:
                    self.spent[stage] += took - nested
                if stack:
                    stack[-1][0] += took
        return timed


@contextmanager
def instrumented(clock: StageClock, hooks: tuple[Any, ...],
                 stages: list[tuple[str, Any, str]] = STAGES) -> Iterator[None]:
    """Wrap every stage's function (and each hook's ``on_stored``) for the block."""
    saved: list[tuple[Any, str, Any]] = []
    targets = [*stages, *(("hooks", h, "on_stored") for h in hooks)]
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


class RouteCost(NamedTuple):
    """One route's figures, milliseconds per instance."""

    stages: dict[str, float]  # CPU per stage, on the calling thread
    thread: float  # CPU of the ingest calls (the calling thread)
    process: float  # CPU of the process meanwhile: the audit-head thread and pollers too
    wall: float  # wall time of the ingest calls: CPU plus waiting (fsync, disk, locks)
    index_kb: float  # growth of the index file (checkpointed), KB per instance


def run_route(work: Path, files: list[Path], route: str, poll: int = 0) -> RouteCost:
    """Feed ``files`` through ``route`` on a scratch node and time it (see the module doc)."""
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
        index_before = _index_bytes(ctx)
        clock = StageClock()
        total_thread = total_process = total_wall = 0.0
        with instrumented(clock, ctx.ingest.hooks), pollers(poll):
            for i, f in enumerate(files[WARM:]):
                part = spool / f"{i}.part"
                shutil.copyfile(f, part)
                w0, p0, t0 = time.perf_counter(), time.process_time(), time.thread_time()
                result = ctx.ingest.ingest_file(part, source)
                total_thread += time.thread_time() - t0
                total_process += time.process_time() - p0
                total_wall += time.perf_counter() - w0
                part.unlink(missing_ok=True)
                if result.action != "stored":
                    raise SystemExit(f"{route}: instance {i} was {result.action}: "
                                     f"{result.outcome.comment}")
        ctx.drain()
        index_growth = _index_bytes(ctx) - index_before
    finally:
        ctx.stop()
        ctx.close()
    n = len(files) - WARM
    per = {stage: ms * 1000 / n for stage, ms in clock.spent.items()}
    per["other (pipeline glue)"] = total_thread * 1000 / n - sum(per.values())
    return RouteCost(per, total_thread * 1000 / n, total_process * 1000 / n,
                     total_wall * 1000 / n, index_growth / 1024 / n)


def run_network_route(work: Path, files: list[Path], route: str) -> RouteCost:
    """Send ``files`` with storescu to a one-worker node in this process, on ``route``, and
    time it (see the module doc): the node's CPU per stage and in all, over the send."""
    config = write_config(work / f"network-{route}",
                          peers={"bench": peer(TEST_AET, "store", route=route)})
    with InProcessNode(config) as node:
        _storescu(node.port, files[:WARM])
        node.drain()
        index_before = _index_bytes(node.ctx)
        clock = StageClock()
        with instrumented(clock, node.ctx.ingest.hooks, NETWORK_STAGES):
            w0, p0 = time.perf_counter(), time.process_time()
            _storescu(node.port, files[WARM:])
            process, wall = time.process_time() - p0, time.perf_counter() - w0
        node.drain()
        index_growth = _index_bytes(node.ctx) - index_before
    n = len(files) - WARM
    per = {stage: ms * 1000 / n for stage, ms in clock.spent.items()}
    counted = sum(per.values())
    per["other threads, unwrapped"] = process * 1000 / n - counted
    return RouteCost(per, counted, process * 1000 / n, wall * 1000 / n, index_growth / 1024 / n)


def _storescu(port: int, files: list[Path]) -> None:
    """DCMTK storescu sends ``files`` on one association (TCP_NODELAY, as a modality).
    Not :func:`benchmarks.ingest.send`: it samples the connections from /proc until it
    has seen each sender's, which here would be CPU of the node's own process."""
    done = subprocess.run(["storescu", "-aet", TEST_AET, "-aec", NODE_AET, "127.0.0.1",
                           str(port), *map(str, files)], env={**os.environ, "TCP_NODELAY": "1"},
                          capture_output=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"storescu failed: {done.stderr.decode()[-500:]}")


def _index_bytes(ctx: NodeContext) -> int:
    """The size of the node's SQLite index with its write-ahead log checkpointed into it."""
    with ctx.index.connection() as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return os.path.getsize(ctx.index.path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=200)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--shape", choices=("phantom", "hospital"), default="phantom",
                        help="hospital: with a scanner's private groups and sequences")
    parser.add_argument("--pollers", type=int, default=0,
                        help="threads waking every millisecond beside the ingest")
    parser.add_argument("--network", action="store_true",
                        help="sent by storescu to a node in this process (see the module doc)")
    args = parser.parse_args()
    if args.network and not shutil.which("storescu"):
        raise SystemExit("--network needs DCMTK's storescu (apt-get install dcmtk)")
    with tempfile.TemporaryDirectory(prefix="lamina-stages-") as tmp:
        work = Path(tmp)
        files = write_series(Phantom(seed="bench-stages", slices_count=args.instances + WARM,
                                     rows=args.size, columns=args.size),
                             work / "series", args.shape)
        results = {route: run_network_route(work, files, route) if args.network
                   else run_route(work, files, route, args.pollers) for route in ROUTES}
    stages = list(dict.fromkeys(s for cost in results.values() for s in cost.stages))
    print(f"{args.instances} {args.shape} instances of {args.size}x{args.size} CT,"
          " ms per instance: CPU per stage, then wall time"
          f"{f', {args.pollers} pollers' if args.pollers else ''}"
          f"{'; sent by storescu to a one-worker node in this process' if args.network else ''}")
    print(f"{'stage':<24}{'clinical':>10}{'deidentified':>14}")

    def row(name: str, figures: list[float]) -> None:
        print(f"{name:<24}{figures[0]:>10.3f}{figures[1]:>14.3f}")

    for stage in stages:
        row(stage, [results[r].stages.get(stage, 0.0) for r in ROUTES])
    if args.network:
        row("stages (all threads)", [results[r].thread for r in ROUTES])
        row("process (all threads)", [results[r].process for r in ROUTES])
        row("send (wall)", [results[r].wall for r in ROUTES])
    else:
        row("ingest call (thread)", [results[r].thread for r in ROUTES])
        row("process (all threads)", [results[r].process for r in ROUTES])
        row("ingest call (wall)", [results[r].wall for r in ROUTES])
        row("waiting (wall - thread)", [results[r].wall - results[r].thread for r in ROUTES])
    row("index growth, KB", [results[r].index_kb for r in ROUTES])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
