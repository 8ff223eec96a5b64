"""Quarantine: where refused objects are kept, with why, and how a person lets one in.

Refused bytes go to their own content-addressed area (``<data>/quarantine``,
same layout and durability as the blob store), never to the blob store that
serves retrievals. What a peer sent may carry PHI, so received bytes are kept
sealed (AES-GCM under the project key, :mod:`node.storage.sealed`) and only
unsealed on export or release, by someone holding the key. The node never
deletes them. A person can list and show
entries, export the bytes to repair them elsewhere, or release one: release
re-runs the ingest pipeline on the kept bytes with an override that turns the
rejecting findings into recorded ones, and audits who did it and why.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from node.audit.trail import Actor, AuditTrail, utc_now
from node.ingest.validate import Finding
from node.storage.blobs import BlobRef, BlobStore
from node.storage.index import Index
from node.storage.sealed import Sealer

if TYPE_CHECKING:
    from node.ingest.pipeline import IngestService, Source, StoreResult


class QuarantineError(ValueError):
    """A quarantine command cannot be carried out (unknown ID, already released, ...)."""


@dataclass(frozen=True)
class Refused:
    """What is known about a refused object, for its quarantine row."""

    status_code: int
    findings: tuple[Finding, ...]
    transfer_syntax_uid: str = ""
    sop_class_uid: str = ""
    sop_instance_uid: str = ""
    series_instance_uid: str = ""

    @property
    def reason(self) -> str:
        return self.findings[0].message if self.findings else "refused"


@dataclass(frozen=True)
class Override:
    """A person's decision to let a quarantined object in despite its findings."""

    quarantine_id: int
    reason: str
    actor: Actor


@dataclass(frozen=True)
class QuarantineEntry:
    """One quarantine row, as ``lamina quarantine list/show`` presents it."""

    id: int
    received_at: str
    calling_ae: str
    address: str
    association_id: str
    status_code: int
    reason: str
    findings: list[dict[str, str]]
    sha256: str
    size: int
    area: str
    transfer_syntax_uid: str
    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    released_at: str | None
    released_by: str | None
    release_reason: str | None
    sealed: bool
    route: str

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> QuarantineEntry:
        return cls(row["id"], row["received_at"], row["calling_ae"], row["address"],
                   row["association_id"], row["status_code"], row["reason"],
                   json.loads(row["findings"]), row["blob_sha256"], row["blob_size"],
                   row["area"], row["transfer_syntax_uid"], row["sop_class_uid"],
                   row["sop_instance_uid"], row["series_instance_uid"], row["released_at"],
                   row["released_by"], row["release_reason"], bool(row["sealed"]),
                   row["route"])


class QuarantineArea:
    """Keeps refused bytes and their rows; used by the ingest pipeline."""

    def __init__(self, store: BlobStore, blobs: BlobStore, index: Index,
                 audit: AuditTrail, sealer: Sealer) -> None:
        self.store = store
        self.blobs = blobs
        self.index = index
        self.audit = audit
        self.sealer = sealer

    def keep(self, spooled: Path, source: Source, refused: Refused) -> tuple[int, str]:
        """Seal received bytes into the area and record why; returns (quarantine ID, sha256).

        Quarantine is rare, so holding one refused object in memory to seal it
        is an accepted cost.
        """
        blob = self.store.put_bytes(self.sealer.seal(spooled.read_bytes()))
        return self._record(blob, source, refused, sealed=True), blob.sha256

    def keep_stored_blob(self, blob: BlobRef, source: Source, refused: Refused) -> int:
        """Quarantine bytes already promoted into the blob store (refused inside the
        index transaction): hard-link them into the area, so nothing is copied or lost."""
        self.store.adopt(self.blobs.path_for(blob.sha256), blob.sha256)
        return self._record(blob, source, refused, sealed=False)

    def _record(self, blob: BlobRef, source: Source, refused: Refused, *, sealed: bool) -> int:
        with self.index.write() as conn:
            qid = insert_row(conn, blob.sha256, blob.size, source, refused, area="quarantine",
                             sealed=sealed, received_at=utc_now())
            entry = self.audit.append(
                conn, "instance.quarantined", source.actor,
                {"quarantine_id": qid, "sha256": blob.sha256, "status": refused.status_code,
                 "sop_instance_uid": refused.sop_instance_uid,
                 "rules": sorted({f.rule for f in refused.findings})},
                outcome="minor-failure",
            )
        self.audit.committed(entry)
        return qid

    def mark_released(self, conn: sqlite3.Connection, override: Override,
                      sop_instance_uid: str) -> None:
        """Inside the release's index transaction: stamp the row and audit the override."""
        conn.execute(
            "UPDATE quarantine SET released_at = ?, released_by = ?, release_reason = ?"
            " WHERE id = ?",
            (utc_now(), override.actor.user, override.reason, override.quarantine_id),
        )
        self.audit.append(conn, "quarantine.released", override.actor,
                          {"quarantine_id": override.quarantine_id,
                           "sop_instance_uid": sop_instance_uid, "reason": override.reason})


