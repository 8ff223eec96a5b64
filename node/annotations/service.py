"""The annotation intake service: the ingest pipeline hands it every annotation it receives.

Order of work for one object (a SEG, or one overlay copy of a stored slice):

1. read it and run the reference checks against the stored series; a failure
   refuses it (0xA900, ErrorComment naming the check and the slice) and
   quarantines it, with the refusal recorded on its annotation;
2. one short transaction stores it: a SEG also becomes an indexed instance
   of its own series (so it can be queried and retrieved); an overlay copy is
   only an annotation object (its SOP Instance UID belongs to the stored
   slice, which it never replaces); the annotation goes to ``received``;
3. the consistency checks run on the annotation's structures, outside any
   transaction, and a second transaction records the findings and moves the
   annotation to ``checked``, unless a newer object of the same annotation
   arrived meanwhile (that object's check will record instead).

Overlay copies arrive one slice per C-STORE; one annotator's copies of one
series form one annotation. Each copy is reference-checked and stored before
its answer; step 3 runs once the set has settled (no new copy for
``settle_seconds``: see :mod:`node.annotations.settle`), from ROI boxes kept
in the index, so no copy is re-read. A newer copy of a slice supersedes the
older one. A set left ``received`` by a crash is checked at the next start.
"""

from __future__ import annotations

import logging
import sqlite3
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

from pydicom import dcmread
from pydicom.dataset import Dataset

from node import status
from node.annotations import records
from node.annotations.grid import GridError, GridSource, SeriesGrid
from node.annotations.masks import Annotator, Mask, MaskBuilder, combined_provenance
from node.annotations.overlay import overlay_groups, plane_mask, read_planes
from node.annotations.records import RoiBox
from node.annotations.seg import SEG_SOP_CLASSES, SegFormatError, read_seg, seg_masks
from node.annotations.settle import SettleQueue
from node.audit.trail import Actor, AuditEntry, AuditTrail, utc_now
from node.checks.consistency import Finding, check_structures
from node.checks.protocol import Protocol
from node.checks.references import Refusal, check_overlay_copy, check_seg, seg_source_series
from node.ingest.pipeline import Source, StoreResult
from node.ingest.quarantine import Refused
from node.ingest.quarantine import insert_row as insert_quarantine_row
from node.ingest.validate import Finding as ValidationFinding
from node.status import Outcome
from node.storage import records as instance_records
from node.storage.blobs import BlobRef, BlobStore
from node.storage.index import Index, IndexUnavailable
from node.storage.records import InstanceRecord, Receipt

log = logging.getLogger("lamina.annotations")

SEG, OVERLAY = "seg", "overlay"

#: Writes what the route learnt about an object into the caller's index transaction.
Recorder = Callable[[sqlite3.Connection], None]


@dataclass(frozen=True)
class Claim:
    """What an object says it is, from its header: enough to file a refusal under."""

    kind: str
    key: str
    series_uid: str  # '' when a SEG names no single series
    annotator: Annotator
    sop_instance_uid: str
    sop_class_uid: str
    stored_uid: str = ""  # overlay copies: the stored slice they annotate
    stored_sha256: str = ""
    object_series_uid: str = ""  # the object's own SeriesInstanceUID (its quarantine row)


@dataclass
class Intake:
    """An object that passed its reference checks, ready to store and check."""

    claim: Claim
    grid: SeriesGrid
    slice_index: int | None = None
    masks: list[Mask] = field(default_factory=list)  # SEG: its segments
    rois: list[RoiBox] = field(default_factory=list)  # overlay copy: its planes


@dataclass(frozen=True)
class CheckReport:
    """The result of one check run, for the CLI."""

    annotation_id: int
    check_id: int | None  # None: a newer object arrived; its check is the current one
    findings: list[Finding]


