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
import threading
import time
from collections import deque
from typing import Any

from node.audit.trail import Actor, AuditTrail
from node.storage.interface import IndexUnavailable

log = logging.getLogger("lamina.audit")

LINGER = 0.05  # seconds a batch waits for more events before it is written
ASSOCIATION_LINGER = 0.25  # the same, for association events (see above)
_MAX_BATCH = 500
_RETRY_DELAYS = (0.1, 0.5, 2.0)  # an index that is briefly locked gets a few more tries

_Event = tuple[str, Actor, dict[str, Any], str]


class AuditQueue:
    """Appends events to one audit trail from a background thread, in order, in batches.

    Built and owned by the node's context: :meth:`start` before the first
    request is served, :meth:`stop` (which writes what is queued) when the node stops.

    The writer sleeps until the batch it gathers is due (the most urgent event's
    time) and is woken early only when an event comes that is due sooner, or by
    :meth:`flush` and :meth:`stop`: an event that can wait as long as the batch (every
    association's accepted and released) is queued without waking it. Waking the
    writer at each one only for it to sleep again was two thread switches and GIL
    hand-offs per association, on the serving threads' time.
    """

    def __init__(self, audit: AuditTrail) -> None:
        self.audit = audit
        self._lock = threading.Lock()
        self._events: deque[_Event] = deque()  # queued, oldest first
        #: When the queued events must be written by (monotonic), None when none are.
        self._due: float | None = None
        self._stopping = False
        self._wake = threading.Event()
        self._idle = threading.Event()  # set while nothing is queued or being written
        self._idle.set()
        self._pending = 0  # queued + being written
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name="audit-writer", daemon=True)
            self._thread.start()

    def put(self, action: str, actor: Actor, obj: dict[str, Any], outcome: str,
            linger: float = LINGER) -> None:
        """Queue one event, written within ``linger`` seconds; written at once (in this
        thread) when the writer is not running."""
        if self._thread is None:
            self._write([(action, actor, obj, outcome)])
            return
        due = time.monotonic() + linger
        with self._lock:
            self._events.append((action, actor, obj, outcome))
            self._pending += 1
            self._idle.clear()
            sooner = self._due is None or due < self._due
            if sooner:
                self._due = due
        if sooner:
            self._wake.set()

    def flush(self, timeout: float = 10.0) -> bool:
        """Write every queued event now and wait until it is written (or given up on);
        False on timeout."""
        if self._thread is not None:
            with self._lock:
                if self._events:
                    self._due = 0.0
            self._wake.set()
        return self._idle.wait(timeout)

    def stop(self, timeout: float = 10.0) -> None:
        """Write what is queued, then end the writer thread."""
        if self._thread is None:
            return
        self.flush(timeout)
        with self._lock:
            self._stopping = True
        self._wake.set()
        self._thread.join(timeout)
        self._thread = None

    def _run(self) -> None:
        while True:
            self._wake.clear()  # before looking: a put after the look sets it again
            with self._lock:
                due, stopping = self._due, self._stopping
                now = time.monotonic()
                if due is not None and due <= now:
                    batch = [self._events.popleft()
                             for _ in range(min(len(self._events), _MAX_BATCH))]
                    # what a full batch left is overdue too: written next turn
                    self._due = now if self._events else None
            if due is None:
                if stopping:
                    return
                self._wake.wait()
                continue
            if due > now:
                self._wake.wait(due - now)
                continue
            self._write(batch)
            with self._lock:
                self._pending -= len(batch)
                if not self._pending:
                    self._idle.set()

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
