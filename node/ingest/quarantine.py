"""Quarantine: where refused objects are kept, with why, and how a person lets one in.

Refused bytes go to their own content-addressed area (``<data>/quarantine``,
same layout and durability as the blob store), never to the blob store that
serves retrievals. What a peer sent may carry PHI, so received bytes are kept
sealed (AES-GCM under the project key, :mod:`node.storage.sealed`) and only
unsealed on export or release, by someone holding the key. The node never
deletes them. A person can list and show entries, export the bytes to repair
them elsewhere, or release one: release re-runs the ingest pipeline on the
kept bytes with an override that turns the rejecting findings into recorded
ones, and audits who did it and why.

Identical refused bytes are one entry: a peer that retries a refused object
(many do, on every failure status) bumps the entry's count and last-seen time
instead of adding a row per send. Entries are matched by the hash of the bytes
as received, which the row keeps because the sealed blob's own hash differs on
every seal (a fresh nonce).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from node.audit.trail import Actor, AuditEntry, AuditTrail, utc_now
from node.ingest.types import Ingest, Override, Source, StoreResult
from node.ingest.validate import Finding
from node.storage.interface import BlobRef, BlobStore, Index, NewQuarantine, Transaction
from node.storage.records import QuarantineRow
from node.storage.sealed import Sealer

#: One quarantine row, as ``lamina quarantine list/show`` presents it.
QuarantineEntry = QuarantineRow


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

    def row(self, blob: BlobRef, source: Source, *, area: str, sealed: bool,
            received_at: str, received_sha256: str = "") -> NewQuarantine:
        """The quarantine row. ``area`` says where the bytes are: ``quarantine`` (this
        area), or ``blobs`` for an annotation refused after its route, whose
        de-identified bytes stay in the blob store under its annotation object. A
        release re-applies the recorded route: the sender's for sealed bytes as
        received, ``deidentified`` (store as they are) for bytes that already went
        through their route, so nothing is pseudonymised twice."""
        return NewQuarantine(
            blob.sha256, blob.size, self.reason, self.status_code, source.calling_ae,
            source.address, source.association_id, received_at, area,
            self.transfer_syntax_uid, self.sop_class_uid, self.sop_instance_uid,
            self.series_instance_uid, [f.as_dict() for f in self.findings], sealed,
            source.route if sealed else "deidentified", received_sha256)


class AlreadyReleased(Exception):
    """The bytes to keep were released from quarantine before: they are stored."""

    def __init__(self, entry: QuarantineRow) -> None:
        super().__init__(f"released as quarantine entry {entry.id}")
        self.entry = entry


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
        """Seal received bytes into the area and record why; returns (quarantine ID, sha256
        of the kept blob). Bytes already waiting in quarantine are counted on their entry.

        Quarantine is rare, so holding one refused object in memory to seal it
        is an accepted cost.
        """
        data = spooled.read_bytes()
        received = hashlib.sha256(data).hexdigest()
        released = self._released(received)
        if released is not None:
            raise AlreadyReleased(released)
        with self.index.reader() as r:
            waiting = r.quarantine.with_received(received, released=False)
        if waiting is not None:
            again = self._again(received, source, refused)
            if again is not None:
                return again
        blob = self.store.put_bytes(self.sealer.seal(data))
        return self._record(blob, source, refused, sealed=True, received=received), blob.sha256

    def keep_stored_blob(self, blob: BlobRef, source: Source, refused: Refused) -> int:
        """Quarantine bytes already in the blob store (refused inside the index
        transaction): the area keeps them too (a local store links them, copying nothing)."""
        again = self._again(blob.sha256, source, refused)
        if again is not None:
            return again[0]
        self.store.copy_from(self.blobs, blob.sha256)
        return self._record(blob, source, refused, sealed=False, received=blob.sha256)

    def _released(self, received: str) -> QuarantineRow | None:
        """The released entry these exact received bytes were once kept under, if any:
        a resend of what a person let in is already stored, not refused again."""
        with self.index.reader() as r:
            return r.quarantine.with_received(received, released=True)

    def _again(self, received: str, source: Source,
               refused: Refused) -> tuple[int, str] | None:
        """Count a resend on the waiting entry of these bytes (None: there is none)."""
        with self.index.transaction() as tx:
            entry = tx.quarantine.with_received(received, released=False)
            if entry is None:
                return None
            times = tx.quarantine.seen_again(entry.id, utc_now())
            event = self.audit.append(
                tx, "instance.quarantined-again", source.actor,
                {"quarantine_id": entry.id, "sha256": entry.sha256, "times_received": times,
                 "status": refused.status_code, "sop_instance_uid": refused.sop_instance_uid},
                outcome="minor-failure")
        self.audit.committed(event)
        return entry.id, entry.sha256

    def _record(self, blob: BlobRef, source: Source, refused: Refused, *, sealed: bool,
                received: str) -> int:
        with self.index.transaction() as tx:
            qid = tx.quarantine.insert(refused.row(blob, source, area="quarantine",
                                                   sealed=sealed, received_at=utc_now(),
                                                   received_sha256=received))
            entry = self.audit.append(
                tx, "instance.quarantined", source.actor,
                {"quarantine_id": qid, "sha256": blob.sha256, "status": refused.status_code,
                 "sop_instance_uid": refused.sop_instance_uid,
                 "rules": sorted({f.rule for f in refused.findings})},
                outcome="minor-failure",
            )
        self.audit.committed(entry)
        return qid

    def mark_released(self, tx: Transaction, override: Override,
                      sop_instance_uid: str) -> AuditEntry:
        """Inside the release's index transaction: stamp the row and audit the override."""
        tx.quarantine.mark_released(override.quarantine_id, utc_now(), override.actor.user,
                                    override.reason)
        return self.audit.append(tx, "quarantine.released", override.actor,
                                 {"quarantine_id": override.quarantine_id,
                                  "sop_instance_uid": sop_instance_uid,
                                  "reason": override.reason})


class QuarantineService:
    """``lamina quarantine list | show | release | export``."""

    def __init__(self, area: QuarantineArea) -> None:
        self.area = area

    def list(self, include_released: bool = False) -> list[QuarantineEntry]:
        with self.area.index.reader() as r:
            return r.quarantine.list(include_released)

    def show(self, quarantine_id: int) -> QuarantineEntry:
        with self.area.index.reader() as r:
            entry = r.quarantine.get(quarantine_id)
        if entry is None:
            raise QuarantineError(f"no quarantine entry {quarantine_id}")
        return entry

    def store_of(self, entry: QuarantineEntry) -> BlobStore:
        """Where the entry's bytes are: the quarantine area, or (rows refused after their
        route, and rows from before the area existed) the blob store."""
        return self.area.store if entry.area == "quarantine" else self.area.blobs

    def bytes_of(self, entry: QuarantineEntry) -> bytes:
        """The object as received: unsealed when it was kept sealed."""
        data = self.store_of(entry).read(entry.sha256)
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
                ingest: Ingest) -> StoreResult:
        """Re-run the pipeline on the kept bytes with an audited override."""
        if not reason.strip():
            raise QuarantineError("a release needs a reason")
        entry = self.show(quarantine_id)
        if entry.released_at:
            raise QuarantineError(f"quarantine entry {quarantine_id} was already released"
                                  f" at {entry.released_at} by {entry.released_by}")
        source = Source(entry.calling_ae, entry.address, entry.association_id, entry.route)
        return ingest.ingest_bytes(self.bytes_of(entry), source,
                                   Override(quarantine_id, reason.strip(), actor))
