"""Reviewers: ids never reused, private keys only under the passphrase, bad input refused."""

from __future__ import annotations

import json

import pytest
from cryptography.hazmat.primitives import serialization

from node.audit.trail import AuditTrail, HeadCheckpoint
from node.review.users import UserDirectory, UserRefused, fingerprint, open_private_key
from node.storage.sqlite.index import SqliteIndex
from tests.review_fixtures import ADMIN, PASSPHRASE


@pytest.fixture
def users(tmp_path):
    index = SqliteIndex(tmp_path / "index.sqlite3")
    index.migrate()
    trail = AuditTrail(index, HeadCheckpoint(tmp_path / "head.json", tmp_path / "audit.key"))
    yield UserDirectory(index, trail, lock_after=2)
    trail.close()
    index.close()


def test_a_user_gets_a_key_pair_whose_private_half_needs_the_passphrase(users):
    user = users.add("rad1", "Ann Radiologist", PASSPHRASE, ADMIN, raters=["Ann^R", " "])
    assert user.rater_ids == ("Ann^R",) and len(user.public_key) == 32
    unlocked = users.unlock("rad1", PASSPHRASE, ADMIN)
    assert unlocked.key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw) == user.public_key
    raw = unlocked.key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                     serialization.NoEncryption())
    assert raw not in user.private_key  # sealed, not stored
    assert open_private_key(user.private_key, PASSPHRASE + "x", "rad1") is None
    # a sealed key copied to another user does not open there, even with the right passphrase
    assert open_private_key(user.private_key, PASSPHRASE, "rad2") is None
    with users.index.reader() as r:
        (added,) = r.audit.of_action("user.added")
    assert json.loads(added.object)["key_sha256"] == fingerprint(user.public_key)
    assert PASSPHRASE not in added.object


def test_ids_are_never_reused_not_even_after_disable(users):
    first = users.add("rad1", "Ann Radiologist", PASSPHRASE, ADMIN)
    users.disable("rad1", ADMIN)
    with pytest.raises(UserRefused, match="already used"):
        users.add("rad1", "Another Ann", PASSPHRASE, ADMIN)
    second = users.add("rad2", "Bo Radiologist", PASSPHRASE, ADMIN)
    assert second.id > first.id
    assert [(u.user_id, bool(u.disabled_at)) for u in users.list()] == [("rad1", True),
                                                                       ("rad2", False)]
    with pytest.raises(UserRefused, match="disabled"):
        users.unlock("rad1", PASSPHRASE, ADMIN)
    with pytest.raises(UserRefused, match="already disabled"):
        users.disable("rad1", ADMIN)


@pytest.mark.parametrize("user_id,name,passphrase,message", [
    ("", "A B", PASSPHRASE, "user id"), ("../x", "A B", PASSPHRASE, "user id"),
    ("rad1", " ", PASSPHRASE, "printed name"), ("rad1", "A B", "short", "at least 8"),
])
def test_bad_users_are_refused(users, user_id, name, passphrase, message):
    with pytest.raises(UserRefused, match=message):
        users.add(user_id, name, passphrase, ADMIN)
    assert users.list() == []


def test_lockout_raises_one_security_alert(users):
    users.add("rad1", "Ann Radiologist", PASSPHRASE, ADMIN)
    for _ in range(3):
        with pytest.raises(UserRefused):
            users.unlock("rad1", "not the passphrase", ADMIN)
    with users.index.reader() as r:
        alerts = r.audit.of_action("security.alert")
        assert r.users.get("rad1").locked_at
    assert len(alerts) == 1 and alerts[0].outcome == "serious-failure"
    users.unlock_user("rad1", ADMIN)
    assert users.unlock("rad1", PASSPHRASE, ADMIN).user.user_id == "rad1"
    with pytest.raises(UserRefused, match="not locked"):
        users.unlock_user("rad1", ADMIN)
    with users.index.reader() as r:
        assert len(r.audit.of_action("user.unlocked")) == 1
