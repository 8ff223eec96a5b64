"""Run a job for a key once the key has been quiet for a while: overlay sets settle before checking.

Overlay copies arrive one slice per C-STORE, often hundreds in a burst.
Checking the whole set in 3D after every slice makes a 300-slice push cost
O(n²) checks inside the C-STORE answers; waiting until the set has not grown
for ``settle_seconds`` gives one check per burst, off the answer path (the
reference checks, which refuse, still run before each answer). The same
coalescing idea as the audit head writer: a background thread the node's
context starts and stops; :meth:`stop` (and :meth:`flush`) run what is still
pending, so nothing is lost. Without :meth:`start` (a command-line tool),
pending jobs wait for :meth:`flush` or :meth:`stop`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Hashable

log = logging.getLogger("lamina.annotations")


class SettleQueue:
    """Calls ``job(key, context)`` once per key, ``settle_seconds`` after its last :meth:`touch`."""

    def __init__(self, job: Callable[[Hashable, object], None], settle_seconds: float) -> None:
        self.job = job
        self.settle_seconds = settle_seconds
        self._due: dict[Hashable, tuple[float, object]] = {}
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False

    def start(self) -> None:
        with self._changed:
            if self._thread is None:
                self._stopping = False
                self._thread = threading.Thread(target=self._loop, name="annotation-checks",
                                                daemon=True)
                self._thread.start()

    def stop(self) -> None:
        """End the thread, then run what is still pending in this thread."""
        with self._changed:
            thread, self._thread = self._thread, None
            self._stopping = True
            self._changed.notify()
        if thread is not None:
            thread.join()
        self.flush()

    def touch(self, key: Hashable, context: object = None, delay: float | None = None) -> None:
        """(Re)schedule ``key``: its job runs when no touch came for ``settle_seconds``
        (or ``delay``: a pending annotation's next look is at the end of its wait)."""
        wait = self.settle_seconds if delay is None else max(0.0, delay)
        with self._changed:
            self._due[key] = (time.monotonic() + wait, context)
            self._changed.notify()

    def pending(self) -> int:
        with self._changed:
            return len(self._due)

    def flush(self) -> None:
        """Run every pending job now, in this thread (shutdown, tests, the CLI)."""
        with self._changed:
            due, self._due = self._due, {}
        for key, (_, context) in due.items():
            self._run(key, context)

    def _loop(self) -> None:
        while True:
            with self._changed:
                while True:
                    if self._stopping:
                        return
                    now = time.monotonic()
                    ready = [k for k, (at, _) in self._due.items() if at <= now]
                    if ready:
                        key = ready[0]
                        _, context = self._due.pop(key)
                        break
                    wait = min((at for at, _ in self._due.values()), default=now + 3600) - now
                    self._changed.wait(timeout=wait)
            self._run(key, context)

    def _run(self, key: Hashable, context: object) -> None:
        try:
            self.job(key, context)
        except Exception as exc:  # the annotation stays "received" for a later run
            log.error("deferred annotation check failed",
                      extra={"fields": {"error": type(exc).__name__}})
