"""Check time of annotations on a 300-slice series: a 10-segment SEG, and 300 overlay copies.

Runs in-process on the node's own services (NodeContext in a temporary data
folder; no sockets, so the figures are the checks, not the network):

* a 300-slice 512×512 CT phantom with ten spheres is stored;
* a BINARY SEG of the ten spheres (highdicom, empty frames omitted) is
  checked: read + reference checks + masks, then the consistency checks,
  then the whole C-STORE path (``IngestService.ingest_bytes``);
* 300 overlay copies carrying 4 ROIs each (four tubes through every slice)
  are ingested one by one, as the Horos pipeline sends them (reference
  checks and storage before each answer); the set's 3D check, which the
  node runs once the set has settled, is then timed on its own.

Target: under 1 s for the SEG. Prints the figures; asserts nothing.

    .venv/bin/python -m benchmarks.annotations [--slices 300] [--size 512]
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom import dcmread
from pydicom.pixels import pack_bits
from pydicom.tag import Tag

from benchmarks.common import ABNORMAL, NODULE, encode, scratch_context, series_arguments
from node.annotations.masks import Annotator
from node.checks.consistency import check_structures
from node.context import NodeContext
from node.ingest.types import Source
from node.phantom import Phantom, Sphere

# Check times are measured here, not de-identification: the synthetic series and
# its annotations are stored as sent.
SOURCE = Source("BENCH", "127.0.0.1", "benchmark", route="deidentified")


def _phantom(slices: int, size: int) -> Phantom:
    spacing = 358.4 / size
    depth = slices * 1.0
    spheres = tuple(Sphere((-120.0 + 26.0 * i, 60.0 * (-1) ** i, -depth / 2 + depth * (i + 1) / 11),
                           6.0 + 1.5 * i, 60) for i in range(10))
    return Phantom(seed="bench-annotations", slices_count=slices, rows=size, columns=size,
                   pixel_spacing=spacing, slice_spacing=1.0,
                   origin=(-179.2, -179.2, -depth / 2), spheres=spheres)


def _labels(p: Phantom) -> np.ndarray:
    """The ten spheres as one label array (1..10), on the phantom's grid."""
    x = p.origin[0] + np.arange(p.columns) * p.pixel_spacing
    y = p.origin[1] + np.arange(p.rows) * p.pixel_spacing
    xx, yy = np.meshgrid(x, y)
    out = np.zeros((p.slices_count, p.rows, p.columns), dtype=np.uint8)
    for k in range(p.slices_count):
        for i, s in enumerate(p.spheres):
            dz2 = (p.z_of(k) - s.center_mm[2]) ** 2
            if dz2 < s.radius_mm ** 2:
                out[k][(xx - s.center_mm[0]) ** 2 + (yy - s.center_mm[1]) ** 2
                       < s.radius_mm ** 2 - dz2] = i + 1
    return out


