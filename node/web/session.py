"""The review page's login session: an HMAC-signed cookie, and CSRF tokens bound to it.

A browser cannot set a bearer header, so a reviewer logs in with the review
user id and passphrase and gets a cookie. Starlette's ``SessionMiddleware``
needs ``itsdangerous``, which this node does not install; the cookie is signed
here with the standard library's ``hmac`` (HMAC-SHA256) instead: a base64url
JSON payload (user id, expiry, a random session id) and its MAC. The key is
32 random bytes in ``<data>/run/web-session.key`` (mode 0600), created once,
so every worker process of ``lamina serve`` accepts the cookies the others
issue. The cookie is HttpOnly and SameSite=Strict; a CSRF token (the MAC of
the session id under the same key) is also required in every form posted.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

COOKIE = "lamina_review"
LIFETIME_SECONDS = 8 * 3600  # one working day; a signature still needs the passphrase


@dataclass(frozen=True)
class Session:
    user_id: str
    session_id: str
    expires: int


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _key_file(path: Path) -> bytes:
    """The node's session key, made on first use (O_EXCL: two workers racing agree)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        for _ in range(50):  # the winner may not have written it yet
            key = path.read_bytes()
            if len(key) == 32:
                return key
            time.sleep(0.01)
        raise RuntimeError(f"{path.name} is damaged: remove it (sessions end)") from None
    key = secrets.token_bytes(32)
    with os.fdopen(fd, "wb") as f:
        f.write(key)
    return key


class SessionSigner:
    """Issues and reads the session cookie; makes and checks CSRF tokens."""

    def __init__(self, run_dir: Path) -> None:
        self._key = _key_file(run_dir / "web-session.key")

    def _mac(self, purpose: str, data: bytes) -> str:
        return hmac.new(self._key, purpose.encode() + b"\0" + data, hashlib.sha256).hexdigest()

    def issue(self, user_id: str, now: float | None = None) -> str:
        payload = json.dumps({"u": user_id, "s": secrets.token_hex(16),
                              "e": int((now or time.time()) + LIFETIME_SECONDS)}).encode()
        return f"{_b64(payload)}.{self._mac('session', payload)}"

    def read(self, cookie: str | None, now: float | None = None) -> Session | None:
        """The session, or None when absent, forged, damaged or expired."""
        if not cookie or "." not in cookie:
            return None
        body, _, mac = cookie.rpartition(".")
        try:
            payload = _unb64(body)
        except (binascii.Error, ValueError):
            return None
        if not hmac.compare_digest(self._mac("session", payload), mac):
            return None
        data = json.loads(payload)
        session = Session(str(data["u"]), str(data["s"]), int(data["e"]))
        return session if session.expires > (now or time.time()) else None

    def csrf(self, session: Session) -> str:
        return self._mac("csrf", session.session_id.encode())

    def csrf_ok(self, session: Session, token: str | None) -> bool:
        return bool(token) and hmac.compare_digest(self.csrf(session), token)
