"""The content-addressed blob store."""

from __future__ import annotations

import ctypes
import hashlib
import os
import tempfile
from pathlib import Path

import pytest

from node.storage.blobs import SHARDS, LocalBlobStore
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


#: cachestat's system call number (one number on every architecture).
_CACHESTAT = 451


class _CacheStat(ctypes.Structure):
    """``struct cachestat`` of the cachestat(2) system call (Linux 6.5)."""

    _fields_ = [(name, ctypes.c_uint64) for name in (
        "nr_cache", "nr_dirty", "nr_writeback", "nr_evicted", "nr_recently_evicted")]


def _dirty_pages(path) -> int:
    """Pages of ``path`` in the page cache not yet written to disk nor being written:
    cachestat(2), skipped where the kernel has none."""
    libc = ctypes.CDLL(None, use_errno=True)
    whole_file = (ctypes.c_uint64 * 2)(0, 0)
    found = _CacheStat()
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc.syscall(_CACHESTAT, fd, ctypes.byref(whole_file), ctypes.byref(found), 0):
            pytest.skip("requires cachestat(2), Linux 6.5 or later: unavailable here"
                        f" ({os.strerror(ctypes.get_errno())})")
    finally:
        os.close(fd)
    return found.nr_dirty


def _skip_without_dirty_pages(folder: Path) -> None:
    """Skip where the filesystem keeps no dirty pages (tmpfs): there is nothing to start."""
    fd, name = tempfile.mkstemp(dir=folder)
    with os.fdopen(fd, "wb") as f:
        f.write(os.urandom(1 << 16))
    try:
        if _dirty_pages(name) == 0:
            pytest.skip("requires a filesystem that keeps dirty pages (not tmpfs) for the"
                        " spool folder: unavailable here, nothing to start")
    finally:
        os.unlink(name)


def test_an_expected_file_starts_for_the_disk_before_its_fsync(blobs):
    """expect_file asks the kernel to write the file's pages now (sync_file_range), so
    the fsync that promotes it waits for less; it stays a file put_file can move."""
    _skip_without_dirty_pages(blobs.spool_dir)
    data = os.urandom(1 << 19)
    # Written as the C-STORE receiver writes its spool file: into the descriptor mkstemp
    # opened. (Reopening it with O_TRUNC would make ext4 start the writeback itself at
    # close: its auto_da_alloc heuristic for files rewritten in place.)
    fd, name = tempfile.mkstemp(dir=blobs.spool_dir, suffix=".part")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    spooled = Path(name)
    assert _dirty_pages(spooled) > 0
    blobs.expect_file(spooled)
    assert _dirty_pages(spooled) == 0  # written, or being written: none left waiting
    ref = blobs.put_file(spooled)
    assert ref.created and blobs.read(ref.sha256) == data
    assert not spooled.exists()  # moved into the store, not copied


def test_a_file_that_is_gone_is_expected_without_error(blobs, tmp_path):
    blobs.expect_file(tmp_path / "never-written.part")  # advice only: nothing to do


def test_a_long_write_starts_for_the_disk_before_the_commit_fsync(blobs):
    """The pixel data a writer copies after a header goes to the disk while it is hashed;
    the blob is still the bytes written, durable under their hash once committed."""
    _skip_without_dirty_pages(blobs.spool_dir)
    header, pixels = b"header" * 100, os.urandom(1 << 19)
    with blobs.writer() as w:
        w.write(header)
        w.write(pixels)
        (spooled,) = blobs.spool_dir.iterdir()
        assert _dirty_pages(spooled) == 0  # written, or being written: none left waiting
    assert w.ref.sha256 == hashlib.sha256(header + pixels).hexdigest()
    assert blobs.read(w.ref.sha256) == header + pixels


def test_a_file_hashed_by_its_writer_is_not_read_back(blobs, monkeypatch):
    """put_file with the hash its writer took (a C-STORE spooled to the folder) names the
    blob by it without reading the file again; the blob is still the file's bytes."""
    data = os.urandom(1 << 16)
    spooled = blobs.spool_dir / "received.part"
    spooled.write_bytes(data)

    def no_reading(path):
        raise AssertionError("read back")

    monkeypatch.setattr("node.storage.blobs.sha256_of_file", no_reading)
    ref = blobs.put_file(spooled, (hashlib.sha256(data).hexdigest(), len(data)))
    assert ref.created and ref.size == len(data)
    monkeypatch.undo()
    assert blobs.read(ref.sha256) == data and blobs.verify(ref.sha256)


def test_a_writers_hash_of_another_size_is_not_trusted(blobs):
    """A file that grew or shrank after its writer hashed it is hashed again: a blob's
    name is always the SHA-256 of the bytes stored under it."""
    data = os.urandom(1 << 16)
    spooled = blobs.spool_dir / "received.part"
    spooled.write_bytes(data + b"more")
    ref = blobs.put_file(spooled, (hashlib.sha256(data).hexdigest(), len(data)))
    assert ref.sha256 == hashlib.sha256(data + b"more").hexdigest()
    assert ref.size == len(data) + 4 and blobs.verify(ref.sha256)


def test_a_store_has_its_shard_folders_before_its_first_blob(blobs, monkeypatch):
    assert sorted(p.name for p in blobs.root.iterdir()) == list(SHARDS)
    assert all((blobs.root / shard).is_dir() for shard in SHARDS)

    def no_mkdir(*args, **kwargs):
        raise AssertionError("a folder was created while storing a blob")

    monkeypatch.setattr(os, "mkdir", no_mkdir)
    ref = blobs.put_bytes(b"first blob of a new store")
    assert blobs.local_path(ref.sha256).read_bytes() == b"first blob of a new store"


def test_opening_a_store_again_keeps_its_blobs_and_folders(blobs):
    ref = blobs.put_bytes(b"kept")
    again = LocalBlobStore(blobs.root, blobs.spool_dir)
    assert sorted(p.name for p in again.root.iterdir()) == list(SHARDS)
    assert again.read(ref.sha256) == b"kept"


def test_a_shard_folder_removed_by_hand_is_made_again(blobs):
    data = b"its folder was removed"
    shard = blobs.root / hashlib.sha256(data).hexdigest()[:2]
    shard.rmdir()
    ref = blobs.put_bytes(data)
    assert ref.created and blobs.read(ref.sha256) == data
    assert shard.is_dir()
    assert list(blobs.spool_dir.iterdir()) == []
