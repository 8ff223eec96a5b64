"""C-STORE: hand the spooled dataset to the ingest service and answer its outcome (counted
by status, bytes and latency in the process's metrics).

Two callers: the C-STORE receiver (:mod:`node.dimse.receive`) calls
:meth:`StoreService.receive` with the spool file it wrote; a C-STORE it leaves to
pynetdicom (a SOP class accepted through SOP Class Common Extended Negotiation)
reaches the EVT_C_STORE handler, :meth:`StoreService.handle`.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Hashable
from pathlib import Path

from pydicom.dataset import Dataset
from pynetdicom import evt

from node.context import NodeContext
from node.dimse import compat
from node.dimse.handlers.association import Sessions
from node.dimse.spool import DataSetSpool
from node.metrics import Metrics
from node.status import Outcome

log = logging.getLogger("lamina.store")


class StoreService:
    """One C-STORE's data set, from its spool file to the answer the sender hears."""

    def __init__(self, ctx: NodeContext, sessions: Sessions) -> None:
        self.ctx = ctx
        self.sessions = sessions
        self.metrics = Metrics.get()
        #: Where the receiver spools data sets that do not stay in memory: the node's own
        #: spool folder, on the blobs' filesystem (an object stored as received is renamed
        #: into the store, not copied, even where the system's temporary folder is a
        #: tmpfs) and swept at start-up (what a kill -9 left half-received does not pile up).
        self.spool_dir = ctx.settings.spool_dir

    def spool(self, key: Hashable) -> DataSetSpool:
        """Where the next data set of the association under ``key`` is written while it arrives: memory when
        the peer's route rewrites what it sends, the spool folder when it may be stored
        as received (:mod:`node.dimse.spool`)."""
        route = self.sessions.of(key).source.route
        return DataSetSpool(self.spool_dir,
                            in_memory=not self.ctx.ingest.router.stores_as_received(route))

    def handle(self, event: evt.Event) -> Dataset:
        """The EVT_C_STORE handler (pynetdicom's receive path)."""
        spool_failure = compat.receive_failure(event.assoc)
        return self.receive(event.assoc, event.dataset_path, spool_failure).as_dimse()

    def receive(self, key: Hashable, path: Path, spool_failure: str = "",
                hashed: tuple[str, int] | None = None) -> Outcome:
        """Ingest the data set spooled at ``path`` (or answer why it could not be spooled);
        ``hashed``: its SHA-256 and size, when the spool took them as it was written.

        The caller removes the spool file afterwards.
        """
        session = self.sessions.of(key)
        started = time.perf_counter()
        if spool_failure:
            result = self.ctx.ingest.receive_failed(session.source, spool_failure)
        else:
            size = os.path.getsize(path)
            result = self.ctx.ingest.ingest_file(path, session.source, hashed=hashed)
            self.metrics.ingest_seconds.labels("dimse").observe(time.perf_counter() - started)
            self.metrics.cstore_bytes.inc(size)
        self.metrics.cstore.labels(f"0x{result.outcome.status.code:04X}").inc()
        if result.outcome.status.is_success:
            session.stored += 1
        else:
            session.failed += 1
        # A success is DEBUG, like storescp and Orthanc (their per-file lines need -v): the
        # audit trail has every stored instance and the association's closing line counts
        # them, and a line per instance cost about 0.15 ms of CPU (formatted, written).
        level = logging.DEBUG if result.outcome.status.is_success else logging.INFO
        log.log(level, "instance " + result.action, extra={"fields": {
            "association": session.association_id, "sop_instance_uid": result.sop_instance_uid,
            "sha256": result.sha256, "status": f"0x{result.outcome.status.code:04X}",
            "reason": result.outcome.comment}})
        return result.outcome
