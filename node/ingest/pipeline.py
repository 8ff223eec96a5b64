"""The one ingest service: every received object (C-STORE now, STOW-RS later) goes through it.

Order of work, chosen so that success is never answered before durability:

1. refuse early if the disk is nearly full (0xA700);
2. parse the header only (the pixels stay on disk, their length is read from
   the element offsets);
3. validate (``node.ingest.validate``): findings whose rule is set to
   ``reject`` send the bytes to quarantine and the sender gets 0xA900;
4. apply the peer's route (:mod:`node.ingest.routes`): de-identify, or move an
   annotation onto the pseudonymous study; the received bytes are never stored;
5. promote the bytes to store into the blob store (hash, fsync, rename, fsync dir);
6. one short index transaction: the patient/study agreement check (on the
   pseudonyms, which are deterministic), then new instance (with its geometry,
   findings, re-identification entries and de-identification evidence, and the
   series back to ``receiving``), identical resend, or conflict, with its audit
   event in the same transaction;
7. advance the signed audit head, then answer.

An object that cannot be parsed or must not be stored is still kept: its bytes
go to the quarantine area, sealed under the project key because what a peer
sent may carry PHI, and a quarantine row says why (nothing is lost); the sender
gets 0xC000 or 0xA900. A release from quarantine re-runs this pipeline with an
:class:`Override`.
"""

from __future__ import annotations

import copy
import logging
import shutil
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from pydicom import dcmread
from pydicom.dataset import Dataset

from node import status
from node.anonymize.anonymizer import BurnedInTextRisk, DeidentificationError
from node.audit.trail import Actor, AuditTrail, utc_now
from node.checks.geometry import InstanceGeometry
from node.ingest.quarantine import Override, QuarantineArea, Refused
from node.ingest.routes import Prepared, Router
from node.ingest.rules import REJECT
from node.ingest.validate import Finding, Received, Validator, patient_conflict, read_received
from node.status import Outcome
from node.storage import checks, records
from node.storage.blobs import BlobRef, BlobStore, OutOfSpace
from node.storage.index import Index, IndexUnavailable
from node.storage.records import InstanceRecord, Receipt

if TYPE_CHECKING:
    from node.annotations.service import AnnotationService

log = logging.getLogger("lamina.ingest")

#: Elements larger than this are read from the spool file only when written out.
DEFER_SIZE = 1 << 20
_PIXEL_DATA = 0x7FE00010


@dataclass(frozen=True)
class Source:
    """Who sent an object: the association's peer (or an HTTP client later)."""

    calling_ae: str
    address: str
    association_id: str
    route: str = "clinical"

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
    quarantine_id: int | None = None
    warnings: tuple[Finding, ...] = ()


class _RefusedInTransaction(Exception):
    """Raised inside the index transaction to roll it back and quarantine instead."""

    def __init__(self, finding: Finding) -> None:
        super().__init__(finding.message)
        self.finding = finding


