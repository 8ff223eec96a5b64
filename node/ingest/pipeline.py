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
6. ask the hooks (:mod:`node.ingest.types`) whether one of them claims the
   object (a SEG, an overlay copy of a stored slice); a claimed new object must
   pass the claim's checks (an annotation's references) or is quarantined;
7. one short index transaction: the patient/study agreement check (on the
   pseudonyms, which are deterministic), then the one store decision (new,
   identical resend, or conflict: :meth:`IngestService._decide`), the new
   instance with its geometry, findings, re-identification entries and
   de-identification evidence, every hook's ``on_stored``, and the audit event;
8. advance the signed audit head, answer, and hand the hooks' ``after_commit``
   work to the context's worker.

An object that cannot be parsed or must not be stored is still kept: its bytes
go to the quarantine area, sealed under the project key because what a peer
sent may carry PHI, and a quarantine row says why (nothing is lost); the sender
gets 0xC000 or 0xA900. A release from quarantine re-runs this pipeline with an
:class:`~node.ingest.types.Override`. A peer without the ``store`` service is
refused here (0x0124), so every way in refuses it the same way.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset

from node import status
from node.anonymize.anonymizer import BurnedInTextRisk, DeidentificationError
from node.audit.trail import AuditEntry, AuditTrail, utc_now
from node.ingest.quarantine import AlreadyReleased, QuarantineArea, QuarantineEntry, Refused
from node.ingest.routes import Prepared, Router
from node.ingest.rules import REJECT
from node.ingest.types import (
    Claim,
    Incoming,
    IngestHook,
    Override,
    Refusal,
    Source,
    Stored,
    StoreResult,
)
from node.ingest.validate import (
    DEFAULT_LIMITS,
    Finding,
    ReadLimits,
    Received,
    TooLarge,
    Validator,
    patient_conflict,
    read_received,
    with_deferred_pixels,
)
from node.part10 import HeaderEncoder
from node.status import Outcome
from node.storage.interface import (
    BlobRef,
    BlobStore,
    Index,
    IndexUnavailable,
    LocalBlobFiles,
    OutOfSpace,
    Reader,
    Transaction,
)
from node.storage.records import FindingRow, InstanceGeometry, InstanceRecord, Receipt

log = logging.getLogger("lamina.ingest")

#: Elements larger than this are read from the spool file only when written out.
DEFER_SIZE = 1 << 20
_PIXEL_DATA = 0x7FE00010
#: What runs a hook's after-commit work: the context's worker (or, for a context
#: that was not started, the calling thread).
Defer = Callable[[Callable[[], None]], None]


class _RefusedInTransaction(Exception):
    """Raised inside the index transaction to roll it back and quarantine instead."""

    def __init__(self, finding: Finding) -> None:
        super().__init__(finding.message)
        self.finding = finding


#: Files up to this size are ingested one at a time in a process (``IngestService._turn``).
#: Two ingests in one process only take turns on the GIL, and hand it over at every system
#: call either makes (a read, a write, an fsync, each SQLite statement), which costs the
#: thread that then waits for it back. With 4 senders on 2 workers (two associations per
#: process) a CT slice cost 0.3-0.8 ms more CPU than with one association per worker;
#: taking turns whole, the clinical route received a median 6 % more (11 paired runs,
#: 9 not worse; issue 15). A larger object (a multi-frame) takes no turn,
#: so that none holds the others up for longer than a slice's ingest. The same bound as
#: a memory spool's (``node.dimse.spool.MEMORY_LIMIT``): what a receiver holds in memory.
TURN_BYTES = 16 << 20


