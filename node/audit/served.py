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

Association events (accepted, released, aborted) come through here too, with a
longer wait, :data:`ASSOCIATION_LINGER`: an echo-and-release cycle takes
milliseconds, so with the query events' 50 ms nearly every association paid for
a transaction of its own (its fsync, its head signature), the larger part of the
node's CPU per association for a peer that opens one at a time. A crash can lose
the association events of that last quarter second; a batch holding any query
event is still written within :data:`LINGER`, and :meth:`AuditQueue.flush` writes
what is queued at once.
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
ASSOCIATION_LINGER = 0.25  # the same, for association events (see above)
_MAX_BATCH = 500
_RETRY_DELAYS = (0.1, 0.5, 2.0)  # an index that is briefly locked gets a few more tries

_Event = tuple[str, Actor, dict[str, Any], str]
#: What the queue carries: an event and the monotonic time it must be written by;
#: None ends the writer, _HURRY (from flush) writes the current batch now.
_Item = tuple[_Event, float] | None
_HURRY = ((), 0.0)


class AuditQueue:
    """Appends events to one audit trail from a background thread, in order, in batches.

    Built and owned by the node's context: :meth:`start` before the first
    request is served, :meth:`stop` (which writes what is queued) when the node stops.
    """

    def __init__(self, audit: AuditTrail) -> None:
        self.audit = audit
        self._events: queue.SimpleQueue[_Item] = queue.SimpleQueue()
        self._idle = threading.Event()
        self._idle.set()
        self._pending = 0
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="audit-writer", daemon=True)
            self._thread.start()

    def put(self, action: str, actor: Actor, obj: dict[str, Any], outcome: str,
            linger: float = LINGER) -> None:
        """Queue one event, written within ``linger`` seconds; written at once (in this
        thread) when the writer is not running."""
        if self._thread is None:
            self._write([(action, actor, obj, outcome)])
            return
        with self._lock:
            self._pending += 1
            self._idle.clear()
        self._events.put(((action, actor, obj, outcome), time.monotonic() + linger))

    def flush(self, timeout: float = 10.0) -> bool:
        """Write every queued event now and wait until it is written (or given up on);
        False on timeout."""
        if self._thread is not None and not self._idle.is_set():
            self._events.put(_HURRY)
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
            if first is _HURRY:
                continue  # nothing was waiting
            event, deadline = first
            batch = [event]
            stopping = False
            while len(batch) < _MAX_BATCH:
                try:
                    item = self._events.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if item is None:
                    stopping = True
                    break
                if item is _HURRY:
                    break
                event, due = item
                batch.append(event)
                deadline = min(deadline, due)
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
