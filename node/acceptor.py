"""One listening socket in the supervisor; each connection handed to the least-busy worker.

Why not SO_REUSEPORT for DIMSE: the kernel spreads connections by a hash of the
4-tuple, not by load, so two senders often land on one of two workers while the
other idles (../shared/NOTES.md). Here the supervisor accepts, and passes the
connected socket over a Unix socket pair (``SCM_RIGHTS``, :func:`socket.send_fds`)
to the worker with the fewest open connections; each worker reports its count
back on the same pair whenever it changes. Everything about the connection
(the PROXY header, the TLS handshake, the association) happens in the worker,
after the hand-over: the supervisor never reads a byte from it.

No pynetdicom here: the supervisor only accepts and hands over.
"""

from __future__ import annotations

import logging
import selectors
import socket
import struct
import threading
from contextlib import suppress
from dataclasses import dataclass, field

log = logging.getLogger("lamina.server")

_COUNT = struct.Struct("!I")  # a worker's report: how many connections it has open now


def set_nodelay(sock: socket.socket) -> None:
    """TCP_NODELAY on the accepted socket (kept by the descriptor the worker receives)."""
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class WorkerChannel:
    """The worker's end of its pair: receives connections, reports its open count."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._send_lock = threading.Lock()

    def receive(self) -> socket.socket | None:
        """The next handed connection (blocks); None once the supervisor is gone or
        :meth:`close` was called."""
        while True:
            try:
                _, fds, _, _ = socket.recv_fds(self.sock, 1, 1)
            except OSError:
                return None
            if not fds:
                return None  # EOF: the supervisor closed its end
            return socket.socket(fileno=fds[0])

    def report(self, open_connections: int) -> None:
        """Tell the supervisor how many connections this worker has open now."""
        # OSError: the supervisor is gone, and this worker dies with it (PDEATHSIG)
        with self._send_lock, suppress(OSError):
            self.sock.sendall(_COUNT.pack(open_connections))

    def close(self) -> None:
        """Unblock :meth:`receive` and close the pair."""
        with suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


@dataclass
class _Worker:
    key: object
    sock: socket.socket
    open: int = 0
    handed: int = 0
    buffer: bytearray = field(default_factory=bytearray)


class Acceptor:
    """The supervisor's accept loop: one listening socket, hand-over to workers.

    :meth:`add` a worker's pair (before or after :meth:`start`); :meth:`remove` it
    when the worker dies (a pair whose worker died reads EOF and is dropped too).
    Connections accepted while no worker is attached are closed at once.
    """

    def __init__(self, listener: socket.socket) -> None:
        self.listener = listener
        listener.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(listener, selectors.EVENT_READ, None)
        self._workers: dict[object, _Worker] = {}
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = socket.socketpair()
        self._selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._stopping = False
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self.listener.getsockname()[1])

    def add(self, key: object, sock: socket.socket) -> None:
        """Attach a worker by its supervisor-side end of the pair."""
        with self._lock:
            self._workers[key] = _Worker(key, sock)
        self._selector.register(sock, selectors.EVENT_READ, key)
        self._wake_w.send(b"w")

    def remove(self, key: object) -> None:
        with self._lock:
            worker = self._workers.pop(key, None)
        if worker is not None:
            with suppress(KeyError, ValueError):
                self._selector.unregister(worker.sock)
            worker.sock.close()

    def counts(self) -> dict[object, int]:
        """Open connections per worker, as last reported (or handed since)."""
        with self._lock:
            return {k: w.open for k, w in self._workers.items()}

    def start(self) -> Acceptor:
        self._thread = threading.Thread(target=self._run, name="dimse-acceptor", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop accepting and close the listening socket and every pair."""
        self._stopping = True
        self._wake_w.send(b"s")
        if self._thread is not None:
            self._thread.join(timeout=10)
        for key in list(self._workers):
            self.remove(key)
        self._selector.close()
        self.listener.close()
        self._wake_r.close()
        self._wake_w.close()

    def _run(self) -> None:
        while not self._stopping:
            for key, _ in self._selector.select(timeout=1.0):
                if key.data is None:
                    self._accept()
                elif key.data == "wake":
                    key.fileobj.recv(64)
                else:
                    self._read_report(key.data)

    def _accept(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:  # EMFILE and the like: keep serving the others
            log.error("accept failed", extra={"fields": {"reason": exc.strerror or str(exc)}})
            return
        with conn:
            set_nodelay(conn)
            self.hand_over(conn)

    def hand_over(self, conn: socket.socket) -> bool:
        """Pass ``conn`` to the least-busy worker (fewest open, then fewest handed so
        far: a tie goes round the workers). False when no worker could take it."""
        while True:
            with self._lock:
                live = sorted(self._workers.values(), key=lambda w: (w.open, w.handed))
                if not live:
                    return False
                worker = live[0]
                worker.open += 1
                worker.handed += 1
            try:
                socket.send_fds(worker.sock, [b"c"], [conn.fileno()])
                return True
            except OSError:
                self.remove(worker.key)  # that worker is gone: try the next

    def _read_report(self, key: object) -> None:
        with self._lock:
            worker = self._workers.get(key)
        if worker is None:
            return
        try:
            data = worker.sock.recv(4096)
        except OSError:
            data = b""
        if not data:
            self.remove(key)
            return
        worker.buffer += data
        while len(worker.buffer) >= _COUNT.size:
            (count,) = _COUNT.unpack_from(worker.buffer)
            del worker.buffer[:_COUNT.size]
            with self._lock:
                worker.open = count
