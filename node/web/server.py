"""Serving the app with uvicorn on a socket this module binds, in a thread of the node.

``lamina serve`` runs one per receiving process, beside the DIMSE server and
stopped with it; with several worker processes each binds the same port with
SO_REUSEPORT (as the DICOM port) and the kernel spreads connections. The
socket is bound here, not by uvicorn, so port 0 works (tests) and the port is
known before the first request.
"""

from __future__ import annotations

import logging
import socket
import threading

import uvicorn

log = logging.getLogger("lamina.web")


class HttpServer:
    """uvicorn in a thread: :meth:`start` returns once it accepts connections."""

    def __init__(self, app, bind: str, port: int, *, reuse_port: bool = False) -> None:
        self.app = app
        self.bind = bind
        self.requested_port = port
        self.reuse_port = reuse_port
        self._socket: socket.socket | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        if self._socket is None:
            raise RuntimeError("the HTTP server is not started")
        return self._socket.getsockname()[1]

    def start(self, timeout: float = 15.0) -> HttpServer:
        family = socket.AF_INET6 if ":" in self.bind else socket.AF_INET
        # IPPROTO_TCP, not the default 0: asyncio turns Nagle's algorithm off (TCP_NODELAY)
        # only on connections whose socket says it is TCP (base_events._set_nodelay), and
        # accepted sockets inherit the listener's protocol number. With Nagle on, every
        # answer after the first on a keep-alive connection waited for the client's
        # delayed ACK of its headers before its body went out: 40 ms per request.
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if self.reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            sock.bind((self.bind, self.requested_port))
            sock.listen(128)
        except OSError:
            sock.close()
            raise
        sock.setblocking(False)
        self._socket = sock
        config = uvicorn.Config(self.app, log_config=None, access_log=False, lifespan="off",
                                timeout_graceful_shutdown=5)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]},
                                        name="lamina-http", daemon=True)
        self._thread.start()
        ready = threading.Event()
        for _ in range(int(timeout / 0.01)):
            if self._server.started or not self._thread.is_alive():
                break
            ready.wait(0.01)
        if not self._server.started:
            self.stop()
            raise OSError(f"the HTTP server did not start on {self.bind}:{self.requested_port}")
        return self

    def stop(self) -> None:
        server, thread, sock = self._server, self._thread, self._socket
        self._server = self._thread = None
        if server is not None:
            server.should_exit = True
        if thread is not None:
            thread.join(10)
        if sock is not None:
            sock.close()
            self._socket = None
