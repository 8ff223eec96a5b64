"""Golden hashes of the store path: the same input and project key give the same stored
bytes, today and after every optimisation of ingest and de-identification.

UIDs and dates are keyed pseudonyms of a fixed key, so the stored bytes are fixed. The
hashes below were recorded from the code before the store path was optimised (issue 15);
if one changes, de-identification output changed — that is a finding, not a re-record.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from pydicom import config, dcmread

from node.anonymize.keys import encode_key
from tests import annotation_fixtures as fx
from tests.harness import TEST_AET, InProcessNode, lamina, write_config
from tests.phi_corpus import STUDIES, write_ct_series

FIXED_SECRET = bytes(range(32))
DEID_AET = "DEIDSRC"


@pytest.fixture(autouse=True)
def _restore_pydicom_validation(monkeypatch):
    monkeypatch.setattr(config.settings, "reading_validation_mode",
                        config.settings.reading_validation_mode)


def _inputs(folder: Path) -> list[Path]:
    """A CT slice, an MR slice, a SEG, an overlay copy and a CT with private tags and
    free text (the planted-PHI corpus), written to ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    ct = fx.PHANTOM.slice(0)
    paths = []
    ct_path = folder / "ct.dcm"
    ct.save_as(ct_path, enforce_file_format=True)
    paths.append(ct_path)
    mr = dcmread(ct_path)
    mr.SOPClassUID = mr.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
    mr.Modality = "MR"
    mr.SOPInstanceUID = mr.file_meta.MediaStorageSOPInstanceUID = "2.25.1515151515"
    mr_path = folder / "mr.dcm"
    mr.save_as(mr_path, enforce_file_format=True)
    paths.append(mr_path)
    seg_path = folder / "seg.dcm"
    seg = fx.valid_seg()
    # highdicom stamps the creation time and draws fresh UIDs: pinned, so the input is fixed.
    seg.SOPInstanceUID = seg.file_meta.MediaStorageSOPInstanceUID = "2.25.2626262626"
    seg.SeriesInstanceUID = "2.25.3737373737"
    seg.InstanceCreationDate = seg.ContentDate = "20240102"
    seg.InstanceCreationTime = seg.ContentTime = "101010"
    for item in seg.get("ContributingEquipmentSequence", []):
        if "ContributionDateTime" in item:
            item.ContributionDateTime = "20240102101010"
    for item in [*seg.DimensionOrganizationSequence, *seg.DimensionIndexSequence]:
        item.DimensionOrganizationUID = "2.25.4848484848"
    seg.save_as(seg_path, enforce_file_format=True)
    paths.append(seg_path)
    plane = np.zeros((512, 512), bool)
    plane[100:120, 100:140] = True
    overlay_path = folder / "overlay.dcm"
    fx.overlay_copy(1, [(0x6000, "NODULE", plane)]).save_as(overlay_path,
                                                           enforce_file_format=True)
    paths.append(overlay_path)
    paths += write_ct_series(STUDIES[0], folder / "phi")[:1]
    return paths


def _hashes(folder: Path) -> list[str]:
    return sorted(hashlib.sha256(p.read_bytes()).hexdigest()
                  for p in folder.rglob("*") if p.is_file())


def _node_config(root: Path):
    key_file = root / "keys" / "project.key"
    key_file.parent.mkdir(parents=True)
    key_file.write_text(encode_key(FIXED_SECRET) + "\n", encoding="ascii")
    key_file.chmod(0o600)
    peers = {"pacs": {"ae_title": TEST_AET, "host": "127.0.0.1", "port": 1, "route": "clinical"},
             "deid": {"ae_title": DEID_AET, "host": "127.0.0.1", "port": 1,
                      "route": "deidentified"}}
    return write_config(root, peers=peers), key_file


def test_store_and_anonymize_output_is_byte_identical(tmp_path, monkeypatch):
    inputs = _inputs(tmp_path / "in")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LAMINA_CONFIG", raising=False)
    cfg, key_file = _node_config(tmp_path / "node")
    out = tmp_path / "anon"
    result = lamina("anonymize", *map(str, inputs), "--out", str(out), "--key-file", str(key_file))
    assert result.exit_code == 0, result.output
    anonymized = sorted(out.glob("*.dcm"))
    with InProcessNode(cfg) as node:
        # The MR is a CT header relabelled: the IOD check refuses it on the clinical route
        # (0xA900); it stays in the set for `lamina anonymize`, which does not validate.
        assert [code for code, _ in node.store(inputs)] == [0, 0xA900, 0, 0, 0]
        clinical = _hashes(node.data / "blobs")
    # The same pseudonymised UIDs would be duplicates in that node: a second one.
    with InProcessNode(_node_config(tmp_path / "node2")[0]) as node:
        codes = [code for code, _ in node.store(anonymized, aet=DEID_AET)]
        deidentified = _hashes(node.data / "blobs")
    stored = {"clinical": clinical, "deidentified": deidentified, "codes": sorted(codes)}
    assert _hashes(out) == GOLDEN_ANONYMIZE
    assert stored == GOLDEN_STORED


GOLDEN_ANONYMIZE = [
    "11d5d5ca48cb3ce4eb055ca75d577cc672d1747250c987f4e90ff5eeb68e84d7",
    "36976d7318165b5e2268338e9d81c45b6614ea2c34cadf503df445b7f35316d7",
    "6f248fc62b593d1f3de634b767d82320d9054c9135098f753c3cbdcd6908f16d",
    "9be1914b71724256a35bffda0277899f23838239885265b690f01c23ba774831",
    "b055e0e63d37fb9e2542e2044892b9781c3daa64dde27c30640fca8dd13fb045",
]
# The clinical route stores exactly what `lamina anonymize` writes (the MR aside). The
# deidentified route stores the anonymized files as received (the MR refused by the IOD check).
GOLDEN_STORED = {
    "clinical": [GOLDEN_ANONYMIZE[0], *GOLDEN_ANONYMIZE[2:]],
    "deidentified": [
        "52ca34bb05b616f4ba018c8d6b300a20de619ca8eece50808d739a744770cad4",
        "52f7fa6c6258fef42d176ea47a0a56151c48f85dd185b2a02376813306cb2436",
        "9b556dd4e4cc9f845c6454d53f35c8fa49eeb6f02f5d8e932c1197345dec9cbb",
        "db9e1e3729f04cfe757c572b320ed9857611fabb35100ec8643e890ed97631ec",
    ],
    "codes": [0, 0, 0, 0, 0xA900],
}
