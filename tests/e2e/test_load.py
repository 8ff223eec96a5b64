"""Concurrent load: 8 DCMTK storescu processes × 200 instances and 4 pynetdicom senders ×
50, all at once, into a node of two receiving workers: every acknowledged instance is
stored exactly once, nothing duplicated, fsck and audit verify clean.

Instances are 64×64 so the run tests concurrency (the index writer, the blob store,
the association slots), not bandwidth.
"""

from __future__ import annotations

import os
import subprocess
import threading
from collections import Counter
from pathlib import Path

import pytest
from pydicom import dcmread

from node.phantom import Phantom
from tests.harness import ProcessNode, peer, require, send

#: (senders, instances each) per kind of sender.
STORESCU, PYNETDICOM = (8, 200), (4, 50)


@pytest.fixture(scope="module")
def studies(tmp_path_factory) -> dict[str, list[Path]]:
    """One study per sender, each its own patient and UIDs."""
    root = tmp_path_factory.mktemp("load-studies")
    out = {}
    for kind, (senders, count) in (("dcmtk", STORESCU), ("pynetdicom", PYNETDICOM)):
        for n in range(senders):
            name = f"{kind}-{n}"
            out[name] = Phantom(seed=f"load-{name}", slices_count=count, rows=64,
                                columns=64).write(root / name)
    return out


def storescu(port: int, files: list[Path], log: Path) -> subprocess.Popen:
    """storescu sending ``files``, its verbose log to a file (a pipe left unread while
    other senders are waited for would fill and stall it)."""
    with open(log, "w") as out:
        return subprocess.Popen(
            [require("storescu"), "-v", "-aet", "LOADDCMTK", "-aec", "LAMINA", "127.0.0.1",
             str(port), *map(str, files)],
            stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "TCP_NODELAY": "1"})


def acknowledged(output: str) -> list[Path]:
    """The files storescu's verbose log shows answered with Success."""
    done, current = [], None
    for line in output.splitlines():
        if line.startswith("I: Sending file: "):
            current = Path(line.removeprefix("I: Sending file: ").strip())
        elif "Received Store Response (Success)" in line and current is not None:
            done.append(current)
            current = None
    return done


def test_concurrent_senders_lose_and_duplicate_nothing(tmp_path, studies):
    require("storescu")  # before the node starts: a skip would leave it running
    node = ProcessNode.with_workers(
        tmp_path / "node", 2,
        peers={"dcmtk": peer("LOADDCMTK", "store"), "scu": peer("LOADSCU", "store")})
    with node:
        procs = {name: storescu(node.port, files, tmp_path / f"{name}.log")
                 for name, files in studies.items() if name.startswith("dcmtk")}
        results: dict[str, list] = {}

        def pynetdicom_sender(name: str) -> None:
            results[name] = send(node.port, studies[name], aet="LOADSCU")

        threads = [threading.Thread(target=pynetdicom_sender, args=(name,))
                   for name in studies if name.startswith("pynetdicom")]
        for t in threads:
            t.start()
        acked: list[Path] = []
        for name, proc in procs.items():
            proc.wait(timeout=300)
            out = (tmp_path / f"{name}.log").read_text()
            assert proc.returncode == 0, out[-2000:]
            acked += acknowledged(out)
        for t in threads:
            t.join(timeout=300)
        for name in (n for n in studies if n.startswith("pynetdicom")):
            assert [code for code, _ in results[name]] == [0] * PYNETDICOM[1], name
            acked += studies[name]
        total = STORESCU[0] * STORESCU[1] + PYNETDICOM[0] * PYNETDICOM[1]
        assert len(acked) == total == len(set(acked))

        key = node.project_key()
        expected = {key.uid(str(dcmread(p, stop_before_pixels=True).SOPInstanceUID))
                    for p in acked}
        rows = node.rows("SELECT sop_instance_uid, blob_sha256 FROM instance")
        assert Counter(uid for uid, _ in rows).most_common(1)[0][1] == 1  # no UID twice
        assert {uid for uid, _ in rows} == expected  # every acknowledged one, nothing else
        blobs = {sha for _, sha in rows}
        assert len(blobs) == total  # each instance its own blob, none shared or lost
        on_disk = {p.name for p in (node.data / "blobs").rglob("*") if p.is_file()}
        assert on_disk == blobs  # no stray or duplicate blob files
        stored = node.rows("SELECT COUNT(*) FROM audit_event WHERE action = 'instance.stored'")
        assert stored == [(total,)]  # one audit event per instance, no resend counted twice
        assert node.rows("SELECT COUNT(*) FROM quarantine") == [(0,)]
        fsck = node.cli("fsck")
        assert fsck.exit_code == 0, fsck.stdout
        verify = node.cli("audit", "verify")
        assert verify.exit_code == 0, verify.stderr
        assert node.echo("LOADSCU") == 0
