"""One log line and one audit event per query or retrieve served from the index.

Shared by the search and retrieve services so both write the same shape.

Why the events are written by a background thread, a batch per transaction:
writing one synchronously costs a write transaction with an fsync and a
signed head checkpoint, about 2.5 ms, which the next request on a held
association would wait for (a C-FIND itself takes a few milliseconds). The
queue keeps the order; events are committed within :data:`LINGER` seconds,
many to one transaction and one signature, and the queue is drained when the
context stops (:meth:`AuditQueue.stop`). What a crash can lose is the events of requests
answered in that last fraction of a second; these requests read, they never
change what is stored (stores are audited synchronously, in the ingest
transaction).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any

from node.audit.trail import Actor, AuditTrail
from node.storage.interface import IndexUnavailable

log = logging.getLogger("lamina.audit")

LINGER = 0.05  # seconds a batch waits for more events before it is written
_MAX_BATCH = 500
_RETRY_DELAYS = (0.1, 0.5, 2.0)  # an index that is briefly locked gets a few more tries

_Event = tuple[str, Actor, dict[str, Any], str]


class AuditQueue:
    """Appends events to one audit trail from a background thread, in order, in batches.

    Built and owned by the node's context: :meth:`start` before the first
    request is served, :meth:`stop` (which writes what is queued) when the node stops.
    """

    def __init__(self, audit: AuditTrail) -> None:
        self.audit = audit
        self._events: queue.SimpleQueue[_Event | None] = queue.SimpleQueue()
        self._idle = threading.Event()
        self._idle.set()
        self._pending = 0
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="audit-writer", daemon=True)
            self._thread.start()

    def put(self, action: str, actor: Actor, obj: dict[str, Any], outcome: str) -> None:
        """Queue one event; written at once (in this thread) when the writer is not running."""
        if self._thread is None:
            self._write([(action, actor, obj, outcome)])
            return
        with self._lock:
            self._pending += 1
            self._idle.clear()
        self._events.put((action, actor, obj, outcome))

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every queued event is written (or given up on); False on timeout."""
        return self._idle.wait(timeout)

    def stop(self, timeout: float = 10.0) -> None:
        """Write what is queued, then end the writer thread."""
        if self._thread is None:
            return
        self.flush(timeout)
        self._events.put(None)
        self._thread.join(timeout)
        self._thread = None

    def _run(self) -> None:
        while True:
            first = self._events.get()
            if first is None:
                return
            batch = [first]
            deadline = time.monotonic() + LINGER
            stopping = False
            while len(batch) < _MAX_BATCH:
                try:
                    event = self._events.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if event is None:
                    stopping = True
                    break
                batch.append(event)
            self._write(batch)
            with self._lock:
                self._pending -= len(batch)
                if not self._pending:
                    self._idle.set()
            if stopping:
                return

    def _write(self, batch: list[_Event]) -> None:
        for delay in (*_RETRY_DELAYS, None):
            try:
                with self.audit.index.transaction() as tx:
                    entries = [self.audit.append(tx, *event) for event in batch]
                self.audit.committed(entries[-1])
                return
            except (IndexUnavailable, OSError) as exc:
                if delay is None:
                    log.error("audit events lost: the index refused them", extra={"fields": {
                        "events": len(batch), "actions": sorted({e[0] for e in batch}),
                        "error": type(exc).__name__}})
                    return
                time.sleep(delay)


def report(events: AuditQueue, log_to: logging.Logger, action: str, actor: Actor,
           obj: dict[str, Any], failed: bool) -> None:
    """Log and audit ``obj`` (counts, names of keys, AE titles: never identifier values)."""
    # "level" is the log line's own severity field: the query level goes out as query_level.
    fields = {"association": actor.association_id, "calling_ae": actor.ae_title,
              **{("query_level" if k == "level" else k): v for k, v in obj.items()}}
    log_to.log(logging.WARNING if failed else logging.INFO, action, extra={"fields": fields})
    events.put(action, actor, obj, "minor-failure" if failed else "success")
