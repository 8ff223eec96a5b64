"""Where a C-STORE data set is written while it arrives (node.dimse.spool).

A data set whose bytes the route rewrites stays in memory (an anonymous memory
file read by path) until it outgrows the memory limit, then moves to the spool
folder with every byte; one stored as received goes to the spool folder at once.
Either way :meth:`remove` leaves nothing behind. A memory spool is rewound for the
association's next data set, which it then holds alone. Spools sharing a memory
budget hold no more than it all together: past it, the one that grows moves out.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from node.dimse.spool import DataSetSpool, MemoryBudget
from tests.harness import memory_spools_open

pytestmark = pytest.mark.skipif(not hasattr(os, "memfd_create"),
                                reason="memory spools need memfd_create (Linux)")


def _chunks(size: int, step: int = 7000) -> list[bytes]:
    data = os.urandom(size)
    return [data[i:i + step] for i in range(0, size, step)]


def test_a_rewritten_data_set_stays_in_memory(tmp_path: Path) -> None:
    spool = DataSetSpool(tmp_path, in_memory=True)
    for chunk in (pieces := _chunks(100_000)):
        spool.write(memoryview(chunk))
    assert list(tmp_path.iterdir()) == []
    assert Path(spool.path).read_bytes() == b"".join(pieces)
    assert spool.size == 100_000
    spool.remove()
    assert memory_spools_open() == 0


def test_a_rewound_memory_spool_holds_the_next_data_set_alone(tmp_path: Path) -> None:
    spool = DataSetSpool(tmp_path, in_memory=True)
    spool.write(memoryview(os.urandom(100_000)))
    spool.complete()
    assert spool.rewind()
    smaller = os.urandom(30_000)
    spool.write(memoryview(smaller))
    spool.complete()
    assert Path(spool.path).read_bytes() == smaller
    assert spool.size == 30_000
    assert memory_spools_open() == 1
    spool.remove()
    assert memory_spools_open() == 0


def test_a_spool_file_is_not_rewound(tmp_path: Path) -> None:
    spool = DataSetSpool(tmp_path, in_memory=False)
    spool.write(memoryview(b"DICM"))
    assert not spool.rewind()
    spool.complete()
    assert Path(spool.path).read_bytes() == b"DICM"
    spool.remove()
    assert list(tmp_path.iterdir()) == []


def test_a_data_set_stored_as_received_is_spooled_beside_the_blobs(tmp_path: Path) -> None:
    spool = DataSetSpool(tmp_path, in_memory=False)
    spool.write(memoryview(b"DICM" * 10))
    assert Path(spool.path).parent == tmp_path
    assert Path(spool.path).read_bytes() == b"DICM" * 10
    spool.remove()
    assert list(tmp_path.iterdir()) == []


def test_a_spool_file_is_hashed_as_it_is_written(tmp_path: Path) -> None:
    """A data set spooled to the folder from its first byte carries the SHA-256 and size
    of the whole file (the blob store names it without reading it back); a memory spool,
    even one moved to the folder, carries none."""
    pieces = _chunks(60_000)
    spool = DataSetSpool(tmp_path, in_memory=False)
    for chunk in pieces:
        spool.write(memoryview(chunk))
    assert spool.hashed() == (hashlib.sha256(b"".join(pieces)).hexdigest(), 60_000)
    assert Path(spool.path).read_bytes() == b"".join(pieces)
    spool.remove()
    moved = DataSetSpool(tmp_path, in_memory=True, memory_limit=10_000)
    for chunk in pieces:
        moved.write(memoryview(chunk))
    assert not moved.in_memory and moved.hashed() is None
    moved.remove()


def test_past_the_memory_limit_every_byte_moves_to_the_spool_folder(tmp_path: Path) -> None:
    spool = DataSetSpool(tmp_path, in_memory=True, memory_limit=50_000)
    pieces = _chunks(120_000)
    for n, chunk in enumerate(pieces):
        spool.write(memoryview(chunk))
        if (n + 1) * 7000 <= 50_000:
            assert list(tmp_path.iterdir()) == [], "moved before the limit"
    assert [p.name for p in tmp_path.iterdir()] == [Path(spool.path).name]
    assert Path(spool.path).read_bytes() == b"".join(pieces)
    assert spool.size == 120_000
    spool.remove()
    assert list(tmp_path.iterdir()) == []
    assert memory_spools_open() == 0


def test_spools_sharing_a_budget_hold_no_more_than_it(tmp_path: Path) -> None:
    budget = MemoryBudget(150_000)
    first = DataSetSpool(tmp_path, in_memory=True, budget=budget)
    first.write(memoryview(os.urandom(100_000)))
    assert first.in_memory and budget.held == 100_000
    second = DataSetSpool(tmp_path, in_memory=True, budget=budget)
    pieces = _chunks(80_000)
    for chunk in pieces:
        second.write(memoryview(chunk))
    assert not second.in_memory, "past the shared budget the growing spool moves out"
    assert Path(second.path).read_bytes() == b"".join(pieces)
    assert budget.held == 100_000, "what the moved spool held is given back"
    # A rewound spool keeps its pages, so it keeps what it took; removing it gives it back.
    assert first.rewind()
    first.write(memoryview(os.urandom(40_000)))
    assert budget.held == 100_000
    first.remove()
    second.remove()
    assert budget.held == 0
    assert list(tmp_path.iterdir()) == []
    assert memory_spools_open() == 0


def test_a_spool_file_renamed_into_the_store_is_removed_quietly(tmp_path: Path) -> None:
    (tmp_path / "spool").mkdir()
    spool = DataSetSpool(tmp_path / "spool", in_memory=False)
    spool.write(memoryview(b"x" * 10))
    Path(spool.path).rename(tmp_path / "blob")
    spool.remove()
    assert (tmp_path / "blob").read_bytes() == b"x" * 10
    assert list((tmp_path / "spool").iterdir()) == []


def test_a_full_spool_folder_is_the_writers_error(tmp_path: Path) -> None:
    """Moving to a spool folder that cannot take the file raises (the receiver answers
    the sender with its reason) and keeps nothing half-moved."""
    spool = DataSetSpool(tmp_path / "gone", in_memory=True, memory_limit=10)
    with pytest.raises(OSError):
        spool.write(memoryview(b"y" * 20))
    spool.remove()
    assert memory_spools_open() == 0
