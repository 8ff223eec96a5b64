"""``/livez`` (the process answers) and ``/readyz`` (it can do its job).

Ready means: the index answers a read, the blob store's folder is there and
writable, and the data disk is above ``storage.min_free_mb`` (below it every
store is refused with 0xA700, so a load balancer should send stores elsewhere).
"""

from __future__ import annotations

import os

from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

from node.context import NodeContext


def livez(request: Request) -> Response:
    return PlainTextResponse("ok\n")


def readiness(ctx: NodeContext) -> list[str]:
    """What keeps the node from serving (empty when ready)."""
    problems = []
    try:
        with ctx.index.reader() as reader:
            reader.audit.last()
    except Exception as exc:  # any failure to read means "not ready"
        problems.append(f"index unreadable: {type(exc).__name__}")
    root = ctx.blobs.root
    if not root.is_dir() or not os.access(root, os.W_OK):
        problems.append("blob store folder missing or not writable")
    else:
        floor = ctx.settings.storage.min_free_mb << 20
        free = ctx.blobs.free_bytes()
        if free < floor:
            problems.append(f"data disk below the floor: {free >> 20} MB free, "
                            f"{floor >> 20} MB needed")
    return problems


def make_readyz(ctx: NodeContext):
    def readyz(request: Request) -> Response:
        problems = readiness(ctx)
        return JSONResponse({"ready": not problems, "problems": problems},
                            status_code=503 if problems else 200)
    return readyz
