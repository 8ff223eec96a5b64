"""A large multi-frame object is received, checked, de-identified (clinical route) and
stored with the receiving process's memory flat: the pixel data is copied from the
spool file to the blob, never held whole (issue 15). A memory bound, not a time.

The object is a Legacy Converted Enhanced CT of 250 phantom slices (~131 MB) made
here by highdicom; ``benchmarks.large_object`` runs the same at 1 GB beside Orthanc.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from pydicom import dcmread

from node.phantom import Phantom
from tests.harness import TEST_AET, ProcessNode, peer, process_status

FRAMES = 250
RSS_GROWTH_LIMIT_MB = 100  # the object is 131 MB: holding its pixels once breaks this


def large_multiframe(folder: Path, frames: int) -> Path:
    """A Legacy Converted Enhanced CT of ``frames`` 512×512 slices, written to ``folder``."""
    import highdicom as hd
    from pydicom.uid import ExplicitVRLittleEndian

    phantom = Phantom(seed=f"large-{frames}", slices_count=frames)
    ds = hd.legacy.LegacyConvertedEnhancedCTImage(
        legacy_datasets=list(phantom.slices()), series_instance_uid=phantom.uid("mf-series"),
        series_number=90, sop_instance_uid=phantom.uid("mf"), instance_number=1)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    path = folder / "large.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def pixel_sha256(path: Path) -> str:
    return hashlib.sha256(dcmread(path).PixelData).hexdigest()


@pytest.fixture(scope="module")
def large(tmp_path_factory) -> Path:
    return large_multiframe(tmp_path_factory.mktemp("large"), FRAMES)


@pytest.mark.parametrize("route", ["clinical", "deidentified"])
def test_a_large_object_is_stored_with_the_receiver_s_memory_flat(tmp_path, large, route):
    peers = {"modality": peer(TEST_AET, "store", route=route)}
    with ProcessNode.with_workers(tmp_path / "node", 1, peers=peers) as node:
        [worker] = node.worker_pids()
        before = process_status(worker)["VmHWM"] // 1024
        assert node.store([large]) == [(0, "")]
        growth = process_status(worker)["VmHWM"] // 1024 - before
        [(sha256, uid)] = node.rows("SELECT blob_sha256, sop_instance_uid FROM instance")
        stored = node.blob_path(sha256)
        assert growth < RSS_GROWTH_LIMIT_MB, f"{route}: the receiver grew by {growth} MB"
        assert pixel_sha256(stored) == pixel_sha256(large)
        sent = dcmread(large, stop_before_pixels=True)
        if route == "clinical":  # de-identified on the way in, header only
            assert uid != sent.SOPInstanceUID
            assert dcmread(stored, stop_before_pixels=True).PatientName != sent.PatientName
        else:
            assert uid == sent.SOPInstanceUID
