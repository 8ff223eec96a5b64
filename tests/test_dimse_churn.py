"""Association churn without growth: many associations, normal and aborted by the PDU
guard, leave the receiving process's file descriptors and threads where they were
(measured in the process that runs the server)."""

from __future__ import annotations

import os
import socket
import struct
import threading
import time

from tests.harness import InProcessNode, write_config

CYCLES = 150


#: Files the node opens on demand, never per association: the index's pooled connections
#: (one more whenever two threads read at once) and the audit head's lock (its first write).
_SHARED = ("index.sqlite3", "index.sqlite3-wal", "index.sqlite3-shm", "head.lock")


def _fds() -> int:
    """Open descriptors of this process, but for the node's :data:`_SHARED` files."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue  # the listing's own descriptor, closed by now
        count += os.path.basename(target) not in _SHARED
    return count


def _bad(port: int, payload: bytes) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(payload)
        sock.settimeout(5)
        while sock.recv(4096):
            pass


def _settled(baseline_threads: int, timeout: float = 10) -> int:
    deadline = time.monotonic() + timeout
    while threading.active_count() > baseline_threads and time.monotonic() < deadline:
        time.sleep(0.05)
    return threading.active_count()


def test_churn_leaves_no_descriptors_or_threads_behind(tmp_path):
    payloads = [struct.pack(">BBL", 0x53, 0, 4) + b"\0" * 4,  # unknown PDU type
                struct.pack(">BBL", 0x01, 0, 0x7FFF_FFFF),  # absurd A-ASSOCIATE-RQ
                struct.pack(">BBL", 0x04, 0, 6) + b"\0" * 6]  # P-DATA first
    with InProcessNode(write_config(tmp_path / "node")) as node:
        for _ in range(10):  # warm-up: lazily created files, pools, the index connection
            assert node.echo() == 0
            _bad(node.port, payloads[0])
        # association events wait for company (ASSOCIATION_LINGER): the audit writer's
        # connection and the head's lock file are opened by the warm-up's first batch
        node.drain()
        threads = _settled(threading.active_count())
        fds = _fds()
        for n in range(CYCLES):
            if n % 2:
                assert node.echo() == 0
            else:
                _bad(node.port, payloads[n // 2 % len(payloads)])
        node.drain()  # no audit batch being written while the descriptors are counted
        assert _settled(threads) <= threads
        assert _fds() <= fds + 2, "file descriptors leaked"
        assert node.echo() == 0
