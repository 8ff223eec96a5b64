"""Deflate bombs: a deflated data set is inflated as a stream with a cap, refused past it,
with the worker's memory flat (measured in a subprocess, as a worker would be).

A robustness run sent 1.1 GiB deflated that pydicom inflated whole (+4.3 GiB in a
worker) and stored with 0x0000. Here 256 MiB of zeros, about 256 KiB deflated.
"""

from __future__ import annotations

import json
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from node import status
from node.ingest.validate import ReadLimits, TooLarge, inflated_size, read_received
from tests.harness import InProcessNode, write_config

INFLATED = 256 << 20


def write_bomb(path: Path, inflated: int = INFLATED) -> Path:
    """A Secondary Capture whose deflated data set ends in ``inflated`` bytes of zeros
    (compressed as a stream: the test never holds the inflated bytes either)."""
    ds = Dataset()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientID, ds.Modality = "BOMB", "OT"
    head = DicomBytesIO()
    head.is_little_endian, head.is_implicit_VR = True, False
    write_dataset(head, ds)
    # (0009,1000) OB, a private element of the requested length, then its zeros.
    element = b"\x09\x00\x10\x10OB\x00\x00" + inflated.to_bytes(4, "little")
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    out = DicomBytesIO()
    out.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(out, meta)
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    with open(path, "wb") as f:
        f.write(out.getvalue())
        f.write(deflater.compress(head.getvalue() + element))
        zeros = bytes(1 << 20)
        for _ in range(inflated >> 20):
            f.write(deflater.compress(zeros))
        f.write(deflater.flush())
    return path


@pytest.fixture(scope="module")
def bomb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_bomb(tmp_path_factory.mktemp("bomb") / "bomb.dcm")


def test_the_bomb_is_small_on_the_wire(bomb):
    assert bomb.stat().st_size < INFLATED // 200


def test_inflated_size_is_counted_and_capped(bomb):
    with open(bomb, "rb") as f:
        assert inflated_size(f, INFLATED * 2) > INFLATED
        with pytest.raises(TooLarge, match="beyond 16 MB"):
            inflated_size(f, 16 << 20)


_MEASURE = """
import json, resource, sys
from pathlib import Path
from node.ingest.validate import ReadLimits, TooLarge, read_received
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    read_received(Path(sys.argv[1]), ReadLimits(max_inflated=16 << 20))
    outcome = "read"
except TooLarge as exc:
    outcome = str(exc)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"outcome": outcome, "grew_kb": after - before}))
"""


def test_refusing_a_bomb_keeps_memory_flat(bomb):
    run = subprocess.run([sys.executable, "-c", _MEASURE, str(bomb)], capture_output=True,
                         text=True, timeout=120, cwd=Path(__file__).parents[1], check=True)
    found = json.loads(run.stdout)
    assert found["outcome"].startswith("deflated data set inflates beyond 16 MB")
    assert found["grew_kb"] < 32 << 10, found  # pydicom alone would grow by the 256 MiB


def test_a_bomb_over_c_store_is_refused_and_not_stored(tmp_path, bomb):
    config = write_config(tmp_path / "node", node={"max_inflated_mb": 16},
                          peers={"tests": {"ae_title": "TESTSCU", "host": "127.0.0.1",
                                           "port": 1, "services": ["store"],
                                           "route": "deidentified"}})
    with InProcessNode(config) as node:
        [(code, comment)] = node.store([bomb])
        assert code == status.CANNOT_UNDERSTAND.code
        assert "inflates beyond 16 MB" in comment
        assert node.rows("SELECT COUNT(*) FROM instance") == [(0,)]
        assert node.rows("SELECT COUNT(*) FROM quarantine") == [(0,)]
        assert "instance.refused" in node.audit_actions()


def test_a_small_deflated_object_still_reads(tmp_path):
    small = write_bomb(tmp_path / "small.dcm", inflated=1 << 20)
    received = read_received(small, ReadLimits(max_inflated=16 << 20))
    assert received.dataset.PatientID == "BOMB"