class IngestService:
    """Turns a received file into a stored, indexed, audited object (or a clear refusal)."""

    def __init__(self, blobs: BlobStore, index: Index, audit: AuditTrail,
                 quarantine: QuarantineArea, router: Router, spool_dir: Path,
                 validator: Validator | None = None, hooks: tuple[IngestHook, ...] = (),
                 defer: Defer = lambda job: job(),
                 limits: ReadLimits = DEFAULT_LIMITS) -> None:
        self.limits = limits
        self.blobs = blobs
        self.index = index
        self.audit = audit
        self.quarantine = quarantine
        self.router = router
        self.spool_dir = spool_dir
        self.validator = validator
        self.hooks = hooks
        self.defer = defer
        self.encoder = HeaderEncoder()
        #: Held by the ingest of a file up to ``turn_bytes`` (:data:`TURN_BYTES`).
        self._turn = threading.Lock()
        self.turn_bytes = TURN_BYTES
        #: Blobs are local files, which deferred values can be read from (checked once:
        #: a runtime protocol check inspects the object each time).
        self._local_blobs = isinstance(blobs, LocalBlobFiles)

    def ingest_bytes(self, data: bytes, source: Source,
                     override: Override | None = None) -> StoreResult:
        """Spool ``data`` (a DICOM file with meta) and ingest it."""
        fd, name = tempfile.mkstemp(dir=self.spool_dir, suffix=".part")
        spooled = Path(name)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            return self.ingest_file(spooled, source, override)
        finally:
            spooled.unlink(missing_ok=True)

    def ingest_file(self, spooled: Path, source: Source, override: Override | None = None,
                    hashed: tuple[str, int] | None = None) -> StoreResult:
        """Ingest a DICOM file (preamble + meta + dataset), e.g. pynetdicom's spooled C-STORE.

        The file may be moved into the blob store when its bytes are stored as
        received; the caller deletes it (if still there) afterwards. With an
        ``override`` (a release from quarantine) rejecting findings are
        recorded instead of refused. Files up to :attr:`turn_bytes` take their turn
        (:data:`TURN_BYTES`). ``hashed``: the file's SHA-256 and size, when its writer
        took them (a C-STORE spooled to the folder); a file stored as received is then
        named without being read again.
        """
        try:
            takes_turn = os.path.getsize(spooled) <= self.turn_bytes
        except OSError:  # gone: the ingest says why
            takes_turn = False
        if not takes_turn:
            return self._ingest(spooled, source, override, hashed)
        with self._turn:
            return self._ingest(spooled, source, override, hashed)

    def _ingest(self, spooled: Path, source: Source, override: Override | None,
                hashed: tuple[str, int] | None) -> StoreResult:
        if not source.may_store:
            return StoreResult(Outcome(status.NOT_AUTHORISED, "this peer may not store"),
                               "failed")
        try:
            self.blobs.ensure_space()
        except OutOfSpace as exc:
            return self._failed(source, f"out of disk space: {exc}", "")

        if self.router.stores_as_received(source.route):
            # Stored as received unless refused: its pages start for the disk while the
            # header is parsed and checked (on the deidentified route the fsyncs then took
            # 0.67-0.74 ms of wall time per CT slice instead of 1.36-2.32 ms: issue 15).
            self.blobs.expect_file(spooled)
        try:
            received = read_received(spooled, self.limits)
            transfer_syntax = str(received.dataset.file_meta.get("TransferSyntaxUID", ""))
        except TooLarge as exc:
            return self._too_large(source, str(exc))
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
            InstanceRecord.check_keys(received.dataset)
        except ValueError as exc:  # a key UID is missing although its rule only warns
            return self._quarantine(spooled, source, self._refused(
                received, transfer_syntax,
                self._ordered([Finding("type1_missing", _plain(exc)), *findings]), source.route))

        try:
            # The whole object: the parsed header with its pixel element deferred
            # when that can be done without parsing again, else the file parsed
            # whole, values over DEFER_SIZE (pixels) left on disk until written out.
            whole = (with_deferred_pixels(received, self._defer_size(source.route))
                     or dcmread(spooled, defer_size=DEFER_SIZE))
            prepared = self.router.prepare(whole, source.route)
            rec = InstanceRecord.from_dataset(prepared.dataset)
        except (BurnedInTextRisk, DeidentificationError) as exc:
            rule = "burned_in_text" if isinstance(exc, BurnedInTextRisk) else "deidentify"
            words = "burned-in text risk" if rule == "burned_in_text" else "cannot de-identify"
            return self._quarantine(spooled, source, self._refused(
                received, transfer_syntax, [Finding(rule, f"{words}: {exc}"[:64],
                                                    detail=str(exc))], source.route))

        try:
            blob = self._promote(spooled, prepared, _raw_pixel_tail(received, whole, prepared),
                                 hashed)
        except OSError as exc:
            return self._failed(source, f"cannot write to disk: {exc.strerror or exc}",
                                rec.sop_instance_uid)

        receipt = Receipt(blob.sha256, blob.size, transfer_syntax, source.calling_ae,
                          source.association_id, utc_now())
        incoming = Incoming(prepared.dataset, rec, blob, receipt, source)
        try:
            claim = self._classify(incoming)
            if claim is not None:
                refusal = self._admit(claim, incoming)
                if refusal is not None:
                    return self._refuse_claimed(incoming, claim, refusal)
            return self._commit(incoming, claim, prepared, findings, override)
        except _RefusedInTransaction as refused:
            # The stored blob is the de-identified object: no PHI, kept as it is.
            return self._quarantine_stored(blob, source, self._refused(
                prepared.dataset, transfer_syntax, self._ordered([refused.finding, *findings]),
                "annotator"))
        except IndexUnavailable as exc:
            # The blob stays in the store unreferenced (fsck reports it); nothing
            # is half-indexed because the transaction rolled back.
            return self._failed(source, f"index unavailable: {exc}", rec.sop_instance_uid)

    def _defer_size(self, route: str) -> int:
        """Pixel values larger than this stay in the spool file until a step reads them.

        On the clinical route every pixel value stays there: the engine reads it only
        to mask burned-in text, and the stored object gets its pixel bytes copied from
        the spool file (or written by pydicom, reading them there). On the
        deidentified route the received file is stored as it is, and
        :meth:`_promote` points the dataset at the blob, so a hook that asks for the
        pixels reads them there. Reading half a megabyte into memory first would be
        for nothing. The annotator route builds a new dataset from the received one
        before it is stored, and a blob store without local files has no blob to
        point at: values up to DEFER_SIZE are read while the spool file is there.
        """
        if route == "annotator" or (route == "deidentified" and not self._local_blobs):
            return DEFER_SIZE
        return 0

    # --- the store decision, written once -------------------------------------

    @staticmethod
    def _decide(reader: Reader, incoming: Incoming, claim: Claim | None) -> str:
        """``new``, ``resend`` (these exact bytes are already taken in) or ``conflict``
        (other bytes under an indexed SOP Instance UID, kept apart, never overwriting)."""
        if claim is not None and not claim.as_instance:
            return "resend" if claim.already_taken(reader) else "new"
        stored = reader.instances.blob_of(incoming.record.sop_instance_uid)
        if stored is None:
            return "new"
        return "resend" if stored == incoming.blob.sha256 else "conflict"

    def _classify(self, incoming: Incoming) -> Claim | None:
        for hook in self.hooks:
            claim = hook.classify(incoming)
            if claim is not None:
                return claim
        return None

    def _admit(self, claim: Claim, incoming: Incoming) -> Refusal | None:
        """A claim's checks run only for bytes not yet taken in: a resend is answered
        from the index, without decoding the object again."""
        with self.index.reader() as reader:
            if self._decide(reader, incoming, claim) == "resend":
                return None
        return claim.admit()

    def _commit(self, incoming: Incoming, claim: Claim | None, prepared: Prepared,
                findings: list[Finding], override: Override | None) -> StoreResult:
        rec, blob, source = incoming.record, incoming.blob, incoming.source
        obj = {"sop_instance_uid": rec.sop_instance_uid, "sop_class_uid": rec.sop_class_uid,
               "study_instance_uid": rec.study_instance_uid,
               "series_instance_uid": rec.series_instance_uid, "sha256": blob.sha256}
        stored: Stored | None = None
        entries: list[AuditEntry | None] = []
        with self.index.transaction() as tx:
            indexed = claim is None or claim.as_instance
            if indexed and self.validator is not None:
                # Checked under the write lock, so two senders cannot race a study
                # in under two patients.
                conflict = patient_conflict(
                    tx.instances.patient_of_study(rec.study_instance_uid),
                    rec.patient_id, rec.issuer_of_patient_id)
                if conflict is not None:
                    if self._action(conflict) == REJECT and override is None:
                        raise _RefusedInTransaction(conflict)
                    findings = [*findings, conflict]
            if findings:
                obj["findings"] = sorted({f.rule for f in findings})
            decision = self._decide(tx, incoming, claim)
            if decision == "conflict":
                stored_sha = tx.instances.blob_of(rec.sop_instance_uid) or ""
                conflict_id = tx.instances.insert_conflict(rec, incoming.receipt, stored_sha)
                entries.append(self.audit.append(
                    tx, "instance.conflict", source.actor,
                    {**obj, "stored_sha256": stored_sha, "conflict_id": conflict_id},
                    outcome="minor-failure"))
                result = StoreResult(
                    Outcome(status.DUPLICATE_SOP_INSTANCE,
                            f"UID already stored with other bytes; kept as conflict {conflict_id}"),
                    "conflict", rec.sop_instance_uid, blob.sha256)
            elif decision == "resend":
                entries.append(self.audit.append(
                    tx, "instance.resend" if claim is None else "annotation.resend",
                    source.actor, obj))
                result = StoreResult(Outcome(status.SUCCESS),
                                     "resend" if claim is None else "annotation-resend",
                                     rec.sop_instance_uid, blob.sha256)
            else:
                stored = Stored(incoming, claim, self._index(tx, incoming, prepared, findings)
                                if indexed else None)
                entries += [hook.on_stored(tx, stored) for hook in self.hooks]
                if indexed:
                    entries.append(self.audit.append(tx, "instance.stored", source.actor, obj))
                result = StoreResult(Outcome(status.SUCCESS),
                                     "stored" if claim is None else "annotation",
                                     rec.sop_instance_uid, blob.sha256,
                                     warnings=tuple(findings))
            if override is not None and result.outcome.status.is_success:
                entries.append(self.quarantine.mark_released(tx, override,
                                                             rec.sop_instance_uid))
        self._committed(entries)
        if stored is not None:
            self._after_commit(stored)
        return result

    def _index(self, tx: Transaction, incoming: Incoming, prepared: Prepared,
               findings: list[Finding]) -> int:
        """A new instance's rows: the instance, what its route learnt, geometry, findings."""
        rec = incoming.record
        instance_id = tx.instances.insert(rec, incoming.receipt)
        self.router.record(tx, prepared, rec.sop_instance_uid, rec.study_instance_uid)
        tx.instances.insert_geometry(instance_id, InstanceGeometry.from_dataset(incoming.dataset))
        tx.instances.insert_findings(
            instance_id, [FindingRow(f.rule, self._action(f), f.message, f.keyword, f.tag)
                          for f in findings], utc_now())
        return instance_id

    def _after_commit(self, stored: Stored) -> None:
        """The hooks' light work now (``right_after``), then one job on the context's
        worker running every hook's ``after_commit`` in turn (one failing hook does not
        stop the others), when some hook left a note in ``on_stored``: most instances
        have no work after their answer, and a handoff to another thread per instance
        would cost the receive path for nothing."""
        for job in stored.right_after:
            _logged(job, stored, "light after-commit work failed")
        if not stored.notes:
            return

        def run() -> None:
            for hook in self.hooks:
                _logged(lambda hook=hook: hook.after_commit(stored), stored,
                        "after-commit hook failed", hook=type(hook).__name__)

        self.defer(run)

    def _committed(self, entries: list[AuditEntry | None]) -> None:
        written = [e for e in entries if e is not None]
        if written:
            self.audit.committed(max(written, key=lambda e: e.seq))

    def _refuse_claimed(self, incoming: Incoming, claim: Claim,
                        refusal: Refusal) -> StoreResult:
        """Quarantine a claimed object its checks refused, answer 0xA900. The row says what
        was refused, by whom and why, like a validation refusal's; the (de-identified)
        bytes stay in the blob store, and the claim records the refusal beside the row."""
        code, dataset = status.DOES_NOT_MATCH_SOP_CLASS, incoming.dataset
        refused = Refused(code.code, (Finding(refusal.check, refusal.reason),),
                          incoming.receipt.transfer_syntax_uid, *(
                              _uid(dataset, k) for k in ("SOPClassUID", "SOPInstanceUID",
                                                          "SeriesInstanceUID")))
        with self.index.transaction() as tx:
            waiting = tx.quarantine.with_received(incoming.blob.sha256, released=False)
            if waiting is not None:  # the same refused bytes again: one entry, counted
                qid = waiting.id
                entry = self.audit.append(
                    tx, "instance.quarantined-again", incoming.source.actor,
                    {"quarantine_id": qid, "sha256": incoming.blob.sha256,
                     "times_received": tx.quarantine.seen_again(qid, utc_now()),
                     "status": code.code, "sop_instance_uid": refused.sop_instance_uid},
                    outcome="minor-failure")
            else:
                qid = tx.quarantine.insert(refused.row(
                    incoming.blob, incoming.source, area="blobs", sealed=False,
                    received_at=incoming.receipt.received_at,
                    received_sha256=incoming.blob.sha256))
                entry = claim.refused(tx, refusal, qid)
        self._committed([entry])
        log.info("claimed object refused", extra={"fields": {
            "kind": claim.kind, "check": refusal.check, "sha256": incoming.blob.sha256}})
        return StoreResult(Outcome(code, refusal.reason), "refused",
                           incoming.record.sop_instance_uid, incoming.blob.sha256,
                           quarantine_id=qid)

    # --- writing the blob -------------------------------------------------------

    def _promote(self, spooled: Path, prepared: Prepared, pixel_tail: int | None,
                 hashed: tuple[str, int] | None = None) -> BlobRef:
        """Into the blob store: the received file itself when nothing changed it,
        else the prepared dataset written through a blob writer.

        When the route left the pixel data untouched and it ends the received
        file (``pixel_tail`` is where its element starts), only the header is
        encoded (:mod:`node.part10`: dcmwrite's bytes, cheaper) and the pixel
        element's bytes are copied after it: the same bytes pydicom would write,
        without reading the pixels into memory to write them.
        """
        if prepared.as_received:
            ref = self.blobs.put_file(spooled, hashed)
            if self._local_blobs:
                # The spool file may have been moved into the store (and the caller
                # deletes it anyway): a value left on disk (the pixels) is read from the
                # blob, the same bytes at the same offsets; a copied blob has its own
                # modification time, which pydicom's deferred read need not check.
                prepared.dataset.filename = str(self.blobs.local_path(ref.sha256))
                prepared.dataset.timestamp = None
            return ref
        with self.blobs.writer() as out:
            if pixel_tail is None:
                prepared.dataset.save_as(out, enforce_file_format=True)
            else:
                out.write(self.encoder.encode(prepared.dataset, stop_before=_PIXEL_DATA))
                # The dataset handed on (hooks, index) has no pixel element: its value
                # is in the spool file, which the caller deletes.
                del prepared.dataset[_PIXEL_DATA]
                with open(spooled, "rb") as src:
                    src.seek(pixel_tail)
                    shutil.copyfileobj(src, out, 1 << 20)
        return out.ref

    # --- refusals -------------------------------------------------------------

    def _action(self, finding: Finding) -> str:
        return self.validator.settings.action(finding.rule) if self.validator else REJECT

    def _ordered(self, findings: list[Finding]) -> list[Finding]:
        """Rejecting before warning, Type 2 absences after structural errors: the first
        finding is the one the sender reads in the ErrorComment."""
        return sorted(findings, key=lambda f: (self._action(f) != REJECT,
                                               f.rule == "type2_missing"))

    def _quarantine(self, spooled: Path, source: Source, refused: Refused) -> StoreResult:
        """Keep refused bytes, unless a person released these exact bytes before: then
        they are stored already (the release stored them), and the answer says so.

        The released-resend lookup needs the hash of the received file, so it is made
        here, for objects about to be refused only: the answer is the one a lookup
        before validation would give, without hashing every received object."""
        try:
            try:
                qid, sha256 = self.quarantine.keep(spooled, source, refused)
            except AlreadyReleased as released:
                return self._released_resend(released.entry, source)
        except (OSError, IndexUnavailable) as exc:
            return self._failed(source, f"cannot quarantine: {_plain(exc)}",
                                refused.sop_instance_uid)
        return self._quarantined(refused, qid, sha256)

    def _released_resend(self, released: QuarantineEntry, source: Source) -> StoreResult:
        """An identical resend of bytes a person released: answered like any resend."""
        self.audit.record("instance.resend", source.actor, {
            "sop_instance_uid": released.sop_instance_uid, "released_quarantine_id": released.id,
            "received_sha256": released.received_sha256})
        return StoreResult(Outcome(status.SUCCESS), "resend", released.sop_instance_uid)

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

    def receive_failed(self, source: Source, reason: str) -> StoreResult:
        """The data set could not even be spooled (a full disk under the receiving
        library): 0xA700 with the reason, audited when the index still takes writes."""
        return self._failed(source, f"cannot spool the data set: {reason}", "")

    def _too_large(self, source: Source, reason: str) -> StoreResult:
        """A deflate bomb: refused and audited, its bytes not kept (quarantine would hold
        the whole file in memory to seal it, and there is nothing in it to release)."""
        self.audit.record("instance.refused", source.actor, {"reason": reason},
                          outcome="serious-failure")
        return StoreResult(Outcome(status.CANNOT_UNDERSTAND, reason), "failed")

    def _failed(self, source: Source, reason: str, sop_instance_uid: str) -> StoreResult:
        """Out of resources: audit it if the index still takes writes, and say why."""
        try:
            self.audit.record("instance.store-failed", source.actor,
                              {"sop_instance_uid": sop_instance_uid, "reason": reason},
                              outcome="serious-failure")
        except (IndexUnavailable, OSError):
            log.error("audit write failed while reporting a store failure")
        return StoreResult(Outcome(status.OUT_OF_RESOURCES, reason), "failed", sop_instance_uid)


