"""End to end with DCMTK's storescu as the sender: it sees the failure statuses and,
in its debug log, the ErrorComment that says why."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from node.phantom import Phantom
from tests.lamina_process import DCMTK_AE, as_file, start_node

pytestmark = pytest.mark.skipif(shutil.which("storescu") is None,
                                reason="DCMTK storescu is not installed")


def test_storescu_sees_failure_statuses_and_error_comments(tmp_path):
    node = start_node(tmp_path / "node")
    try:
        ph = Phantom(seed="e2e-storescu", slices_count=3, rows=16, columns=16)
        good, missing, skewed = ph.slice(0), ph.slice(1), ph.slice(2)
        del missing.Rows
        skewed.ImageOrientationPatient = [1, 0, 0, 0.6, 0.8, 0]
        files = []
        for name, ds in (("good", good), ("missing", missing), ("skewed", skewed)):
            path = tmp_path / f"{name}.dcm"
            path.write_bytes(as_file(ds))
            files.append(str(path))
        run = subprocess.run(
            ["storescu", "-d", "--no-halt", "-aet", DCMTK_AE, "-aec", "LAMINA", "127.0.0.1",
             str(node.port), *files],
            capture_output=True, text=True, timeout=60, check=False,
            env={**os.environ, "TCP_NODELAY": "1"},
        )
    finally:
        node.stop()
    log = run.stdout + run.stderr
    statuses = [line.split("DIMSE Status", 1)[1].split(":", 1)[1].strip()
                for line in log.splitlines() if "DIMSE Status" in line]
    assert statuses == ["0x0000: Success",
                        "0xa900: Error: Data Set does not match SOP Class",
                        "0xa900: Error: Data Set does not match SOP Class"]
    assert "(0000,0902) LO [Rows (0028,0010) missing (Type 1)]" in log
    assert ("(0000,0902) LO [ImageOrientationPatient (0020,0037) not orthogonal: dot 0.6]"
            in log)
