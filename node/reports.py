"""Read-only reports for people: ``lamina status`` and ``lamina fsck``."""

from __future__ import annotations

from dataclasses import dataclass, field

import sqlite_utils

from node.config import Settings
from node.context import NodeContext


def node_status(settings: Settings) -> dict[str, str]:
    """Counts per level, disk used, quarantine and conflicts."""
    ctx = NodeContext.open(settings, migrate=False)
    try:
        db = sqlite_utils.Database(settings.index_path)
        counts = {t: db[t].count for t in ("patient", "study", "series", "instance",
                                          "quarantine", "conflict", "audit_event")}
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
        }
    finally:
        ctx.close()


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
    ctx = NodeContext.open(settings, migrate=False)
    report = FsckReport()
    try:
        with ctx.index.read() as conn:
            report.integrity = conn.execute("PRAGMA integrity_check").fetchone()[0]
            referenced = {row[0] for row in conn.execute(
                "SELECT blob_sha256 FROM instance UNION SELECT blob_sha256 FROM conflict"
                " UNION SELECT blob_sha256 FROM quarantine"
                " UNION SELECT blob_sha256 FROM annotation_object")}
        on_disk = set(ctx.blobs.iter_hashes())
        report.missing = sorted(referenced - on_disk)
        for sha in sorted(on_disk):
            report.checked += 1
            if not ctx.blobs.verify(sha):
                report.corrupt.append(sha)
        report.unreferenced = sorted(on_disk - referenced)
        report.stale_spool = len(ctx.blobs.stale_spool_files())
    finally:
        ctx.close()
    return report
