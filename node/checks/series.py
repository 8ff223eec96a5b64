"""The series check as a service: when a series stops growing (or on demand), prove it whole.

State machine kept in the index: a stored instance puts its series in
``receiving``; after the quiet period (or ``lamina check series UID``) the
check runs and the series becomes ``complete`` or ``incomplete``, with its
findings, its reconstructed geometry and an audit event. A later instance
puts it back to ``receiving``. Each run is a new ``series_check`` row: earlier
runs are never overwritten.

The check reads and writes in one write transaction, so an instance arriving
meanwhile is either part of the check or restarts the quiet period after it.

The checker is an ingest hook (a new image instance marks its series
``receiving`` in the instance's own transaction) and owns the sweeper thread
that checks series once they are quiet; the node's context starts and stops it.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from node.audit.trail import Actor, AuditEntry, AuditTrail, utc_now
from node.checks.geometry import SeriesFinding, VolumeGeometry, analyse_series
from node.config import ValidationSettings
from node.ingest.rules import REJECT
from node.ingest.types import Incoming, Stored
from node.storage.interface import Index, IndexUnavailable, Transaction
from node.storage.records import SeriesFindingRow

log = logging.getLogger("lamina.series")


@dataclass(frozen=True)
class SeriesState:
    """A series' current state, with the findings and geometry of its latest check."""

    series_instance_uid: str
    state: str  # receiving | complete | incomplete
    instances: int
    checked_at: str | None
    findings: tuple[tuple[SeriesFinding, str], ...]  # (finding, severity)
    geometry: VolumeGeometry | None


class SeriesChecker:
    """Runs series checks and reads their results back."""

    def __init__(self, index: Index, audit: AuditTrail, settings: ValidationSettings,
                 ae_title: str) -> None:
        self.index = index
        self.audit = audit
        self.settings = settings
        self.actor = Actor(ae_title=ae_title, user="series-check")
        #: How stale a receiving series' time may be (``mark_receiving``): a tenth of the
        #: quiet period, at most a second. Rewriting it for every slice made its row and
        #: index entry two of the fifteen pages each stored instance wrote (issue 15).
        self.resolution = min(1.0, settings.quiet_period / 10)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- as an ingest hook -----------------------------------------------------

    def classify(self, obj: Incoming) -> None:
        """Claims nothing: it only follows the image instances others store."""

    def on_stored(self, tx: Transaction, obj: Stored) -> AuditEntry | None:
        """A new image instance: its series is receiving and its quiet period restarts.
        Annotations (claimed objects) are not image series and are not checked as such."""
        if obj.instance_id is not None and obj.claim is None:
            tx.series.mark_receiving(obj.incoming.record.series_instance_uid, time.time(),
                                     self.resolution)
        return None

    def after_commit(self, obj: Stored) -> None:
        """Nothing: the sweeper checks series once they are quiet."""

    def check(self, series_instance_uid: str, trigger: str = "on-demand",
              actor: Actor | None = None) -> SeriesState | None:
        """Check one series now; None when the series is not in the index."""
        with self.index.transaction() as tx:
            rows = tx.series.rows(series_instance_uid)
            if rows is None:
                return None
            if trigger != "on-demand" and rows.state != "receiving":
                return None  # another sweeper, or a new check, got there first
            report = analyse_series(rows.instances, self.settings.spacing_tolerance,
                                    self.settings.orientation_tolerance)
            graded = [(f, self.settings.action(f.rule)) for f in report.findings]
            state = "incomplete" if any(s == REJECT for _, s in graded) else "complete"
            check_id = tx.series.insert_check(
                rows.series_fk, trigger, state, report.instances,
                report.geometry.as_dict() if report.geometry else None,
                [SeriesFindingRow(f.rule, severity, f.message, f.positions)
                 for f, severity in graded], rows.last_received, utc_now())
            entry = self.audit.append(
                tx, f"series.{state}", actor or self.actor,
                {"series_instance_uid": series_instance_uid, "check_id": check_id,
                 "trigger": trigger, "instances": report.instances,
                 "rules": sorted({f.rule for f in report.findings})},
                outcome="success" if state == "complete" else "minor-failure",
            )
        self.audit.committed(entry)
        log.info(f"series {state}", extra={"fields": {
            "series_instance_uid": series_instance_uid, "instances": report.instances,
            "findings": len(graded), "trigger": trigger}})
        return SeriesState(series_instance_uid, state, report.instances, None, tuple(graded),
                           report.geometry)

    def sweep(self, now: float | None = None) -> list[SeriesState]:
        """Check every series whose quiet period has passed."""
        # A series' time may be up to `resolution` older than its newest instance: the
        # quiet period is counted from that time plus the resolution, never shorter.
        older_than = ((now if now is not None else time.time()) - self.settings.quiet_period
                      - self.resolution)
        with self.index.reader() as r:
            quiet = r.series.quiet(older_than)
        return [s for uid in quiet if (s := self.check(uid, "quiet-period")) is not None]

    def start(self) -> None:
        """Sweep in a background thread until :meth:`stop`."""
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="series-sweep", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        interval = max(0.2, min(1.0, self.settings.quiet_period / 4))
        while not self._stop.wait(interval):
            try:
                self.sweep()
            except IndexUnavailable as exc:
                log.warning("series sweep skipped: index unavailable",
                            extra={"fields": {"error": str(exc)[:200]}})

    def state(self, series_instance_uid: str) -> SeriesState | None:
        """The stored state of a series and its latest check, without re-checking."""
        with self.index.reader() as r:
            row = r.series.state(series_instance_uid)
        if row is None:
            return None
        findings = tuple((SeriesFinding(f.rule, f.message, f.positions), f.severity)
                         for f in row.findings)
        geometry = VolumeGeometry.from_dict(row.geometry) if row.geometry else None
        return SeriesState(series_instance_uid, row.state or "receiving", row.instances,
                           row.checked_at, findings, geometry)
