"""Rewriting a small file atomically without freeing an inode each time.

The node rewrites a few small files many times a second or minute: the signed
audit head (:mod:`node.audit.trail`, up to ten times a second per process while
instances arrive) and the syslog cursor (:mod:`node.audit.syslog`). The usual
way, writing a temporary file and renaming it over the old one, creates an inode
and frees one per rewrite.

Why that is avoided (issue 15): on ext4 without a journal, as on this project's
machines, creating a file skips every free inode of its block group freed in the
last 30 seconds (``vm.dirty_expire_centisecs``), looking each one up in the inode
table first (``find_inode_bit``, ``recently_deleted``). The head's rewrites kept
up to a few hundred such inodes beside the blobs, and every blob the worker
created walked past them. ``perf record`` on a receiving worker (clinical route,
one sender) found 2.7-12.5 % of its CPU in that walk over three runs with
rename, 0.8-3.9 % over three runs with this module (the rest: files other
programs deleted).

So the new contents go into a spare file kept beside the target
(``<name>.next``), which is then swapped with the target in one atomic
``renameat2(RENAME_EXCHANGE)``. A reader sees the old file or the new one,
never a part of either; afterwards the spare holds the previous contents and is
written over next time. Python's ``os`` has no binding for ``renameat2``, hence
ctypes. Where the call is missing or the filesystem cannot exchange (not Linux,
some network filesystems), or on the first write (no target yet), the spare is
renamed over the target as before.
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Callable
from pathlib import Path

#: ``AT_FDCWD``: paths relative to the working folder, as ``os.rename`` takes them.
_AT_FDCWD = -100
#: ``RENAME_EXCHANGE`` (linux/fs.h): swap the two names atomically.
_RENAME_EXCHANGE = 2
#: What renameat2 answers where it cannot exchange: no such call, flag or support.
_UNSUPPORTED = {errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP}


def _libc_renameat2() -> Callable[[int, bytes, int, bytes, int], int] | None:
    """libc's ``renameat2`` (glibc 2.28 and later), or None where there is none."""
    try:
        call = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError, TypeError):  # no such function; no C library to ask
        return None
    call.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                     ctypes.c_uint]
    call.restype = ctypes.c_int
    return call


_renameat2 = _libc_renameat2()


def spare_of(path: Path) -> Path:
    """The file beside ``path`` that its next contents are written to."""
    return path.with_name(path.name + ".next")


def write_atomically(path: Path, data: bytes) -> None:
    """Replace ``path``'s contents with ``data``, all at once for any reader.

    Not durable by itself (no fsync), as the rename it replaces was not: the
    callers' files may lag after a power cut, never be torn. A write that fails
    (a full disk) raises and leaves at most a partial spare, which nothing reads.
    """
    spare = spare_of(path)
    spare.write_bytes(data)
    if not exchange(spare, path):
        os.replace(spare, path)


def exchange(first: Path, second: Path) -> bool:
    """Swap two existing files' names atomically; False where that cannot be done here
    (no ``renameat2``, a filesystem without the exchange, or ``second`` missing)."""
    if _renameat2 is None:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second),
                  _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in _UNSUPPORTED or code == errno.ENOENT:
        return False
    raise OSError(code, os.strerror(code), str(first))
