"""Read-only reports for people: ``lamina status`` and ``lamina fsck``."""

from __future__ import annotations

from dataclasses import dataclass, field

from node.config import Settings
from node.context import NodeContext


def node_status(settings: Settings) -> dict[str, str]:
    """Counts per level, disk used, quarantine and conflicts."""
    ctx = NodeContext.open(settings, migrate=False, must_exist=True)
    try:
        with ctx.index.reader() as r:
            counts = r.reports.counts()
            waiting = r.reports.quarantine_waiting()
            states = r.reports.series_states()
            instance_rules = r.reports.instance_rule_counts()
            series_rules = r.reports.series_rule_counts()
            forward = r.outbox.counts()
        return {
            "ae_title": f"{settings.node.ae_title} (port {settings.node.port})",
            "data": str(settings.storage.data),
            "patients": str(counts["patient"]),
            "studies": str(counts["study"]),
            "series": str(counts["series"]),
            "instances": str(counts["instance"]),
            "quarantined": str(counts["quarantine"]),
            "conflicts": str(counts["conflict"]),
            "audit_events": str(counts["audit_event"]),
            "disk_used_mb": f"{ctx.blobs.disk_used() / (1 << 20):.1f}",
            "disk_free_mb": f"{ctx.blobs.free_bytes() / (1 << 20):.0f}",
            "quarantine_waiting": str(waiting),
            "series_states": ", ".join(f"{k} {states.get(k, 0)}"
                                       for k in ("receiving", "complete", "incomplete")),
            "instance_findings": ", ".join(f"{r} {n}" for r, n in instance_rules) or "none",
            "series_findings": ", ".join(f"{r} {n}" for r, n in series_rules) or "none",
            **forward_counts(forward),
        }
    finally:
        ctx.close()


def forward_counts(counts: dict[str, dict[str, int]]) -> dict[str, str]:
    """One ``forward_<destination>`` line per destination: rows queued, failed (to be
    retried), sent and dead-lettered, then cancelled and refused when there are any."""
    lines = {}
    for destination, states in counts.items():
        shown = [f"{s} {states.get(s, 0)}" for s in ("queued", "failed", "sent", "dead")]
        shown += [f"{s} {states[s]}" for s in ("cancelled", "refused") if states.get(s)]
        lines[f"forward_{destination}"] = ", ".join(shown)
    return lines or {"forward": "nothing queued"}


def instance_findings(settings: Settings, sop_instance_uid: str) -> list[str]:
    """What was found on one instance: recorded findings if stored, reasons if quarantined."""
    ctx = NodeContext.open(settings, migrate=False, must_exist=True)
    try:
        with ctx.index.reader() as r:
            stored, found = r.reports.instance_findings(sop_instance_uid)
            held = r.quarantine.for_instance(sop_instance_uid)
    finally:
        ctx.close()
    lines = [f"instance {sop_instance_uid}: {'stored' if stored else 'not stored'}"]
    lines += [f"  {f.severity:<6} [{f.rule}] {f.message}" for f in found]
    for entry in held:
        state = f"released {entry.released_at}" if entry.released_at else "waiting"
        lines += [f"  quarantine {entry.id} ({state}) [{f['rule']}] {f['message']}"
                  for f in entry.findings]
    return lines


@dataclass
class FsckReport:
    checked: int = 0
    missing: list[str] = field(default_factory=list)
    corrupt: list[str] = field(default_factory=list)
    unreferenced: list[str] = field(default_factory=list)
    stale_spool: int = 0
    integrity: str = "ok"

    @property
    def clean(self) -> bool:
        return not self.missing and not self.corrupt and self.integrity == "ok"

    def lines(self) -> list[str]:
        out = [f"index integrity: {self.integrity}", f"blobs checked: {self.checked}"]
        out += [f"MISSING blob {h}" for h in self.missing]
        out += [f"CORRUPT blob {h} (bytes no longer match their hash)" for h in self.corrupt]
        if self.unreferenced:
            out.append(f"unreferenced blobs (a store that failed after writing): "
                       f"{len(self.unreferenced)}")
        if self.stale_spool:
            out.append(f"stale spool files (cleared at next start): {self.stale_spool}")
        out.append("clean" if self.clean else "NOT clean")
        return out


def fsck(settings: Settings) -> FsckReport:
    """Every blob the index references exists, and every blob hashes to its name."""
    ctx = NodeContext.open(settings, migrate=False, must_exist=True)
    report = FsckReport()
    try:
        with ctx.index.reader() as r:
            report.integrity = r.reports.integrity()
            referenced = r.reports.referenced_blobs()
            quarantined = r.reports.quarantined_blobs()
        area = ctx.quarantined
        for store, hashes in ((ctx.blobs, referenced), (area, quarantined)):
            on_disk = set(store.iter_hashes())
            report.missing += sorted(hashes - on_disk)
            for sha in sorted(on_disk):  # every file, referenced or not, must be whole
                report.checked += 1
                if not store.verify(sha):
                    report.corrupt.append(sha)
        # Bytes refused inside the index transaction are hard-linked from the
        # blob store into the quarantine area: those are accounted for.
        report.unreferenced = sorted(set(ctx.blobs.iter_hashes()) - referenced - quarantined)
        report.stale_spool = len(ctx.blobs.stale_spool_files())
    finally:
        ctx.close()
    return report
