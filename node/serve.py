"""``lamina serve``: one or several receiving processes sharing one port.

The DIMSE server itself is :func:`node.dimse.server.build_dimse_server`; this
module only runs processes around it (no pynetdicom here).

One pynetdicom process tops out well below DCMTK's storescp (the GIL and the
per-PDU Python work), so the node can run N worker processes bound to the same
port with SO_REUSEPORT; the kernel spreads associations between them and they
share the WAL-mode index and the blob store. The parent prepares the data
folder (migrations, stale spool files), starts the workers, runs the series
sweep (one per node, so a series is checked once when its quiet period ends),
and stops them on SIGTERM/SIGINT. Workers die with the parent (PR_SET_PDEATHSIG), so a kill -9
of the node never leaves orphans holding the port.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
import threading
from collections.abc import Callable

from node.audit.trail import Actor
from node.config import Settings
from node.context import NodeContext
from node.dimse.server import build_dimse_server
from node.logs import quiet_pydicom, setup_logging

log = logging.getLogger("lamina.server")

_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent_pid: int) -> None:
    """Ask Linux to SIGKILL this worker when the node process dies."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def _wait_for_stop(alive: Callable[[], bool] = lambda: True) -> bool:
    """Block until SIGTERM/SIGINT (True) or until ``alive()`` turns False (False)."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(0.5):
        if not alive():
            return False
    return True


def run_worker(settings: Settings, parent_pid: int | None = None) -> None:
    """Serve associations on the configured port until told to stop."""
    if parent_pid is not None:
        _die_with_parent(parent_pid)
    setup_logging(settings.log.level)
    quiet_pydicom()
    ctx = NodeContext.open(settings, migrate=False, with_key=True)
    ctx.start()
    server = build_dimse_server(ctx).start()
    log.info("listening", extra={"fields": {"ae_title": settings.node.ae_title,
                                            "port": server.port}})
    try:
        _wait_for_stop()
    finally:
        server.stop()
        ctx.close()


def serve(settings: Settings) -> None:
    """Prepare the data folder, then run the workers until SIGTERM/SIGINT."""
    setup_logging(settings.log.level)
    quiet_pydicom()
    if settings.node.workers > 1 and settings.node.port == 0:
        raise ValueError("node.port: must be fixed when node.workers > 1")
    ctx = NodeContext.open(settings, migrate=True, with_key=True)  # refuse early without a key
    cleared = ctx.blobs.clear_spool()
    actor = Actor(ae_title=settings.node.ae_title, user=f"pid:{os.getpid()}")
    ctx.start(supervisor=True)
    ctx.audit.record("node.started", actor,
                     {"workers": settings.node.workers, "stale_spool_files": cleared})
    try:
        if settings.node.workers == 1:
            run_worker(settings)
            return
        spawn = multiprocessing.get_context("spawn")
        workers = [spawn.Process(target=run_worker, args=(settings, os.getpid()),
                                 name=f"lamina-worker-{i}", daemon=False)
                   for i in range(settings.node.workers)]
        for w in workers:
            w.start()
        try:
            if not _wait_for_stop(lambda: all(w.is_alive() for w in workers)):
                log.error("a worker process died; stopping the node")
                raise SystemExit(1)
        finally:
            for w in workers:
                w.terminate()
            for w in workers:
                w.join(timeout=10)
                if w.is_alive():
                    log.error("worker did not stop in 10 s; killing it",
                              extra={"fields": {"worker_pid": w.pid}})
                    w.kill()
                    w.join()
    finally:
        ctx.audit.record("node.stopped", actor, {})
        ctx.close()
