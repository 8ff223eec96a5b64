"""Content-addressed blob store: a file's name is the SHA-256 of its bytes.

Received values (UIDs, AE titles) never become paths. A blob enters the store
only by :meth:`BlobStore.promote`: the spooled file is hashed, fsync'd, renamed
into place and its directory fsync'd, so a blob that exists under its name is
always whole. Two writers of the same bytes race harmlessly: the rename is
atomic and both produce the same content.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

_CHUNK = 1 << 20


class OutOfSpace(OSError):
    """Free space on the data filesystem is below the configured minimum."""


@dataclass(frozen=True)
class BlobRef:
    """A blob that is durable in the store."""

    sha256: str
    size: int
    created: bool  # False when identical bytes were already stored


def sha256_of_file(path: Path) -> tuple[str, int]:
    """Hash a file in chunks, so a multi-hundred-MB object is never held whole."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class BlobStore:
    """Files under ``<root>/<aa>/<sha256>``, spooled through ``spool_dir``.

    One level of 256 shard folders: a second level would make nearly every
    new blob create (and fsync) a new folder until the store holds millions,
    while ext4's hashed directories keep lookups fast at thousands per folder.

    ``spool_dir`` must be on the same filesystem as ``root`` so that promotion
    is a rename, not a copy.
    """

    def __init__(self, root: Path, spool_dir: Path, min_free_bytes: int = 0) -> None:
        self.root = root
        self.spool_dir = spool_dir
        self.min_free_bytes = min_free_bytes
        root.mkdir(parents=True, exist_ok=True)
        spool_dir.mkdir(parents=True, exist_ok=True)

    def path_for(self, sha256: str) -> Path:
        if len(sha256) != 64 or not all(c in "0123456789abcdef" for c in sha256):
            raise ValueError("not a SHA-256 hex digest")
        return self.root / sha256[:2] / sha256

    def exists(self, sha256: str) -> bool:
        return self.path_for(sha256).is_file()

    def open(self, sha256: str) -> BinaryIO:
        """The blob's bytes, for reading (FileNotFoundError when it is not stored)."""
        return open(self.path_for(sha256), "rb")

    def local_path(self, sha256: str) -> Path:
        """Optional capability of a local store: the blob's file, for senders that stream
        a file by name (pynetdicom's chunked C-STORE)."""
        return self.path_for(sha256)

    def free_bytes(self) -> int:
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize

    def ensure_space(self) -> None:
        """Refuse early when the disk is nearly full, before anything is promoted."""
        if self.min_free_bytes and self.free_bytes() < self.min_free_bytes:
            raise OutOfSpace(
                f"{self.free_bytes() // (1 << 20)} MB free on the data disk, "
                f"minimum {self.min_free_bytes // (1 << 20)} MB"
            )

    def new_spool_file(self) -> Path:
        """A fresh empty file in the spool area, for writers other than pynetdicom."""
        fd, name = tempfile.mkstemp(dir=self.spool_dir, suffix=".part")
        os.close(fd)
        return Path(name)

    def promote(self, spooled: Path) -> BlobRef:
        """Move a fully written spool file into the store, durably.

        When identical bytes are already stored the spool file is left where it
        is (its owner deletes it) and ``created`` is False.
        """
        sha256, size = sha256_of_file(spooled)
        target = self.path_for(sha256)
        if target.is_file():
            return BlobRef(sha256, size, created=False)
        fd = os.open(spooled, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        self._make_dirs(target.parent)
        os.rename(spooled, target)
        fsync_dir(target.parent)
        return BlobRef(sha256, size, created=True)

    def put_bytes(self, data: bytes) -> BlobRef:
        """Spool ``data`` and promote it (used by tests and HTTP uploads)."""
        spooled = self.new_spool_file()
        try:
            with open(spooled, "wb") as f:
                f.write(data)
            return self.promote(spooled)
        finally:
            spooled.unlink(missing_ok=True)

    def adopt(self, source: Path, sha256: str) -> None:
        """Hard-link a file already known to hash to ``sha256`` (e.g. from another store on
        the same filesystem) into place: no copy, and both names stay whole."""
        target = self.path_for(sha256)
        if target.is_file():
            return
        self._make_dirs(target.parent)
        try:
            os.link(source, target)
        except FileExistsError:
            return
        fsync_dir(target.parent)

    def _make_dirs(self, directory: Path) -> None:
        """Create a shard folder on first use, making its entry durable."""
        if directory.is_dir():
            return
        try:
            directory.mkdir()
        except FileExistsError:
            return
        fsync_dir(directory.parent)

    def verify(self, sha256: str) -> bool:
        """True when the blob exists and its bytes still hash to its name."""
        path = self.path_for(sha256)
        return path.is_file() and sha256_of_file(path)[0] == sha256

    def iter_hashes(self) -> Iterator[str]:
        for path in self.root.glob("??/*"):
            if path.is_file():
                yield path.name

    def disk_used(self) -> int:
        return sum(p.stat().st_size for p in self.root.glob("??/*") if p.is_file())

    def stale_spool_files(self) -> list[Path]:
        return [p for p in self.spool_dir.iterdir() if p.is_file()]

    def clear_spool(self) -> int:
        """Remove spool files left by a crash. Only safe while no receiver runs."""
        stale = self.stale_spool_files()
        for p in stale:
            p.unlink(missing_ok=True)
        return len(stale)
