"""``lamina send`` to DCMTK's storescp that accepts Implicit VR Little Endian only (``+xi``):
every file arrives, re-encoded (an RLE file decoded), pixel data equal."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless

from node.cli import main
from node.phantom import Phantom

pytestmark = pytest.mark.skipif(shutil.which("storescp") is None,
                                reason="DCMTK storescp is not installed")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _storescp(port: int, out: Path, *options: str) -> subprocess.Popen:
    out.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen(["storescp", *options, "-aet", "STORESCP", "-od", str(out),
                                str(port)], env={**os.environ, "TCP_NODELAY": "1"},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return process
        except OSError:
            time.sleep(0.05)
    process.kill()
    raise RuntimeError("storescp did not start")


def _stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def test_lamina_send_to_an_implicit_only_storescp(tmp_path):
    files = Phantom(seed="send-implicit", slices_count=3, rows=32, columns=32).write(
        tmp_path / "files")
    rle = dcmread(files[-1])
    rle.compress(RLELossless)  # pydicom's own RLE encoder (numpy only)
    rle.save_as(files[-1], enforce_file_format=True)
    sent = {str(dcmread(f).SOPInstanceUID): dcmread(f) for f in files}
    assert {str(ds.file_meta.TransferSyntaxUID) for ds in sent.values()} == \
        {ExplicitVRLittleEndian, RLELossless}

    port = _free_port()
    storescp = _storescp(port, tmp_path / "received", "+xi")
    config = tmp_path / "node.toml"
    config.write_text(f'[node]\nae_title = "LAMINA"\n[storage]\ndata = "{tmp_path / "data"}"\n')
    try:
        result = CliRunner().invoke(main, ["send", str(tmp_path / "files"), "--to",
                                           f"STORESCP@127.0.0.1:{port}", "--config",
                                           str(config)])
    finally:
        _stop(storescp)
    assert result.exit_code == 0, result.output
    assert "3  0x0000 Success" in result.stdout
    received = {str(ds.SOPInstanceUID): ds
                for ds in map(dcmread, (tmp_path / "received").iterdir())}
    assert sorted(received) == sorted(sent)
    for uid, ds in received.items():
        assert ds.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
        assert np.array_equal(ds.pixel_array, sent[uid].pixel_array)
