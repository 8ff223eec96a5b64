"""The PROXY protocol (v1 text, v2 binary) HAProxy sends before the A-ASSOCIATE-RQ.

Behind a load balancer every association comes from the balancer's address; with
``[dimse] proxy_protocol = true`` the node reads the header HAProxy writes (``send-proxy`` /
``send-proxy-v2``) and uses the client's real address for the AE+IP peer policy, the audit
trail and the logs. Only connections from ``proxy_trusted`` networks may speak it; anyone
else could claim any address. Hand-written because the header is a few fixed fields and the
PyPI parsers either read past the header or pull in an asyncio server.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from dataclasses import dataclass

from node.dimse.sender import recv_exactly

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_MAX = 107  # the longest v1 line, CRLF included (the specification's limit)


class ProxyHeaderError(ValueError):
    """The header is absent, malformed or truncated: the connection is closed."""


@dataclass(frozen=True)
class ProxyPolicy:
    """Which source networks may send a PROXY header (the balancers)."""

    trusted: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]

    @classmethod
    def parse(cls, networks: list[str] | tuple[str, ...]) -> ProxyPolicy:
        return cls(tuple(ipaddress.ip_network(n, strict=False) for n in networks))

    def trusts(self, host: str) -> bool:
        address = ipaddress.ip_address(host)
        return any(address in network for network in self.trusted)


def read_header(sock: socket.socket, timeout: float) -> tuple[str, int] | None:
    """Read one PROXY header (and nothing after it); the client's (address, port), or None
    for a LOCAL/UNKNOWN header (a health check: keep the socket's own address)."""
    sock.settimeout(timeout)
    try:
        start = recv_exactly(sock, 12)
        if start == V2_SIGNATURE:
            return _v2(sock)
        if start.startswith(b"PROXY "):
            return _v1(sock, start)
    except (TimeoutError, OSError) as exc:
        raise ProxyHeaderError(f"no PROXY header: {type(exc).__name__}") from None
    finally:
        sock.settimeout(None)
    raise ProxyHeaderError("no PROXY header")


def speaks(sock: socket.socket, timeout: float) -> bool:
    """After a LOCAL header: True once the peer sends a byte (left unread for the
    association), False when it closes, resets or stays silent for ``timeout`` s. HAProxy's
    health check (``check-send-proxy``) is a LOCAL header and then a close: dropped quietly,
    it never becomes an association that fails on a half-read PDU and logs an error."""
    sock.settimeout(timeout)
    try:
        return sock.recv(1, socket.MSG_PEEK) != b""
    except OSError:  # reset by the peer, or the timeout
        return False
    finally:
        sock.settimeout(None)


def _v1(sock: socket.socket, start: bytes) -> tuple[str, int] | None:
    line = start
    while not line.endswith(b"\r\n"):
        if len(line) >= V1_MAX:
            raise ProxyHeaderError("PROXY v1 line too long")
        line += recv_exactly(sock, 1)
    parts = line[:-2].decode("ascii", "replace").split(" ")
    if len(parts) >= 2 and parts[1] == "UNKNOWN":
        return None
    if len(parts) != 6 or parts[1] not in ("TCP4", "TCP6"):
        raise ProxyHeaderError("malformed PROXY v1 line")
    try:
        ipaddress.ip_address(parts[2])
        port = int(parts[4])
    except ValueError:
        raise ProxyHeaderError("malformed PROXY v1 address") from None
    if not 0 <= port <= 65535:
        raise ProxyHeaderError("malformed PROXY v1 port")
    return parts[2], port


def _v2(sock: socket.socket) -> tuple[str, int] | None:
    version_command, family, length = struct.unpack("!BBH", recv_exactly(sock, 4))
    if version_command >> 4 != 2 or version_command & 0x0F not in (0, 1):
        raise ProxyHeaderError("unsupported PROXY v2 version or command")
    body = recv_exactly(sock, length)
    if version_command & 0x0F == 0:  # LOCAL: the balancer's own connection
        return None
    if family >> 4 == 1 and len(body) >= 12:  # AF_INET
        return socket.inet_ntop(socket.AF_INET, body[:4]), struct.unpack("!H", body[8:10])[0]
    if family >> 4 == 2 and len(body) >= 36:  # AF_INET6
        return socket.inet_ntop(socket.AF_INET6, body[:16]), struct.unpack("!H", body[32:34])[0]
    if family >> 4 == 0:  # UNSPEC
        return None
    raise ProxyHeaderError("unsupported PROXY v2 address family")
