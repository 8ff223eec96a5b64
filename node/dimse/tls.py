"""DICOM TLS (PS3.15 B.9, the BCP 195 profile): contexts, the handshake, client pinning.

TLS 1.2 or later with forward-secret AEAD suites only. pynetdicom runs the
server handshake in its accepting thread, where one client that never finishes
it stalls every new connection (see ../shared/NOTES.md); the node instead
accepts plain sockets and runs the handshake in the connection's own thread,
bounded by ``node.acse_timeout`` (:func:`handshake`).

A peer can pin the client certificate it must present, by SHA-256 fingerprint
and/or subject (:func:`certificate_problem`, checked at admission).
"""

from __future__ import annotations

import hashlib
import logging
import socket
import ssl

from cryptography import x509

from node.config import Peer, TlsSettings

log = logging.getLogger("lamina.tls")

#: BCP 195 (RFC 9325) for TLS 1.2: ECDHE key exchange, AEAD ciphers. TLS 1.3 suites
#: are all acceptable and are not affected by this string.
BCP195_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"


def _harden(context: ssl.SSLContext) -> ssl.SSLContext:
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(BCP195_CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION
    return context


def server_context(settings: TlsSettings) -> ssl.SSLContext | None:
    """Our server context (None when TLS is off); asks for a client certificate when a CA
    is configured (verified against it when presented, required by pinning peers)."""
    if settings.mode == "off":
        return None
    context = _harden(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    context.load_cert_chain(str(settings.cert), str(settings.key))
    if settings.ca is not None:
        context.load_verify_locations(str(settings.ca))
        context.verify_mode = ssl.CERT_OPTIONAL
    return context


def client_context(ca: str | None = None, cert: str | None = None,
                   key: str | None = None) -> ssl.SSLContext:
    """A client context: the server verified against ``ca`` (hostname too), our own
    certificate when given."""
    context = _harden(ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca))
    if cert is not None:
        context.load_cert_chain(cert, key)
    return context


def handshake(context: ssl.SSLContext, sock: socket.socket,
              timeout: float) -> ssl.SSLSocket | None:
    """Wrap an accepted socket and finish the handshake within ``timeout`` seconds.

    Runs in the connection's thread. None (the socket closed, the reason logged)
    when the client is silent, speaks plaintext, or fails verification.
    """
    previous = sock.gettimeout()
    try:
        tls = context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        tls.settimeout(timeout)
        tls.do_handshake()
        tls.settimeout(previous)
        return tls
    except (OSError, ValueError) as exc:
        reason = "timed out" if isinstance(exc, TimeoutError) else type(exc).__name__
        log.warning("TLS handshake failed", extra={"fields": {"reason": reason}})
        sock.close()
        return None


def certificate_problem(peer: Peer, sock: object) -> str:
    """Why the connection's client certificate does not satisfy ``peer``'s pinning ('' if
    it does, or the peer pins nothing)."""
    if not (peer.tls_fingerprint or peer.tls_subject):
        return ""
    der = sock.getpeercert(binary_form=True) if isinstance(sock, ssl.SSLSocket) else None
    if not der:
        return "no client certificate"
    if peer.tls_fingerprint and hashlib.sha256(der).hexdigest() != peer.tls_fingerprint:
        return "client certificate fingerprint does not match"
    if peer.tls_subject:
        subject = x509.load_der_x509_certificate(der).subject.rfc4514_string()
        if subject != peer.tls_subject:
            return "client certificate subject does not match"
    return ""


def outgoing_context(settings: TlsSettings, wanted: bool) -> ssl.SSLContext | None:
    """The context for associations we open to a peer (C-MOVE destinations,
    forwarding, ``lamina send``): None unless ``wanted`` (its ``tls = true``). The peer's
    certificate is verified against ``tls.ca`` (the system's CAs without one); our
    own certificate (``tls.cert``/``tls.key``) is presented when configured."""
    if not wanted:
        return None
    return client_context(str(settings.ca) if settings.ca else None,
                          str(settings.cert) if settings.cert else None,
                          str(settings.key) if settings.key else None)
