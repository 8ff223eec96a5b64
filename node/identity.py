"""DICOM User Identity Negotiation (PS3.7 D.3.3.7) checked against the configured users.

A peer names a user in its A-ASSOCIATE-RQ: a username (type 1), a username and
passcode (type 2), or a JSON Web Token (type 5). With ``[identity] users``
configured, the name must be one of them, a passcode must match the stored
scrypt hash, and a JWT must verify under ``[identity] jwt_key_file`` with its
``sub`` naming a configured user; anything else (Kerberos, SAML, unknown user,
wrong passcode, bad token) rejects the association. The verified user is the
actor of what the association does in the audit trail.

Passcodes are never stored: :func:`hash_passcode` makes the value to put in the
config (``lamina`` reads only the hash).
"""

from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import dataclass, field
from pathlib import Path

import jwt

#: scrypt cost (RFC 7914): n=2**14, r=8, p=1 takes ~50 ms and 16 MB, per association.
_SCRYPT = {"n": 1 << 14, "r": 8, "p": 1}

USERNAME, USERNAME_PASSCODE, KERBEROS, SAML, JWT = 1, 2, 3, 4, 5


@dataclass(frozen=True)
class IdentitySettings:
    """``[identity]``: user name → scrypt hash of its passcode ('' = username alone)."""

    users: dict[str, str] = field(default_factory=dict)
    jwt_key_file: Path | None = None
    jwt_algorithms: tuple[str, ...] = ("HS256", "RS256", "ES256")

    @property
    def enabled(self) -> bool:
        return bool(self.users)


def hash_passcode(passcode: str) -> str:
    """The config value for a passcode: ``scrypt$<salt hex>$<hash hex>``."""
    salt = os.urandom(16)
    digest = hashlib.scrypt(passcode.encode(), salt=salt, **_SCRYPT)
    return f"scrypt${salt.hex()}${digest.hex()}"


def passcode_matches(passcode: bytes, stored: str) -> bool:
    try:
        kind, salt, digest = stored.split("$")
        expected = bytes.fromhex(digest)
        salt_bytes = bytes.fromhex(salt)
    except ValueError:
        return False
    if kind != "scrypt":
        return False
    return hmac.compare_digest(hashlib.scrypt(passcode, salt=salt_bytes, **_SCRYPT), expected)


class IdentityRefused(Exception):
    """Why a negotiated identity is not accepted (for the audit trail; no secrets in it)."""


def verify(settings: IdentitySettings, kind: int, primary: bytes,
           secondary: bytes | None) -> str:
    """The configured user the identity names, or IdentityRefused."""
    if kind in (USERNAME, USERNAME_PASSCODE):
        user = primary.decode("utf-8", "replace").strip()
        if user not in settings.users:
            raise IdentityRefused("unknown user")
        stored = settings.users[user]
        if kind == USERNAME:
            if stored:
                raise IdentityRefused("this user needs a passcode")
            return user
        if not stored or not passcode_matches(secondary or b"", stored):
            raise IdentityRefused("wrong passcode")
        return user
    if kind == JWT:
        return _jwt_user(settings, primary)
    raise IdentityRefused(f"identity type {kind} is not supported")


def _jwt_user(settings: IdentitySettings, token: bytes) -> str:
    if settings.jwt_key_file is None:
        raise IdentityRefused("no JWT key configured")
    key = settings.jwt_key_file.read_bytes()
    try:
        claims = jwt.decode(token.decode("ascii", "replace").strip(), key,
                            algorithms=list(settings.jwt_algorithms),
                            options={"require": ["sub", "exp"]})
    except jwt.InvalidTokenError as exc:
        raise IdentityRefused(f"JWT refused: {type(exc).__name__}") from None
    user = str(claims["sub"])
    if user not in settings.users:
        raise IdentityRefused("JWT names an unknown user")
    return user
