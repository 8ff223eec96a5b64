"""Small files rewritten in place keep their two inodes and are never seen torn."""

from __future__ import annotations

from pathlib import Path

import pytest

from node.atomic_file import exchange, spare_of, write_atomically
from tests.harness import exchanges_here, inodes


def test_first_write_renames_the_spare_into_place(tmp_path: Path) -> None:
    target = tmp_path / "head.json"
    write_atomically(target, b"first")
    assert target.read_bytes() == b"first"
    assert not spare_of(target).exists()


def test_rewrites_swap_two_inodes_and_free_none(tmp_path: Path) -> None:
    if not exchanges_here(tmp_path):
        pytest.skip("renameat2(RENAME_EXCHANGE) unavailable here (not Linux, or this "
                    "filesystem cannot exchange): rewrites rename, as before")
    target = tmp_path / "head.json"
    write_atomically(target, b"first")
    write_atomically(target, b"second")
    kept = inodes(target, spare_of(target))
    assert len(kept) == 2
    for n in range(10):
        write_atomically(target, f"rewrite {n}".encode())
        assert target.read_bytes() == f"rewrite {n}".encode()
        assert inodes(target, spare_of(target)) == kept
    assert spare_of(target).read_bytes() == b"rewrite 8"  # the previous contents
    assert sorted(p.name for p in tmp_path.iterdir()) == ["head.json", "head.json.next"]


def test_exchange_with_a_missing_file_is_refused_and_changes_nothing(tmp_path: Path) -> None:
    present = tmp_path / "present"
    present.write_bytes(b"kept")
    assert exchange(present, tmp_path / "missing") is False
    assert present.read_bytes() == b"kept"
    assert not (tmp_path / "missing").exists()