def insert_row(conn: sqlite3.Connection, sha256: str, size: int, source: Source,
               refused: Refused, *, area: str, sealed: bool, received_at: str) -> int:
    """One quarantine row, inside the caller's transaction; returns its ID.

    ``area`` says where the bytes are: ``quarantine`` (this area), or ``blobs``
    for an annotation refused after its route, whose de-identified bytes stay in
    the blob store under its annotation object. A release re-applies the
    recorded route: the sender's for sealed bytes as received, ``deidentified``
    (store as they are) for bytes that already went through their route, so
    nothing is pseudonymised twice.
    """
    route = source.route if sealed else "deidentified"
    return conn.execute(
        "INSERT INTO quarantine (blob_sha256, blob_size, reason, status_code, calling_ae,"
        " association_id, received_at, area, address, transfer_syntax_uid,"
        " sop_class_uid, sop_instance_uid, series_instance_uid, findings, sealed, route)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (sha256, size, refused.reason, refused.status_code, source.calling_ae,
         source.association_id, received_at, area, source.address,
         refused.transfer_syntax_uid, refused.sop_class_uid, refused.sop_instance_uid,
         refused.series_instance_uid, json.dumps([f.as_dict() for f in refused.findings]),
         int(sealed), route),
    ).lastrowid


class QuarantineService:
    """``lamina quarantine list | show | release | export``."""

    def __init__(self, area: QuarantineArea) -> None:
        self.area = area

    def list(self, include_released: bool = False) -> list[QuarantineEntry]:
        where = "" if include_released else " WHERE released_at IS NULL"
        with self.area.index.read() as conn:
            rows = conn.execute(f"SELECT * FROM quarantine{where} ORDER BY id").fetchall()
        return [QuarantineEntry.from_row(r) for r in rows]

    def show(self, quarantine_id: int) -> QuarantineEntry:
        with self.area.index.read() as conn:
            row = conn.execute("SELECT * FROM quarantine WHERE id = ?",
                               (quarantine_id,)).fetchone()
        if row is None:
            raise QuarantineError(f"no quarantine entry {quarantine_id}")
        return QuarantineEntry.from_row(row)

    def path_of(self, entry: QuarantineEntry) -> Path:
        """Rows from before the quarantine area existed kept their bytes in the blob store."""
        store = self.area.store if entry.area == "quarantine" else self.area.blobs
        return store.path_for(entry.sha256)

    def bytes_of(self, entry: QuarantineEntry) -> bytes:
        """The object as received: unsealed when it was kept sealed."""
        data = self.path_of(entry).read_bytes()
        return self.area.sealer.open(data) if entry.sealed else data

    def export(self, quarantine_id: int, destination: Path, actor: Actor) -> Path:
        """Copy the kept bytes out (the entry stays); a folder gets ``<sha256>.dcm``."""
        entry = self.show(quarantine_id)
        target = destination / f"{entry.sha256}.dcm" if destination.is_dir() else destination
        target.write_bytes(self.bytes_of(entry))
        self.area.audit.record("quarantine.exported", actor,
                               {"quarantine_id": quarantine_id, "sha256": entry.sha256})
        return target

    def release(self, quarantine_id: int, reason: str, actor: Actor,
                ingest: IngestService) -> StoreResult:
        """Re-run the pipeline on the kept bytes with an audited override."""
        from node.ingest.pipeline import Source

        if not reason.strip():
            raise QuarantineError("a release needs a reason")
        entry = self.show(quarantine_id)
        if entry.released_at:
            raise QuarantineError(f"quarantine entry {quarantine_id} was already released"
                                  f" at {entry.released_at} by {entry.released_by}")
        spooled = ingest.blobs.new_spool_file()
        try:
            spooled.write_bytes(self.bytes_of(entry))
            source = Source(entry.calling_ae, entry.address, entry.association_id, entry.route)
            return ingest.ingest_file(spooled, source,
                                      Override(quarantine_id, reason.strip(), actor))
        finally:
            spooled.unlink(missing_ok=True)
