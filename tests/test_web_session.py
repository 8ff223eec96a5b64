"""The review session cookie: accepted as issued, refused when forged, edited or expired;
one key shared by every process of a node; CSRF tokens bound to the session."""

from __future__ import annotations

import base64
import json
import time

from node.web.session import LIFETIME_SECONDS, SessionSigner


def test_cookie_round_trip_and_refusals(tmp_path):
    signer = SessionSigner(tmp_path)
    cookie = signer.issue("rad1")
    session = signer.read(cookie)
    assert session is not None and session.user_id == "rad1"
    body, mac = cookie.rsplit(".", 1)
    payload = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    payload["u"] = "admin"  # another user, the MAC kept
    edited = base64.urlsafe_b64encode(json.dumps(payload).encode()).decode().rstrip("=")
    assert signer.read(f"{edited}.{mac}") is None
    assert signer.read(body + "." + "0" * 64) is None
    assert signer.read("not a cookie") is None and signer.read(None) is None
    assert signer.read("!!!.00") is None
    assert signer.read(cookie, now=time.time() + LIFETIME_SECONDS + 1) is None


def test_key_shared_across_processes_and_csrf_bound_to_the_session(tmp_path):
    first, second = SessionSigner(tmp_path), SessionSigner(tmp_path)  # two workers
    assert (tmp_path / "web-session.key").stat().st_mode & 0o077 == 0
    session = second.read(first.issue("rad1"))
    assert session is not None
    token = first.csrf(session)
    assert second.csrf_ok(session, token)
    other = first.read(first.issue("rad1"))
    assert not first.csrf_ok(other, token) and not first.csrf_ok(session, "")
    (tmp_path / "other-node").mkdir()
    assert SessionSigner(tmp_path / "other-node").read(first.issue("rad1")) is None
