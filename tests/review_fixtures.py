"""What the review tests share: a node with the phantom stored, checked annotations, users."""

from __future__ import annotations

import copy
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import highdicom as hd

from node.audit.trail import Actor
from node.context import NodeContext
from tests import annotation_fixtures as fx
from tests.harness import ProcessNode

PASSPHRASE = "correct horse battery"
ADMIN = Actor(user="admin")
REVIEWER = Actor(user="tests")


class Annotations:
    """Makes fresh checked annotations: one SEG built once, sent again under new UIDs."""

    def __init__(self, ctx: NodeContext) -> None:
        self.ctx = ctx
        self.seg = fx.valid_seg(fx.served(ctx))

    def checked(self) -> int:
        seg = copy.deepcopy(self.seg)
        seg.SOPInstanceUID = hd.UID()
        seg.file_meta.MediaStorageSOPInstanceUID = seg.SOPInstanceUID
        assert fx.ingest(self.ctx, seg).action == "annotation"
        annotation_id = fx.annotation_of(self.ctx, str(seg.SOPInstanceUID))
        assert self.state(annotation_id) == "checked"
        return annotation_id

    def state(self, annotation_id: int) -> str:
        with self.ctx.index.reader() as r:
            return r.annotations.get(annotation_id)["state"]


def open_review_node(folder: Path, **sections) -> NodeContext:
    """:func:`annotation_fixtures.open_node` with extra config sections (audit, review)."""
    config = fx.node_config(folder, **sections)
    ctx = NodeContext.open(config.settings(), with_key=True)
    for k in range(fx.PHANTOM.slices_count):
        assert ctx.ingest.ingest_bytes(fx.encode(fx.PHANTOM.slice(k)), fx.PACS).action == "stored"
    return ctx


def tamper(ctx: NodeContext, *statements: str, args: tuple = ()) -> None:
    """What someone with write access to the index file can do: drop the guards, edit rows."""
    conn = sqlite3.connect(ctx.settings.index_path, isolation_level=None)
    try:
        conn.execute("DROP TRIGGER IF EXISTS review_signature_no_update")
        conn.execute("DROP TRIGGER IF EXISTS review_signature_no_delete")
        for sql in statements:
            conn.execute(sql, args)
    finally:
        conn.close()


def passphrase_fd(text: str) -> int:
    """A pipe's read end holding ``text`` and a newline (for ``--passphrase-fd``)."""
    read, write = os.pipe()
    os.write(write, (text + "\n").encode())
    os.close(write)
    return read


def lamina_process(node: ProcessNode, *args: str, passphrase: str | None = None
                   ) -> subprocess.CompletedProcess:
    """``python -m node ARGS --config`` as its own process (the e2e tests run the CLI as an
    operator would); with ``passphrase``, it comes on an inherited pipe named by
    ``--passphrase-fd`` (never on the command line)."""
    read = None
    if passphrase is not None:
        read = passphrase_fd(passphrase)
        args = (*args, "--passphrase-fd", str(read))
    try:
        return subprocess.run([sys.executable, "-m", "node", *args, "--config",
                               str(node.config.path)],
                              env=ProcessNode.env(), cwd=node.config.root, capture_output=True,
                              text=True, pass_fds=(read,) if read is not None else (),
                              timeout=120)
    finally:
        if read is not None:
            os.close(read)
