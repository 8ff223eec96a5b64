"""DICOM TLS over 127.0.0.1 with certificates made here by ``cryptography``: TLS-only mode
refuses plaintext, a silent client does not stall the accept loop, a peer's pinned client
certificate (fingerprint or subject) is enforced, TLS 1.1 is refused."""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import socket
import ssl
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from node.config import ConfigError
from node.dimse.tls import client_context
from tests.harness import NODE_AET, TEST_AET, InProcessNode, lamina, peer, write_config


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Lamina tests"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _issue(folder: Path, stem: str, cn: str, issuer: tuple | None, *, ca: bool = False,
           server: bool = False) -> tuple:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    signer_key, signer_name = issuer if issuer else (key, _name(cn))
    builder = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(signer_name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
    cert = builder.sign(signer_key, hashes.SHA256())
    (folder / f"{stem}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / f"{stem}.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    return key, cert


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("pki")
    ca_key, ca = _issue(folder, "ca", "Test CA", None, ca=True)
    _issue(folder, "server", "localhost", (ca_key, ca.subject), server=True)
    _, client = _issue(folder, "client", "scanner", (ca_key, ca.subject))
    _issue(folder, "other", "intruder", (ca_key, ca.subject))
    return {"dir": folder, "client_sha256": hashlib.sha256(
        client.public_bytes(serialization.Encoding.DER)).hexdigest()}


def _config(tmp_path: Path, pki: dict, **pin: str):
    d = pki["dir"]
    return write_config(tmp_path / "node", node={"acse_timeout": 5},
                        peers={"tests": peer(TEST_AET, "store", **pin)},
                        tls={"mode": "only", "cert": str(d / "server.pem"),
                             "key": str(d / "server.key"), "ca": str(d / "ca.pem")})


def _echo(port: int, context: ssl.SSLContext | None) -> bool:
    ae = AE(ae_title=TEST_AET)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = 5
    kwargs = {"tls_args": (context, "localhost")} if context else {}
    assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AET, **kwargs)
    if not assoc.is_established:
        return False
    ok = assoc.send_c_echo().Status == 0
    assoc.release()
    return ok


def _client(pki: dict, who: str | None = "client") -> ssl.SSLContext:
    d = pki["dir"]
    if who is None:
        return client_context(str(d / "ca.pem"))
    return client_context(str(d / "ca.pem"), str(d / f"{who}.pem"), str(d / f"{who}.key"))


def test_tls_only_serves_tls_and_refuses_plaintext(tmp_path, pki):
    with InProcessNode(_config(tmp_path, pki)) as node:
        assert _echo(node.port, _client(pki))
        assert _echo(node.port, _client(pki, None))  # no client certificate needed here
        assert not _echo(node.port, None)


def test_a_silent_client_does_not_stall_new_associations(tmp_path, pki):
    with InProcessNode(_config(tmp_path, pki)) as node:
        silent = [socket.create_connection(("127.0.0.1", node.port)) for _ in range(3)]
        try:
            start = time.monotonic()
            assert _echo(node.port, _client(pki))
            assert time.monotonic() - start < 2.5  # not the 5 s handshake timeout
        finally:
            for sock in silent:
                sock.close()


def test_tls_1_1_is_refused(tmp_path, pki):
    with InProcessNode(_config(tmp_path, pki)) as node:
        old = _client(pki)
        old.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
        old.maximum_version = ssl.TLSVersion.TLSv1_1
        with pytest.raises((ssl.SSLError, OSError)), socket.create_connection(
                ("127.0.0.1", node.port), timeout=5) as raw, \
                old.wrap_socket(raw, server_hostname="localhost"):
            pass


@pytest.mark.parametrize("pin", ["fingerprint", "subject"])
def test_a_pinned_client_certificate_is_enforced(tmp_path, pki, pin):
    value = {"fingerprint": {"tls_fingerprint": pki["client_sha256"]},
             "subject": {"tls_subject": "CN=scanner,O=Lamina tests"}}[pin]
    with InProcessNode(_config(tmp_path, pki, **value)) as node:
        assert _echo(node.port, _client(pki))
        assert not _echo(node.port, _client(pki, "other"))
        assert not _echo(node.port, _client(pki, None))
        rejected = node.audit_events("association.rejected")
        assert any("client certificate" in e["object"]["detail"] for e in rejected)


def test_pinning_needs_tls_only_and_a_ca(tmp_path):
    config = write_config(tmp_path / "n", peers={"p": peer("P", "store", tls_subject="CN=x")})
    with pytest.raises(ConfigError, match="pinned client certificate"):
        config.settings()


def _tls_sender(tmp_path: Path, pki: dict, port: int):
    """A sender's config whose peer "archive" (the node on ``port``) is reached over TLS."""
    d = pki["dir"]
    return write_config(
        tmp_path / "sender",
        peers={"archive": peer(NODE_AET, "store", port=port, tls=True)},
        tls={"ca": str(d / "ca.pem"), "cert": str(d / "client.pem"),
             "key": str(d / "client.key")},
        node={"ae_title": TEST_AET})


def test_lamina_send_speaks_tls_to_a_peer_configured_for_it(tmp_path, pki, phantom_files):
    with InProcessNode(_config(tmp_path, pki)) as receiver:
        sender = _tls_sender(tmp_path, pki, receiver.port)
        result = lamina("send", str(phantom_files[0]), "--to", "archive", config=sender)
        assert result.exit_code == 0, result.output
        assert receiver.rows("SELECT COUNT(*) FROM instance") == [(1,)]
        plain = write_config(tmp_path / "plain", node={"ae_title": TEST_AET},
                             peers={"archive": peer(NODE_AET, "store", port=receiver.port)})
        result = lamina("send", str(phantom_files[1]), "--to", "archive", config=plain)
        assert result.exit_code != 0  # plaintext is refused by a TLS-only node
        assert receiver.rows("SELECT COUNT(*) FROM instance") == [(1,)]


def test_a_series_over_one_tls_association_is_stored_whole(tmp_path, pki, phantom_files):
    # The node reads TLS records itself (node.dimse.receive): decrypted bytes left in the
    # SSL object, which select() does not see, must still be read at once.
    with InProcessNode(_config(tmp_path, pki)) as receiver:
        sender = _tls_sender(tmp_path, pki, receiver.port)
        files = [str(path) for path in phantom_files[:6]]
        result = lamina("send", *files, "--to", "archive", config=sender)
        assert result.exit_code == 0, result.output
        assert receiver.rows("SELECT COUNT(*) FROM instance") == [(6,)]
        assert _echo(receiver.port, _client(pki))
