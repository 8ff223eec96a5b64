"""A real full disk (a small tmpfs holding the data folder and the spool) under
``lamina serve``: every write failure answers 0xA700 or aborts the association, no
thread dies, association slots are released, and the node stores again when space
returns, without a restart.

Found by a robustness run: a failed write inside pynetdicom's spool ended the
connection's thread, the sender got no answer, the slot stayed taken and the audit
head's thread died; with ``max_associations = 2`` two such events locked every peer
out until a restart. Mounting a tmpfs needs root: the test skips otherwise.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from node import status
from tests.harness import ProcessNode, write_config

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")

SIZE_MB = 24


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "small-disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={SIZE_MB}m", "tmpfs",
                           str(mount)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"requires root to mount a tmpfs: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(folder: Path, leave: int) -> Path:
    """Fill the file system of ``folder`` until ``leave`` bytes are free (about)."""
    filler = folder / "filler"
    stats = os.statvfs(folder)
    free = stats.f_bavail * stats.f_frsize
    with open(filler, "wb") as f, contextlib.suppress(OSError):
        f.write(bytes(max(free - leave, 0)))
    return filler


def _timed_store(node: ProcessNode, files: list[Path]) -> tuple[list, float]:
    start = time.monotonic()
    results = node.store(files)
    return results, time.monotonic() - start


@pytest.mark.parametrize("floor_mb", [0, 4], ids=["no-floor", "floor"])
def test_disk_full_answers_releases_slots_and_recovers(tmp_path, tmpfs, phantom_files,
                                                       monkeypatch, floor_mb):
    spool = tmpfs / "tmp"
    spool.mkdir()
    monkeypatch.setenv("TMPDIR", str(spool))  # any temporary file goes to the small disk too
    config = write_config(tmp_path / "node", data=tmpfs / "data",
                          storage={"min_free_mb": floor_mb},
                          node={"max_associations": 2, "dimse_timeout": 30,
                                "network_timeout": 30, "acse_timeout": 30},
                          peers={"tests": {"ae_title": "TESTSCU", "host": "127.0.0.1",
                                           "port": 1, "services": ["store"],
                                           "route": "deidentified"}})
    with ProcessNode(config) as node:
        assert node.store(phantom_files[:1]) == [(0, "")]
        # Less room than one 512x512 slice: the spool write itself fails (no floor),
        # or the floor refuses first.
        filler = fill(tmpfs, 100 << 10)
        for attempt in range(4):  # twice the association limit
            results, took = _timed_store(node, phantom_files[1:3])
            assert took < 15, f"attempt {attempt}: no answer for {took:.0f} s"
            for code, comment in results:
                assert code in (status.OUT_OF_RESOURCES.code, -1), (attempt, code, comment)
                if code == status.OUT_OF_RESOURCES.code:
                    assert comment  # the reason
        filler.unlink()
        time.sleep(1.5)  # the audit head's retry
        assert node.store(phantom_files[1:3]) == [(0, "")] * 2
        assert node.echo() == 0
        assert node.rows("SELECT COUNT(*) FROM instance") == [(3,)]
        assert not list(spool.iterdir()), "temporary files left behind"
        assert not list((node.data / "spool").iterdir()), "spool files left behind"
        log = node.log()
        assert "Exception in thread" not in log and "Traceback" not in log, log[-3000:]
    verify = node.cli("audit", "verify")
    assert verify.exit_code == 0, verify.output
