"""Who is calling: a bearer token (or none) → a configured peer and its audit actor.

Each ``[http.clients.NAME]`` maps a token to a ``[peers.NAME]``: the peer's
``services`` decide what the client may do (``find`` for QIDO-RS, ``get`` for
WADO-RS, ``store`` for STOW-RS: the same permission C-FIND, C-GET and C-STORE
check, decided by the same services), its route how STOW-RS input is treated,
and its AE title names it in the audit trail. Without a token a request takes
the ``http.anonymous`` peer, or is refused with 401.

With ``[http.jwt]`` a bearer token may also be an OIDC access token (a JWT):
verified by :class:`node.identity.JwtValidator` (the one the DIMSE JWT user
identity uses), its ``claim`` names the client, and ``http.jwt.peers`` maps it
to the peer whose permissions and audit identity it takes. A token that does
not verify is a 401 saying why; a valid one for no configured client, a 403.
"""

from __future__ import annotations

import hmac
import uuid
from dataclasses import dataclass

from node.audit.trail import Actor
from node.config import Peer, Settings
from node.identity import IdentityRefused, JwtValidator
from node.ingest.types import Source
from node.web.errors import WebError


@dataclass(frozen=True)
class Caller:
    """One request's identity: the peer it acts as, and where it came from."""

    peer: Peer
    client: str  # the [http.clients] name, "jwt:<claim value>", or "anonymous"
    address: str
    request_id: str

    @property
    def actor(self) -> Actor:
        return Actor(ae_title=self.peer.ae_title, address=self.address,
                     association_id=self.request_id, user=f"http:{self.client}")

    def source(self) -> Source:
        """The ingest's view of a STOW-RS request: the same fields a C-STORE association gives."""
        return Source(self.peer.ae_title, self.address, self.request_id, self.peer.route,
                      may_store="store" in self.peer.services)


class Identities:
    """Resolves the Authorization header against the configured clients."""

    def __init__(self, settings: Settings) -> None:
        self.tokens = [(c.token.encode(), c.name, settings.peer_named(c.peer))
                       for c in settings.http.clients]
        self.anonymous = (settings.peer_named(settings.http.anonymous)
                          if settings.http.anonymous else None)
        j = settings.http.jwt
        self.jwt = (JwtValidator(j.algorithms, jwks=j.jwks, issuer=j.issuer, audience=j.audience,
                                 claim=j.claim) if j.enabled else None)
        self.jwt_peers = {value: settings.peer_named(name) for value, name in j.peers.items()}

    def caller(self, authorization: str | None, address: str) -> Caller:
        """The caller, or :class:`WebError` 401 (no or unknown token)."""
        request_id = f"http-{uuid.uuid4().hex[:16]}"
        if not authorization:
            if self.anonymous is None:
                raise WebError(401, "a bearer token is required",
                               {"WWW-Authenticate": 'Bearer realm="lamina"'})
            return Caller(self.anonymous, "anonymous", address, request_id)
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise WebError(401, "the Authorization header must be 'Bearer <token>'",
                           {"WWW-Authenticate": 'Bearer realm="lamina"'})
        given = token.strip().encode()
        found = None
        for known, name, peer in self.tokens:  # compare every one: no timing hint
            if hmac.compare_digest(known, given) and peer is not None:
                found = (name, peer)
        if found is None and self.jwt is not None and given.count(b".") == 2:
            found = self._jwt_client(given.decode("ascii", "replace"))
        if found is None:
            raise WebError(401, "unknown token",
                           {"WWW-Authenticate": 'Bearer realm="lamina", error="invalid_token"'})
        return Caller(found[1], found[0], address, request_id)

    def _jwt_client(self, token: str) -> tuple[str, Peer]:
        """The client a verified JWT names, and its peer; 401 why it does not verify,
        403 when it names no configured client."""
        assert self.jwt is not None
        try:
            value = self.jwt.subject(token)
        except IdentityRefused as exc:
            raise WebError(401, str(exc), {"WWW-Authenticate": 'Bearer realm="lamina", '
                                           'error="invalid_token"'}) from None
        peer = self.jwt_peers.get(value)
        if peer is None:
            raise WebError(403, f"the token's {self.jwt.claim} names no client in"
                                " http.jwt.peers")
        return f"jwt:{value}", peer


def require(caller: Caller, service: str) -> None:
    """403 when the caller's peer lacks ``service`` (STOW-RS is refused by the ingest itself,
    QIDO/WADO by the search and retrieve services; this guards what no service decides)."""
    if service not in caller.peer.services:
        raise WebError(403, f"this client may not use {service}")
