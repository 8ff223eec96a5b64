"""Forwarding tests' shared pieces: a node folder with an approved-to-be SEG, built once and
copied per test; a counting storage SCP; the approval as the review would make it."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

from node.annotations.states import AnnotationState
from node.audit.trail import Actor
from node.context import NodeContext
from tests import annotation_fixtures as fx
from tests.harness import NodeConfig, StorageSCP, peer, write_config

REVIEWER = Actor(user="reviewer-1")
SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
CT_CLASS = "1.2.840.10008.5.1.4.1.1.2"


class CountingSCP(StorageSCP):
    """The harness's storage SCP, counting receptions per instance (and the hash of each
    data set received), answering ``answers[uid]`` (a warning or failure status) where one
    is set, and 0xA700 to everything while ``refuse_all``."""

    def __init__(self, *args, answers: dict[str, int] | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.counts: Counter[str] = Counter()
        self.hashes: dict[str, list[str]] = defaultdict(list)
        self.answers = answers or {}
        self.refuse_all = False

    def _on_store(self, event) -> int:
        uid = str(event.request.AffectedSOPInstanceUID)
        status = super()._on_store(event)
        with self.lock:
            self.counts[uid] += 1
            self.hashes[uid].append(hashlib.sha256(self.received[uid]).hexdigest())
        return 0xA700 if self.refuse_all else self.answers.get(uid, status)


def config(folder: Path, dest_port: int, rule: dict | None = None, **forward) -> NodeConfig:
    """The node's config: the PACS and annotators of the annotation tests, the destination
    ``dest`` (AE title DEST on ``dest_port``) and one rule ``to_dest`` (any class, as stored,
    unless ``rule`` says otherwise); three attempts, no backoff unless ``forward`` says."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "protocol.toml").write_text(fx.TEST_PROTOCOL)
    rules = {"to_dest": {"class": "*", "destination": "dest", **(rule or {})}}
    return write_config(
        folder, peers={**fx.PEERS, "dest": peer("DEST", port=dest_port)},
        annotations={"protocol": str(folder / "protocol.toml"), "settle_seconds": 0.1},
        forward={"max_attempts": 3, "backoff_seconds": 0.0, "poll_seconds": 0.05,
                 **forward, "rules": rules})


@dataclass(frozen=True)
class Template:
    """A node folder with the phantom stored (from the PACS) and a valid SEG (from the
    annotator) checked, not yet approved."""

    root: Path
    seg_uid: str
    annotation_id: int

    def copy(self, folder: Path, dest_port: int, rule: dict | None = None,
             **forward) -> NodeConfig:
        """This node in ``folder``, configured by :func:`config`."""
        shutil.copytree(self.root, folder)
        return config(folder, dest_port, rule, **forward)


def build_template(root: Path) -> Template:
    ctx = NodeContext.open(config(root, 1).settings(), with_key=True)
    try:
        for k in range(fx.PHANTOM.slices_count):
            assert fx.ingest(ctx, fx.PHANTOM.slice(k), fx.PACS).action == "stored"
        seg = fx.valid_seg(fx.served(ctx))
        assert fx.ingest(ctx, seg).action == "annotation"
        annotation_id = fx.annotation_of(ctx, str(seg.SOPInstanceUID))
        with ctx.index.reader() as r:
            assert r.annotations.get(annotation_id)["state"] == "checked"
    finally:
        ctx.close()
    return Template(root, str(seg.SOPInstanceUID), annotation_id)


def approve(ctx: NodeContext, annotation_id: int) -> None:
    """checked → approved, as the review does (the outbox rows are written with it)."""
    with ctx.index.transaction() as tx:
        entry = ctx.states.move(tx, annotation_id, AnnotationState.APPROVED, REVIEWER)
    ctx.audit.committed(entry)


def rows(ctx: NodeContext) -> list[dict]:
    with ctx.index.reader() as r:
        return r.outbox.list()


def audit(ctx: NodeContext, prefix: str) -> list[dict]:
    """Audit events whose action starts with ``prefix``: their objects, with the outcome."""
    with ctx.index.reader() as r:
        return [json.loads(e.object) | {"outcome": e.outcome} for e in r.audit.of_action(prefix)]
