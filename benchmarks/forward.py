"""Forwarding throughput: an approved SEG and its 300-slice source series to DCMTK's storescp.

The node (in this process) stores a synthetic CT series from its PACS (clinical
route: de-identified on the way in) and a SEG from an annotator, which is
approved; the forward worker then sends the SEG and the series to storescp,
once as stored and once re-identified onto the clinical originals. Beside it,
the same series moved by C-MOVE (``lamina serve`` as a subprocess, DCMTK's
movescu asking, the same storescp receiving). Figures, not assertions::

    .venv/bin/python -m benchmarks.forward [--slices 300] [--runs 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom import dcmread

from benchmarks.common import ABNORMAL, NODULE, encode
from node.annotations.states import AnnotationState
from node.audit.trail import Actor
from node.context import NodeContext
from node.ingest.types import Source
from node.phantom import Phantom
from tests.harness import ProcessNode, free_port, peer, require, stop_process, storescp, write_config

PACS = Source("PACS", "127.0.0.1", "bench", route="clinical")
ANNOTATOR = Source("ANNOTATOR", "127.0.0.1", "bench", route="annotator")


def _seg(ctx: NodeContext, p: Phantom) -> bytes:
    """A one-segment SEG (the phantom's first sphere) drawn on the stored series."""
    series_uid = ctx.key.uid(p.series_uid)
    with ctx.index.reader() as r:
        shas = [sha for _, sha in r.instances.series_members(series_uid)]
    headers = sorted((dcmread(ctx.blobs.open(sha), stop_before_pixels=True) for sha in shas),
                     key=lambda ds: float(ds.ImagePositionPatient[2]))
    sphere = p.spheres[0]
    rows, cols = np.mgrid[:p.rows, :p.columns]
    x = p.origin[0] + cols * p.pixel_spacing
    y = p.origin[1] + rows * p.pixel_spacing
    mask = np.zeros((p.slices_count, p.rows, p.columns), dtype=bool)
    for k in range(p.slices_count):
        dz2 = (p.z_of(k) - sphere.center_mm[2]) ** 2
        mask[k] = (x - sphere.center_mm[0]) ** 2 + (y - sphere.center_mm[1]) ** 2 \
            < sphere.radius_mm ** 2 - dz2
    description = hd.seg.SegmentDescription(
        segment_number=1, segment_label="Nodule 1", segmented_property_category=ABNORMAL,
        segmented_property_type=NODULE, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL)
    seg = hd.seg.Segmentation(headers, mask, hd.seg.SegmentationTypeValues.BINARY,
                              [description], hd.UID(), 100, hd.UID(), 1, "Lamina", "bench",
                              "1", "1")
    return encode(seg)


def _approve(ctx: NodeContext, seg: bytes) -> None:
    result = ctx.ingest.ingest_bytes(seg, ANNOTATOR)
    assert result.action == "annotation", result.outcome.comment
    with ctx.index.reader() as r:
        [annotation] = [a for a in r.annotations.list() if a["state"] == "checked"]
    with ctx.index.transaction() as tx:
        entry = ctx.states.move(tx, annotation["id"], AnnotationState.APPROVED,
                                Actor(user="bench"))
    ctx.audit.committed(entry)


def _forward(config, p: Phantom, seg_of, dest: Path, port: int) -> tuple[float, int]:
    """Approve a new SEG under this config's rule and time the worker's pass to storescp."""
    shutil.rmtree(dest, ignore_errors=True)
    process = storescp(port, dest, aet="STORESCP")
    ctx = NodeContext.open(config.settings(), with_key=True)
    try:
        _approve(ctx, seg_of(ctx, p))
        start = time.perf_counter()
        sent = ctx.forwarder.deliver_due()
        seconds = time.perf_counter() - start
    finally:
        ctx.close()
        stop_process(process)
    if sent != p.slices_count + 1 or len(list(dest.iterdir())) != sent:
        raise RuntimeError(f"forwarding sent {sent}, storescp kept {len(list(dest.iterdir()))}")
    return seconds, sent


def _move(config, study_uid: str, dest: Path, port: int, runs: int) -> list[float]:
    movescu = require("movescu")
    node = ProcessNode(config)
    times = []
    try:
        node.start()
        for _ in range(runs):
            shutil.rmtree(dest, ignore_errors=True)
            process = storescp(port, dest, aet="STORESCP")
            try:
                start = time.perf_counter()
                subprocess.run([movescu, "-aet", "MOVESCU", "-aec", "LAMINA", "-aem",
                                "STORESCP", "-S", "-k", "QueryRetrieveLevel=STUDY",
                                "-k", f"StudyInstanceUID={study_uid}", "127.0.0.1",
                                str(node.port)],
                               env={**os.environ, "TCP_NODELAY": "1"}, check=True,
                               capture_output=True)
                times.append(time.perf_counter() - start)
            finally:
                stop_process(process)
    finally:
        node.stop()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    require("storescp")
    p = Phantom(seed="benchmark-forward", slices_count=args.slices)
    with tempfile.TemporaryDirectory(prefix="lamina-bench-forward-") as tmp:
        work = Path(tmp)
        port = free_port()
        # Two names for the one storescp, so that each pass queues the series afresh
        # (a row is unique per object and destination).
        peers = {"pacs": peer("PACS", "store"),
                 "annotator": peer("ANNOTATOR", "store", route="annotator"),
                 "bench": peer("MOVESCU", "find", "move", move_destinations=["storescp"]),
                 "storescp": peer("STORESCP", port=port),
                 "storescp_reidentified": peer("STORESCP", port=port)}

        def config(reidentify: bool):
            destination = "storescp_reidentified" if reidentify else "storescp"
            return write_config(work / "node", peers=peers, forward={"rules": {"bench": {
                "destination": destination, "source_series": True,
                "reidentify": reidentify}}})

        ctx = NodeContext.open(config(False).settings(), with_key=True)
        try:
            for k in range(p.slices_count):
                assert ctx.ingest.ingest_bytes(encode(p.slice(k)), PACS).action == "stored"
            study_uid = ctx.key.uid(p.study_uid)
        finally:
            ctx.close()
        print(f"forwarding an approved SEG + its {p.slices_count}-slice CT series"
              f" ({p.rows}x{p.columns}) to DCMTK storescp")
        for reidentify in (False, True):
            seconds, sent = _forward(config(reidentify), p, _seg, work / "received", port)
            label = "re-identified" if reidentify else "as stored"
            print(f"  forward {label:<14} {seconds:6.2f} s  {sent / seconds:6.0f} instances/s")
        times = _move(config(False), study_uid, work / "moved", port, args.runs)
        median = statistics.median(times)
        print(f"  C-MOVE of the series   {median:6.2f} s  {p.slices_count / median:6.0f}"
              f" instances/s (median of {len(times)})")


if __name__ == "__main__":
    main()
