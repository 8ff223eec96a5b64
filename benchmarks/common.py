"""What several benchmarks share: the segment codes their SEGs carry, a dataset as
Part 10 bytes, and a node context on a scratch folder (no sockets, no user config)."""

from __future__ import annotations

import argparse
from pathlib import Path

import highdicom as hd
from pydicom.filebase import DicomBytesIO

from node import config
from node.anonymize.keys import create_key_file
from node.context import NodeContext

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
    on their own (the benchmark times the checks it calls)."""
    settings = config.load(None, overrides={"storage.data": str(work / "data"),
                                            "storage.min_free_mb": 0,
                                            "annotations.settle_seconds": 3600,
                                            "audit.signing_key": str(work / "key.pem"),
                                            "deidentify.key_file": str(
                                                create_key_file(work / "project.key"))})
    return NodeContext.open(settings, with_key=True)
