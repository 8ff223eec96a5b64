"""The signed manifest of an approval or rejection, and its verification.

What a reviewer signs (21 CFR Part 11 §11.50, §11.70) is one canonical JSON
document: printed name, user id, UTC time, the meaning of the signature, and
what was reviewed — the annotation (id and key, so a signature moved to another
record no longer fits), the SHA-256 of the exact bytes of every current object
of the annotation, and the SHA-256 of its check report. The Ed25519 signature
covers those exact bytes; the manifest is stored as signed, never re-serialised.

Canonical JSON here is ``json.dumps`` with sorted keys, no whitespace and
UTF-8: every value is a string, an integer or a list of those, which is the
subset where that is unambiguous (no floats).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from node.review.users import fingerprint
from node.storage.interface import BlobStore, Reader
from node.storage.records import Row, SignatureRow, UserRow

FORMAT = "lamina-signature/1"


def canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


@dataclass(frozen=True)
class Manifest:
    """Everything one signature binds together."""

    annotation_id: int
    annotation_key: str
    decision: str  # approved | rejected
    meaning: str
    reason: str
    user_id: str
    user_row: int
    printed_name: str
    signed_at: str  # UTC, ISO 8601 with Z
    objects: list[dict[str, str]]  # [{sop_instance_uid, sha256}] in index order
    check_id: int
    check_report_sha256: str
    format: str = FORMAT

    def to_bytes(self) -> bytes:
        return canonical(asdict(self))

    @classmethod
    def from_bytes(cls, data: bytes) -> Manifest:
        return cls(**json.loads(data))

    def sign(self, key: Ed25519PrivateKey) -> tuple[bytes, bytes]:
        """(manifest bytes, signature)."""
        body = self.to_bytes()
        return body, key.sign(body)


def check_report(reader: Reader, check_id: int) -> dict[str, Any]:
    """The check report a reviewer saw: the structures measured and the findings made by
    one check run (row ids left out: they are storage details, not content)."""
    def content(rows: list[Row]) -> list[Row]:
        return [{k: v for k, v in r.items() if k not in {"id", "check_fk", "annotation_fk"}}
                for r in rows]
    return {"check_id": check_id, "structures": content(reader.annotations.structures(check_id)),
            "findings": content(reader.annotations.findings(check_id))}


def report_sha256(reader: Reader, check_id: int) -> str:
    return hashlib.sha256(canonical(check_report(reader, check_id))).hexdigest()


def blob_sha256(blobs: BlobStore, sha256: str) -> str:
    """The SHA-256 of a blob's bytes as they are now (never the name it is stored under)."""
    try:
        with blobs.open(sha256) as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except FileNotFoundError:
        return "missing"


def object_list(objects: list[Row]) -> list[dict[str, str]]:
    """The annotation's current objects as the manifest lists them (index order)."""
    return [{"sop_instance_uid": o["sop_instance_uid"], "sha256": o["blob_sha256"]}
            for o in objects]


def problems(row: SignatureRow, user: UserRow | None, key_sha256: str | None,
             annotation: Row | None, newest: bool, current: list[Row], reader: Reader,
             blobs: BlobStore) -> list[str]:
    """Everything wrong with one stored signature; empty when it verifies.

    ``key_sha256``: the user's key fingerprint as the audit trail recorded it when the
    user was added. ``newest``: this is the annotation's newest signature and the
    annotation is still in the state it decided, so its current objects must be the
    ones signed.
    """
    if user is None:
        return ["the signing user does not exist"]
    if key_sha256 != fingerprint(user.public_key):
        return ["the user's public key is not the one the audit trail recorded"]
    body = row.manifest.encode()
    try:
        Ed25519PublicKey.from_public_bytes(user.public_key).verify(row.signature, body)
    except InvalidSignature:
        return ["signature does not match the manifest"]
    manifest = Manifest.from_bytes(body)
    found = []
    if manifest.format != FORMAT:
        found.append(f"unknown manifest format {manifest.format!r}")
    stored = {"annotation_id": row.annotation_id, "user_row": row.user_fk,
              "decision": row.decision, "meaning": row.meaning, "signed_at": row.signed_at}
    for name, value in stored.items():
        if getattr(manifest, name) != value:
            found.append(f"{name} differs from the signed manifest")
    if (manifest.user_id, manifest.printed_name) != (user.user_id, user.printed_name):
        found.append("the user's id or printed name differs from the signed manifest")
    if annotation is None or annotation["key"] != manifest.annotation_key:
        found.append("signed for another annotation")
    for obj in manifest.objects:
        if blob_sha256(blobs, obj["sha256"]) != obj["sha256"]:
            found.append(f"annotation bytes of {obj['sop_instance_uid']} changed or missing")
    if newest and object_list(current) != manifest.objects:
        found.append("the annotation's current objects are not the ones signed")
    if report_sha256(reader, manifest.check_id) != manifest.check_report_sha256:
        found.append("the check report differs from the one signed")
    return found
