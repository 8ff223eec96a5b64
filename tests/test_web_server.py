"""node.web.server: the HTTP server's own sockets."""

from __future__ import annotations

import os
import socket
from contextlib import suppress

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from node.web.server import HttpServer


def _hello(request: Request) -> PlainTextResponse:
    return PlainTextResponse("hello")


def _accepted_end(client: socket.socket) -> socket.socket:
    """The server's end of ``client``'s connection: the server runs in this process, so
    its accepted socket is one of this process's descriptors (a duplicate is returned)."""
    for name in os.listdir("/proc/self/fd"):
        with suppress(OSError):
            if not os.readlink(f"/proc/self/fd/{name}").startswith("socket:"):
                continue
            candidate = socket.socket(fileno=os.dup(int(name)))
            try:
                if (candidate.family == client.family
                        and candidate.getsockname() == client.getpeername()
                        and candidate.getpeername() == client.getsockname()):
                    return candidate
            except OSError:
                pass
            candidate.close()
    raise AssertionError("no accepted socket for this connection in this process")


def test_accepted_connections_send_without_waiting_for_acks():
    """Nagle's algorithm is off on every accepted connection (TCP_NODELAY): with it on,
    each answer after the first on a keep-alive connection waited for the client's
    delayed ACK of its headers before its body went out (40 ms per request)."""
    server = HttpServer(Starlette(routes=[Route("/", _hello)]), "127.0.0.1", 0).start()
    try:
        with socket.create_connection(("127.0.0.1", server.port)) as client:
            client.settimeout(10)
            client.sendall(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")
            answer = b""
            while not answer.endswith(b"hello"):
                chunk = client.recv(4096)
                assert chunk, f"connection closed before the answer: {answer!r}"
                answer += chunk
            assert answer.startswith(b"HTTP/1.1 200")
            with _accepted_end(client) as accepted:
                assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    finally:
        server.stop()
