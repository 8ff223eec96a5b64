"""Sealed blobs: bytes that may carry PHI, encrypted before they touch the disk.

Quarantine must keep what it refused (nothing is lost), but what a clinical
peer sent is identified, and no PHI may rest outside the encrypted
re-identification map. So quarantined bytes are sealed with AES-256-GCM under
a subkey of the project key; reading them back needs the key.
"""

from __future__ import annotations

import hashlib
import hmac
import os

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

MAGIC = b"LAMINA-SEALED-1\n"


class Sealer:
    def __init__(self, map_key: bytes) -> None:
        """``map_key``: the project key's map key; sealing derives its own purpose-bound
        subkey from it and never reuses the map's key."""
        self._aead = AESGCM(hmac.digest(map_key, b"lamina/quarantine-seal", hashlib.sha256))

    def seal(self, data: bytes) -> bytes:
        nonce = os.urandom(12)
        return MAGIC + nonce + self._aead.encrypt(nonce, data, MAGIC)

    def open(self, sealed: bytes) -> bytes:
        if not sealed.startswith(MAGIC):
            raise ValueError("not a sealed blob")
        body = sealed[len(MAGIC):]
        return self._aead.decrypt(body[:12], body[12:], MAGIC)
