"""The supervisor's hand-over (node.acceptor) over real sockets: a connection accepted on
the listening socket arrives in the least-busy worker's channel, still connected to its
client, and workers' reported counts steer the next one."""

from __future__ import annotations

import socket
import time

import pytest

from node.acceptor import Acceptor, WorkerChannel


def _listener() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


def _until(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)


@pytest.fixture
def acceptor():
    acc = Acceptor(_listener()).start()
    yield acc
    acc.stop()


def _attach(acc: Acceptor, key: str) -> WorkerChannel:
    supervisor_end, worker_end = socket.socketpair()
    acc.add(key, supervisor_end)
    return WorkerChannel(worker_end)


def test_handed_socket_is_the_clients_connection(acceptor):
    worker = _attach(acceptor, "a")
    with socket.create_connection(("127.0.0.1", acceptor.port), timeout=5) as client:
        handed = worker.receive()
        assert handed is not None
        with handed:
            assert handed.getpeername() == client.getsockname()
            assert handed.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            client.sendall(b"ping")
            assert handed.recv(4) == b"ping"
            handed.sendall(b"pong")
            assert client.recv(4) == b"pong"
    worker.close()


def test_connections_go_to_the_least_busy_worker(acceptor):
    a, b = _attach(acceptor, "a"), _attach(acceptor, "b")
    clients = [socket.create_connection(("127.0.0.1", acceptor.port), timeout=5)
               for _ in range(2)]
    _until(lambda: sorted(acceptor.counts().values()) == [1, 1])
    got_a, got_b = a.receive(), b.receive()
    assert got_a is not None and got_b is not None
    # a reports both of its connections ended; b still holds one: the next goes to a
    a.report(0)
    b.report(1)
    _until(lambda: acceptor.counts() == {"a": 0, "b": 1})
    third = socket.create_connection(("127.0.0.1", acceptor.port), timeout=5)
    handed = a.receive()
    assert handed is not None and handed.getpeername() == third.getsockname()
    assert acceptor.counts() == {"a": 1, "b": 1}
    for s in (*clients, third, got_a, got_b, handed):
        s.close()
    a.close()
    b.close()


def test_a_dead_worker_is_dropped_and_the_next_connection_still_served(acceptor):
    a, b = _attach(acceptor, "a"), _attach(acceptor, "b")
    a.close()  # the worker's end closes when its process dies
    _until(lambda: list(acceptor.counts()) == ["b"])
    with socket.create_connection(("127.0.0.1", acceptor.port), timeout=5) as client:
        handed = b.receive()
        assert handed is not None and handed.getpeername() == client.getsockname()
        handed.close()
    b.close()


def test_receive_returns_none_when_the_supervisor_end_closes():
    supervisor_end, worker_end = socket.socketpair()
    worker = WorkerChannel(worker_end)
    supervisor_end.close()
    assert worker.receive() is None
    worker.close()
