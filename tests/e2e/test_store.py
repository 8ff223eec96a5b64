"""C-STORE end to end into ``lamina serve`` running as a subprocess: DCMTK's storescu and
echoscu as the peer, and two receiving worker processes sharing one port.

The same receive path with pynetdicom as the peer, in-process, is tests/test_dimse_store.py.
"""

from __future__ import annotations

import os
import subprocess
import threading

from node.phantom import Phantom
from tests.harness import TEST_AET, ProcessNode, as_file, peer, require, write_config


def test_dcmtk_storescu_and_echoscu(node_process, phantom_files):
    node = node_process
    storescu, echoscu = require("storescu"), require("echoscu")
    echo = subprocess.run([echoscu, "-aet", TEST_AET, "-aec", "LAMINA", "127.0.0.1",
                           str(node.port)], capture_output=True, text=True, timeout=30)
    assert echo.returncode == 0, echo.stderr
    sent = subprocess.run(
        [storescu, "-v", "-aet", TEST_AET, "-aec", "LAMINA", "127.0.0.1", str(node.port),
         *map(str, phantom_files)],
        capture_output=True, text=True, timeout=120, env={**os.environ, "TCP_NODELAY": "1"},
    )
    assert sent.returncode == 0, sent.stderr
    assert sent.stdout.count("Received Store Response (Success)") + \
        sent.stderr.count("Received Store Response (Success)") == len(phantom_files)
    assert node.rows("SELECT count(*) FROM instance") == [(len(phantom_files),)]
    assert node.cli("fsck").exit_code == 0  # every blob hashes to its name


def test_storescu_sees_failure_statuses_and_error_comments(tmp_path):
    """storescu sees the failure statuses and, in its debug log, the ErrorComment that
    says why."""
    storescu = require("storescu")
    ph = Phantom(seed="e2e-storescu", slices_count=3, rows=16, columns=16)
    good, missing, skewed = ph.slice(0), ph.slice(1), ph.slice(2)
    del missing.Rows
    skewed.ImageOrientationPatient = [1, 0, 0, 0.6, 0.8, 0]
    files = []
    for name, ds in (("good", good), ("missing", missing), ("skewed", skewed)):
        path = tmp_path / f"{name}.dcm"
        path.write_bytes(as_file(ds))
        files.append(str(path))
    config = write_config(tmp_path / "node", peers={"dcmtk": peer("STORESCU", "store")})
    with ProcessNode(config) as node:
        run = subprocess.run(
            [storescu, "-d", "--no-halt", "-aet", "STORESCU", "-aec", "LAMINA", "127.0.0.1",
             str(node.port), *files],
            capture_output=True, text=True, timeout=60, check=False,
            env={**os.environ, "TCP_NODELAY": "1"},
        )
    log = run.stdout + run.stderr
    statuses = [line.split("DIMSE Status", 1)[1].split(":", 1)[1].strip()
                for line in log.splitlines() if "DIMSE Status" in line]
    assert statuses == ["0x0000: Success",
                        "0xa900: Error: Data Set does not match SOP Class",
                        "0xa900: Error: Data Set does not match SOP Class"]
    assert "(0000,0902) LO [Rows (0028,0010) missing (Type 1)]" in log
    assert ("(0000,0902) LO [ImageOrientationPatient (0020,0037) not orthogonal: dot 0.6]"
            in log)


def test_concurrent_associations_into_two_workers(tmp_path):
    """Three senders at once into two receiving processes: every instance indexed once."""
    studies = [list(Phantom(seed=f"concurrent-{i}", slices_count=6).slices()) for i in range(3)]
    results: dict[int, list] = {}
    with ProcessNode.with_workers(tmp_path / "n", 2) as node:
        threads = [threading.Thread(target=lambda i=i: results.__setitem__(
            i, node.store(studies[i]))) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert all(results[i] == [(0, "")] * 6 for i in range(3))
        assert node.rows("SELECT count(*), count(DISTINCT sop_instance_uid)"
                         " FROM instance") == [(18, 18)]
        assert node.rows("SELECT count(*) FROM study") == [(3,)]
        assert node.cli("audit", "verify").exit_code == 0
