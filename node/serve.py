"""``lamina serve``: one or several receiving processes sharing one port.

The DIMSE server itself is :func:`node.dimse.server.build_dimse_server`; this
module only runs processes around it (no pynetdicom here).

One pynetdicom process tops out well below DCMTK's storescp (the GIL and the
per-PDU Python work), so the node can run N worker processes; they share the
WAL-mode index and the blob store. The supervisor owns the one DIMSE listening
socket and hands each accepted connection to the least-busy worker
(:mod:`node.acceptor`; SO_REUSEPORT's hash put two senders on one of two
workers far too often). HTTP stays on SO_REUSEPORT in every worker. The
supervisor prepares the data folder (migrations, stale spool files), starts
the workers, restarts one that dies (audited ``node.worker_restarted``; the
kernel has released its association slots, which are flock'd files), runs the
series sweep (one per node, so a series is checked once when its quiet period
ends), and stops them on SIGTERM/SIGINT. Workers die with the parent
(PR_SET_PDEATHSIG), so a kill -9 of the node never leaves orphans.

One node per port and per data folder: before anything else the supervisor
probes the port with a plain bind (SO_REUSEADDR, not SO_REUSEPORT), which fails
while any other process listens there, and takes an ``flock`` on
``<data>/run/node.lock`` for its lifetime (its pid written inside). Without
these a second ``lamina serve`` would start silently beside the first
(HTTP's SO_REUSEPORT) and the kernel would split requests between two data
folders. With one worker
the supervisor serves on its own context; with more, each spawned worker opens
its own and the supervisor keeps the series sweep.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import gc
import logging
import multiprocessing
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

from node.acceptor import Acceptor, WorkerChannel
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


def _wait_for_stop() -> None:
    """Block until SIGTERM/SIGINT."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(0.5):
        pass


class ServeRefused(RuntimeError):
    """The node cannot start here (port or data folder taken, address unusable): one line."""


