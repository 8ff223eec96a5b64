"""Electronic signatures and audit export: what an approval costs, how fast verify and the
ATNA export run.

Runs in-process on a NodeContext in a temporary data folder. ``--annotations`` checked
annotations are made through the storage interface (one object blob of ``--object-mb`` MB
each, the size of a 10-segment SEG on a 300-slice series, and a check with ten
structures), then:

* each is approved through ``ReviewService.decide`` (passphrase unlock of the user's
  encrypted key, hashing, signing, the transaction, the external checkpoint);
* ``review verify`` re-hashes every signed object and checks every signature;
* ``--events`` store-like events are added to the trail, and every audit event is
  exported as a DICOM audit message.

Prints the figures; asserts nothing.

    .venv/bin/python -m benchmarks.review [--annotations 50] [--object-mb 5] [--events 20000]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from node import config
from node.audit.atna import export
from node.audit.trail import Actor, utc_now
from node.context import NodeContext
from node.storage.records import Receipt, StructureRow

PASSPHRASE = "benchmark passphrase"


def _annotations(ctx: NodeContext, count: int, size: int) -> list[int]:
    ids = []
    for i in range(count):
        blob = ctx.blobs.put_bytes(os.urandom(size))
        now = utc_now()
        with ctx.index.transaction() as tx:
            annotation_id, revision = tx.annotations.upsert(
                "seg", f"seg|2.25.{i}", "2.25.1", "BENCH", "127.0.0.1", "Reader^Bench", now,
                accepted=True)
            tx.annotations.insert_object(annotation_id, f"2.25.{i}", "1.2.840.10008.5.1.4.1.1.66.4",
                                         Receipt(blob.sha256, blob.size, "1.2.840.10008.1.2.1",
                                                 "BENCH", "bench", now))
            structures = [StructureRow(f"segment {k}", f"Nodule {k}", "nodule", None, None,
                                       1000 + k, 1000.0 + k, 12.5, 10, 20, 11, blob.sha256)
                          for k in range(1, 11)]
            tx.annotations.record_check(annotation_id, revision, "bench", "", structures, [], now)
        ids.append(annotation_id)
    return ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--annotations", type=int, default=50)
    parser.add_argument("--object-mb", type=float, default=5.0)
    parser.add_argument("--events", type=int, default=20000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        settings = config.load(None, environ={}, overrides={
            "storage.data": str(root / "data")})
        settings = replace(settings, audit=replace(settings.audit,
                                                   signing_key=root / "keys" / "audit.pem",
                                                   checkpoint_path=root / "vault" / "cp"))
        ctx = NodeContext.open(settings)
        try:
            ids = _annotations(ctx, args.annotations, int(args.object_mb * 2**20))
            ctx.review.users.add("rad1", "Bench Reviewer", PASSPHRASE, Actor(user="bench"))
            times = []
            for annotation_id in ids:
                start = time.perf_counter()
                ctx.review.decide(annotation_id, "approve", "rad1", PASSPHRASE, "approved",
                                  Actor(user="bench"))
                times.append(time.perf_counter() - start)
            start = time.perf_counter()
            checks = ctx.review.verify()
            verify_s = time.perf_counter() - start
            assert all(c.ok for c in checks)
            with ctx.index.transaction() as tx:
                for i in range(args.events):
                    entry = ctx.audit.append(tx, "instance.stored", Actor(
                        ae_title="PACS", address="127.0.0.1", association_id=str(i)), {
                        "study_instance_uid": f"2.25.{i // 300}", "sop_instance_uid": f"2.25.9{i}",
                        "sha256": "0" * 64})
            ctx.audit.committed(entry)
            start = time.perf_counter()
            with ctx.index.reader() as r:
                messages = sum(1 for _ in export(r.audit.rows(), "LAMINA"))
            export_s = time.perf_counter() - start
        finally:
            ctx.close()
    print(f"approve ({args.object_mb:g} MB object, 10 structures): median"
          f" {statistics.median(times) * 1000:.1f} ms, max {max(times) * 1000:.1f} ms"
          f" over {len(times)}")
    print(f"review verify: {len(checks)} signatures in {verify_s:.2f} s"
          f" ({verify_s / len(checks) * 1000:.1f} ms each, re-hashing every object)")
    print(f"ATNA export: {messages} messages in {export_s:.2f} s"
          f" ({messages / export_s:.0f} messages/s)")


if __name__ == "__main__":
    main()