def _tubes(p: Phantom, k: int) -> list[np.ndarray]:
    """Four ROIs on slice ``k``: tubes whose radius drifts slowly along the series."""
    rows, cols = np.mgrid[:p.rows, :p.columns]
    planes = []
    for j in range(4):
        cr, cc = p.rows * (0.3 + 0.4 * (j // 2)), p.columns * (0.3 + 0.4 * (j % 2))
        radius = p.rows * (0.02 + 0.01 * j) * (1 + 0.2 * np.sin(k / 40))
        planes.append((rows - cr) ** 2 + (cols - cc) ** 2 < radius ** 2)
    return planes


def _overlay_copy(p: Phantom, k: int):
    ds = p.slice(k)
    ds.OperatorsName = "Reader^Bench"
    planes = _tubes(p, k)
    shift = k % 4  # the same ROI moves between groups from slice to slice
    for j, i in enumerate([*range(shift, 4), *range(shift)]):
        group = 0x6000 + 2 * j
        ds.add_new(Tag(group, 0x0010), "US", p.rows)
        ds.add_new(Tag(group, 0x0011), "US", p.columns)
        ds.add_new(Tag(group, 0x0040), "CS", "R")
        ds.add_new(Tag(group, 0x0050), "SS", [1, 1])
        ds.add_new(Tag(group, 0x0100), "US", 1)
        ds.add_new(Tag(group, 0x0102), "US", 0)
        ds.add_new(Tag(group, 0x1500), "LO", f"Vessel {i + 1}")
        ds.add_new(Tag(group, 0x3000), "OW", pack_bits(planes[i].astype(np.uint8).ravel()))
    return ds


def _time_seg(ctx: NodeContext, p: Phantom, headers: list, work: Path, omit_empty: bool) -> None:
    """Best-of-3 figures for a 10-segment BINARY SEG of the phantom's spheres."""
    descriptions = [hd.seg.SegmentDescription(
        segment_number=i + 1, segment_label=f"Nodule {i + 1}",
        segmented_property_category=ABNORMAL, segmented_property_type=NODULE,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL) for i in range(10)]
    seg = hd.seg.Segmentation(headers, _labels(p), hd.seg.SegmentationTypeValues.BINARY,
                              descriptions, hd.UID(), 100, hd.UID(), 1, "Lamina", "bench",
                              "1", "1", omit_empty_frames=omit_empty)
    path = work / "seg.dcm"
    path.write_bytes(encode(seg))
    empties = "omitted" if omit_empty else "present"
    print(f"SEG: 10 segments, empty frames {empties}: {seg.NumberOfFrames} frames, "
          f"{path.stat().st_size / 1e6:.1f} MB")
    timings: dict[str, list[float]] = {"read + reference checks + masks": [],
                                       "consistency checks": [],
                                       "C-STORE path (store, index, check, audit)": []}
    for _ in range(3):
        start = time.perf_counter()
        grid, masks = ctx.annotations.masks_from_seg(dcmread(path), "0" * 64, Annotator("BENCH"))
        middle = time.perf_counter()
        _, findings = check_structures(masks, grid, ctx.annotations.protocol)
        timings["read + reference checks + masks"].append(middle - start)
        timings["consistency checks"].append(time.perf_counter() - middle)
    for _ in range(3):
        seg.SOPInstanceUID = hd.UID()
        payload = encode(seg)
        start = time.perf_counter()
        result = ctx.ingest.ingest_bytes(payload, SOURCE)
        timings["C-STORE path (store, index, check, audit)"].append(time.perf_counter() - start)
        assert result.action == "annotation", result
    total = [a + b for a, b in zip(timings["read + reference checks + masks"],
                                   timings["consistency checks"], strict=True)]
    for name, values in timings.items():
        print(f"  {name:<42} {min(values) * 1000:7.0f} ms (best of 3)")
    print(f"  {'check time (target < 1000 ms)':<42} {min(total) * 1000:7.0f} ms;"
          f" findings: {len(findings)}")


def main() -> int:
    args = series_arguments(__doc__.splitlines()[0])
    p = _phantom(args.slices, args.size)
    with tempfile.TemporaryDirectory(prefix="lamina-bench-") as tmp:
        work = Path(tmp)
        ctx = scratch_context(work)
        start = time.perf_counter()
        for k in range(p.slices_count):
            ctx.ingest.ingest_bytes(encode(p.slice(k)), SOURCE)
        print(f"series: {p.slices_count} CT slices {p.rows}x{p.columns} stored in "
              f"{time.perf_counter() - start:.1f} s")

        start = time.perf_counter()
        grid = ctx.annotations.grid(p.series_uid)
        cold = time.perf_counter() - start
        start = time.perf_counter()
        ctx.annotations.grid(p.series_uid)
        print(f"series grid from {p.slices_count} stored headers: {cold * 1000:.0f} ms cold, "
              f"{(time.perf_counter() - start) * 1000:.1f} ms cached")

        headers = []
        for k in range(p.slices_count):
            ds = p.slice(k)
            del ds.PixelData
            headers.append(ds)
        for omit_empty in (True, False):
            _time_seg(ctx, p, headers, work, omit_empty)

        per_copy = []
        for k in range(p.slices_count):
            payload = encode(_overlay_copy(p, k))
            start = time.perf_counter()
            result = ctx.ingest.ingest_bytes(payload, SOURCE)
            per_copy.append(time.perf_counter() - start)
            assert result.action == "annotation", result.outcome.comment
        with ctx.index.connection() as conn:
            set_id = conn.execute("SELECT MAX(id) FROM annotation WHERE kind = 'overlay'"
                                  ).fetchone()[0]
        print(f"overlays: {p.slices_count} copies x 4 ROIs, ingested one by one "
              f"(reference checks and storage before each answer)")
        print(f"  per copy: first {per_copy[0] * 1000:.0f} ms, median "
              f"{np.median(per_copy) * 1000:.0f} ms, last {per_copy[-1] * 1000:.0f} ms;"
              f" all {sum(per_copy):.1f} s")
        start = time.perf_counter()
        ctx.annotations.flush()  # the settled set's 3D check, as the node's checker runs it
        settled = time.perf_counter() - start
        start = time.perf_counter()
        grid, masks = ctx.annotations.masks_of(set_id)
        middle = time.perf_counter()
        _, findings = check_structures(masks, grid, ctx.annotations.protocol)
        end = time.perf_counter()
        print(f"  set check once settled (masks, checks, record): {settled * 1000:.0f} ms")
        print(f"  measured apart: masks from the index {(middle - start) * 1000:.0f} ms, "
              f"consistency checks {(end - middle) * 1000:.0f} ms; findings: {len(findings)}")
        ctx.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
