"""The series check as a service: when a series stops growing (or on demand), prove it whole.

State machine kept in the index: a stored instance puts its series in
``receiving``; after the quiet period (or ``lamina check series UID``) the
check runs and the series becomes ``complete`` or ``incomplete``, with its
findings, its reconstructed geometry and an audit event. A later instance
puts it back to ``receiving``. Each run is a new ``series_check`` row: earlier
runs are never overwritten.

The check reads and writes in one write transaction, so an instance arriving
meanwhile is either part of the check or restarts the quiet period after it.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass

from node.audit.trail import Actor, AuditTrail
from node.checks.geometry import SeriesFinding, VolumeGeometry, analyse_series
from node.config import ValidationSettings
from node.ingest.rules import REJECT
from node.storage import checks
from node.storage.index import Index, IndexUnavailable

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

    def check(self, series_instance_uid: str, trigger: str = "on-demand",
              actor: Actor | None = None) -> SeriesState | None:
        """Check one series now; None when the series is not in the index."""
        with self.index.write() as conn:
            rows = checks.series_rows(conn, series_instance_uid)
            if rows is None:
                return None
            if trigger != "on-demand" and rows.state != "receiving":
                return None  # another sweeper, or a new check, got there first
            report = analyse_series(rows.instances, self.settings.spacing_tolerance,
                                    self.settings.orientation_tolerance)
            graded = [(f, self.settings.action(f.rule)) for f in report.findings]
            state = "incomplete" if any(s == REJECT for _, s in graded) else "complete"
            check_id = checks.insert_series_check(conn, rows.series_fk, trigger, state,
                                                  report.instances, report.geometry, graded,
                                                  rows.last_received)
            entry = self.audit.append(
                conn, f"series.{state}", actor or self.actor,
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
        older_than = (now if now is not None else time.time()) - self.settings.quiet_period
        with self.index.read() as conn:
            quiet = checks.quiet_series(conn, older_than)
        return [s for uid in quiet if (s := self.check(uid, "quiet-period")) is not None]

    def run(self, stop: threading.Event) -> None:
        """Sweep until ``stop`` is set (a thread in the node's parent process)."""
        interval = max(0.2, min(1.0, self.settings.quiet_period / 4))
        while not stop.wait(interval):
            try:
                self.sweep()
            except IndexUnavailable as exc:
                log.warning("series sweep skipped: index unavailable",
                            extra={"fields": {"error": str(exc)[:200]}})

    def state(self, series_instance_uid: str) -> SeriesState | None:
        """The stored state of a series and its latest check, without re-checking."""
        with self.index.read() as conn:
            row = conn.execute(
                "SELECT s.id, st.state, c.id AS check_id, c.checked_at, c.geometry,"
                " (SELECT count(*) FROM instance i WHERE i.series_fk = s.id) AS instances"
                " FROM series s LEFT JOIN series_state st ON st.series_fk = s.id"
                " LEFT JOIN series_check c ON c.id = st.check_fk"
                " WHERE s.series_instance_uid = ?", (series_instance_uid,)).fetchone()
            if row is None:
                return None
            found = conn.execute(
                "SELECT rule, severity, message, positions FROM finding"
                " WHERE series_check_fk = ? ORDER BY id", (row["check_id"],)).fetchall() \
                if row["check_id"] else []
        findings = tuple((SeriesFinding(f["rule"], f["message"],
                                        tuple(json.loads(f["positions"] or "[]"))),
                          f["severity"]) for f in found)
        geometry = VolumeGeometry.from_dict(json.loads(row["geometry"])) \
            if row["geometry"] else None
        return SeriesState(series_instance_uid, row["state"] or "receiving", row["instances"],
                           row["checked_at"], findings, geometry)
