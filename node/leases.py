"""Background work that runs on exactly one node of an index: started where its lease is held.

Several nodes share one PostgreSQL index; the series sweeper, the forward worker,
the syslog stream and the recovery of unchecked annotations must run once across
them, not once per node. Each node's supervisor polls the lease
(:meth:`node.storage.interface.Index.lease`) every :data:`POLL_SECONDS`: the node
that gets it starts the work, and a node that loses it (its index connection
broke) stops the work at once. When the holder dies, its lease is free on the
index and another node takes the work over at its next poll. On SQLite (one
node) the lease is always held: the work starts with the node, as before.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from node.storage.interface import Lease

log = logging.getLogger("lamina.leases")

#: How often a node asks for the lease: the longest a dead holder's work waits for a new one.
POLL_SECONDS = 2.0


class LeasedWork:
    """Runs ``start`` while this node holds ``lease`` and ``stop`` when it no longer does."""

    def __init__(self, lease: Lease, start: Callable[[], None], stop: Callable[[], None],
                 name: str, poll: float = POLL_SECONDS) -> None:
        self.lease = lease
        self._start, self._stop_work = start, stop
        self.name = name
        self.poll = poll
        self.active = False
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Take the lease now if it is free (so a lone node starts its work before it
        serves), then keep polling in a thread."""
        if self._thread is not None:
            return
        self._stopping.clear()
        self._poll_once()
        self._thread = threading.Thread(target=self._run, name=f"lease-{self.name}",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the work (when held) and give the lease up for another node."""
        thread, self._thread = self._thread, None
        if thread is not None:
            self._stopping.set()
            thread.join()
        if self.active:
            self._stop_work()
            self.active = False
        self.lease.release()

    def _run(self) -> None:
        while not self._stopping.wait(self.poll):
            try:
                self._poll_once()
            except Exception:  # the work failed to start (index away): next poll retries
                log.exception("lease work failed to start", extra={"fields": {"lease": self.name}})
                if self.active:
                    self._stop_work()
                    self.active = False

    def _poll_once(self) -> None:
        held = self.lease.held()
        if held and not self.active:
            log.info("lease taken: starting its work", extra={"fields": {"lease": self.name}})
            self.active = True  # before: work half started is stopped again (see _run)
            self._start()
        elif not held and self.active:
            log.warning("lease lost: stopping its work", extra={"fields": {"lease": self.name}})
            self._stop_work()
            self.active = False
