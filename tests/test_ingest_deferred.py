"""Pixel values the store path leaves on disk are still there for whoever asks: on the
deidentified route the spool file becomes the blob, and a hook reading the pixels
reads them from it (the same bytes) after the spool file has gone."""

from __future__ import annotations

from pathlib import Path

from node.config import load
from node.context import NodeContext
from node.ingest.types import Source
from node.phantom import Phantom
from tests.harness import as_file, write_config


class PixelReader:
    """An ingest hook that reads each object's pixel data while it is being stored."""

    def __init__(self) -> None:
        self.seen: list[bytes] = []

    def classify(self, obj):
        return None

    def on_stored(self, tx, obj):
        self.seen.append(bytes(obj.incoming.dataset.PixelData))
        return None

    def after_commit(self, obj) -> None:
        return None


def test_a_hook_reads_deferred_pixels_from_the_blob_on_the_deidentified_route(tmp_path: Path):
    ctx = NodeContext.open(load(write_config(tmp_path).path, environ={}), with_key=True)
    reader = PixelReader()
    ctx.ingest.hooks = (*ctx.ingest.hooks, reader)
    try:
        slices = [Phantom(seed="deferred", slices_count=2, rows=64, columns=64).slice(i)
                  for i in range(2)]
        source = Source("DEIDSRC", "127.0.0.1", "assoc-1", route="deidentified")
        for ds in slices:
            assert ctx.ingest.ingest_bytes(as_file(ds), source).action == "stored"
        assert ctx.ingest.spool_dir.exists() and not any(ctx.ingest.spool_dir.iterdir())
        assert reader.seen == [ds.PixelData for ds in slices]
    finally:
        ctx.close()
