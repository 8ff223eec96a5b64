"""C-STORE over real associations (pynetdicom as SCU) into a node running in this process:
indexing, the store decision (resend, conflict), refusals (disk, index, permission),
association admission and its audit.

DCMTK's storescu and the multi-worker node are in tests/e2e/test_store.py.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import subprocess
import time

import pytest
from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification

from node import status
from tests.harness import TEST_AET, InProcessNode, peer, write_config


def test_pynetdicom_series_is_indexed_and_blobs_verify(node, phantom_files):
    results = node.store(phantom_files)
    assert results == [(0, "")] * len(phantom_files)

    rows = node.rows("SELECT sop_instance_uid, blob_sha256, blob_size, calling_ae,"
                     " transfer_syntax_uid FROM instance")
    assert len(rows) == len(phantom_files)
    key = node.project_key()  # the clinical route stores the de-identified object
    sent = {key.uid(str(dcmread(p).SOPInstanceUID)): p for p in phantom_files}
    for uid, sha, size, calling_ae, syntax in rows:
        blob = node.blob_path(sha).read_bytes()
        assert hashlib.sha256(blob).hexdigest() == sha and len(blob) == size
        assert calling_ae == TEST_AET and syntax == "1.2.840.10008.1.2.1"
        stored, original = dcmread(node.blob_path(sha)), dcmread(sent[uid])
        assert stored.file_meta.MediaStorageSOPInstanceUID == uid
        assert stored.PixelData == original.PixelData  # pixels untouched, not transcoded
        assert stored.PatientID != original.PatientID
        assert stored.PatientIdentityRemoved == "YES"
        assert original.PatientName.encode() not in blob  # no PHI at rest
    assert node.rows("SELECT modalities_in_study FROM study") == [("CT",)]
    assert node.audit_actions().count("instance.stored") == len(phantom_files)
    assert node.cli("fsck").exit_code == 0
    assert node.cli("audit", "verify").exit_code == 0


def _reject_reason(port: int, aet: str, called: str = "LAMINA") -> tuple[int, int, int] | None:
    ae = AE(ae_title=aet)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    if assoc.is_established:
        assoc.release()
        return None
    assert assoc.is_rejected
    rj = assoc.acceptor.primitive
    return (rj.result, rj.result_source, rj.diagnostic)


def test_unknown_calling_ae_is_rejected_and_audited(node):
    assert _reject_reason(node.port, "STRANGER") == (0x01, 0x01, 0x03)
    assert _reject_reason(node.port, TEST_AET, called="NOTLAMINA") == (0x01, 0x01, 0x07)
    assert node.echo() == 0  # the node keeps serving
    rejected = node.rows("SELECT object FROM audit_event WHERE action ="
                         " 'association.rejected' ORDER BY seq")
    assert len(rejected) == 2 and "calling AE title not recognised" in rejected[0][0]
    assert "unknown calling AE title" in node.log()


def test_known_ae_from_wrong_address_is_rejected(tmp_path):
    peers = {"remote": peer("REMOTE", "store", host="192.0.2.10", port=104),
             "tests": {"ae_title": TEST_AET, "host": "127.0.0.1", "port": 1}}
    with InProcessNode(write_config(tmp_path / "n", peers=peers)) as node:
        assert _reject_reason(node.port, "REMOTE") == (0x01, 0x01, 0x03)
        [(obj,)] = node.rows("SELECT object FROM audit_event"
                             " WHERE action = 'association.rejected'")
        assert "address does not match" in obj


def test_association_limit_rejects_the_one_too_many(tmp_path):
    with InProcessNode(write_config(tmp_path / "n", node={"max_associations": 1})) as node:
        ae = AE(ae_title=TEST_AET)
        ae.add_requested_context(Verification)
        held = ae.associate("127.0.0.1", node.port, ae_title="LAMINA")
        assert held.is_established
        try:
            assert _reject_reason(node.port, TEST_AET) == (0x02, 0x03, 0x02)
        finally:
            held.release()
        assert node.echo() == 0  # the slot is free again
        [(obj,)] = node.rows("SELECT object FROM audit_event"
                             " WHERE action = 'association.rejected'")
        assert "local limit exceeded" in obj


def test_identical_resend_is_success_and_stores_nothing_new(node, phantom_files):
    first = node.store(phantom_files[:3])
    node.ctx.drain()  # the first store's metadata sidecars are written after its answer
    blobs_before = sorted((node.data / "blobs").rglob("*"))
    again = node.store(phantom_files[:3])
    assert first == again == [(0, "")] * 3
    assert node.rows("SELECT count(*) FROM instance") == [(3,)]
    assert sorted((node.data / "blobs").rglob("*")) == blobs_before
    assert node.audit_actions().count("instance.resend") == 3


def test_conflicting_resend_is_kept_as_conflict_and_never_overwrites(node, phantom, tmp_path):
    original = phantom.slice(0)
    assert node.store([original]) == [(0, "")]
    [(stored_sha,)] = node.rows("SELECT blob_sha256 FROM instance")

    changed = phantom.slice(0)
    changed.PixelData = b"\x01" + changed.PixelData[1:]  # survives de-identification
    [(code, comment)] = node.store([changed])
    assert code == status.DUPLICATE_SOP_INSTANCE.code
    assert "conflict" in comment

    assert node.rows("SELECT blob_sha256 FROM instance") == [(stored_sha,)]
    [(conflict_sha, kept_for)] = node.rows(
        "SELECT blob_sha256, stored_blob_sha256 FROM conflict")
    assert kept_for == stored_sha and conflict_sha != stored_sha
    assert dcmread(node.blob_path(conflict_sha)).PixelData[:1] == b"\x01"
    assert "instance.conflict" in node.audit_actions()
    # the same conflicting bytes again: still refused, still one conflict row
    assert node.store([changed])[0][0] == status.DUPLICATE_SOP_INSTANCE.code
    assert node.rows("SELECT count(*) FROM conflict") == [(1,)]


def test_low_disk_space_refuses_with_a700_and_indexes_nothing(tmp_path, phantom_files):
    with InProcessNode(write_config(tmp_path / "n", storage={"min_free_mb": 1 << 30})) as node:
        [(code, comment)] = node.store(phantom_files[:1])
        assert code == status.OUT_OF_RESOURCES.code
        assert "disk space" in comment
        assert node.rows("SELECT count(*) FROM instance") == [(0,)]
        assert not list((node.data / "blobs").rglob("*.dcm"))
        assert "instance.store-failed" in node.audit_actions()


@pytest.mark.skipif(os.geteuid() != 0, reason="requires root to mount a tiny tmpfs")
def test_filling_a_real_tiny_filesystem(tmp_path, phantom_files):
    """A 4 MB tmpfs: stores succeed until the free-space floor, then 0xA700, never half-done."""
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], check=True)
    try:
        with InProcessNode(write_config(tmp_path / "n", data=mount / "data",
                                        storage={"min_free_mb": 1})) as node:
            results = node.store(phantom_files)
            codes = [code for code, _ in results]
            assert 0 in codes and status.OUT_OF_RESOURCES.code in codes
            first_refusal = codes.index(status.OUT_OF_RESOURCES.code)
            assert all(c == status.OUT_OF_RESOURCES.code for c in codes[first_refusal:])
            stored = node.rows("SELECT blob_sha256 FROM instance")
            assert len(stored) == codes.count(0)
            assert node.echo() == 0
            fsck = node.cli("fsck")
            assert fsck.exit_code == 0, fsck.stdout
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_index_unavailable_answers_a700_and_rolls_back(tmp_path, phantom_files):
    with InProcessNode(write_config(tmp_path / "n", index={"busy_timeout_ms": 300})) as node:
        blocker = sqlite3.connect(node.data / "index.sqlite3", isolation_level=None)
        blocker.execute("BEGIN EXCLUSIVE")
        try:
            [(code, comment)] = node.store(phantom_files[:1])
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        assert code == status.OUT_OF_RESOURCES.code
        assert "index unavailable" in comment
        assert node.rows("SELECT count(*) FROM instance") == [(0,)]
        # once the index is back, the same object stores normally
        assert node.store(phantom_files[:1]) == [(0, "")]
        assert node.cli("fsck").exit_code == 0


def test_peer_without_store_permission_is_refused(tmp_path, phantom_files):
    peers = {"viewer": peer(TEST_AET, "find")}
    with InProcessNode(write_config(tmp_path / "n", peers=peers)) as node:
        [(code, comment)] = node.store(phantom_files[:1])
        assert code == status.NOT_AUTHORISED.code and "may not store" in comment
        assert node.rows("SELECT count(*) FROM instance") == [(0,)]


def test_lamina_send_and_status(node, phantom_files):
    folder = phantom_files[0].parent
    sent = node.cli("send", str(folder), "--to", f"LAMINA@127.0.0.1:{node.port}",
                    "--aet", TEST_AET)
    assert sent.exit_code == 0, sent.stderr
    assert f"{len(phantom_files):6d}  0x0000 Success" in sent.stdout
    shown = node.cli("status")
    assert shown.exit_code == 0
    assert f"instances              {len(phantom_files)}" in shown.stdout
    unknown = node.cli("send", str(folder), "--to", "nowhere")
    assert unknown.exit_code == 2 and "unknown peer" in unknown.stderr


def test_ct_storage_is_offered_with_compressed_syntaxes(node):
    """The SCP accepts a JPEG 2000 context for CT without transcoding (stored as received)."""
    ae = AE(ae_title=TEST_AET)
    ae.add_requested_context(CTImageStorage, ["1.2.840.10008.1.2.4.90"])
    assoc = ae.associate("127.0.0.1", node.port, ae_title="LAMINA")
    try:
        assert assoc.is_established
        assert [cx.transfer_syntax[0] for cx in assoc.accepted_contexts] == \
            ["1.2.840.10008.1.2.4.90"]
    finally:
        assoc.release()


def test_aborted_association_is_audited(node):
    ae = AE(ae_title=TEST_AET)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="LAMINA")
    assert assoc.is_established
    assoc.abort()
    for _ in range(50):
        if "association.aborted" in node.audit_actions():
            break
        time.sleep(0.1)
    assert "association.aborted" in node.audit_actions()
    assert node.echo() == 0