class NodeLock:
    """``<data>/run/node.lock``: held (flock) by the one node serving a data folder.

    The kernel drops the lock when the holder exits, however it exits, so a
    crashed node never blocks the next start; the pid inside is only for the message.
    """

    def __init__(self, data: Path) -> None:
        self.data = data
        self.path = data / "run" / "node.lock"
        self._fd: int | None = None

    def acquire(self) -> NodeLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            refusal = self._served(fd)
            os.close(fd)
            raise refusal from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def check_free(self) -> None:
        """Refuse when a node holds the lock; creates nothing (the folder may not exist)."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise self._served(fd) from None
        finally:
            os.close(fd)

    def _served(self, fd: int) -> ServeRefused:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
        who = f"lamina pid {holder}" if holder.isdigit() else "another lamina process"
        return ServeRefused(f"data folder {self.data} is already served by {who}")

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            os.close(self._fd)
            self._fd = None


def _bind_refusal(exc: OSError, bind: str, port: int) -> ServeRefused:
    if exc.errno == errno.EADDRINUSE:
        return ServeRefused(f"port {port} is already in use by another process")
    if exc.errno == errno.EACCES:
        return ServeRefused(f"port {port}: permission denied (ports below 1024 need privileges)")
    if exc.errno == errno.EADDRNOTAVAIL:
        return ServeRefused(f"node.bind {bind}: not an address of this machine")
    if isinstance(exc, socket.gaierror):
        return ServeRefused(f"node.bind {bind}: does not resolve")
    return ServeRefused(f"cannot listen on {bind}:{port}: {exc.strerror or exc}")


def check_port_free(bind: str, port: int) -> None:
    """Refuse when any other process listens on ``bind:port`` (port 0: nothing to check).

    A plain bind with SO_REUSEADDR (connections in TIME_WAIT do not count) and
    without SO_REUSEPORT, which every listener on that port makes fail.
    """
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(bind, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise _bind_refusal(exc, bind, port) from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            raise _bind_refusal(exc, bind, port) from None


def _serve_until_stopped(ctx: NodeContext, channel: WorkerChannel | None = None) -> None:
    """Serve associations (and HTTP, when ``http.enabled``) on ``ctx`` until SIGTERM/SIGINT;
    with ``channel``, the connections the supervisor hands over instead of a port of its own."""
    node = ctx.settings.node
    try:
        server = build_dimse_server(ctx).start(channel)
    except OSError as exc:
        raise _bind_refusal(exc, node.bind, node.port) from None
    web = None
    try:
        web = _start_http(ctx)
        _freeze_what_lives_forever()
        # "listening" once both ports answer: whoever waits for it (tests, scripts) may
        # use HTTP at once.
        log.info("listening", extra={"fields": {"ae_title": node.ae_title, "port": server.port}})
        _wait_for_stop()
    finally:
        if web is not None:
            web.stop()
        server.stop()


def _freeze_what_lives_forever() -> None:
    """Move every object the serving process has made so far (modules, pydicom's data
    dictionaries, the context) out of the garbage collector's sight: they live as long as
    the process. A full collection then looks at what associations made since, and took
    ~14 ms instead of ~200 ms under association churn (every thread waits for it)."""
    gc.collect()
    gc.freeze()


def _start_http(ctx: NodeContext):
    """The HTTP front end on ``http.port`` (shared by every worker, SO_REUSEPORT), or None."""
    http, node = ctx.settings.http, ctx.settings.node
    if not http.enabled:
        return None
    from node.web.app import build_app  # Starlette only where HTTP is served
    from node.web.server import HttpServer

    bind = http.bind or node.bind
    try:
        web = HttpServer(build_app(ctx), bind, http.port, reuse_port=node.workers > 1).start()
    except OSError as exc:
        raise _bind_refusal(exc, bind, http.port) from None
    log.info("http listening", extra={"fields": {"port": web.port, "base_path": http.base_path}})
    return web


def run_worker(settings: Settings, parent_pid: int | None = None,
               channel: socket.socket | None = None) -> None:
    """A spawned receiving process: its own context, serving the connections handed over on
    ``channel`` (its end of the pair with the supervisor) until told to stop."""
    if parent_pid is not None:
        _die_with_parent(parent_pid)
    setup_logging(settings.log.level, settings.node.id)
    quiet_pydicom()
    ctx = NodeContext.open(settings, migrate=False, with_key=True)
    ctx.start()
    try:
        _serve_until_stopped(ctx, WorkerChannel(channel) if channel is not None else None)
    finally:
        ctx.close()


def serve(settings: Settings) -> None:
    """Check the port and take the data folder, prepare the data folder, then serve
    (in this process with one worker, in spawned workers otherwise) until SIGTERM/SIGINT.

    Raises :class:`ServeRefused` when another process serves the data folder or
    listens on the port.
    """
    setup_logging(settings.log.level, settings.node.id)
    quiet_pydicom()
    node = settings.node
    if node.workers > 1 and node.port == 0:
        raise ValueError("node.port: must be fixed when node.workers > 1")
    http = settings.http
    if http.enabled and node.workers > 1 and http.port == 0:
        raise ValueError("http.port: must be fixed when node.workers > 1")
    lock = NodeLock(settings.storage.data)
    try:
        check_port_free(node.bind, node.port)
        if http.enabled:
            check_port_free(http.bind or node.bind, http.port)
    except ServeRefused:
        lock.check_free()  # the same node running again: say so, rather than "port in use"
        raise
    lock.acquire()
    if http.enabled:
        _metrics_folder(settings.storage.data)
    try:
        _supervise(settings)
    finally:
        lock.release()


def _metrics_folder(data: Path) -> None:
    """Every process of this node writes its HTTP metrics to ``<data>/run/metrics``
    (prometheus-client's multiprocess mode, read at import: set before any worker
    starts), emptied at start so a previous run's figures do not count."""
    if "prometheus_client" in sys.modules:
        return  # this process chose its mode already (an in-process test): per-process figures
    folder = data / "run" / "metrics"
    if folder.is_dir():
        for stale in folder.glob("*.db"):
            stale.unlink(missing_ok=True)
    folder.mkdir(parents=True, exist_ok=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(folder.resolve())


def _require_current_schema(ctx: NodeContext) -> None:
    """``[index] migrate_on_start = false``: the deploy migrates; a stale schema is refused."""
    from node.storage.backend import target_version

    current, target = ctx.index.schema_version(), target_version(ctx.settings.index.backend)
    if current < target:
        ctx.close()
        raise ServeRefused(f"index schema version {current} is older than {target} and"
                           " index.migrate_on_start is false: run `lamina migrate` first")


def _supervise(settings: Settings) -> None:
    # refuse early without a key
    ctx = NodeContext.open(settings, migrate=settings.index.migrate_on_start, with_key=True)
    if not settings.index.migrate_on_start:
        _require_current_schema(ctx)
    cleared = ctx.blobs.clear_spool()
    actor = Actor(ae_title=settings.node.ae_title, user=f"pid:{os.getpid()}")
    ctx.start(supervisor=True)
    ctx.audit.record("node.started", actor,
                     {"workers": settings.node.workers, "stale_spool_files": cleared})
    try:
        if settings.node.workers == 1:
            _serve_until_stopped(ctx)
            return
        _supervise_workers(settings, ctx, actor)
    finally:
        ctx.audit.record("node.stopped", actor, {})
        ctx.close()


def _listen(bind: str, port: int) -> socket.socket:
    """The node's one DIMSE listening socket (the supervisor's; workers get connections)."""
    try:
        infos = socket.getaddrinfo(bind, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, address = infos[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise _bind_refusal(exc, bind, port) from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise _bind_refusal(exc, bind, port) from None
    return sock


class _Workers:
    """The supervisor's receiving processes, each attached to the acceptor by its pair."""

    def __init__(self, settings: Settings, acceptor: Acceptor) -> None:
        self.settings = settings
        self.acceptor = acceptor
        self.spawn = multiprocessing.get_context("spawn")
        self.procs: list[multiprocessing.process.BaseProcess] = []

    def start(self, slot: int) -> multiprocessing.process.BaseProcess:
        supervisor_end, worker_end = socket.socketpair()
        proc = self.spawn.Process(target=run_worker,
                                  args=(self.settings, os.getpid(), worker_end),
                                  name=f"lamina-worker-{slot}", daemon=False)
        proc.start()
        worker_end.close()  # the child has its own copy
        self.acceptor.add(proc.pid, supervisor_end)
        if slot < len(self.procs):
            self.procs[slot] = proc
        else:
            self.procs.append(proc)
        return proc

    def dead(self) -> list[int]:
        return [i for i, p in enumerate(self.procs) if not p.is_alive()]

    def stop(self) -> None:
        for w in self.procs:
            w.terminate()
        for w in self.procs:
            w.join(timeout=10)
            if w.is_alive():
                log.error("worker did not stop in 10 s; killing it",
                          extra={"fields": {"worker_pid": w.pid}})
                w.kill()
                w.join()


#: More than this many worker restarts within the window stops the node (a crash loop).
_MAX_RESTARTS, _RESTART_WINDOW = 5, 60.0


def _supervise_workers(settings: Settings, ctx: NodeContext, actor: Actor) -> None:
    """Accept on the node's port and hand connections to N workers until SIGTERM/SIGINT.

    A worker that dies is replaced and the restart audited. Its association slots
    (flock'd files, node.policy.SlotLimiter) were released by the kernel when it died.
    """
    node = settings.node
    acceptor = Acceptor(_listen(node.bind, node.port)).start()
    workers = _Workers(settings, acceptor)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    restarts: list[float] = []
    try:
        for i in range(node.workers):
            workers.start(i)
        while not stop.wait(0.2):
            for i in workers.dead():
                old = workers.procs[i]
                old.join()
                acceptor.remove(old.pid)
                now = time.monotonic()
                restarts = [t for t in restarts if now - t < _RESTART_WINDOW] + [now]
                if len(restarts) > _MAX_RESTARTS:  # dies as it starts: restarting cannot help
                    log.error("workers keep dying; stopping the node", extra={"fields": {
                        "worker_pid": old.pid, "exitcode": old.exitcode}})
                    raise SystemExit(1)
                new = workers.start(i)
                log.error("worker died; restarted", extra={"fields": {
                    "worker_pid": old.pid, "exitcode": old.exitcode, "new_pid": new.pid}})
                ctx.audit.record("node.worker_restarted", actor, {
                    "worker_pid": old.pid, "exitcode": old.exitcode, "new_pid": new.pid},
                    outcome="minor-failure")
    finally:
        acceptor.stop()
        workers.stop()
