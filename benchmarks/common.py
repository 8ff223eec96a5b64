"""What several benchmarks share: the segment codes their SEGs carry, a dataset as
Part 10 bytes, a node context on a scratch folder (no sockets, no user config), and
phantom slices shaped like a scanner's."""

from __future__ import annotations

import argparse
from pathlib import Path

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid

from node import config
from node.anonymize.keys import create_key_file
from node.context import NodeContext
from node.logs import quiet_pydicom
from node.phantom import Phantom

NODULE = hd.sr.CodedConcept("27925004", "SCT", "Nodule")
ABNORMAL = hd.sr.CodedConcept("49755003", "SCT", "Morphologically Abnormal Structure")


def encode(ds) -> bytes:
    """A dataset as Part 10 file bytes, as a C-STORE would hand them to ingest."""
    buffer = DicomBytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def series_arguments(description: str) -> argparse.Namespace:
    """``--slices`` and ``--size`` of the synthetic series (300 slices of 512×512 by default)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    return parser.parse_args()


def scratch_context(work: Path) -> NodeContext:
    """The node's services on ``work`` with a fresh project key; annotations do not settle
    on their own (the benchmark times the checks it calls). pydicom is configured as
    ``lamina serve`` configures it (:func:`node.logs.quiet_pydicom`: no value validation
    on reading or writing), so the figures are the served node's."""
    quiet_pydicom()
    settings = config.load(None, overrides={"storage.data": str(work / "data"),
                                            "storage.min_free_mb": 0,
                                            "annotations.settle_seconds": 3600,
                                            "audit.signing_key": str(work / "key.pem"),
                                            "deidentify.key_file": str(
                                                create_key_file(work / "project.key"))})
    return NodeContext.open(settings, with_key=True)


#: Private groups as a CT scanner writes them (GE's creators), 40 elements each, of the
#: VRs such groups hold: with them a slice's header has about 210 elements, not 47.
_PRIVATE_GROUPS = ((0x0009, "GEMS_IDEN_01"), (0x0019, "GEMS_ACQU_01"),
                   (0x0021, "GEMS_RELA_01"), (0x0043, "GEMS_PARM_01"))
_PRIVATE_VALUES = (("SS", 3), ("DS", "1.25"), ("LO", "SCAN PARAMETER"), ("SL", 7), ("US", 2),
                   ("FL", 1.5), ("OB", b"\x01\x02"))


def hospital_shaped(ds: Dataset, index: int) -> Dataset:
    """``ds`` (a phantom slice) with what a scanner's slice also carries: four private
    groups under their creators, a referenced-image sequence whose items differ per
    slice, and an anatomic-region code sequence. Synthetic, no PHI."""
    for group, creator in _PRIVATE_GROUPS:
        block = ds.private_block(group, creator, create=True)
        for offset in range(40):
            vr, value = _PRIVATE_VALUES[offset % len(_PRIVATE_VALUES)]
            block.add_new(0x10 + offset, vr, value)
    references = []
    for k in range(3):
        item = Dataset()
        item.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        # Deterministic and at most 64 characters, as a scanner's UIDs are (the series
        # UID with a suffix ran past 64, and every slice drew pydicom's warning).
        item.ReferencedSOPInstanceUID = generate_uid(
            entropy_srcs=[str(ds.SeriesInstanceUID), "referenced", str(index), str(k)])
        references.append(item)
    ds.ReferencedImageSequence = Sequence(references)
    region = Dataset()
    region.CodeValue, region.CodingSchemeDesignator = "T-D0050", "SRT"
    region.CodeMeaning = "Tissue"
    ds.AnatomicRegionSequence = Sequence([region])
    return ds


def write_series(phantom: Phantom, folder: Path, shape: str) -> list[Path]:
    """The phantom's slices as files, as made (``phantom``) or :func:`hospital_shaped`."""
    return phantom.write(folder, hospital_shaped if shape == "hospital" else None)
