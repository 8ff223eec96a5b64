"""Every way of tampering with a signed approval is caught by verify: any signed field, the
copies of those fields beside the manifest, the signature, the annotation's bytes, its index
row, its check report, the user's key, moving the signature, deleting it."""

from __future__ import annotations

import json
import os
import sqlite3

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from node.review.signatures import Manifest, canonical
from node.review.users import open_private_key
from node.storage.sqlite.index import SqliteIndex
from tests.review_fixtures import (
    ADMIN,
    PASSPHRASE,
    REVIEWER,
    Annotations,
    open_review_node,
    tamper,
)


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    ctx = open_review_node(tmp_path_factory.mktemp("signatures"))
    ctx.review.users.add("rad1", "Ann Radiologist", PASSPHRASE, ADMIN)
    yield ctx
    ctx.close()


@pytest.fixture(scope="module")
def made(node) -> Annotations:
    return Annotations(node)


def approved(ctx, made) -> tuple[int, int]:
    annotation_id = made.checked()
    signed = ctx.review.decide(annotation_id, "approve", "rad1", PASSPHRASE,
                               "reviewed and approved", REVIEWER)
    assert [c.ok for c in ctx.review.verify(annotation_id)] == [True]
    return annotation_id, signed.signature_id


def problems(ctx, annotation_id: int) -> list[str]:
    return [p for check in ctx.review.verify(annotation_id) for p in check.problems]


def edit_manifest(ctx, signature_id: int, **changes) -> None:
    with ctx.index.reader() as r:
        row = next(s for s in r.signatures.list() if s.id == signature_id)
    manifest = {**json.loads(row.manifest), **changes}
    tamper(ctx, "UPDATE review_signature SET manifest = ? WHERE id = "
                f"{signature_id}", args=(canonical(manifest).decode(),))


@pytest.mark.parametrize("field,value", [
    ("printed_name", "Someone Else"), ("user_id", "rad9"), ("signed_at", "2020-01-01T00:00:00Z"),
    ("meaning", "reviewed only"), ("decision", "rejected"), ("check_report_sha256", "0" * 64),
    ("annotation_id", 1), ("objects", []),
])
def test_editing_a_signed_field_breaks_the_signature(node, made, field, value):
    annotation_id, signature_id = approved(node, made)
    edit_manifest(node, signature_id, **{field: value})
    assert problems(node, annotation_id) == ["signature does not match the manifest"]


@pytest.mark.parametrize("column,value", [("meaning", "'reviewed only'"),
                                          ("signed_at", "'2020-01-01T00:00:00Z'"),
                                          ("decision", "'rejected'")])
def test_editing_the_copies_beside_the_manifest_is_caught(node, made, column, value):
    annotation_id, signature_id = approved(node, made)
    tamper(node, f"UPDATE review_signature SET {column} = {value} WHERE id = {signature_id}")
    assert f"{column} differs from the signed manifest" in problems(node, annotation_id)


def test_a_changed_signature_byte_is_caught(node, made):
    annotation_id, signature_id = approved(node, made)
    tamper(node, "UPDATE review_signature SET signature = ? WHERE id = "
                 f"{signature_id}", args=(bytes(64),))
    assert problems(node, annotation_id) == ["signature does not match the manifest"]


def test_changed_annotation_bytes_are_caught(node, made):
    annotation_id, _ = approved(node, made)
    with node.index.reader() as r:
        (obj,) = r.annotations.current_objects(annotation_id)
    path = node.blobs.local_path(obj["blob_sha256"])
    os.chmod(path, 0o600)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # one pixel bit
    path.write_bytes(bytes(data))
    found = problems(node, annotation_id)
    assert found == [f"annotation bytes of {obj['sop_instance_uid']} changed or missing"]


def test_an_object_swapped_in_the_index_is_caught(node, made):
    annotation_id, _ = approved(node, made)
    other = made.checked()
    with node.index.reader() as r:
        (theirs,) = r.annotations.current_objects(other)
    tamper(node, "UPDATE annotation_object SET blob_sha256 = ? WHERE annotation_fk = "
                 f"{annotation_id}", args=(theirs["blob_sha256"],))
    assert problems(node, annotation_id) == [
        "the annotation's current objects are not the ones signed"]


