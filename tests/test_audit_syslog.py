"""The audit trail streamed to a real TLS syslog collector on 127.0.0.1: nothing sent and
nothing lost while it is down or untrusted, everything in order once it is up, RFC 5424
messages in RFC 5425 frames, a signed checkpoint after each batch."""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
import json
import socket
import ssl
import threading
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from node.audit.trail import Actor
from node.context import NodeContext
from tests.harness import free_port, write_config


def certificate(folder: Path, name: str) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (it is its own CA): (cert, key) files."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = folder / f"{name}.pem", folder / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


class Collector:
    """A TLS syslog collector reading RFC 5425 octet-counted frames."""

    def __init__(self, port: int, cert: Path, key: Path) -> None:
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(cert, key)
        self.server = socket.create_server(("127.0.0.1", port))
        self.server.settimeout(0.2)
        self.frames: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                raw, _ = self.server.accept()
            except TimeoutError:
                continue
            try:
                with self.context.wrap_socket(raw, server_side=True) as conn:
                    self._read(conn.makefile("rb"))
            except (OSError, ssl.SSLError):
                continue

    def _read(self, stream) -> None:
        while True:
            length = b""
            while (c := stream.read(1)) not in (b" ", b""):
                length += c
            if not length:
                return
            self.frames.append(stream.read(int(length)))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.server.close()


def node_with_syslog(tmp_path: Path, port: int, ca: Path) -> NodeContext:
    config = write_config(tmp_path, audit={"syslog": f"127.0.0.1:{port}", "syslog_ca": str(ca)})
    return NodeContext.open(config.settings())


def events(frames: list[bytes]) -> list[tuple[str, str]]:
    """(MSGID, body) of each RFC 5424 message."""
    out = []
    for message in frames:
        header, _, body = message.decode().partition(" - \ufeff")
        pri_version, _time, _host, app, _pid, msgid = header.split(" ")
        assert pri_version.startswith("<") and pri_version.endswith(">1") and app == "lamina"
        out.append((msgid, body))
    return out


def test_events_wait_while_the_collector_is_down_then_all_arrive_in_order(tmp_path):
    cert, key = certificate(tmp_path, "collector")
    port = free_port()
    ctx = node_with_syslog(tmp_path, port, cert)
    try:
        for i in range(3):
            ctx.audit.record("test.event", Actor(user="tests"), {"n": i})
        assert ctx.syslog.send_pending() == 0  # nobody listening
        assert ctx.syslog.cursor == 0
        collector = Collector(port, cert, key)
        try:
            assert ctx.syslog.send_pending() == 3
            deadline = time.monotonic() + 10
            while len(collector.frames) < 4 and time.monotonic() < deadline:
                time.sleep(0.05)
            got = events(collector.frames)
            assert [m for m, _ in got] == ["IHE+RFC-3881"] * 3 + ["lamina-checkpoint"]
            assert all("<AuditMessage>" in body and 'csd-code="110100"' in body
                       for _, body in got[:3])
            checkpoint = json.loads(got[3][1])
            assert checkpoint["seq"] == 3 and ctx.syslog.cursor == 3
            signature = base64.b64decode(checkpoint["signature"])
            assert ctx.audit.checkpoint.signature_valid(3, checkpoint["hash"], signature)
            assert ctx.syslog.send_pending() == 0  # nothing twice
        finally:
            collector.close()
    finally:
        ctx.close()


def test_a_collector_whose_certificate_does_not_verify_gets_nothing(tmp_path):
    cert, key = certificate(tmp_path, "collector")
    other_ca, _ = certificate(tmp_path, "someone-else")
    port = free_port()
    collector = Collector(port, cert, key)
    ctx = node_with_syslog(tmp_path, port, other_ca)
    try:
        ctx.audit.record("test.event", Actor(user="tests"), {"n": 1})
        assert ctx.syslog.send_pending() == 0
        assert ctx.syslog.cursor == 0 and collector.frames == []
    finally:
        ctx.close()
        collector.close()


def test_the_running_node_streams_on_its_own(tmp_path):
    cert, key = certificate(tmp_path, "collector")
    port = free_port()
    collector = Collector(port, cert, key)
    ctx = node_with_syslog(tmp_path, port, cert)
    ctx.syslog.poll = 0.1
    ctx.start(supervisor=True)
    try:
        entry = ctx.audit.record("test.event", Actor(user="tests"), {"n": 1})
        deadline = time.monotonic() + 15
        while ctx.syslog.cursor < entry.seq and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ctx.syslog.cursor >= entry.seq
    finally:
        ctx.close()
        collector.close()


@pytest.mark.parametrize("audit,message", [
    ({"syslog": "collector"}, "must be host:port"),
    ({"syslog": "127.0.0.1:6514"}, "audit.syslog_ca: required"),
    ({"syslog_ca": "missing-ca.pem"}, "not found"),
])
def test_bad_syslog_settings_are_one_line(tmp_path, audit, message):
    from node.config import ConfigError
    if "syslog_ca" in audit:
        audit = {"syslog_ca": str(tmp_path / audit["syslog_ca"])}
    with pytest.raises(ConfigError, match=message):
        write_config(tmp_path, audit=audit).settings()
