"""The content-addressed blob store."""

from __future__ import annotations

import hashlib

import pytest

from node.storage.blobs import LocalBlobStore
from node.storage.interface import OutOfSpace


@pytest.fixture
def blobs(tmp_path):
    return LocalBlobStore(tmp_path / "blobs", tmp_path / "spool")


def test_name_is_the_sha256_of_the_bytes(blobs):
    ref = blobs.put_bytes(b"some dicom bytes")
    digest = hashlib.sha256(b"some dicom bytes").hexdigest()
    assert ref.sha256 == digest and ref.created and ref.size == 16
    assert blobs.local_path(digest).read_bytes() == b"some dicom bytes"
    assert blobs.verify(digest)
    assert list(blobs.spool_dir.iterdir()) == []


def test_identical_bytes_are_stored_once(blobs):
    assert blobs.put_bytes(b"x").created
    assert not blobs.put_bytes(b"x").created
    assert list(blobs.iter_hashes()) == [hashlib.sha256(b"x").hexdigest()]
    assert list(blobs.spool_dir.iterdir()) == []  # the second copy is not left behind


def test_a_failed_write_leaves_nothing_in_the_spool(blobs):
    with pytest.raises(RuntimeError), blobs.writer() as out:
        out.write(b"half a blob")
        raise RuntimeError("the writer failed")
    assert list(blobs.spool_dir.iterdir()) == []
    assert list(blobs.iter_hashes()) == []


def test_received_values_never_become_paths(blobs):
    for hostile in ("../../etc/passwd", "1.2.840.10008.1", "A" * 64):
        with pytest.raises(ValueError):
            blobs.local_path(hostile)


def test_corruption_is_detected(blobs):
    ref = blobs.put_bytes(b"original")
    blobs.local_path(ref.sha256).write_bytes(b"0riginal")
    assert not blobs.verify(ref.sha256)


def test_free_space_floor(tmp_path):
    store = LocalBlobStore(tmp_path / "b", tmp_path / "s", min_free_bytes=1 << 62)
    with pytest.raises(OutOfSpace, match="MB free"):
        store.ensure_space()


def test_sidecar_kept_beside_its_blob_and_never_listed_as_one(blobs):
    ref = blobs.put_bytes(b"a stored instance")
    assert blobs.read_sidecar(ref.sha256) is None
    blobs.put_sidecar(ref.sha256, b'{"first":1}')
    blobs.put_sidecar(ref.sha256, b'{"second":2}')  # replaced whole
    assert blobs.read_sidecar(ref.sha256) == b'{"second":2}'
    assert blobs.local_path(ref.sha256).read_bytes() == b"a stored instance"
    assert list(blobs.spool_dir.iterdir()) == []  # written through the spool, renamed
    assert list(blobs.iter_hashes()) == [ref.sha256]
    assert blobs.verify(ref.sha256)
    blobs.delete(ref.sha256)
    assert blobs.read_sidecar(ref.sha256) is None and list(blobs.local_path(
        ref.sha256).parent.iterdir()) == []


def test_sidecar_names_are_hashes_too(blobs):
    for hostile in ("../../etc/passwd", "1.2.840.10008.1"):
        with pytest.raises(ValueError):
            blobs.put_sidecar(hostile, b"{}")
        with pytest.raises(ValueError):
            blobs.read_sidecar(hostile)


def test_writer_hashes_what_ends_in_the_file_even_after_a_seek_back(blobs):
    """The hash computed while writing names the file's bytes; an overwrite after a
    seek back (a patched length) is hashed from disk instead of trusted."""
    with blobs.writer() as w:
        w.write(b"header-")
        w.write(b"pixels")
    assert w.ref.sha256 == hashlib.sha256(b"header-pixels").hexdigest()
    with blobs.writer() as w:
        w.write(b"len=0000;body")
        w.seek(4)
        w.write(b"0013")
        w.seek(0, 2)
        w.write(b"!")
    expected = b"len=0013;body!"
    assert w.ref.sha256 == hashlib.sha256(expected).hexdigest() and w.ref.size == len(expected)
    assert blobs.read(w.ref.sha256) == expected and blobs.verify(w.ref.sha256)
