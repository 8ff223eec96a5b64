"""Training export time: N studies (one patient each) with an approved SEG, to nnU-Net v2.

The node (in this process) stores N synthetic CT series (clinical route), takes
a one-segment SEG on each from an annotator and approves it, then times
``lamina export``'s work (volumes, label maps, NIfTI writes, manifest) for
nnU-Net with a 20 % patient hold-out. Figures, not assertions::

    .venv/bin/python -m benchmarks.export [--studies 20] [--slices 100]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from benchmarks.common import encode
from benchmarks.forward import ANNOTATOR, PACS, _seg
from node.annotations.states import AnnotationState
from node.audit.trail import Actor
from node.context import NodeContext
from node.forward.export import TrainingExport
from node.phantom import Phantom
from tests.harness import peer, write_config

PROTOCOL = """
[protocol]
name = "benchmark"
version = "1"

[classes.nodule]
label = "Nodule"
pattern = "nodule[ _-]?\\\\d+"
category = { scheme = "SCT", value = "49755003", meaning = "Morphologically Abnormal Structure" }
type = { scheme = "SCT", value = "27925004", meaning = "Nodule" }
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=20)
    parser.add_argument("--slices", type=int, default=100)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="lamina-bench-export-") as tmp:
        work = Path(tmp)
        (work / "protocol.toml").write_text(PROTOCOL)
        config = write_config(work / "node", peers={
            "pacs": peer("PACS", "store"),
            "annotator": peer("ANNOTATOR", "store", route="annotator")},
            annotations={"protocol": str(work / "protocol.toml")})
        ctx = NodeContext.open(config.settings(), with_key=True)
        try:
            start = time.perf_counter()
            for n in range(args.studies):
                p = replace(Phantom(seed=f"bench-export-{n}", slices_count=args.slices),
                            patient_id=f"SYN-{n:04d}")
                for k in range(p.slices_count):
                    assert ctx.ingest.ingest_bytes(encode(p.slice(k)), PACS).action == "stored"
                result = ctx.ingest.ingest_bytes(_seg(ctx, p), ANNOTATOR)
                assert result.action == "annotation", result.outcome.comment
            with ctx.index.reader() as r:
                checked = r.annotations.in_state("checked")
            for annotation_id in checked:
                with ctx.index.transaction() as tx:
                    entry = ctx.states.move(tx, annotation_id, AnnotationState.APPROVED,
                                            Actor(user="bench"))
                ctx.audit.committed(entry)
            print(f"{args.studies} studies x {args.slices} slices (512x512) stored, SEGs"
                  f" approved in {time.perf_counter() - start:.0f} s")
            exporter = TrainingExport(ctx.index, ctx.annotations, ctx.audit)
            start = time.perf_counter()
            cases = exporter.plan(0.2)
            exporter.write(work / "out", "nnunet", cases, 0.2, Actor(user="bench"))
            seconds = time.perf_counter() - start
            size = sum(f.stat().st_size for f in (work / "out").rglob("*") if f.is_file())
            test = sum(c.split == "test" for c in cases)
            print(f"export nnU-Net: {len(cases)} cases ({test} held out) in {seconds:.1f} s"
                  f" ({seconds / len(cases):.2f} s per study, {size / 1e6:.0f} MB written)")
        finally:
            ctx.close()


if __name__ == "__main__":
    main()
