"""``lamina send`` to DCMTK's storescp that accepts Implicit VR Little Endian only (``+xi``):
every file arrives, re-encoded (an RLE file decoded), pixel data equal."""

from __future__ import annotations

import numpy as np
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless

from node.phantom import Phantom
from tests.harness import (
    free_port,
    lamina,
    require,
    stop_process,
    storescp,
    write_config,
)


def test_lamina_send_to_an_implicit_only_storescp(tmp_path):
    require("storescp")
    files = Phantom(seed="send-implicit", slices_count=3, rows=32, columns=32).write(
        tmp_path / "files")
    rle = dcmread(files[-1])
    rle.compress(RLELossless)  # pydicom's own RLE encoder (numpy only)
    rle.save_as(files[-1], enforce_file_format=True)
    sent = {str(dcmread(f).SOPInstanceUID): dcmread(f) for f in files}
    assert {str(ds.file_meta.TransferSyntaxUID) for ds in sent.values()} == \
        {ExplicitVRLittleEndian, RLELossless}

    port = free_port()
    receiver = storescp(port, tmp_path / "received", "+xi")
    config = write_config(tmp_path / "node", peers={}, key=False)
    try:
        result = lamina("send", str(tmp_path / "files"), "--to",
                        f"STORESCP@127.0.0.1:{port}", config=config)
    finally:
        stop_process(receiver)
    assert result.exit_code == 0, result.output
    assert "3  0x0000 Success" in result.stdout
    received = {str(ds.SOPInstanceUID): ds
                for ds in map(dcmread, (tmp_path / "received").iterdir())}
    assert sorted(received) == sorted(sent)
    for uid, ds in received.items():
        assert ds.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
        assert np.array_equal(ds.pixel_array, sent[uid].pixel_array)
