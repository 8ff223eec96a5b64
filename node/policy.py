"""Association policy: which peer is calling, and whether there is room for it.

Kept free of pynetdicom so that the rules can be read (and tested) on their own;
``node.dimse.handlers.association`` applies them to real associations.
"""

from __future__ import annotations

import fcntl
import os
from dataclasses import dataclass
from pathlib import Path

from node import status
from node.config import Peer, Settings
from node.status import Rejection


@dataclass(frozen=True)
class Admission:
    """The verdict on an association request: a peer, or a rejection with its reason."""

    peer: Peer | None
    rejection: Rejection | None = None
    detail: str = ""


def admit(settings: Settings, calling_ae: str, called_ae: str, address: str) -> Admission:
    """Match the request against the configured peers (AE title and address)."""
    if called_ae.strip() != settings.node.ae_title:
        return Admission(None, status.CALLED_AE_NOT_RECOGNISED, "called AE title is not ours")
    candidates = settings.peers_with_ae(calling_ae.strip())
    if not candidates:
        return Admission(None, status.CALLING_AE_NOT_RECOGNISED, "unknown calling AE title")
    for peer in candidates:
        if peer.allows_address(address):
            return Admission(peer)
    return Admission(None, status.CALLING_AE_NOT_RECOGNISED,
                     "calling AE title known but address does not match")


class SlotLimiter:
    """At most N concurrent associations across every receiving process of a node.

    Each association holds an exclusive ``flock`` on one of N slot files. The
    kernel drops the lock when the holder closes the file or dies, so a crashed
    process never leaks a slot, and no shared counter needs recovering.
    """

    def __init__(self, run_dir: Path, limit: int, name: str = "association-slot") -> None:
        self.paths = [run_dir / f"{name}-{i:03d}.lock" for i in range(limit)]

    def acquire(self) -> int | None:
        """A held slot's file descriptor, or None when every slot is busy."""
        for path in self.paths:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            return fd
        return None

    @staticmethod
    def release(fd: int) -> None:
        os.close(fd)

    def held(self) -> int | None:
        """How many slots are held now, across every process (None where the kernel's lock
        table cannot be read). Read from ``/proc/locks`` rather than by probing each slot
        with a lock of our own, which could make a concurrent acquire skip that slot."""
        inodes = set()
        for path in self.paths:
            try:
                info = path.stat()
            except OSError:
                continue
            inodes.add((os.major(info.st_dev), os.minor(info.st_dev), info.st_ino))
        try:
            table = Path("/proc/locks").read_text()
        except OSError:
            return None
        held = 0
        for line in table.splitlines():
            fields = line.split()
            if len(fields) < 6 or fields[1] != "FLOCK" or "->" in fields:
                continue
            try:
                major, minor, inode = fields[5].split(":")
                key = (int(major, 16), int(minor, 16), int(inode))
            except ValueError:
                continue
            held += key in inodes
        return held
