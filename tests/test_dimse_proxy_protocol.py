"""The PROXY header before the A-ASSOCIATE-RQ, over real sockets: v1 and v2 parsed, a
malformed or absent header from a trusted address closes the connection at once, and an
untrusted source is closed without being read."""

from __future__ import annotations

import socket
import struct
import time

import pytest

from node.dimse.proxy_protocol import V2_SIGNATURE, ProxyHeaderError, ProxyPolicy, read_header
from tests.harness import InProcessNode, ProcessNode, echo, peer, proxy_relay, write_config


def _pair(payload: bytes) -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair()
    a.sendall(payload)
    return a, b


def test_v1_and_v2_headers_give_the_client_address_and_leave_the_rest():
    a, b = _pair(b"PROXY TCP4 10.1.2.3 10.0.0.1 40000 104\r\nREST")
    assert read_header(b, 2) == ("10.1.2.3", 40000)
    assert b.recv(4) == b"REST"
    body = socket.inet_aton("10.9.8.7") + socket.inet_aton("10.0.0.1") + struct.pack("!HH", 5, 104)
    a2, b2 = _pair(V2_SIGNATURE + struct.pack("!BBH", 0x21, 0x11, len(body)) + body + b"X")
    assert read_header(b2, 2) == ("10.9.8.7", 5)
    assert b2.recv(1) == b"X"
    for s in (a, b, a2, b2):
        s.close()


@pytest.mark.parametrize("payload", [b"\x01\x00\x00\x00\x00\x10" + b"\x00" * 10,
                                     b"PROXY TCP4 nonsense\r\n", b"PROXY " + b"9" * 200])
def test_malformed_headers_are_refused(payload):
    a, b = _pair(payload)
    with pytest.raises(ProxyHeaderError):
        read_header(b, 1)
    a.close()
    b.close()


def test_trust_is_by_network():
    policy = ProxyPolicy.parse(["127.0.0.1/32", "10.0.0.0/8"])
    assert policy.trusts("10.3.4.5") and policy.trusts("127.0.0.1")
    assert not policy.trusts("192.168.1.1")


def _closed_at_once(port: int, payload: bytes) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(payload)
        try:
            return sock.recv(1024) == b""
        except ConnectionResetError:
            return True


def test_node_closes_an_associate_request_without_header(tmp_path):
    config = write_config(tmp_path / "node")
    config.path.write_text(config.path.read_text()
                           + '\n[dimse]\nproxy_protocol = true\nproxy_trusted = ["127.0.0.1/32"]\n')
    with InProcessNode(config) as node:
        # an A-ASSOCIATE-RQ's first bytes where the header should be: closed, nothing answered
        assert _closed_at_once(node.port, b"\x01\x00\x00\x00\x00\xcd" + b"\x00" * 20)
        assert _closed_at_once(node.port, b"PROXY TCP4 bad\r\n")


def test_the_peer_policy_sees_the_address_in_the_header(tmp_path):
    config = write_config(tmp_path / "node", peers={"tests": peer("TESTSCU", "store",
                                                                    host="10.20.30.40")})
    config.path.write_text(config.path.read_text()
                           + '\n[dimse]\nproxy_protocol = true\nproxy_trusted = ["127.0.0.1/32"]\n')
    with InProcessNode(config) as node:
        allowed = proxy_relay(node.port, b"PROXY TCP4 10.20.30.40 127.0.0.1 5000 104\r\n")
        assert echo(allowed, aet="TESTSCU") == 0
        refused = proxy_relay(node.port, b"PROXY TCP4 10.20.30.41 127.0.0.1 5000 104\r\n")
        assert echo(refused, aet="TESTSCU") != 0


def test_a_health_check_local_header_then_close_is_dropped_quietly(tmp_path):
    """HAProxy's check-send-proxy: a v2 LOCAL header, then a close (or a reset). No
    association is started on it, so nothing is logged as an error; a LOCAL header followed
    by an association is still served (from the socket's own address)."""
    config = write_config(tmp_path / "node")
    config.path.write_text(config.path.read_text()
                           + '\n[dimse]\nproxy_protocol = true\nproxy_trusted = ["127.0.0.1/32"]\n')
    local = V2_SIGNATURE + struct.pack("!BBH", 0x20, 0x00, 0)
    with ProcessNode(config) as node:  # its own process: pynetdicom's log lines are in its log
        for reset in (False, True, False, True):
            with socket.create_connection(("127.0.0.1", node.port), timeout=10) as sock:
                if reset:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.sendall(local)
        assert echo(proxy_relay(node.port, local)) == 0
        time.sleep(0.5)  # the handler threads of the closed connections have finished
        log = node.log()
    assert '"association accepted"' in log
    assert '"level": "error"' not in log, log[-2000:]