class IngestService:
    """Turns a spooled file into a stored, indexed, audited instance (or a clear refusal)."""

    def __init__(self, blobs: BlobStore, index: Index, audit: AuditTrail,
                 quarantine: QuarantineArea, router: Router,
                 validator: Validator | None = None,
                 annotations: AnnotationService | None = None) -> None:
        self.blobs = blobs
        self.index = index
        self.audit = audit
        self.quarantine = quarantine
        self.router = router
        self.validator = validator
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

    def ingest_file(self, spooled: Path, source: Source,
                    override: Override | None = None) -> StoreResult:
        """Ingest a DICOM file (preamble + meta + dataset) in the spool area.

        The file is moved into the blob store (or the quarantine area) when its
        bytes are new; otherwise it is left for the caller to delete. With an
        ``override`` (a release from quarantine) rejecting findings are
        recorded instead of refused.
        """
        try:
            self.blobs.ensure_space()
        except OutOfSpace as exc:
            return self._failed(source, f"out of disk space: {exc}", "")

        try:
            received = read_received(spooled)
            transfer_syntax = str(received.dataset.file_meta.get("TransferSyntaxUID", ""))
        except Exception as exc:
            reason = f"cannot parse: {_plain(exc)}"
            if override is not None:
                return StoreResult(Outcome(status.CANNOT_UNDERSTAND, reason), "failed")
            return self._quarantine(spooled, source, Refused(
                status.CANNOT_UNDERSTAND.code,
                (Finding("parse", reason, detail=f"{type(exc).__name__}: {str(exc)[:300]}"),)))

        findings = self.validator.check(received) if self.validator else []
        rejecting = [f for f in findings if self._action(f) == REJECT]
        if rejecting and override is None:
            return self._quarantine(spooled, source, self._refused(
                received, transfer_syntax, self._ordered(findings), source.route))
        try:
            InstanceRecord.from_dataset(received.dataset)
        except ValueError as exc:  # a key UID is missing although its rule only warns
            return self._quarantine(spooled, source, self._refused(
                received, transfer_syntax,
                self._ordered([Finding("type1_missing", _plain(exc)), *findings]), source.route))

        try:
            # The whole object now; values over DEFER_SIZE (pixels) stay on disk
            # until the prepared dataset is written out.
            whole = dcmread(spooled, defer_size=DEFER_SIZE)
            prepared = self.router.prepare(whole, source.route)
            rec = InstanceRecord.from_dataset(prepared.dataset)
        except (BurnedInTextRisk, DeidentificationError) as exc:
            rule = "burned_in_text" if isinstance(exc, BurnedInTextRisk) else "deidentify"
            words = "burned-in text risk" if rule == "burned_in_text" else "cannot de-identify"
            return self._quarantine(spooled, source, self._refused(
                received, transfer_syntax, [Finding(rule, f"{words}: {exc}"[:64],
                                                    detail=str(exc))], source.route))

        try:
            blob = self._promote(spooled, prepared, _raw_pixel_tail(received, whole, prepared))
        except OSError as exc:
            return self._failed(source, f"cannot write to disk: {exc.strerror or exc}",
                                rec.sop_instance_uid)

        receipt = Receipt(blob.sha256, blob.size, transfer_syntax, source.calling_ae,
                          source.association_id, utc_now())
        geometry = InstanceGeometry.from_dataset(prepared.dataset)
        try:
            # A SEG, or an overlay copy of a stored slice: an annotation, not a conflict.
            if self.annotations and (kind := self.annotations.classify(prepared.dataset,
                                                                       blob.sha256)):
                # A new SEG instance keeps what its route learnt, as any instance does.
                record = partial(self.router.record, prepared=prepared,
                                 sop_instance_uid=rec.sop_instance_uid,
                                 study_instance_uid=rec.study_instance_uid)
                return self.annotations.ingest(kind, prepared.dataset, blob, receipt, source,
                                               record)
            return self._index(rec, receipt, blob, source, geometry, findings, override,
                               prepared)
        except _RefusedInTransaction as refused:
            # The stored blob is the de-identified object: no PHI, kept as it is.
            return self._quarantine_stored(blob, source, self._refused(
                prepared.dataset, transfer_syntax, self._ordered([refused.finding, *findings]),
                "annotator"))
        except IndexUnavailable as exc:
            # The blob stays in the store unreferenced (fsck reports it); nothing
            # is half-indexed because the transaction rolled back.
            return self._failed(source, f"index unavailable: {exc}", rec.sop_instance_uid)

    def _promote(self, spooled: Path, prepared: Prepared, pixel_tail: int | None) -> BlobRef:
        """Into the blob store: the received file itself when nothing changed it,
        else the prepared dataset written to a new spool file.

        When the route left the pixel data untouched and it ends the received
        file (``pixel_tail`` is where its element starts), only the header is
        encoded and the pixel element's bytes are copied after it: the same bytes
        pydicom would write, without reading the pixels into memory to write them.
        """
        if prepared.as_received:
            return self.blobs.promote(spooled)
        to_store = self.blobs.new_spool_file()
        try:
            if pixel_tail is None:
                prepared.dataset.save_as(to_store, enforce_file_format=True)
            else:
                header = copy.copy(prepared.dataset)  # shallow: the elements are shared
                del header[_PIXEL_DATA]
                header.save_as(to_store, enforce_file_format=True)
                with open(spooled, "rb") as src, open(to_store, "ab") as dst:
                    src.seek(pixel_tail)
                    shutil.copyfileobj(src, dst, 1 << 20)
            return self.blobs.promote(to_store)
        finally:
            to_store.unlink(missing_ok=True)

    def _action(self, finding: Finding) -> str:
        return self.validator.settings.action(finding.rule) if self.validator else REJECT

    def _ordered(self, findings: list[Finding]) -> list[Finding]:
        """Rejecting before warning, Type 2 absences after structural errors: the first
        finding is the one the sender reads in the ErrorComment."""
        return sorted(findings, key=lambda f: (self._action(f) != REJECT,
                                               f.rule == "type2_missing"))

    def _index(
        self, rec: InstanceRecord, receipt: Receipt, blob: BlobRef, source: Source,
        geometry: InstanceGeometry, findings: list[Finding], override: Override | None,
        prepared: Prepared,
    ) -> StoreResult:
        obj = {"sop_instance_uid": rec.sop_instance_uid, "sop_class_uid": rec.sop_class_uid,
               "study_instance_uid": rec.study_instance_uid,
               "series_instance_uid": rec.series_instance_uid, "sha256": blob.sha256}
        with self.index.write() as conn:
            if self.validator is not None:
                # Checked under the write lock, so two senders cannot race a study
                # in under two patients.
                conflict = patient_conflict(checks.patient_of_study(conn, rec.study_instance_uid),
                                            rec.patient_id, rec.issuer_of_patient_id)
                if conflict is not None:
                    if self._action(conflict) == REJECT and override is None:
                        raise _RefusedInTransaction(conflict)
                    findings = [*findings, conflict]
            if findings:
                obj["findings"] = sorted({f.rule for f in findings})
            stored_sha = records.stored_blob_of(conn, rec.sop_instance_uid)
            if stored_sha is None:
                instance_fk = records.insert_instance(conn, rec, receipt)
                self.router.record(conn, prepared, rec.sop_instance_uid, rec.study_instance_uid)
                checks.insert_instance_geometry(conn, instance_fk, geometry)
                checks.insert_instance_findings(conn, instance_fk,
                                                [(f, self._action(f)) for f in findings])
                checks.mark_receiving(conn, rec.series_instance_uid, time.time())
                entry = self.audit.append(conn, "instance.stored", source.actor, obj)
                result = StoreResult(Outcome(status.SUCCESS), "stored",
                                     rec.sop_instance_uid, blob.sha256, warnings=tuple(findings))
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
            if override is not None and result.outcome.status.is_success:
                self.quarantine.mark_released(conn, override, rec.sop_instance_uid)
        self.audit.committed(entry)
        return result

    def _quarantine(self, spooled: Path, source: Source, refused: Refused) -> StoreResult:
        try:
            qid, sha256 = self.quarantine.keep(spooled, source, refused)
        except (OSError, IndexUnavailable) as exc:
            return self._failed(source, f"cannot quarantine: {_plain(exc)}",
                                refused.sop_instance_uid)
        return self._quarantined(refused, qid, sha256)

    def _quarantine_stored(self, blob: BlobRef, source: Source, refused: Refused) -> StoreResult:
        try:
            qid = self.quarantine.keep_stored_blob(blob, source, refused)
        except (OSError, IndexUnavailable) as exc:
            return self._failed(source, f"cannot quarantine: {_plain(exc)}",
                                refused.sop_instance_uid)
        return self._quarantined(refused, qid, blob.sha256)

    def _refused(self, received: Received | Dataset, transfer_syntax: str,
                 findings: list[Finding], route: str) -> Refused:
        """The quarantine record of a parsed but refused instance (findings ordered:
        reason first). Its UIDs are the pseudonyms the clinical route would give them:
        original UIDs identify, and the row is not sealed like the bytes are."""
        ds = received.dataset if isinstance(received, Received) else received
        sop_class, instance, series = (
            _uid(ds, k) for k in ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID"))
        if route == "clinical":
            instance, series = (self.router.key.uid(u) if u else "" for u in (instance, series))
        return Refused(status.DOES_NOT_MATCH_SOP_CLASS.code, tuple(findings), transfer_syntax,
                       sop_class, instance, series)

    @staticmethod
    def _quarantined(refused: Refused, qid: int, sha256: str) -> StoreResult:
        code = (status.CANNOT_UNDERSTAND if refused.status_code == status.CANNOT_UNDERSTAND.code
                else status.DOES_NOT_MATCH_SOP_CLASS)
        return StoreResult(Outcome(code, refused.reason), "quarantined",
                           refused.sop_instance_uid, sha256, quarantine_id=qid)

    def _failed(self, source: Source, reason: str, sop_instance_uid: str) -> StoreResult:
        """Out of resources: audit it if the index still takes writes, and say why."""
        try:
            self.audit.record("instance.store-failed", source.actor,
                              {"sop_instance_uid": sop_instance_uid, "reason": reason},
                              outcome="serious-failure")
        except (IndexUnavailable, OSError):
            log.error("audit write failed while reporting a store failure")
        return StoreResult(Outcome(status.OUT_OF_RESOURCES, reason), "failed", sop_instance_uid)




def _raw_pixel_tail(received: Received, whole: Dataset, prepared: Prepared) -> int | None:
    """Where the received pixel element starts, when it can be copied as bytes: native
    pixel data that ends the file, kept by the route as the very same element, last
    in both datasets, in an unchanged transfer syntax."""
    pixel = received.pixels
    if (pixel is None or pixel.tag != _PIXEL_DATA or pixel.start < 0
            or pixel.length != pixel.available):
        return None
    out = prepared.dataset
    if (_PIXEL_DATA not in out or out.get_item(_PIXEL_DATA) is not whole.get_item(_PIXEL_DATA)
            or max(out.keys()) != _PIXEL_DATA or max(whole.keys()) != _PIXEL_DATA):
        return None
    same_syntax = (out.file_meta.get("TransferSyntaxUID")
                   == whole.file_meta.get("TransferSyntaxUID"))
    return pixel.start if same_syntax else None


def _uid(ds, keyword: str) -> str:
    try:
        return str(ds.get(keyword, "") or "")[:64]
    except Exception:
        return ""


def _plain(exc: BaseException) -> str:
    """An exception as one short line without received values beyond its type's words."""
    if isinstance(exc, RecursionError):
        return "sequences nested too deeply"
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:120]
