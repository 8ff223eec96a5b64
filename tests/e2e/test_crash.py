"""Repeated kill -9 while DCMTK storescu sends 200 instances: nothing the sender saw
succeed is lost, in any round.

The node runs as a subprocess with two receiving workers (the production
layout). Each round it is killed with SIGKILL at another point of a transfer,
then restarted on the same data folder and checked (every acknowledged
instance of every round so far, fsck, audit verify). Three rounds by default;
``LAMINA_LONG=1`` runs ten.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
from pathlib import Path

from pydicom import dcmread

from node.phantom import Phantom
from tests.harness import TEST_AET, ProcessNode, require


def wait_gone(pids: set[int], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    for pid in pids:
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        else:
            raise AssertionError(f"worker {pid} outlived the killed node")


def send_until_killed(node: ProcessNode, files: list[Path], kill_after: int) -> list[Path]:
    """Run storescu; SIGKILL the node after ``kill_after`` successes; return the succeeded files."""
    storescu = require("storescu")
    proc = subprocess.Popen(
        [storescu, "-v", "-aet", TEST_AET, "-aec", "LAMINA", "127.0.0.1", str(node.port),
         *map(str, files)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "TCP_NODELAY": "1"},
    )
    succeeded: list[Path] = []
    current: Path | None = None
    killed = False
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("I: Sending file: "):
            current = Path(line.removeprefix("I: Sending file: ").strip())
        elif "Received Store Response (Success)" in line and current is not None:
            succeeded.append(current)
            if len(succeeded) >= kill_after and not killed:
                pids = node.worker_pids()
                node.kill9()
                wait_gone(pids)
                killed = True
    proc.wait(timeout=120)
    assert killed, "the transfer finished before the kill point"
    return succeeded


#: Kill -9 rounds on one data folder: a few in ``make test``, ten with LAMINA_LONG=1.
ROUNDS = 10 if os.environ.get("LAMINA_LONG") == "1" else 3
#: Where in a 200-instance transfer each round kills (round r: KILL_POINTS[r % 3]).
KILL_POINTS = (1, 70, 160)


def assert_all_there(node: ProcessNode, succeeded: list[Path]) -> None:
    """Every file the sender saw succeed is indexed, its blob whole and its pixels intact;
    no spool left; fsck and audit verify clean; the node answers."""
    indexed = dict(node.rows("SELECT sop_instance_uid, blob_sha256 FROM instance"))
    key = node.project_key()
    for path in succeeded:
        uid = key.uid(str(dcmread(path, stop_before_pixels=True).SOPInstanceUID))
        assert uid in indexed, f"acknowledged instance {path.name} lost"
        blob = node.blob_path(indexed[uid])
        assert hashlib.sha256(blob.read_bytes()).hexdigest() == indexed[uid]
        assert dcmread(blob).PixelData == dcmread(path).PixelData
    assert not list((node.data / "spool").iterdir()), "stale spool files survived restart"
    fsck = node.cli("fsck")
    assert fsck.exit_code == 0, fsck.stdout  # every blob whole, none missing
    verify = node.cli("audit", "verify")
    assert verify.exit_code == 0, verify.stderr
    assert node.echo() == 0


def test_repeated_kill_9_mid_transfer_loses_nothing_acknowledged(tmp_path):
    """ROUNDS times on the same data folder: send a fresh 200-instance study, SIGKILL the
    node mid-transfer, restart it, and find everything acknowledged in every round so far."""
    require("storescu")  # before the node starts: a skip would leave it running
    node = ProcessNode.with_workers(tmp_path / "node", 2).start()
    acknowledged: list[Path] = []
    try:  # stopped by its PID whatever fails, before or after a restart
        for n in range(ROUNDS):
            study = Phantom(seed=f"crash-{n}", slices_count=200).write(tmp_path / f"s{n}")
            kill_after = KILL_POINTS[n % len(KILL_POINTS)]
            succeeded = send_until_killed(node, study, kill_after)
            assert len(succeeded) >= kill_after
            acknowledged += succeeded
            node.start()  # same config and data folder
            assert_all_there(node, acknowledged)
    finally:
        node.stop()
