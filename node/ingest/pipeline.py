"""The one ingest service: every received object (C-STORE now, STOW-RS later) goes through it.

Order of work, chosen so that success is never answered before durability:

1. refuse early if the disk is nearly full (0xA700);
2. parse the header only (the pixels stay on disk);
3. promote the spooled bytes into the blob store (hash, fsync, rename, fsync dir);
4. one short index transaction: new instance, identical resend, or conflict,
   with its audit event in the same transaction;
5. advance the signed audit head, then answer.

An object that cannot be parsed is still kept: its bytes go to the blob store
and a quarantine row says why (nothing is lost).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pydicom import dcmread
from pydicom.errors import InvalidDicomError

from node import status
from node.audit.trail import Actor, AuditTrail, utc_now
from node.status import Outcome
from node.storage import records
from node.storage.blobs import BlobRef, BlobStore, OutOfSpace
from node.storage.index import Index, IndexUnavailable
from node.storage.records import InstanceRecord, Receipt

if TYPE_CHECKING:
    from node.annotations.service import AnnotationService

log = logging.getLogger("lamina.ingest")


@dataclass(frozen=True)
class Source:
    """Who sent an object: the association's peer (or an HTTP client later)."""

    calling_ae: str
    address: str
    association_id: str

    @property
    def actor(self) -> Actor:
        return Actor(ae_title=self.calling_ae, address=self.address,
                     association_id=self.association_id)


@dataclass(frozen=True)
class StoreResult:
    """An outcome plus what the log line and tests need to know about it."""

    outcome: Outcome
    action: str  # stored | resend | conflict | quarantined | failed
    sop_instance_uid: str = ""
    sha256: str = ""


class IngestService:
    """Turns a spooled file into a stored, indexed, audited instance (or a clear refusal)."""

    def __init__(self, blobs: BlobStore, index: Index, audit: AuditTrail,
                 annotations: AnnotationService | None = None) -> None:
        self.blobs = blobs
        self.index = index
        self.audit = audit
        self.annotations = annotations

    def ingest_bytes(self, data: bytes, source: Source) -> StoreResult:
        """Spool ``data`` (a DICOM file with meta) and ingest it."""
        spooled = self.blobs.new_spool_file()
        try:
            with open(spooled, "wb") as f:
                f.write(data)
            return self.ingest_file(spooled, source)
        finally:
            spooled.unlink(missing_ok=True)

    def ingest_file(self, spooled: Path, source: Source) -> StoreResult:
        """Ingest a DICOM file (preamble + meta + dataset) in the spool area.

        The file is moved into the blob store when its bytes are new; otherwise
        it is left for the caller to delete.
        """
        try:
            self.blobs.ensure_space()
        except OutOfSpace as exc:
            return self._failed(source, f"out of disk space: {exc}", "")

        try:
            header = dcmread(spooled, stop_before_pixels=True)
            rec = InstanceRecord.from_dataset(header)
            transfer_syntax = str(header.file_meta.TransferSyntaxUID)
        except (InvalidDicomError, ValueError, AttributeError, EOFError, OSError) as exc:
            return self._quarantine(spooled, source, status.CANNOT_UNDERSTAND,
                                    f"cannot parse: {_plain(exc)}")

        try:
            blob = self.blobs.promote(spooled)
        except OSError as exc:
            return self._failed(source, f"cannot write to disk: {exc.strerror or exc}",
                                rec.sop_instance_uid)

        receipt = Receipt(blob.sha256, blob.size, transfer_syntax, source.calling_ae,
                          source.association_id, utc_now())
        try:
            # A SEG, or an overlay copy of a stored slice: an annotation, not a conflict.
            if self.annotations and (kind := self.annotations.classify(header, blob.sha256)):
                return self.annotations.ingest(kind, header, blob, receipt, source)
            return self._index(rec, receipt, blob, source)
        except IndexUnavailable as exc:
            # The blob stays in the store unreferenced (fsck reports it); nothing
            # is half-indexed because the transaction rolled back.
            return self._failed(source, f"index unavailable: {exc}", rec.sop_instance_uid)

    def _index(
        self, rec: InstanceRecord, receipt: Receipt, blob: BlobRef, source: Source
    ) -> StoreResult:
        obj = {"sop_instance_uid": rec.sop_instance_uid, "sop_class_uid": rec.sop_class_uid,
               "study_instance_uid": rec.study_instance_uid,
               "series_instance_uid": rec.series_instance_uid, "sha256": blob.sha256}
        with self.index.write() as conn:
            stored_sha = records.stored_blob_of(conn, rec.sop_instance_uid)
            if stored_sha is None:
                records.insert_instance(conn, rec, receipt)
                entry = self.audit.append(conn, "instance.stored", source.actor, obj)
                result = StoreResult(Outcome(status.SUCCESS), "stored",
                                     rec.sop_instance_uid, blob.sha256)
            elif stored_sha == blob.sha256:
                entry = self.audit.append(conn, "instance.resend", source.actor, obj)
                result = StoreResult(Outcome(status.SUCCESS), "resend",
                                     rec.sop_instance_uid, blob.sha256)
            else:
                conflict_id = records.insert_conflict(conn, rec, receipt, stored_sha)
                entry = self.audit.append(
                    conn, "instance.conflict", source.actor,
                    {**obj, "stored_sha256": stored_sha, "conflict_id": conflict_id},
                    outcome="minor-failure",
                )
                result = StoreResult(
                    Outcome(status.DUPLICATE_SOP_INSTANCE,
                            f"UID already stored with other bytes; kept as conflict {conflict_id}"),
                    "conflict", rec.sop_instance_uid, blob.sha256,
                )
        self.audit.committed(entry)
        return result

    def _quarantine(
        self, spooled: Path, source: Source, code: status.Status, reason: str
    ) -> StoreResult:
        try:
            blob = self.blobs.promote(spooled)
            receipt = Receipt(blob.sha256, blob.size, "", source.calling_ae,
                              source.association_id, utc_now())
            with self.index.write() as conn:
                qid = records.insert_quarantine(conn, receipt, reason, code.code)
                entry = self.audit.append(
                    conn, "instance.quarantined", source.actor,
                    {"sha256": blob.sha256, "quarantine_id": qid, "reason": reason},
                    outcome="minor-failure",
                )
        except (OSError, IndexUnavailable) as exc:
            return self._failed(source, f"cannot quarantine: {_plain(exc)}", "")
        self.audit.committed(entry)
        return StoreResult(Outcome(code, reason), "quarantined", "", blob.sha256)

    def _failed(self, source: Source, reason: str, sop_instance_uid: str) -> StoreResult:
        """Out of resources: audit it if the index still takes writes, and say why."""
        try:
            self.audit.record("instance.store-failed", source.actor,
                              {"sop_instance_uid": sop_instance_uid, "reason": reason},
                              outcome="serious-failure")
        except (IndexUnavailable, OSError):
            log.error("audit write failed while reporting a store failure")
        return StoreResult(Outcome(status.OUT_OF_RESOURCES, reason), "failed", sop_instance_uid)


def _plain(exc: BaseException) -> str:
    """An exception as one short line without received values beyond its type's words."""
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:120]