def _logged(job: Callable[[], None], stored: Stored, message: str, **fields: str) -> None:
    """Run work whose failure must not change a committed store's answer; log it."""
    try:
        job()
    except Exception:
        log.exception(message, extra={"fields": {
            **fields, "sha256": stored.incoming.blob.sha256}})


def _raw_pixel_tail(received: Received, whole: Dataset, prepared: Prepared) -> int | None:
    """Where the received pixel element starts, when it can be copied as bytes: native
    pixel data that ends the file, kept by the route as the very same element, last
    in both datasets, in an unchanged transfer syntax."""
    pixel = received.pixels
    if (pixel is None or pixel.tag != _PIXEL_DATA or pixel.start < 0
            or pixel.length != pixel.available):
        return None
    out = prepared.dataset
    # keep_deferred: comparing the elements must not read a deferred value (the pixels)
    if (_PIXEL_DATA not in out
            or out.get_item(_PIXEL_DATA, keep_deferred=True)
            is not whole.get_item(_PIXEL_DATA, keep_deferred=True)
            or _last_tag(out) != _PIXEL_DATA or _last_tag(whole) != _PIXEL_DATA):
        return None
    same_syntax = (out.file_meta.get("TransferSyntaxUID")
                   == whole.file_meta.get("TransferSyntaxUID"))
    return pixel.start if same_syntax else None


def _last_tag(ds: Dataset) -> int:
    """The highest tag, compared as plain ints (pydicom's tags compare in Python)."""
    return max(map(int, ds.keys()))


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
