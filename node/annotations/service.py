"""The annotation intake service: an ingest hook that claims SEGs and overlay copies.

Order of work for one object (a SEG, or one overlay copy of a stored slice),
driven by the ingest pipeline (:mod:`node.ingest.types`):

1. ``classify``: a SEG, or an image with overlay planes that is a copy of a
   stored slice (same SOP Instance UID, other bytes) or references one, is
   claimed as an annotation; anything else is an ordinary instance.
2. the claim's ``admit`` reads the object and runs the reference checks
   against the stored series; a failure refuses it (0xA900, ErrorComment
   naming the check and the slice), the pipeline quarantines it, and the
   refusal is recorded on its annotation in the same transaction.
3. ``on_stored``, inside the transaction that stores it: a SEG is also an
   indexed instance of its own series (so it can be queried and retrieved);
   an overlay copy is only an annotation object (its SOP Instance UID belongs
   to the stored slice, which it never replaces); the annotation goes to
   ``received``.
4. ``after_commit``, on the context's worker after the answer: the
   consistency checks run on the annotation's structures, outside any
   transaction, and a second transaction records the findings and moves the
   annotation to ``checked``, unless a newer object of the same annotation
   arrived meanwhile (that object's check will record instead).

Overlay copies arrive one slice per C-STORE; one annotator's copies of one
series form one annotation. Each copy is reference-checked and stored before
its answer; step 4 runs once the set has settled (no new copy for
``settle_seconds``: see :mod:`node.annotations.settle`), from ROI boxes kept
in the index, so no copy is re-read. A newer copy of a slice supersedes the
older one. A set left ``received`` by a crash is checked at the next start.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

from pydicom import dcmread
from pydicom.dataset import Dataset

from node.annotations.grid import GridError, GridSource, SeriesGrid
from node.annotations.masks import Annotator, Mask, MaskBuilder, combined_provenance
from node.annotations.overlay import overlay_groups, plane_mask, read_planes
from node.annotations.records import RoiBox, finding_rows, structure_rows
from node.annotations.seg import SEG_SOP_CLASSES, SegFormatError, read_seg, seg_masks
from node.annotations.settle import SettleQueue
from node.audit.trail import Actor, AuditEntry, AuditTrail, utc_now
from node.checks.consistency import Finding, check_structures
from node.checks.protocol import Protocol
from node.checks.references import Refusal, check_overlay_copy, check_seg, seg_source_series
from node.ingest.types import Incoming, Stored
from node.ingest.types import Refusal as IngestRefusal
from node.storage.interface import BlobStore, Index, IndexUnavailable, Reader, Transaction
from node.storage.records import StoredRef

log = logging.getLogger("lamina.annotations")

SEG, OVERLAY = "seg", "overlay"

@dataclass(frozen=True)
class ClaimInfo:
    """What an object says it is, from its header: enough to file a refusal under."""

    kind: str
    key: str
    series_uid: str  # '' when a SEG names no single series
    annotator: Annotator
    sop_instance_uid: str
    sop_class_uid: str
    stored_uid: str = ""  # overlay copies: the stored slice they annotate
    stored_sha256: str = ""


@dataclass
class Intake:
    """An object that passed its reference checks, ready to store and check."""

    info: ClaimInfo
    grid: SeriesGrid
    slice_index: int | None = None
    masks: list[Mask] = field(default_factory=list)  # SEG: its segments
    rois: list[RoiBox] = field(default_factory=list)  # overlay copy: its planes


class AnnotationClaim:
    """The service's hold on one received annotation object (an ingest ``Claim``)."""

    def __init__(self, service: AnnotationService, info: ClaimInfo, incoming: Incoming) -> None:
        self.service = service
        self.info = info
        self.incoming = incoming
        self.kind = info.kind
        self.as_instance = info.kind == SEG
        self.intake: Intake | None = None

    def already_taken(self, reader: Reader) -> bool:
        return reader.annotations.object_with_blob(self.incoming.blob.sha256) is not None

    def admit(self) -> IngestRefusal | None:
        try:
            self.intake = self.service._intake(self.info, self.incoming.blob.sha256)
        except Refusal as refusal:
            return IngestRefusal(refusal.check, refusal.reason)
        return None

    def refused(self, tx: Transaction, refusal: IngestRefusal,
                quarantine_id: int) -> AuditEntry:
        return self.service._record_refusal(tx, self, refusal, quarantine_id)


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
        #: Called after each recorded check commits, with (annotation id, actor, grid
        #: spacing, the masks just checked): double reading compares the reading with the
        #: series' others there, without decoding it again.
        self.after_check: list[Callable[[int, Actor, tuple[float, float, float], list[Mask]],
                                        object]] = []

    # --- as an ingest hook ---------------------------------------------------

    def classify(self, obj: Incoming) -> AnnotationClaim | None:
        """Claim a SEG, or an overlay copy of a stored slice (same SOP Instance UID and
        other bytes, or referencing one); None for an ordinary instance."""
        header = obj.dataset
        if str(header.SOPClassUID) in SEG_SOP_CLASSES:
            return AnnotationClaim(self, self._claim_info(SEG, header, obj), obj)
        if not overlay_groups(header):
            return None
        with self.index.reader() as r:
            stored = self._annotated_instance(r, header)
        if stored is None or stored.blob_sha256 == obj.blob.sha256:
            return None  # not a copy of ours, or the stored slice itself resent
        return AnnotationClaim(self, self._claim_info(OVERLAY, header, obj, stored), obj)

    def on_stored(self, tx: Transaction, obj: Stored) -> AuditEntry | None:
        """File a new annotation object under its annotation, which goes to ``received``."""
        claim = obj.claim
        if not isinstance(claim, AnnotationClaim) or claim.service is not self:
            return None
        if claim.intake is None:
            # Taken in already when the pipeline looked, superseded since: the sender's
            # retry (after 0xA700) runs the reference checks before its answer.
            raise IndexUnavailable("the annotation changed while this copy was stored; resend")
        info, intake, receipt = claim.info, claim.intake, obj.incoming.receipt
        annotation_id, revision = tx.annotations.upsert(
            info.kind, info.key, info.series_uid, info.annotator.ae_title,
            info.annotator.address, info.annotator.person, utc_now(), accepted=True)
        object_id = tx.annotations.insert_object(annotation_id, info.sop_instance_uid,
                                                 info.sop_class_uid, receipt,
                                                 slice_index=intake.slice_index)
        tx.annotations.insert_rois(object_id, [roi.row() for roi in intake.rois])
        obj.notes["annotation"] = (annotation_id, revision)
        return self.audit.append(tx, "annotation.received", obj.incoming.source.actor, {
            "kind": info.kind, "sop_instance_uid": info.sop_instance_uid,
            "series_instance_uid": info.series_uid, "sha256": receipt.blob_sha256,
            "annotation_id": annotation_id, "object_id": object_id,
            "slice": None if intake.slice_index is None else intake.slice_index + 1})

    def after_commit(self, obj: Stored) -> None:
        """A SEG is checked now (on the context's worker); an overlay set once it settles."""
        claim = obj.claim
        if not isinstance(claim, AnnotationClaim) or claim.service is not self:
            return
        annotation_id, revision = obj.notes["annotation"]
        actor = obj.incoming.source.actor
        if claim.kind == SEG and claim.intake is not None:
            try:
                self._check(annotation_id, revision, claim.intake.grid, claim.intake.masks,
                            actor)
            except Exception as exc:  # the SEG is stored and durable: retry its check later
                log.error("annotation check deferred", extra={"fields": {
                    "annotation_id": annotation_id, "error": type(exc).__name__}})
                self._settling.touch(annotation_id, actor)
        else:
            self._settling.touch(annotation_id, actor)

    # --- the worker ----------------------------------------------------------

    def start(self) -> None:
        """Check overlay sets in a background thread once they settle."""
        self._settling.start()

    def flush(self) -> None:
        """Check every overlay set still settling, now (shutdown, tests)."""
        self._settling.flush()

    def stop(self) -> None:
        self._settling.stop()

    def check_received(self, actor: Actor) -> int:
        """Check every annotation left ``received`` (a crash between store and check).

        Returns how many were checked; one that cannot be is logged and stays
        ``received`` (``lamina annotations check ID`` says why), so the node still starts.
        """
        with self.index.reader() as r:
            ids = r.annotations.in_state("received")
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
        with self.index.reader() as r:
            row = r.annotations.get(annotation_id)
            objects = r.annotations.current_objects(annotation_id) if row else []
        if row is None or not objects:
            raise LookupError(f"annotation {annotation_id} has no accepted object")
        annotator = Annotator(row["annotator_ae"], row["annotator_address"],
                              row["annotator_person"])
        if row["kind"] == OVERLAY:
            grid = self._grid(row["source_series_uid"])
            return grid, self._set_masks(annotation_id, annotator, row["source_series_uid"])
        sha = objects[-1]["blob_sha256"]
        return self.masks_from_seg(self._read(sha), sha, annotator)

    def spacing_and_masks(self, annotation_id: int) -> tuple[tuple[float, float, float],
                                                              list[Mask]]:
        """The grid spacing (ITK order, mm) and current masks of a stored annotation."""
        grid, masks = self.masks_of(annotation_id)
        return grid.spacing, masks

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
        with self.index.reader() as r:
            sha = r.instances.blob_of(sop_instance_uid)
        if sha is None:
            raise LookupError("instance is not stored")
        return self._read(sha, stop_before_pixels=not pixels)

    def recheck(self, annotation_id: int, actor: Actor) -> CheckReport:
        """Check a stored annotation again (after a protocol change, or a crash before its check)."""
        with self.index.reader() as r:
            row = r.annotations.get(annotation_id)
        if row is None:
            raise LookupError(f"no annotation {annotation_id}")
        grid, masks = self.masks_of(annotation_id)
        return self._check(annotation_id, row["revision"], grid, masks, actor)

    # --- steps ---------------------------------------------------------------

    def _read(self, sha256: str, **kwargs) -> Dataset:
        with self.blobs.open(sha256) as f:
            return dcmread(f, **kwargs)

    @staticmethod
    def _annotated_instance(reader: Reader, header: Dataset) -> StoredRef | None:
        """The stored slice a copy annotates: its own UID, or one it references."""
        candidates = [str(header.SOPInstanceUID)]
        for keyword in ("ReferencedImageSequence", "SourceImageSequence"):
            candidates += [str(item.ReferencedSOPInstanceUID) for item in header.get(keyword, [])
                           if "ReferencedSOPInstanceUID" in item]
        for uid in candidates:
            stored = reader.instances.stored(uid)
            if stored is not None:
                return stored
        return None

    def _claim_info(self, kind: str, header: Dataset, obj: Incoming,
                    stored: StoredRef | None = None) -> ClaimInfo:
        uid, sop_class = str(header.SOPInstanceUID), str(header.SOPClassUID)
        person = str(header.get("ContentCreatorName", "") or "")
        source = obj.source
        if kind == SEG:
            series = [str(i.SeriesInstanceUID) for i in header.get("ReferencedSeriesSequence", [])
                      if "SeriesInstanceUID" in i]
            annotator = Annotator(source.calling_ae, source.address, person)
            return ClaimInfo(SEG, f"seg|{uid}", series[0] if len(series) == 1 else "",
                             annotator, uid, sop_class)
        assert stored is not None
        if not person and header.get("OperatorsName"):
            original = self._read(stored.blob_sha256, stop_before_pixels=True,
                                  specific_tags=["OperatorsName"])
            if str(original.get("OperatorsName", "")) != str(header.OperatorsName):
                person = str(header.OperatorsName)
        annotator = Annotator(source.calling_ae, source.address, person)
        return ClaimInfo(OVERLAY, f"overlay|{stored.series_instance_uid}|{annotator.key}",
                         stored.series_instance_uid, annotator, uid, sop_class,
                         stored.sop_instance_uid, stored.blob_sha256)

    def _grid(self, series_uid: str) -> SeriesGrid | None:
        try:
            return self.grids.grid(series_uid)
        except GridError as exc:
            raise Refusal("series-geometry", str(exc)) from None

    def _intake(self, info: ClaimInfo, sha256: str) -> Intake:
        """Read the object and run its reference checks; anything undecodable is a refusal."""
        try:
            ds = self._read(sha256)
            if info.kind == SEG:
                grid, masks = self.masks_from_seg(ds, sha256, info.annotator)
                return Intake(info, grid, masks=masks)
            grid = self._grid(info.series_uid)
            k = grid.slice_of(info.stored_uid)
            stored = self._read(info.stored_sha256)
            planes = read_planes(ds)
            check_overlay_copy(ds, stored, planes, f"slice {k + 1}")
            rois = [RoiBox.from_plane(p.group, p.structure_label, k, plane_mask(ds, p))
                    for p in planes]
            return Intake(info, grid, slice_index=k, rois=rois)
        except (Refusal, IndexUnavailable):
            raise
        except Exception as exc:  # untrusted bytes past their header that do not decode
            check = "seg-format" if info.kind == SEG else "overlay-data"
            raise Refusal(check, f"cannot decode the object ({type(exc).__name__})") from None

    def _set_masks(self, annotation_id: int, annotator: Annotator, series_uid: str) -> list[Mask]:
        """An overlay set's structures: its current copies' planes grouped by label."""
        grid = self._grid(series_uid)
        with self.index.reader() as r:
            rois = [(RoiBox.from_row(row), sha) for row, sha in
                    r.annotations.current_rois(annotation_id)]
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
        """Step 4 of the module docstring: run the consistency checks and record them if
        still current."""
        summaries, findings = check_structures(masks, grid, self.protocol)
        entry: AuditEntry | None = None
        with self.index.transaction() as tx:
            check_id = tx.annotations.record_check(
                annotation_id, revision, self.protocol.name, self.protocol.sha256,
                structure_rows(masks, summaries), finding_rows(grid, findings), utc_now())
            if check_id is not None:
                entry = self.audit.append(tx, "annotation.checked", actor, {
                    "annotation_id": annotation_id, "check_id": check_id, "revision": revision,
                    "protocol_sha256": self.protocol.sha256, "structures": len(masks),
                    "findings": sorted({f.check for f in findings})})
        if entry is not None:
            self.audit.committed(entry)
            for listener in self.after_check:
                try:
                    listener(annotation_id, actor, grid.spacing, masks)
                except Exception as exc:  # the check stands; the comparison is redone later
                    log.error("after-check listener failed", extra={"fields": {
                        "annotation_id": annotation_id, "error": type(exc).__name__}})
        return CheckReport(annotation_id, check_id, findings)

    def _record_refusal(self, tx: Transaction, claim: AnnotationClaim, refusal: IngestRefusal,
                        quarantine_id: int) -> AuditEntry:
        """Inside the quarantine row's transaction: the refused object on its annotation."""
        info, receipt, now = claim.info, claim.incoming.receipt, utc_now()
        annotation_id, _ = tx.annotations.upsert(
            info.kind, info.key, info.series_uid, info.annotator.ae_title,
            info.annotator.address, info.annotator.person, now, accepted=False)
        tx.annotations.insert_object(annotation_id, info.sop_instance_uid, info.sop_class_uid,
                                     receipt, refusal=(refusal.check, refusal.reason),
                                     quarantine_id=quarantine_id)
        tx.annotations.settle_refused(annotation_id, now)
        return self.audit.append(tx, "annotation.refused", claim.incoming.source.actor, {
            "annotation_id": annotation_id, "quarantine_id": quarantine_id,
            "sha256": receipt.blob_sha256, "check": refusal.check, "reason": refusal.reason},
            outcome="minor-failure")
