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


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


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
        threads = _settled(threading.active_count())
        fds = _fds()
        for n in range(CYCLES):
            if n % 2:
                assert node.echo() == 0
            else:
                _bad(node.port, payloads[n // 2 % len(payloads)])
        assert _settled(threads) <= threads
        assert _fds() <= fds + 2, "file descriptors leaked"
        assert node.echo() == 0
