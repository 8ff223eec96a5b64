"""The ingest service's turn: files up to ``turn_bytes`` are ingested one at a time in a
process (two would only hand the GIL to each other at every system call), and larger
ones take no turn, so that none holds the others up."""

from __future__ import annotations

import threading
from pathlib import Path

from node.config import load
from node.context import NodeContext
from node.ingest.pipeline import TURN_BYTES
from node.ingest.types import Source
from node.phantom import Phantom
from tests.harness import as_file, write_config


class Arrivals:
    """An ingest hook that counts the ingests between parsing and indexing at once: each
    waits there (up to half a second) for another to arrive beside it."""

    def __init__(self) -> None:
        self.inside = 0
        self.most = 0
        self._changed = threading.Condition()

    def classify(self, obj):
        with self._changed:
            self.inside += 1
            self.most = max(self.most, self.inside)
            self._changed.notify_all()
            self._changed.wait_for(lambda: self.inside > 1, timeout=0.5)
            self.inside -= 1
        return None

    def on_stored(self, tx, obj):
        return None

    def after_commit(self, obj) -> None:
        return None


def _ingest_together(ctx: NodeContext, files: list[bytes]) -> list[str]:
    source = Source("TESTSCU", "127.0.0.1", "assoc-1")
    start = threading.Barrier(len(files))
    actions: list[str] = []

    def one(data: bytes) -> None:
        start.wait()
        actions.append(ctx.ingest.ingest_bytes(data, source).action)

    threads = [threading.Thread(target=one, args=(data,)) for data in files]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    return actions


def test_files_up_to_the_bound_take_turns_and_larger_ones_do_not(tmp_path: Path):
    ctx = NodeContext.open(load(write_config(tmp_path).path, environ={}), with_key=True)
    arrivals = Arrivals()
    ctx.ingest.hooks = (*ctx.ingest.hooks, arrivals)
    try:
        files = [as_file(Phantom(seed="turns", slices_count=4, rows=64, columns=64).slice(i))
                 for i in range(4)]
        assert ctx.ingest.turn_bytes == TURN_BYTES > max(len(f) for f in files)
        assert _ingest_together(ctx, files[:2]) == ["stored", "stored"]
        assert arrivals.most == 1  # the second waited for the first's whole ingest

        ctx.ingest.turn_bytes = min(len(f) for f in files) - 1  # now "larger objects"
        arrivals.most = 0
        assert _ingest_together(ctx, files[2:]) == ["stored", "stored"]
        assert arrivals.most == 2
    finally:
        ctx.close()
