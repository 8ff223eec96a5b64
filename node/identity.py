"""DICOM User Identity Negotiation (PS3.7 D.3.3.7) checked against the configured users.

A peer names a user in its A-ASSOCIATE-RQ: a username (type 1), a username and
passcode (type 2), or a JSON Web Token (type 5). With ``[identity] users``
configured, the name must be one of them, a passcode must match the stored
scrypt hash, and a JWT must verify under ``[identity] jwt_key_file`` with its
``sub`` naming a configured user; anything else (Kerberos, SAML, unknown user,
wrong passcode, bad token) rejects the association. The verified user is the
actor of what the association does in the audit trail.

:class:`JwtValidator` is the one place a JWT is checked: for DIMSE against the
key file above, for HTTP bearer tokens (``[http.jwt]``, OIDC access tokens)
against the identity provider's JWKS with its issuer and audience.

Passcodes are never stored: :func:`hash_passcode` makes the value to put in the
config (``lamina`` reads only the hash).
"""

from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    # Imported where a token is checked, not with this module: the configuration
    # imports this module (its settings classes), so every ``lamina`` command and
    # worker did, and PyJWT imports cryptography's X.509 package, about 40 ms of a
    # ``lamina anonymize`` start-up of 0.40-0.48 s (``python -X importtime``), for
    # commands that never see a token.
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


@dataclass(frozen=True)
class JwtSettings:
    """``[http.jwt]``: OIDC access tokens as HTTP bearer tokens."""

    #: The identity provider's signing keys: a JWKS file, or its https:// URL (fetched
    #: and cached by PyJWT's PyJWKClient). Empty: JWTs are not accepted.
    jwks: str = ""
    issuer: str = ""
    audience: str = ""
    algorithms: tuple[str, ...] = ("RS256", "ES256")
    #: The claim that names the client (``sub``; ``azp`` or ``client_id`` for
    #: client-credential tokens).
    claim: str = "sub"
    #: Claim value → configured peer name (its services, route and audit identity).
    peers: dict[str, str] = field(default_factory=dict)

    @property
    def enabled(self) -> bool:
        return bool(self.jwks)


def _refusal(exc: Exception) -> str:
    """PyJWT's refusal in words a client can act on (no token content in them)."""
    import jwt  # not with the module (see the imports)

    reasons: tuple[tuple[type[Exception], str], ...] = (
        (jwt.ExpiredSignatureError, "the token has expired"),
        (jwt.ImmatureSignatureError, "the token is not valid yet"),
        (jwt.InvalidSignatureError, "the token's signature does not verify"),
        (jwt.InvalidIssuerError, "the token's issuer is not the configured one"),
        (jwt.InvalidAudienceError, "the token's audience is not this node"),
        (jwt.InvalidAlgorithmError, "the token's algorithm is not accepted"),
        (jwt.MissingRequiredClaimError, "the token lacks a required claim"),
        (jwt.DecodeError, "the token is not a well-formed JWT"),
    )
    for kind, reason in reasons:
        if isinstance(exc, kind):
            return reason
    return f"the token is refused ({type(exc).__name__})"


class JwtValidator:
    """Verifies a JWT (signature, algorithm, ``exp``, issuer, audience) and returns its
    claims, or raises :class:`IdentityRefused` saying why.

    The key is one PEM/secret (``key``) or a JWKS (``jwks``: a file read once, or a URL
    PyJWKClient fetches and caches), the token's ``kid`` choosing among its keys. Only
    ``algorithms`` are accepted, whatever the token's header claims: ``alg: none`` or
    an HMAC token signed with a public key never verify.
    """

    def __init__(self, algorithms: tuple[str, ...], *, key: bytes | None = None,
                 jwks: str = "", issuer: str = "", audience: str = "",
                 claim: str = "sub") -> None:
        self.algorithms = [a for a in algorithms if a.lower() != "none"]
        self.key = key
        self.issuer = issuer or None
        self.audience = audience or None
        self.claim = claim
        import jwt  # not with the module (see the imports)

        self._client: jwt.PyJWKClient | None = None
        self._keys: jwt.PyJWKSet | None = None
        if jwks.startswith(("https://", "http://")):
            self._client = jwt.PyJWKClient(jwks, cache_keys=True)
        elif jwks:
            self._keys = jwt.PyJWKSet.from_json(Path(jwks).read_text())

    def claims(self, token: str) -> dict[str, Any]:
        import jwt  # not with the module (see the imports)

        try:
            header = jwt.get_unverified_header(token)
            if header.get("alg") not in self.algorithms:
                raise IdentityRefused("the token's algorithm is not accepted")
            required = ["exp", self.claim] + ["iss"] * bool(self.issuer) + [
                "aud"] * bool(self.audience)
            return jwt.decode(token, self._signing_key(token, header),
                              algorithms=self.algorithms, issuer=self.issuer,
                              audience=self.audience, options={"require": required})
        except jwt.PyJWKClientError:
            raise IdentityRefused("the token's key is not among the identity provider's"
                                  ) from None
        except jwt.InvalidTokenError as exc:
            raise IdentityRefused(_refusal(exc)) from None

    def subject(self, token: str) -> str:
        """The value of the claim that names the client."""
        return str(self.claims(token)[self.claim])

    def _signing_key(self, token: str, header: dict[str, Any]) -> Any:
        if self._client is not None:
            return self._client.get_signing_key_from_jwt(token).key
        if self._keys is not None:
            kid = header.get("kid")
            keys = self._keys.keys
            found = [k for k in keys if kid is None or k.key_id == kid]
            if kid is None and len(keys) != 1:
                raise IdentityRefused("the token names no key (kid) and the JWKS has several")
            if not found:
                raise IdentityRefused("the token's key (kid) is not in the configured JWKS")
            return found[0].key
        if self.key is None:
            raise IdentityRefused("no JWT key configured")
        return self.key


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
    validator = JwtValidator(settings.jwt_algorithms, key=settings.jwt_key_file.read_bytes())
    try:
        user = validator.subject(token.decode("ascii", "replace").strip())
    except IdentityRefused as exc:
        raise IdentityRefused(f"JWT refused: {exc}") from None
    if user not in settings.users:
        raise IdentityRefused("JWT names an unknown user")
    return user
