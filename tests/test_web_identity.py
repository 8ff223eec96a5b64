"""Bearer tokens on HTTP through a real uvicorn server: configured static tokens and OIDC
access tokens (JWTs, RS256 and ES256 keys made here with cryptography, published in a JWKS
file), each mapped to a configured peer whose services decide what it may do."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from node.config import ConfigError
from tests.harness import InProcessNode, http_root, write_config
from tests.studies import QR_VALIDATION, StudySpec, qr_peer, write_study

STATIC = "static-token-0123456789abcdef"
ISSUER, AUDIENCE = "https://idp.example.test/realms/lab", "lamina"
SPEC = StudySpec("jwt", "Doe^Jane", "JWT-1", "20240105", "091500", "JW-1", "CT", slices=2)
KEYS = {"rsa": rsa.generate_private_key(65537, 2048),
        "ec": ec.generate_private_key(ec.SECP256R1())}
ALGORITHM = {"rsa": "RS256", "ec": "ES256"}


def _jwks(path: Path) -> Path:
    keys = []
    for kid, key in KEYS.items():
        made = (RSAAlgorithm if kid == "rsa" else ECAlgorithm).to_jwk(key.public_key(),
                                                                      as_dict=True)
        keys.append({**made, "kid": kid, "use": "sig", "alg": ALGORITHM[kid]})
    path.write_text(json.dumps({"keys": keys}))
    return path


def token(sub: str = "ohif-viewer", kid: str = "rsa", *, expires: float = 300,
          issuer: str = ISSUER, audience: str = AUDIENCE, key=None) -> str:
    claims = {"sub": sub, "iss": issuer, "aud": audience, "exp": int(time.time() + expires)}
    return jwt.encode(claims, key or KEYS[kid], algorithm=ALGORITHM[kid],
                      headers={"kid": kid})


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    folder: Path = tmp_path_factory.mktemp("jwt")
    peers = {"client": qr_peer("CLIENT", "store", "find", "get"),
             "reader": qr_peer("READER", "find")}
    http = {"clients": {"static": {"token": STATIC, "peer": "client"}},
            "jwt": {"jwks": str(_jwks(folder / "jwks.json")), "issuer": ISSUER,
                    "audience": AUDIENCE, "algorithms": ["RS256", "ES256"],
                    "peers": {"ohif-viewer": "client", "dashboard": "reader"}}}
    with InProcessNode(write_config(folder / "node", peers=peers, validation=QR_VALIDATION,
                                    http=http)) as node:
        files = write_study(folder / "study", SPEC)
        assert node.store(files, "CLIENT") == [(0, "")] * len(files)
        with http_root(node.ctx) as root:
            yield f"{root}/dicom-web"


def get(url: str, path: str, bearer: str | None) -> httpx.Response:
    headers = {"Accept": "application/dicom+json"}
    if bearer is not None:
        headers["Authorization"] = f"Bearer {bearer}"
    return httpx.get(url + path, headers=headers, timeout=30)


@pytest.mark.parametrize("bearer", [lambda: STATIC, lambda: token(kid="rsa"),
                                    lambda: token(kid="ec")],
                         ids=["static", "RS256", "ES256"])
def test_static_token_and_valid_jwts_are_accepted(site, bearer):
    bearer = bearer()  # made now: a token made at collection may expire before its test runs
    studies = get(site, "/studies", bearer)
    assert studies.status_code == 200, studies.text
    [study] = studies.json()
    uid = study["0020000D"]["Value"][0]
    assert get(site, f"/studies/{uid}/metadata", bearer).status_code == 200


def _none_token() -> str:
    claims = {"sub": "ohif-viewer", "iss": ISSUER, "aud": AUDIENCE,
              "exp": int(time.time() + 300)}
    return jwt.encode(claims, None, algorithm="none", headers={"kid": "rsa"})


@pytest.mark.parametrize(("bearer", "reason"), [
    (None, "a bearer token is required"),
    (lambda: token(expires=-60), "expired"),
    (lambda: token(key=rsa.generate_private_key(65537, 2048)), "signature does not verify"),
    (lambda: token(issuer="https://other.example.test"), "issuer"),
    (lambda: token(audience="another-service"), "audience"),
    (_none_token, "algorithm is not accepted"),
    (lambda: "not-a-token", "unknown token"),
], ids=["missing", "expired", "bad-signature", "wrong-issuer", "wrong-audience", "alg-none",
        "unknown"])
def test_refused_tokens_get_401_with_a_reason(site, bearer, reason):
    response = get(site, "/studies", bearer() if callable(bearer) else bearer)
    assert response.status_code == 401, response.text
    assert reason in response.json()["reason"]
    assert response.headers["WWW-Authenticate"].startswith("Bearer")


def test_the_mapped_peer_decides_what_a_jwt_may_do(site):
    reader = token(sub="dashboard", kid="ec")
    found = get(site, "/studies", reader)
    assert found.status_code == 200, found.text  # READER has find
    uid = found.json()[0]["0020000D"]["Value"][0]
    refused = get(site, f"/studies/{uid}/metadata", reader)  # ... but not get
    assert refused.status_code == 403 and refused.json()["reason"]
    stranger = get(site, "/studies", token(sub="someone-else"))
    assert stranger.status_code == 403
    assert "http.jwt.peers" in stranger.json()["reason"]


def test_jwt_config_is_checked(tmp_path: Path):
    peers = {"client": qr_peer("CLIENT", "find")}
    jwks = str(_jwks(tmp_path / "jwks.json"))
    for bad, message in (
            ({"jwks": str(tmp_path / "missing.json"), "issuer": ISSUER, "audience": AUDIENCE},
             "no JWKS file"),
            ({"jwks": jwks, "audience": AUDIENCE}, "issuer, audience and claim"),
            ({"jwks": jwks, "issuer": ISSUER, "audience": AUDIENCE, "algorithms": ["none"]},
             "not none"),
            ({"jwks": jwks, "issuer": ISSUER, "audience": AUDIENCE,
              "peers": {"x": "nobody"}}, "not a configured peer")):
        config = write_config(tmp_path / "node", peers=peers, http={"jwt": bad})
        with pytest.raises(ConfigError, match=message):
            config.settings()


def test_jwks_fetched_from_the_identity_provider_url(tmp_path: Path):
    """``jwks`` as a URL: PyJWKClient fetches the keys over a real socket (and caches them)."""
    body = _jwks(tmp_path / "jwks.json").read_bytes()
    fetched = []

    class Keys(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            fetched.append(self.path)
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    idp = ThreadingHTTPServer(("127.0.0.1", 0), Keys)
    threading.Thread(target=idp.serve_forever, daemon=True).start()
    http = {"jwt": {"jwks": f"http://127.0.0.1:{idp.server_port}/certs", "issuer": ISSUER,
                    "audience": AUDIENCE, "peers": {"ohif-viewer": "client"}}}
    try:
        with InProcessNode(write_config(tmp_path / "node", http=http, peers={
                "client": qr_peer("CLIENT", "find")})) as node, http_root(node.ctx) as root:
            url = f"{root}/dicom-web"
            assert get(url, "/studies", token(kid="ec")).status_code == 200
            assert get(url, "/studies", token(kid="rsa")).status_code == 200
            assert get(url, "/studies", token(expires=-5)).status_code == 401
    finally:
        idp.shutdown()
        idp.server_close()
    assert fetched and set(fetched) == {"/certs"}