def test_a_changed_check_report_is_caught(node, made):
    annotation_id, _ = approved(node, made)
    with node.index.reader() as r:
        check = r.annotations.get(annotation_id)["current_check_fk"]
    tamper(node, f"UPDATE annotation_structure SET voxels = voxels + 1 WHERE check_fk = {check}")
    assert problems(node, annotation_id) == ["the check report differs from the one signed"]


def test_a_signature_moved_to_another_record_is_caught(node, made):
    annotation_id, signature_id = approved(node, made)
    other = made.checked()
    tamper(node, f"UPDATE annotation SET state = 'approved' WHERE id = {other}",
           f"UPDATE review_signature SET annotation_fk = {other} WHERE id = {signature_id}")
    found = problems(node, other)
    assert "annotation_id differs from the signed manifest" in found
    assert "signed for another annotation" in found
    assert problems(node, annotation_id) == ["approved without a signature"]


def test_an_approved_annotation_moved_on_behind_the_state_machine_is_caught(node, made):
    annotation_id, _ = approved(node, made)
    tamper(node, f"UPDATE annotation SET state = 'received' WHERE id = {annotation_id}")
    assert problems(node, annotation_id) == ["approved, but the annotation is now received"]


def test_a_deleted_signature_is_caught(node, made):
    annotation_id, signature_id = approved(node, made)
    tamper(node, f"DELETE FROM review_signature WHERE id = {signature_id}")
    assert problems(node, annotation_id) == ["approved without a signature"]


def test_a_forged_signature_under_a_swapped_user_key_is_caught(node, made):
    """Whoever replaces the user's public key can sign anything: the key's fingerprint is in
    the hash-chained audit trail, so the swap shows."""
    annotation_id, signature_id = approved(node, made)
    forger = Ed25519PrivateKey.generate()
    with node.index.reader() as r:
        row = next(s for s in r.signatures.list() if s.id == signature_id)
    manifest = Manifest.from_bytes(row.manifest.encode())
    body, signature = Manifest(**{**manifest.__dict__, "meaning": "forged"}).sign(forger)
    public = forger.public_key().public_bytes(serialization.Encoding.Raw,
                                              serialization.PublicFormat.Raw)
    tamper(node, "UPDATE review_user SET public_key = ? WHERE user_id = 'rad1'", args=(public,))
    tamper(node, f"UPDATE review_signature SET manifest = ?, signature = ?, meaning = 'forged'"
                 f" WHERE id = {signature_id}", args=(body.decode(), signature))
    try:
        assert problems(node, annotation_id) == [
            "the user's public key is not the one the audit trail recorded"]
    finally:  # the other tests sign as rad1
        tamper(node, "UPDATE review_user SET public_key = ? WHERE user_id = 'rad1'",
               args=(original_key(node),))


def original_key(ctx) -> bytes:
    """rad1's public key, as derived from the (still sealed) private key."""
    with ctx.index.reader() as r:
        user = r.users.get("rad1")
    key = open_private_key(user.private_key, PASSPHRASE, "rad1")
    return key.public_key().public_bytes(serialization.Encoding.Raw,
                                         serialization.PublicFormat.Raw)


def test_the_node_itself_cannot_edit_or_delete_a_signature(tmp_path):
    index = SqliteIndex(tmp_path / "index.sqlite3")
    index.migrate()
    index.close()
    conn = sqlite3.connect(tmp_path / "index.sqlite3", isolation_level=None)
    try:
        conn.execute("INSERT INTO review_signature (annotation_fk, user_fk, decision, meaning,"
                     " signed_at, manifest, signature) VALUES (1, 1, 'approved', 'm', 't', '{}',"
                     " x'00')")
        for sql in ("UPDATE review_signature SET meaning = 'x'", "DELETE FROM review_signature"):
            with pytest.raises(sqlite3.IntegrityError, match="append-only"):
                conn.execute(sql)
    finally:
        conn.close()
