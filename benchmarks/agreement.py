"""Agreement between two raters' 10-segment SEGs on a 300-slice series (issue 10).

Runs in-process on the node's own services (NodeContext in a temporary data
folder; no sockets):

* a 300-slice 512×512 CT phantom with ten spheres is stored;
* rater A's SEG holds the ten spheres, rater B's the same spheres shifted by
  two columns with every other one grown by one voxel (highdicom, BINARY,
  empty frames omitted); both are taken in through the C-STORE path;
* timed: the comparison alone (matching, Dice/Jaccard, Hausdorff, HD95 for
  ten pairs, :func:`node.checks.agreement.compare`), and the step the node
  runs after B's check (``DoubleReading.checked`` with B's masks from the
  check: compare, store with its audit event), once with A's SEG read back
  from the blob store and decoded (after a restart), once with A's masks
  kept from its own check (the usual case).

Target: under 1 s. Prints the figures; asserts nothing.

    .venv/bin/python -m benchmarks.agreement [--slices 300] [--size 512]
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import highdicom as hd
import numpy as np

from benchmarks.annotations import SOURCE, _labels, _phantom
from benchmarks.common import ABNORMAL, NODULE, encode, scratch_context, series_arguments
from node.annotations.reading import DoubleReading
from node.audit.trail import Actor
from node.checks.agreement import compare


def _grown(labels: np.ndarray) -> np.ndarray:
    """Rater B: every label moved two columns, even labels grown by one voxel."""
    out = np.roll(labels, 2, axis=2)
    for value in range(2, 11, 2):
        mask = out == value
        grown = mask.copy()
        for axis in range(3):
            for step in (1, -1):
                grown |= np.roll(mask, step, axis=axis)
        out[grown & (out == 0)] = value
    return out


def _seg(headers: list, labels: np.ndarray, creator: str) -> hd.seg.Segmentation:
    descriptions = [hd.seg.SegmentDescription(
        segment_number=i + 1, segment_label=f"Nodule {i + 1}",
        segmented_property_category=ABNORMAL, segmented_property_type=NODULE,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL) for i in range(10)]
    return hd.seg.Segmentation(headers, labels, hd.seg.SegmentationTypeValues.BINARY,
                               descriptions, hd.UID(), 100, hd.UID(), 1, "Lamina", "bench",
                               "1", "1", omit_empty_frames=True, content_creator_name=creator)


def _best(fn, runs: int = 3) -> tuple[float, object]:
    times, result = [], None
    for _ in range(runs):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def main() -> int:
    args = series_arguments(__doc__.splitlines()[0])
    p = _phantom(args.slices, args.size)
    with tempfile.TemporaryDirectory(prefix="lamina-bench-") as tmp:
        ctx = scratch_context(Path(tmp))
        try:
            for k in range(p.slices_count):
                ctx.ingest.ingest_bytes(encode(p.slice(k)), SOURCE)
            headers = []
            for k in range(p.slices_count):
                ds = p.slice(k)
                del ds.PixelData
                headers.append(ds)
            labels = _labels(p)
            ids = []
            for creator, array in (("Reader^A", labels), ("Reader^B", _grown(labels))):
                seg = _seg(headers, array, creator)
                assert ctx.ingest.ingest_bytes(encode(seg), SOURCE).action == "annotation"
                with ctx.index.reader() as r:
                    ids.append(max(row["id"] for row in r.annotations.list()))
            print(f"series: {p.slices_count} CT slices {p.rows}x{p.columns}; two 10-segment "
                  f"SEGs (annotations {ids[0]} and {ids[1]})")
            spacing, masks_a = ctx.annotations.spacing_and_masks(ids[0])
            _, masks_b = ctx.annotations.spacing_and_masks(ids[1])
            took, pairs = _best(lambda: compare(masks_a, masks_b, spacing,
                                                ctx.annotations.protocol))
            matched = [q for q in pairs if q.measures is not None]
            dice = [q.measures.dice for q in matched]
            hd95 = [q.measures.hd95_mm for q in matched]
            print(f"  compare (match + Dice/Jaccard/Hausdorff/HD95, {len(matched)} pairs): "
                  f"{took * 1000:.0f} ms (best of 3)")
            print(f"    Dice {min(dice):.3f}..{max(dice):.3f}; HD95 {min(hd95):.2f}.."
                  f"{max(hd95):.2f} mm")
            actor = Actor(user="bench")

            def cold():  # A's SEG read back from the blob store and decoded (a restart)
                fresh = DoubleReading(ctx.index, ctx.audit, ctx.states, ctx.annotations.protocol,
                                      ctx.annotations.spacing_and_masks, None, 0.0)
                return fresh.checked(ids[1], actor, spacing, masks_b)

            took, _ = _best(cold)
            print(f"  after B's check, A decoded again (compare, store, audit): "
                  f"{took * 1000:.0f} ms (best of 3)")
            took, _ = _best(lambda: ctx.reading.checked(ids[1], actor, spacing, masks_b))
            print(f"  after B's check, A's masks kept from its check: {took * 1000:.0f} ms "
                  f"(best of 3; target < 1000 ms)")
        finally:
            ctx.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