class AnnotationService:
    """Classifies, takes in, checks and records annotations."""

    def __init__(self, index: Index, blobs: BlobStore, audit: AuditTrail, grids: GridSource,
                 protocol: Protocol, settle_seconds: float = 1.0) -> None:
        self.index = index
        self.blobs = blobs
        self.audit = audit
        self.grids = grids
        self.protocol = protocol
        self._settling = SettleQueue(self._check_settled, settle_seconds)

    # --- the pipeline's interface -------------------------------------------

    def classify(self, header: Dataset, sha256: str) -> str | None:
        """``seg``, ``overlay`` or None (an ordinary instance) for a parsed header.

        An image with overlay planes is an annotation when it is a copy of a
        stored slice (same SOP Instance UID, other bytes) or references one.
        """
        if str(header.SOPClassUID) in SEG_SOP_CLASSES:
            return SEG
        if not overlay_groups(header):
            return None
        with self.index.read() as conn:
            stored = self._annotated_instance(conn, header)
        if stored is None or stored[1] == sha256:
            return None  # not a copy of ours, or the stored slice itself resent
        return OVERLAY

    def ingest(self, kind: str, header: Dataset, blob: BlobRef, receipt: Receipt,
               source: Source, record: Recorder | None = None) -> StoreResult:
        """Take in one promoted annotation object; returns the C-STORE outcome.

        ``record`` writes what its route learnt (re-identification entries and
        de-identification evidence) inside the transaction that indexes a new SEG.
        """
        uid = str(header.SOPInstanceUID)
        with self.index.read() as conn:
            known = records.object_with_blob(conn, blob.sha256)
        if known is not None:
            self.audit.record("annotation.resend", source.actor,
                              {"annotation_id": known["annotation_id"], "sha256": blob.sha256})
            return StoreResult(Outcome(status.SUCCESS), "annotation-resend", uid, blob.sha256)
        claim = self._claim(kind, header, source)
        try:
            intake = self._intake(claim, blob.sha256)
        except Refusal as refusal:
            return self._refuse(claim, refusal, receipt, source)
        stored = self._store(intake, header, receipt, source, record)
        if isinstance(stored, StoreResult):
            return stored
        annotation_id, revision = stored
        if kind == SEG:
            try:
                self._check(annotation_id, revision, intake.grid, intake.masks, source.actor)
            except Exception as exc:  # the SEG is stored and durable: retry its check later
                log.error("annotation check deferred", extra={"fields": {
                    "annotation_id": annotation_id, "error": type(exc).__name__}})
                self._settling.touch(annotation_id, source.actor)
        else:
            self._settling.touch(annotation_id, source.actor)
        return StoreResult(Outcome(status.SUCCESS), "annotation", uid, blob.sha256)

    def flush(self) -> None:
        """Check every overlay set still settling, now (shutdown, tests)."""
        self._settling.flush()

    close = flush

    def check_received(self, actor: Actor) -> int:
        """Check every annotation left ``received`` (a crash between store and check).

        Returns how many were checked; one that cannot be is logged and stays
        ``received`` (``lamina annotations check ID`` says why), so the node still starts.
        """
        with self.index.read() as conn:
            ids = [r[0] for r in conn.execute("SELECT id FROM annotation WHERE state = 'received'")]
        checked = 0
        for annotation_id in ids:
            try:
                self.recheck(annotation_id, actor)
                checked += 1
            except (Refusal, LookupError, IndexUnavailable) as exc:
                log.error("received annotation not checked", extra={"fields": {
                    "annotation_id": annotation_id, "error": type(exc).__name__}})
        return checked

    # --- for the CLI and the bridges -----------------------------------------

    def masks_of(self, annotation_id: int) -> tuple[SeriesGrid, list[Mask]]:
        """The current masks of a stored annotation on its series' grid."""
        with self.index.read() as conn:
            row = records.get_annotation(conn, annotation_id)
            objects = records.current_objects(conn, annotation_id) if row else []
        if row is None or not objects:
            raise LookupError(f"annotation {annotation_id} has no accepted object")
        annotator = Annotator(row["annotator_ae"], row["annotator_address"],
                              row["annotator_person"])
        if row["kind"] == OVERLAY:
            grid = self._grid(row["source_series_uid"])
            return grid, self._set_masks(annotation_id, annotator, row["source_series_uid"])
        sha = objects[-1]["blob_sha256"]
        return self.masks_from_seg(dcmread(self.blobs.path_for(sha)), sha, annotator)

    def masks_from_seg(self, ds: Dataset, sha256: str,
                       annotator: Annotator) -> tuple[SeriesGrid, list[Mask]]:
        """A SEG's segments on its stored series' grid; raises :class:`Refusal` like intake."""
        try:
            obj = read_seg(ds)
        except SegFormatError as exc:
            raise Refusal("seg-format", str(exc)) from None
        grid = self._grid(seg_source_series(obj))
        placement = check_seg(obj, grid, self.protocol.position_tolerance_mm)
        return grid, seg_masks(obj, placement, grid.shape, annotator=annotator,
                               source_series_uid=grid.series_instance_uid, provenance=sha256,
                               fractional_threshold=self.protocol.fractional_threshold)

    def grid(self, series_uid: str) -> SeriesGrid:
        """The grid of a stored series; LookupError when it is not stored."""
        grid = self.grids.grid(series_uid)
        if grid is None:
            raise LookupError("series is not stored")
        return grid

    def stored_slice(self, sop_instance_uid: str, *, pixels: bool = True) -> Dataset:
        """The stored dataset of an instance (its header only unless ``pixels``)."""
        with self.index.read() as conn:
            sha = instance_records.stored_blob_of(conn, sop_instance_uid)
        if sha is None:
            raise LookupError("instance is not stored")
        return dcmread(self.blobs.path_for(sha), stop_before_pixels=not pixels)

    def recheck(self, annotation_id: int, actor: Actor) -> CheckReport:
        """Check a stored annotation again (after a protocol change, or a crash before its check)."""
        with self.index.read() as conn:
            row = records.get_annotation(conn, annotation_id)
        if row is None:
            raise LookupError(f"no annotation {annotation_id}")
        grid, masks = self.masks_of(annotation_id)
        return self._check(annotation_id, row["revision"], grid, masks, actor)

    # --- steps ---------------------------------------------------------------

    def _annotated_instance(self, conn, header: Dataset) -> tuple[str, str, str] | None:
        """(SOP Instance UID, blob hash, series UID) of the stored slice a copy annotates."""
        candidates = [str(header.SOPInstanceUID)]
        for keyword in ("ReferencedImageSequence", "SourceImageSequence"):
            candidates += [str(item.ReferencedSOPInstanceUID) for item in header.get(keyword, [])
                           if "ReferencedSOPInstanceUID" in item]
        for uid in candidates:
            row = conn.execute(
                "SELECT i.blob_sha256, s.series_instance_uid FROM instance i"
                " JOIN series s ON s.id = i.series_fk WHERE i.sop_instance_uid = ?", (uid,)
            ).fetchone()
            if row is not None:
                return uid, row[0], row[1]
        return None

    def _claim(self, kind: str, header: Dataset, source: Source) -> Claim:
        uid, sop_class = str(header.SOPInstanceUID), str(header.SOPClassUID)
        own_series = str(header.get("SeriesInstanceUID", "") or "")
        person = str(header.get("ContentCreatorName", "") or "")
        if kind == SEG:
            series = [str(i.SeriesInstanceUID) for i in header.get("ReferencedSeriesSequence", [])
                      if "SeriesInstanceUID" in i]
            annotator = Annotator(source.calling_ae, source.address, person)
            return Claim(SEG, f"seg|{uid}", series[0] if len(series) == 1 else "", annotator,
                         uid, sop_class, object_series_uid=own_series)
        with self.index.read() as conn:
            stored_uid, stored_sha, series_uid = self._annotated_instance(conn, header)
        if not person and header.get("OperatorsName"):
            original = dcmread(self.blobs.path_for(stored_sha), stop_before_pixels=True,
                               specific_tags=["OperatorsName"])
            if str(original.get("OperatorsName", "")) != str(header.OperatorsName):
                person = str(header.OperatorsName)
        annotator = Annotator(source.calling_ae, source.address, person)
        return Claim(OVERLAY, f"overlay|{series_uid}|{annotator.key}", series_uid, annotator,
                     uid, sop_class, stored_uid, stored_sha, own_series)

    def _grid(self, series_uid: str) -> SeriesGrid | None:
        try:
            return self.grids.grid(series_uid)
        except GridError as exc:
            raise Refusal("series-geometry", str(exc)) from None

    def _intake(self, claim: Claim, sha256: str) -> Intake:
        """Read the object and run its reference checks; anything undecodable is a refusal."""
        try:
            ds = dcmread(self.blobs.path_for(sha256))
            if claim.kind == SEG:
                grid, masks = self.masks_from_seg(ds, sha256, claim.annotator)
                return Intake(claim, grid, masks=masks)
            grid = self._grid(claim.series_uid)
            k = grid.slice_of(claim.stored_uid)
            stored = dcmread(self.blobs.path_for(claim.stored_sha256))
            planes = read_planes(ds)
            check_overlay_copy(ds, stored, planes, f"slice {k + 1}")
            rois = [RoiBox.from_plane(p.group, p.structure_label, k, plane_mask(ds, p))
                    for p in planes]
            return Intake(claim, grid, slice_index=k, rois=rois)
        except (Refusal, IndexUnavailable):
            raise
        except Exception as exc:  # untrusted bytes past their header that do not decode
            check = "seg-format" if claim.kind == SEG else "overlay-data"
            raise Refusal(check, f"cannot decode the object ({type(exc).__name__})") from None

    def _store(self, intake: Intake, header: Dataset, receipt: Receipt, source: Source,
               record: Recorder | None) -> tuple[int, int] | StoreResult:
        """Step 2 of the module docstring: (annotation id, revision), or a SEG's conflict."""
        claim, now = intake.claim, utc_now()
        obj = {"kind": claim.kind, "sop_instance_uid": claim.sop_instance_uid,
               "series_instance_uid": claim.series_uid, "sha256": receipt.blob_sha256}
        with self.index.write() as conn:
            conflict = (self._index_seg(conn, header, receipt, source, obj, record)
                        if claim.kind == SEG else None)
            if conflict is None:
                annotation_id, revision = records.upsert_annotation(
                    conn, claim.kind, claim.key, claim.series_uid, claim.annotator, now,
                    accepted=True)
                object_id = records.insert_object(conn, annotation_id, claim.sop_instance_uid,
                                                  claim.sop_class_uid, receipt,
                                                  slice_index=intake.slice_index)
                records.insert_rois(conn, object_id, intake.rois)
                entry = self.audit.append(conn, "annotation.received", source.actor, {
                    **obj, "annotation_id": annotation_id, "object_id": object_id,
                    "slice": None if intake.slice_index is None else intake.slice_index + 1})
        if conflict is not None:
            result, entry = conflict
            self.audit.committed(entry)
            return result
        self.audit.committed(entry)
        return annotation_id, revision

    def _index_seg(self, conn, header: Dataset, receipt: Receipt, source: Source,
                   obj: dict, record: Recorder | None) -> tuple[StoreResult, AuditEntry] | None:
        """Index a SEG as an instance of its own series; a conflict when its UID has other bytes."""
        rec = InstanceRecord.from_dataset(header)
        stored_sha = instance_records.stored_blob_of(conn, rec.sop_instance_uid)
        if stored_sha is None:
            instance_records.insert_instance(conn, rec, receipt)
            if record is not None:
                record(conn)
            return None
        if stored_sha == receipt.blob_sha256:
            return None
        conflict_id = instance_records.insert_conflict(conn, rec, receipt, stored_sha)
        entry = self.audit.append(conn, "instance.conflict", source.actor,
                                  {**obj, "stored_sha256": stored_sha, "conflict_id": conflict_id},
                                  outcome="minor-failure")
        outcome = Outcome(status.DUPLICATE_SOP_INSTANCE,
                          f"UID already stored with other bytes; kept as conflict {conflict_id}")
        return StoreResult(outcome, "conflict", rec.sop_instance_uid, receipt.blob_sha256), entry

    def _set_masks(self, annotation_id: int, annotator: Annotator, series_uid: str) -> list[Mask]:
        """An overlay set's structures: its current copies' planes grouped by label."""
        grid = self._grid(series_uid)
        with self.index.read() as conn:
            rois = records.current_rois(conn, annotation_id)
        builders: dict[str, MaskBuilder] = {}
        sources: dict[str, set[str]] = defaultdict(set)
        for roi, sha in rois:
            builders.setdefault(roi.label, MaskBuilder(grid.shape)).add(
                roi.slice_index, roi.box, roi.row0, roi.col0)
            sources[roi.label].add(sha)
        masks = []
        for label, builder in builders.items():
            cls = self.protocol.class_for(label)
            masks.append(builder.build(
                structure_id=f"roi {label}", label=label,
                category=cls.category if cls else None, type=cls.type if cls else None,
                annotator=annotator, source_series_uid=series_uid,
                provenance=combined_provenance(sources[label])))
        return masks

    def _check_settled(self, annotation_id: int, actor: Actor) -> None:
        self.recheck(annotation_id, actor)

    def _check(self, annotation_id: int, revision: int, grid: SeriesGrid, masks: list[Mask],
               actor: Actor) -> CheckReport:
        """Step 3 of the module docstring: run the consistency checks and record them if still current."""
        summaries, findings = check_structures(masks, grid, self.protocol)
        entry: AuditEntry | None = None
        with self.index.write() as conn:
            check_id = records.record_check(conn, annotation_id, revision, self.protocol, grid,
                                            masks, summaries, findings, utc_now())
            if check_id is not None:
                entry = self.audit.append(conn, "annotation.checked", actor, {
                    "annotation_id": annotation_id, "check_id": check_id, "revision": revision,
                    "protocol_sha256": self.protocol.sha256, "structures": len(masks),
                    "findings": sorted({f.check for f in findings})})
        if entry is not None:
            self.audit.committed(entry)
        return CheckReport(annotation_id, check_id, findings)

    def _refuse(self, claim: Claim, refusal: Refusal, receipt: Receipt,
                source: Source) -> StoreResult:
        """Quarantine the object, record the refusal on its annotation, answer 0xA900."""
        code, now = status.DOES_NOT_MATCH_SOP_CLASS, utc_now()
        # The row says what was refused, by whom and why, like a validation refusal's;
        # the (de-identified) bytes stay in the blob store under the refused object.
        refused = Refused(code.code, (ValidationFinding(refusal.check, refusal.reason),),
                          receipt.transfer_syntax_uid, claim.sop_class_uid,
                          claim.sop_instance_uid, claim.object_series_uid)
        with self.index.write() as conn:
            quarantine_id = insert_quarantine_row(conn, receipt.blob_sha256, receipt.blob_size,
                                                  source, refused, area="blobs", sealed=False,
                                                  received_at=receipt.received_at)
            annotation_id, _ = records.upsert_annotation(
                conn, claim.kind, claim.key, claim.series_uid, claim.annotator, now,
                accepted=False)
            records.insert_object(conn, annotation_id, claim.sop_instance_uid, claim.sop_class_uid,
                                  receipt, refusal=(refusal.check, refusal.reason),
                                  quarantine_id=quarantine_id)
            records.settle_refused(conn, annotation_id, now)
            entry = self.audit.append(conn, "annotation.refused", source.actor, {
                "annotation_id": annotation_id, "quarantine_id": quarantine_id,
                "sha256": receipt.blob_sha256, "check": refusal.check, "reason": refusal.reason},
                outcome="minor-failure")
        self.audit.committed(entry)
        log.info("annotation refused", extra={"fields": {"check": refusal.check,
                                                         "sha256": receipt.blob_sha256}})
        return StoreResult(Outcome(code, refusal.reason), "refused", claim.sop_instance_uid,
                           receipt.blob_sha256)
