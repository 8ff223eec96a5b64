"""Read-only reports for people: ``lamina status`` and ``lamina fsck``."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import sqlite_utils

from node.config import Settings
from node.context import NodeContext
from node.storage.blobs import BlobStore


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
            **_validation_status(ctx),
        }
    finally:
        ctx.close()


def _validation_status(ctx: NodeContext) -> dict[str, str]:
    """Quarantine still waiting, series states and findings by rule."""
    with ctx.index.read() as conn:
        waiting = conn.execute(
            "SELECT count(*) FROM quarantine WHERE released_at IS NULL").fetchone()[0]
        states = dict(conn.execute(
            "SELECT state, count(*) FROM series_state GROUP BY state").fetchall())
        instance_rules = conn.execute(
            "SELECT rule, count(*) FROM finding WHERE instance_fk IS NOT NULL"
            " GROUP BY rule ORDER BY rule").fetchall()
        series_rules = conn.execute(
            "SELECT f.rule, count(*) FROM finding f JOIN series_state st"
            " ON st.check_fk = f.series_check_fk GROUP BY f.rule ORDER BY f.rule").fetchall()
    return {
        "quarantine_waiting": str(waiting),
        "series_states": ", ".join(f"{k} {states.get(k, 0)}"
                                   for k in ("receiving", "complete", "incomplete")),
        "instance_findings": ", ".join(f"{r} {n}" for r, n in instance_rules) or "none",
        "series_findings": ", ".join(f"{r} {n}" for r, n in series_rules) or "none",
    }


def instance_findings(settings: Settings, sop_instance_uid: str) -> list[str]:
    """What was found on one instance: recorded findings if stored, reasons if quarantined."""
    ctx = NodeContext.open(settings, migrate=False)
    try:
        with ctx.index.read() as conn:
            stored = conn.execute(
                "SELECT id FROM instance WHERE sop_instance_uid = ?", (sop_instance_uid,)
            ).fetchone()
            found = conn.execute(
                "SELECT severity, rule, message FROM finding WHERE instance_fk = ? ORDER BY id",
                (stored[0],)).fetchall() if stored else []
            held = conn.execute(
                "SELECT id, findings, released_at FROM quarantine WHERE sop_instance_uid = ?"
                " ORDER BY id", (sop_instance_uid,)).fetchall()
    finally:
        ctx.close()
    lines = [f"instance {sop_instance_uid}: {'stored' if stored else 'not stored'}"]
    lines += [f"  {severity:<6} [{rule}] {message}" for severity, rule, message in found]
    for qid, findings, released_at in held:
        state = f"released {released_at}" if released_at else "waiting"
        lines += [f"  quarantine {qid} ({state}) [{f['rule']}] {f['message']}"
                  for f in json.loads(findings)]
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
    ctx = NodeContext.open(settings, migrate=False)
    report = FsckReport()
    try:
        with ctx.index.read() as conn:
            report.integrity = conn.execute("PRAGMA integrity_check").fetchone()[0]
            referenced = {row[0] for row in conn.execute(
                "SELECT blob_sha256 FROM instance UNION SELECT blob_sha256 FROM conflict"
                " UNION SELECT blob_sha256 FROM quarantine WHERE area = 'blobs'"
                " UNION SELECT blob_sha256 FROM annotation_object")}
            quarantined = {row[0] for row in conn.execute(
                "SELECT blob_sha256 FROM quarantine WHERE area = 'quarantine'")}
        area = BlobStore(settings.storage.data / "quarantine", ctx.blobs.spool_dir)
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
