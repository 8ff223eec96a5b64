"""DICOM User Identity Negotiation over real associations: username, username + passcode
and JWT mapped to the configured users; a wrong passcode, an unknown user or a bad
token is rejected; a peer can require an identity; the verified user is the audit actor.

Before this, username, wrong passcode and JWT were all accepted with no check.
"""

from __future__ import annotations

import subprocess
import sys
import time

import jwt
import pytest
from pynetdicom import AE
from pynetdicom.pdu_primitives import UserIdentityNegotiation
from pynetdicom.sop_class import Verification

from node.config import ConfigError
from node.identity import (
    IdentityRefused,
    IdentitySettings,
    hash_passcode,
    passcode_matches,
    verify,
)
from tests.harness import NODE_AET, TEST_AET, InProcessNode, lamina, peer, write_config

SECRET = b"a-test-only-jwt-secret-of-32-bytes!"


def _identity(kind: int, primary: bytes, secondary: bytes | None = None):
    item = UserIdentityNegotiation()
    item.user_identity_type = kind
    item.primary_field = primary
    if secondary is not None:
        item.secondary_field = secondary
    return item


def _associate(port: int, aet: str = TEST_AET, identity=None):
    ae = AE(ae_title=aet)
    ae.add_requested_context(Verification)
    return ae.associate("127.0.0.1", port, ae_title=NODE_AET,
                        ext_neg=[identity] if identity is not None else None)


def _token(sub: str, key: bytes = SECRET, expires: float = 300) -> bytes:
    return jwt.encode({"sub": sub, "exp": int(time.time() + expires)}, key,
                      algorithm="HS256").encode()


@pytest.fixture(scope="module")
def alice_hash() -> str:
    return hash_passcode("correct horse")


@pytest.fixture
def node(tmp_path, alice_hash):
    key = tmp_path / "jwt.key"
    key.write_bytes(SECRET)
    config = write_config(
        tmp_path / "node",
        peers={"tests": peer(TEST_AET, "store"),
               "strict": peer("STRICT", "store", identity="required")},
        identity={"users": {"alice": {"passcode": alice_hash}, "bob": {}},
                  "jwt_key_file": str(key)})
    with InProcessNode(config) as n:
        yield n


def test_passcodes_are_stored_hashed_and_compared(alice_hash):
    assert "correct horse" not in alice_hash and alice_hash.startswith("scrypt$")
    assert passcode_matches(b"correct horse", alice_hash)
    assert not passcode_matches(b"wrong", alice_hash)
    settings = IdentitySettings({"alice": alice_hash, "bob": ""})
    assert verify(settings, 2, b"alice", b"correct horse") == "alice"
    assert verify(settings, 1, b"bob", None) == "bob"
    for kind, primary, secondary, why in [(2, b"alice", b"nope", "wrong passcode"),
                                          (1, b"alice", None, "needs a passcode"),
                                          (1, b"eve", None, "unknown user"),
                                          (3, b"ticket", None, "not supported")]:
        with pytest.raises(IdentityRefused, match=why):
            verify(settings, kind, primary, secondary)


def test_username_and_passcode_is_accepted_and_becomes_the_audit_actor(node):
    assoc = _associate(node.port, identity=_identity(2, b"alice", b"correct horse"))
    assert assoc.is_established
    assoc.release()
    [accepted] = node.audit_events("association.accepted")
    assert accepted["actor"]["user"] == "alice"


# Identities are made when the test runs, not when it is collected: a token made at
# collection would expire during a long run and be refused for the wrong reason.
@pytest.mark.parametrize(("make_identity", "why"), [
    (lambda: _identity(2, b"alice", b"guess"), "wrong passcode"),
    (lambda: _identity(1, b"eve"), "unknown user"),
    (lambda: _identity(5, _token("alice", key=b"another-secret-of-32-bytes-long!!")),
     "JWT refused"),
    (lambda: _identity(5, _token("alice", expires=-60)), "JWT refused"),
    (lambda: _identity(5, _token("mallory")), "unknown user"),
], ids=["wrong-passcode", "unknown-user", "jwt-bad-signature", "jwt-expired", "jwt-unknown-sub"])
def test_a_bad_identity_rejects_the_association(node, make_identity, why):
    assoc = _associate(node.port, identity=make_identity())
    assert assoc.is_rejected
    [rejected] = node.audit_events("association.rejected")
    assert rejected["object"]["reason"] == "user identity not verified"
    assert why in rejected["object"]["detail"]
    assert "guess" not in str(rejected)  # no secret in the trail
    assert node.echo() == 0  # and the node keeps serving


def test_a_valid_jwt_is_accepted(node):
    assoc = _associate(node.port, identity=_identity(5, _token("bob")))
    assert assoc.is_established
    assoc.release()
    assert node.audit_events("association.accepted")[0]["actor"]["user"] == "bob"


def test_a_peer_can_require_an_identity(node):
    assert _associate(node.port, "STRICT").is_rejected
    assoc = _associate(node.port, "STRICT", identity=_identity(1, b"bob"))
    assert assoc.is_established
    assoc.release()
    assoc = _associate(node.port, TEST_AET)  # the other peer may still come without one
    assert assoc.is_established
    assoc.release()


def test_config_refuses_a_plain_passcode_and_required_without_users(tmp_path):
    config = write_config(tmp_path / "a", identity={"users": {"alice": {"passcode": "hunter2"}}})
    with pytest.raises(ConfigError, match="never the passcode itself"):
        config.settings()
    config = write_config(tmp_path / "b", peers={"p": peer("P", "store", identity="required")})
    with pytest.raises(ConfigError, match="required, but"):
        config.settings()


def test_identity_hash_command_prints_a_usable_hash():
    result = lamina("identity", "hash", "--passcode", "s3cret")
    assert result.exit_code == 0
    assert passcode_matches(b"s3cret", result.stdout.strip())


def test_loading_the_configuration_does_not_import_pyjwt():
    """PyJWT (and cryptography's X.509 under it) is imported where a token is checked:
    every command loads the configuration, few see a token (start-up time)."""
    run = subprocess.run([sys.executable, "-c", "import sys, node.config, node.identity;"
                          " print(sorted(m for m in sys.modules if m.split('.')[0] == 'jwt'))"],
                         capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "[]"
