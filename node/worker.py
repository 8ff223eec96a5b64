"""One background thread that runs submitted jobs in order: where after-the-answer work goes.

The node's context owns one and hands its :meth:`Worker.submit` to the ingest
service, so the hooks' ``after_commit`` work (an annotation's 3-D consistency
check) runs after the C-STORE answer, never on the association thread. A
worker that was never started (a command-line tool's context) runs each job
at once in the submitting thread: the command then prints results that exist.
:meth:`stop` runs what is still queued before it returns, so nothing submitted
is dropped at a normal shutdown; a crash loses queued jobs, which the services
recover from the index at the next start (annotations left ``received``).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

log = logging.getLogger("lamina.worker")

Job = Callable[[], None]


class Worker:
    def __init__(self, name: str) -> None:
        self.name = name
        self._jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._idle = threading.Condition()
        self._pending = 0

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            self._thread.start()

    def submit(self, job: Job) -> None:
        if self._thread is None:
            self._call(job)
            return
        with self._idle:
            self._pending += 1
        self._jobs.put(job)

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until every submitted job has run; False on timeout."""
        with self._idle:
            return self._idle.wait_for(lambda: self._pending == 0, timeout)

    def stop(self) -> None:
        """Run what is queued, then end the thread."""
        if self._thread is None:
            return
        self._jobs.put(None)
        self._thread.join()
        self._thread = None

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            self._call(job)
            with self._idle:
                self._pending -= 1
                self._idle.notify_all()

    def _call(self, job: Job) -> None:
        try:
            job()
        except Exception:
            log.exception("background job failed", extra={"fields": {"worker": self.name}})
