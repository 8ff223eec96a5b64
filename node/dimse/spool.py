"""Where a C-STORE data set is written while it arrives: memory, or the spool folder.

Why not always the spool folder (issue 15, measured with ``benchmarks/ingest``): on
the clinical and annotator routes the received bytes are never stored (the stored
object is the de-identified one, written to a blob of its own), so the spool file
only lives for the few milliseconds the pipeline reads it. On ext4 its creation,
half a megabyte of page cache and its removal still take the journal's locks,
which the other receiving process's fsyncs hold: with two senders the clinical
route spent 5.8 ms of CPU per CT slice against 4.3 ms with its spool files in
memory, and received 240 against 300 slices/s.

So a data set whose bytes will be rewritten goes to an anonymous memory file
(``memfd_create``) which the pipeline reads by path (``/proc/self/fd/N``, like any
file), and moves to the spool folder once it outgrows ``MEMORY_LIMIT`` (a large
multi-frame object: the memory a node holds stays bounded). A data set that may be
stored as received (the ``deidentified`` route) goes to the spool folder at once,
on the blobs' filesystem, so storing it is a rename. Nothing here is durable either
way: durability is the blob store's fsync and rename, after this.

An association's memory file is reused, data set after data set (:meth:`DataSetSpool.
rewind`): filling a new memory file with a CT slice (33 writes of 16 KB, as the
receiver makes them) and closing it cost 0.33-0.36 ms of CPU, most of it the kernel
allocating and freeing its half megabyte of pages; overwriting the pages a rewound
one holds cost 0.09 ms. So an idle association holds the pages of its last data set,
at most ``MEMORY_LIMIT``.

Memory spools may also share a :class:`MemoryBudget`: the bytes they may hold all
together, past which a spool moves to the spool folder as past its own limit. STOW-RS
uses one (``node.web.dicomweb``), since nothing else bounds how many HTTP requests
upload at once; C-STORE needs none, its associations being bounded in number.

A memory spool's path names a descriptor of this process: its content is the data set
being received until the receiver rewinds it for the next one, and after
:meth:`DataSetSpool.remove` the number may name another file. The receiver rewinds or
removes the spool only once the pipeline has answered, and what the pipeline hands on
has its values read (the stored object's, not the spool's).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading
from contextlib import suppress
from pathlib import Path

#: Largest data set held in memory (a CT, MR or PET image, most CR): beyond it, the
#: spool folder. Per association at once, so four senders hold at most 64 MiB.
MEMORY_LIMIT = 16 << 20

#: The name a memory spool shows in ``/proc/PID/fd`` (``memfd:lamina-spool``).
MEMORY_FILE_NAME = "lamina-spool"


class MemoryBudget:
    """Bytes that the memory spools sharing it may hold at once (their files' sizes)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0
        self._lock = threading.Lock()  # spools write from several threads

    def take(self, size: int) -> bool:
        """Hold ``size`` more bytes if the budget has them; False (nothing held) if not."""
        with self._lock:
            if self.held + size > self.limit:
                return False
            self.held += size
            return True

    def give_back(self, size: int) -> None:
        with self._lock:
            self.held -= size


class DataSetSpool:
    """One data set being received: written to by :meth:`write`, read by the pipeline
    at :attr:`path`, and removed by :meth:`remove` (whatever happened)."""

    def __init__(self, spool_dir: Path, in_memory: bool,
                 memory_limit: int = MEMORY_LIMIT, budget: MemoryBudget | None = None) -> None:
        self.spool_dir = spool_dir
        self.memory_limit = memory_limit
        self.budget = budget
        self._taken = 0  # bytes held from the budget: the memory file's largest size
        self.size = 0
        self.in_memory = in_memory and hasattr(os, "memfd_create")
        if self.in_memory:
            self.fd = os.memfd_create(MEMORY_FILE_NAME, os.MFD_CLOEXEC)
            self.path = f"/proc/self/fd/{self.fd}"
        else:
            self.fd, self.path = tempfile.mkstemp(dir=spool_dir, suffix=".part")
        #: A data set spooled to the folder from its first byte may be stored as received
        #: (the deidentified route): its SHA-256 is taken as it is written, so the blob
        #: store need not read the file back to name it (see :meth:`hashed`).
        self._digest = None if self.in_memory else hashlib.sha256()

    def write(self, data: memoryview) -> None:
        """Append ``data`` (all of it); an ``OSError`` (a full disk) is the caller's."""
        if self.in_memory and not self.stays_in_memory(len(data)):
            self._to_disk()
        while data:
            written = os.write(self.fd, data)
            if self._digest is not None:
                self._digest.update(data[:written])
            self.size += written
            data = data[written:]

    def stays_in_memory(self, more: int) -> bool:
        """Whether ``more`` bytes can be appended to this memory spool without moving it
        to the spool folder (within its limit, and its budget holds them)."""
        needed = self.size + more
        if needed > self.memory_limit:
            return False
        if self.budget is None or needed <= self._taken:
            return True
        if not self.budget.take(needed - self._taken):
            return False
        self._taken = needed
        return True

    def _give_back(self) -> None:
        if self.budget is not None and self._taken:
            self.budget.give_back(self._taken)
        self._taken = 0

    def _to_disk(self) -> None:
        """Move what memory holds to a spool file and go on writing there."""
        fd, path = tempfile.mkstemp(dir=self.spool_dir, suffix=".part")
        try:
            offset = 0
            while offset < self.size:
                offset += os.sendfile(fd, self.fd, offset, self.size - offset)
        except OSError:
            os.close(fd)
            os.unlink(path)
            raise
        os.close(self.fd)
        self.fd, self.path, self.in_memory = fd, path, False
        self._give_back()

    def hashed(self) -> tuple[str, int] | None:
        """The SHA-256 and size of the whole spool file, for a data set written to the
        spool folder from its first byte; None for one held in memory, even if it moved to
        the folder later (hashing every memory spool would cost the routes that never
        store the received bytes). Saves reading half a megabyte back per CT slice."""
        return (self._digest.hexdigest(), self.size) if self._digest is not None else None

    def complete(self) -> None:
        """The data set is whole: the file ends where it does (a rewound memory file
        holds the previous data set's bytes past it until now)."""
        if self.in_memory:
            os.ftruncate(self.fd, self.size)

    def rewind(self) -> bool:
        """Empty a memory spool for the next data set, keeping its pages; False (and
        nothing done) for a spool file, which is removed instead."""
        if not self.in_memory or self.fd < 0:
            return False
        try:
            os.lseek(self.fd, 0, os.SEEK_SET)
        except OSError:
            return False
        self.size = 0
        return True

    def remove(self) -> None:
        """Close the file and delete it (a memory file goes with its descriptor)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self._give_back()
        if not self.in_memory and self.path:
            with suppress(OSError):  # gone already: renamed into the blob store
                os.unlink(self.path)
        self.path = ""
