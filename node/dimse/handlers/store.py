"""C-STORE: hand the spooled dataset to the ingest service and answer its outcome (counted
by status, bytes and latency in the process's metrics)."""

from __future__ import annotations

import logging
import os
import time

from pydicom.dataset import Dataset
from pynetdicom import evt

from node.context import NodeContext
from node.dimse import compat
from node.dimse.handlers.association import Sessions
from node.metrics import Metrics

log = logging.getLogger("lamina.store")


def make_store_handler(ctx: NodeContext, sessions: Sessions):
    """Bind the handler to the node's context and session registry."""
    metrics = Metrics.get()

    def handle_store(event: evt.Event) -> Dataset:
        session = sessions.of(event.assoc)
        started = time.perf_counter()
        spool_failure = compat.receive_failure(event.assoc)
        if spool_failure:
            result = ctx.ingest.receive_failed(session.source, spool_failure)
        else:
            size = os.path.getsize(event.dataset_path)
            result = ctx.ingest.ingest_file(event.dataset_path, session.source)
            metrics.ingest_seconds.labels("dimse").observe(time.perf_counter() - started)
            metrics.cstore_bytes.inc(size)
        metrics.cstore.labels(f"0x{result.outcome.status.code:04X}").inc()
        if result.outcome.status.is_success:
            session.stored += 1
        else:
            session.failed += 1
        log.info("instance " + result.action, extra={"fields": {
            "association": session.association_id, "sop_instance_uid": result.sop_instance_uid,
            "sha256": result.sha256, "status": f"0x{result.outcome.status.code:04X}",
            "reason": result.outcome.comment}})
        return result.outcome.as_dimse()

    return handle_store
