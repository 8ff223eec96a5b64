"""Reviewers: ids never reused, an Ed25519 key pair each, the private key under a passphrase.

21 CFR Part 11 asks for two identification components: the user id and the
passphrase. The passphrase never reaches the index: it only decrypts the
user's private key, so a signature can only be made by whoever knows it. The
key is sealed with AES-GCM under a key derived from the passphrase by scrypt
(``cryptography``'s primitives; cost 2^15, about 0.1 s and 32 MB per try, so a
stolen index does not give passphrases away cheaply — PKCS#8's
``BestAvailableEncryption`` derives its key in about a millisecond), with the
user id as associated data so a sealed key moved to another user does not
open. Wrong passphrases are counted; after ``lock_after`` in a row the user is
locked and a Security Alert (DICOM 110113) is audited.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from node.audit.trail import Actor, AuditTrail, utc_now
from node.storage.interface import Index
from node.storage.records import UserRow

USER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
MIN_PASSPHRASE = 8


class UserRefused(ValueError):
    """A user operation that cannot be done; the message is one line for the CLI."""


SEALED = b"LMK1"  # format tag of a sealed private key: tag, log2(n), salt, nonce, ciphertext
SCRYPT_LOG2_N = 15


def _derive(passphrase: str, salt: bytes, log2_n: int) -> bytes:
    return Scrypt(salt=salt, length=32, n=2**log2_n, r=8, p=1).derive(passphrase.encode())


def seal_private_key(key: Ed25519PrivateKey, passphrase: str, user_id: str) -> bytes:
    """The raw private key, AES-GCM-encrypted under scrypt(passphrase), bound to ``user_id``."""
    salt, nonce = os.urandom(16), os.urandom(12)
    raw = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                            serialization.NoEncryption())
    sealed = AESGCM(_derive(passphrase, salt, SCRYPT_LOG2_N)).encrypt(nonce, raw,
                                                                      user_id.encode())
    return SEALED + bytes([SCRYPT_LOG2_N]) + salt + nonce + sealed


def open_private_key(blob: bytes, passphrase: str, user_id: str) -> Ed25519PrivateKey | None:
    """The private key, or None when the passphrase (or the user) is not the one it was
    sealed for."""
    if not blob.startswith(SEALED) or len(blob) < 5 + 16 + 12 + 48:
        raise UserRefused(f"user {user_id!r}: stored key is damaged")
    log2_n, salt, nonce, sealed = blob[4], blob[5:21], blob[21:33], blob[33:]
    try:
        raw = AESGCM(_derive(passphrase, salt, log2_n)).decrypt(nonce, sealed, user_id.encode())
    except InvalidTag:
        return None
    return Ed25519PrivateKey.from_private_bytes(raw)


def fingerprint(public_key: bytes) -> str:
    """What the audit trail records of a user's key, so a swapped key is noticed."""
    return hashlib.sha256(public_key).hexdigest()


@dataclass(frozen=True)
class Unlocked:
    """A user whose passphrase was right, with the key it opened."""

    user: UserRow
    key: Ed25519PrivateKey


class UserDirectory:
    """Adds, disables and unlocks reviewers; every change and every failure audited."""

    def __init__(self, index: Index, audit: AuditTrail, lock_after: int = 5) -> None:
        self.index = index
        self.audit = audit
        self.lock_after = lock_after

    def add(self, user_id: str, printed_name: str, passphrase: str, actor: Actor,
            raters: list[str] | None = None) -> UserRow:
        """A new user with a fresh key pair; refused when the id was ever used."""
        if not USER_ID.fullmatch(user_id):
            raise UserRefused(f"user id {user_id!r}: use 1-64 letters, digits, '.', '_', '@', '-'")
        if not printed_name.strip():
            raise UserRefused("a printed name is required (it is part of every signature)")
        if len(passphrase) < MIN_PASSPHRASE:
            raise UserRefused(f"the passphrase must be at least {MIN_PASSPHRASE} characters")
        key = Ed25519PrivateKey.generate()
        public = key.public_key().public_bytes(serialization.Encoding.Raw,
                                               serialization.PublicFormat.Raw)
        private = seal_private_key(key, passphrase, user_id)
        names = sorted({r.strip() for r in raters or () if r.strip()})
        with self.index.transaction() as tx:
            try:
                row_id = tx.users.insert(user_id, printed_name.strip(), names, public, private,
                                         utc_now())
            except KeyError:
                raise UserRefused(f"user id {user_id!r} was already used (ids are never"
                                  " reused)") from None
            entry = self.audit.append(tx, "user.added", actor, {
                "user_id": user_id, "user_row": row_id, "key_sha256": fingerprint(public)})
            user = tx.users.by_row(row_id)
        self.audit.committed(entry)
        return user

    def disable(self, user_id: str, actor: Actor) -> None:
        with self.index.transaction() as tx:
            if tx.users.get(user_id) is None:
                raise UserRefused(f"unknown user {user_id!r}")
            if not tx.users.disable(user_id, utc_now()):
                raise UserRefused(f"user {user_id!r} is already disabled")
            entry = self.audit.append(tx, "user.disabled", actor, {"user_id": user_id})
        self.audit.committed(entry)

    def unlock_user(self, user_id: str, actor: Actor) -> None:
        """An administrator lifts a lockout (after checking who tried the passphrases)."""
        with self.index.transaction() as tx:
            if tx.users.get(user_id) is None:
                raise UserRefused(f"unknown user {user_id!r}")
            if not tx.users.clear_lock(user_id):
                raise UserRefused(f"user {user_id!r} is not locked")
            entry = self.audit.append(tx, "user.unlocked", actor, {"user_id": user_id})
        self.audit.committed(entry)

    def list(self) -> list[UserRow]:
        with self.index.reader() as r:
            return r.users.list()

    def unlock(self, user_id: str, passphrase: str, actor: Actor) -> Unlocked:
        """The user's private key, or :class:`UserRefused` (audited) when the user is unknown,
        disabled or locked, or the passphrase is wrong (counted; locks at ``lock_after``)."""
        with self.index.reader() as r:
            user = r.users.get(user_id)
        problem = ("unknown user" if user is None else "user is disabled" if user.disabled_at
                   else "user is locked" if user.locked_at else "")
        if problem:
            self.audit.record("user.authentication", actor, {"user_id": user_id,
                                                             "refused": problem},
                              outcome="minor-failure")
            raise UserRefused(f"{problem}: {user_id!r}")
        key = open_private_key(user.private_key, passphrase, user_id)
        if key is None:
            self._wrong_passphrase(user_id, actor)
        if user.failed_attempts:
            with self.index.transaction() as tx:
                tx.users.reset_failures(user_id)
        return Unlocked(user, key)

    def _wrong_passphrase(self, user_id: str, actor: Actor) -> None:
        with self.index.transaction() as tx:
            failures, locked = tx.users.record_failure(user_id, self.lock_after, utc_now())
            entry = self.audit.append(tx, "user.authentication", actor, {
                "user_id": user_id, "refused": "wrong passphrase", "failures": failures},
                outcome="minor-failure")
            if locked:
                entry = self.audit.append(tx, "security.alert", actor, {
                    "user_id": user_id, "alert": "user locked after repeated wrong passphrases",
                    "failures": failures}, outcome="serious-failure")
        self.audit.committed(entry)
        raise UserRefused(f"wrong passphrase for {user_id!r}"
                          + (": the user is now locked" if locked else ""))
