"""The annotation intake service: an ingest hook that claims SEGs and overlay copies.

Order of work for one object (a SEG, or one overlay copy of a stored slice),
driven by the ingest pipeline (:mod:`node.ingest.types`):

1. ``classify``: a SEG, or an image with overlay planes that is a copy of a
   stored slice (same SOP Instance UID, other bytes) or references one, is
   claimed as an annotation; anything else is an ordinary instance.
2. the claim's ``admit`` reads the object and runs the reference checks
   against the stored series; a failure refuses it (0xA900, ErrorComment
   naming the check and the slice), the pipeline quarantines it, and the
   refusal is recorded on its annotation in the same transaction. A SEG whose
   images are not (all) stored yet is not refused: a PACS forwarding a study
   sends its objects in any order, so it is stored ``pending`` (0x0000).
3. ``on_stored``, inside the transaction that stores it: a SEG is also an
   indexed instance of its own series (so it can be queried and retrieved);
   an overlay copy is only an annotation object (its SOP Instance UID belongs
   to the stored slice, which it never replaces); the annotation goes to
   ``received`` (or ``pending``). An ordinary image stored into a series that
   pending annotations wait on schedules a new look at them.
4. ``after_commit``, on the context's worker after the answer: the
   consistency checks run on the annotation's structures, outside any
   transaction, and a second transaction records the findings and moves the
   annotation to ``checked``, unless a newer object of the same annotation
   arrived meanwhile (that object's check will record instead).

A pending annotation is looked at again once its series has been quiet for
``settle_seconds`` after an image arrived, and at the end of its wait
(``pending_seconds``): checked when its images are all there, ``refused``
with the reason when the wait is over. Every state change goes through the
one state machine (:mod:`node.annotations.states`), so each is audited.

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
from datetime import UTC, datetime

from pydicom import dcmread
from pydicom.dataset import Dataset

from node.annotations.bridge import masks_to_seg
from node.annotations.grid import GridError, GridSource, SeriesGrid
from node.annotations.masks import Annotator, Mask, MaskBuilder, combined_provenance
from node.annotations.overlay import overlay_groups, plane_mask, read_planes
from node.annotations.records import RoiBox, finding_rows, structure_rows
from node.annotations.seg import SEG_SOP_CLASSES, SegFormatError, read_seg, seg_masks
from node.annotations.settle import SettleQueue
from node.annotations.states import TRANSITIONS, AnnotationState, AnnotationStates, TransitionRefused
from node.audit.trail import Actor, AuditEntry, AuditTrail, utc_now
from node.checks.consistency import Finding, check_structures
from node.checks.protocol import Protocol
from node.checks.references import (
    NotYetStored,
    Refusal,
    check_overlay_copy,
    check_seg,
    seg_source_series,
)
from node.ingest.types import Incoming, Stored
from node.ingest.types import Refusal as IngestRefusal
from node.storage.interface import BlobStore, Index, IndexUnavailable, Reader, Transaction
from node.storage.records import StoredRef

log = logging.getLogger("lamina.annotations")

SEG, OVERLAY = "seg", "overlay"
S = AnnotationState

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
        #: Set by ``admit`` when the images it references are not stored yet.
        self.pending: NotYetStored | None = None

    def already_taken(self, reader: Reader) -> bool:
        return reader.annotations.object_with_blob(self.incoming.blob.sha256) is not None

    def admit(self) -> IngestRefusal | None:
        closed = self.service._closed(self.info)
        if closed is not None:
            return closed
        try:
            self.intake = self.service._intake(self.info, self.incoming.blob.sha256)
        except NotYetStored as missing:
            self.pending = missing
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
                 protocol: Protocol, states: AnnotationStates, settle_seconds: float = 1.0,
                 pending_seconds: float = 3600.0) -> None:
        self.index = index
        self.blobs = blobs
        self.audit = audit
        self.grids = grids
        self.protocol = protocol
        self.states = states
        self.pending_seconds = pending_seconds
        self._settling = SettleQueue(self._check_settled, settle_seconds)
        #: Called after each recorded check commits, with (annotation id, actor, grid
        #: spacing, the masks just checked): double reading compares the reading with the
        #: series' others there, without decoding it again.
        self.after_check: list[Callable[[int, Actor, tuple[float, float, float], list[Mask]],
                                        object]] = []

    # --- as an ingest hook ---------------------------------------------------

    def classify(self, obj: Incoming) -> AnnotationClaim | None:
        """Claim a SEG, or an overlay copy of a stored slice (same SOP Instance UID and
        other bytes, or referencing one); None for an ordinary instance.

        An image with overlay planes from an ``annotator`` peer whose slice is not stored
        (yet) is an overlay copy that came before its image: claimed, it waits
        ``pending``. From any other peer it is an ordinary image with overlays."""
        header = obj.dataset
        if str(header.SOPClassUID) in SEG_SOP_CLASSES:
            return AnnotationClaim(self, self._claim_info(SEG, header, obj), obj)
        if not overlay_groups(header):
            return None
        with self.index.reader() as r:
            stored = self._annotated_instance(r, header)
        if stored is None:
            if obj.source.route != "annotator":
                return None
            return AnnotationClaim(self, self._claim_info(OVERLAY, header, obj), obj)
        if stored.blob_sha256 == obj.blob.sha256:
            return None  # the stored slice itself resent
        return AnnotationClaim(self, self._claim_info(OVERLAY, header, obj, stored), obj)

    def on_stored(self, tx: Transaction, obj: Stored) -> AuditEntry | None:
        """File a new annotation object under its annotation, which goes to ``received``
        (``pending`` while its images are not stored). An ordinary image notes the
        pending annotations of its series, to look at them after the commit."""
        claim = obj.claim
        if claim is None:
            if obj.instance_id is not None:
                waiting = tx.annotations.waiting_on_series(
                    obj.incoming.record.series_instance_uid)
                if waiting:
                    obj.notes["pending_annotations"] = waiting
            return None
        if not isinstance(claim, AnnotationClaim) or claim.service is not self:
            return None
        if claim.intake is None and claim.pending is None:
            # Taken in already when the pipeline looked, superseded since: the sender's
            # retry (after 0xA700) runs the reference checks before its answer.
            raise IndexUnavailable("the annotation changed while this copy was stored; resend")
        info, intake, receipt = claim.info, claim.intake, obj.incoming.receipt
        annotation_id, revision = tx.annotations.upsert(
            info.kind, info.key, info.series_uid, info.annotator.ae_title,
            info.annotator.address, info.annotator.person, utc_now(), accepted=True)
        object_id = tx.annotations.insert_object(
            annotation_id, info.sop_instance_uid, info.sop_class_uid, receipt,
            slice_index=intake.slice_index if intake else None)
        if intake is not None:
            tx.annotations.insert_rois(object_id, [roi.row() for roi in intake.rois])
        obj.notes["annotation"] = (annotation_id, revision)
        return self._arrived(tx, annotation_id, claim, obj.incoming.source.actor, {
            "kind": info.kind, "sop_instance_uid": info.sop_instance_uid,
            "series_instance_uid": info.series_uid, "sha256": receipt.blob_sha256,
            "annotation_id": annotation_id, "object_id": object_id,
            "slice": None if intake is None or intake.slice_index is None
            else intake.slice_index + 1})

    def _arrived(self, tx: Transaction, annotation_id: int, claim: AnnotationClaim,
                 actor: Actor, detail: dict) -> AuditEntry:
        """A new object's annotation goes to ``received`` (``pending`` when its images are
        missing) through the state machine; one already there gets the object's event."""
        before = S(tx.annotations.get(annotation_id)["state"])
        target, reason = ((S.PENDING, claim.pending.reason) if claim.pending is not None
                          else (S.RECEIVED, ""))
        if before is target:
            return self.audit.append(tx, f"annotation.{target}", actor,
                                     {**detail, **({"reason": reason} if reason else {})})
        if target not in TRANSITIONS[before]:
            self.states.move(tx, annotation_id, S.RECEIVED, actor, reason="a new object",
                             detail=detail)
        return self.states.move(tx, annotation_id, target, actor, reason=reason, detail=detail)

    def after_commit(self, obj: Stored) -> None:
        """A SEG is checked now (on the context's worker); an overlay set once it settles;
        a pending annotation once the series its images arrive in settles."""
        for annotation_id in obj.notes.get("pending_annotations", ()):
            self._settling.touch(annotation_id, obj.incoming.source.actor)
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
        """Check every annotation left ``received`` (a crash between store and check), and
        schedule a look at every ``pending`` one (their waits are not kept in memory
        across a restart; their start is in the index).

        Returns how many were checked; one that cannot be is logged and stays
        ``received`` (``lamina annotations check ID`` says why), so the node still starts.
        """
        with self.index.reader() as r:
            ids = r.annotations.in_state("received")
            for annotation_id in r.annotations.in_state("pending"):
                self._settling.touch(annotation_id, actor)
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

    def as_seg(self, annotation_id: int) -> Dataset:
        """A stored annotation (overlay copies included) as a new DICOM-SEG referencing its
        series (``lamina annotations to-seg``, forwarding an overlay annotation). Raises
        LookupError (nothing stored) or BridgeError (nothing to convert)."""
        grid, masks = self.masks_of(annotation_id)
        headers = [self.stored_slice(uid, pixels=False) for uid in grid.sop_instance_uids]
        return masks_to_seg(masks, grid, headers, self.protocol,
                            content_creator=masks[0].annotator.person if masks else "")

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
        if not person and header.get("OperatorsName"):
            # The annotator, unless the slice already carried this operator (the copy
            # kept it). Before its slice is stored the copy's own value is all there is.
            original = None if stored is None else self._read(
                stored.blob_sha256, stop_before_pixels=True, specific_tags=["OperatorsName"])
            if original is None or str(original.get("OperatorsName", "")) != str(
                    header.OperatorsName):
                person = str(header.OperatorsName)
        annotator = Annotator(source.calling_ae, source.address, person)
        if stored is None:  # the Horos pipeline keeps the slice's series and SOP Instance UIDs
            series = str(header.get("SeriesInstanceUID", "") or "")
            return ClaimInfo(OVERLAY, f"overlay|{series}|{annotator.key}", series, annotator,
                             uid, sop_class, uid)
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
            if not info.stored_sha256:
                raise NotYetStored("instances", "the slice an overlay copy annotates"
                                                " is not stored")
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
        with self.index.reader() as r:
            row = r.annotations.get(annotation_id)
        if row is None:
            return
        missing = self._place_copies(annotation_id, row) if row["kind"] == OVERLAY else None
        if row["state"] == S.PENDING or missing is not None:
            self._resolve_pending(annotation_id, actor, missing)
        else:
            self.recheck(annotation_id, actor)

    def _place_copies(self, annotation_id: int, row: dict) -> NotYetStored | None:
        """Run the reference checks of an overlay set's copies that came before their
        slices, now, for those whose slice is stored: each is placed on its slice (or
        refused alone, as it would have been on arrival). What is still missing, if any."""
        with self.index.reader() as r:
            waiting = [o for o in r.annotations.current_objects(annotation_id)
                       if o["slice_index"] is None]
        missing = None
        annotator = Annotator(row["annotator_ae"], row["annotator_address"],
                              row["annotator_person"])
        for obj in waiting:
            header = self._read(obj["blob_sha256"], stop_before_pixels=True)
            with self.index.reader() as r:
                stored = self._annotated_instance(r, header)
            info = ClaimInfo(OVERLAY, row["key"], stored.series_instance_uid if stored else "",
                             annotator, obj["sop_instance_uid"], obj["sop_class_uid"],
                             stored.sop_instance_uid if stored else "",
                             stored.blob_sha256 if stored else "")
            try:
                intake = self._intake(info, obj["blob_sha256"])
            except NotYetStored as still:
                missing = still
                continue
            except Refusal as refusal:
                with self.index.transaction() as tx:
                    tx.annotations.refuse_object(obj["id"], refusal.check, refusal.reason)
                    entry = self.audit.append(tx, "annotation.object-refused", self._actor(row), {
                        "annotation_id": annotation_id, "object_id": obj["id"],
                        "check": refusal.check, "reason": refusal.reason},
                        outcome="minor-failure")
                self.audit.committed(entry)
                continue
            with self.index.transaction() as tx:
                tx.annotations.place_object(obj["id"], intake.slice_index,
                                            [roi.row() for roi in intake.rois])
        return missing

    @staticmethod
    def _actor(row: dict) -> Actor:
        return Actor(ae_title=row["annotator_ae"], address=row["annotator_address"])

    def _resolve_pending(self, annotation_id: int, actor: Actor,
                         missing: NotYetStored | None = None) -> None:
        """Check a pending annotation whose images are all there; refuse it when they are
        still missing at the end of its wait (or it fails another reference check). An
        overlay set with copies still waiting for their slices becomes pending."""
        try:
            if missing is not None:
                raise missing
            grid, masks = self.masks_of(annotation_id)
        except NotYetStored as missing:
            with self.index.reader() as r:
                row = r.annotations.get(annotation_id)
            if row["state"] != S.PENDING:
                self._wait(annotation_id, missing, actor)
                self._settling.touch(annotation_id, actor, delay=self.pending_seconds)
                return
            waited = _seconds_since(row["state_since"])
            if waited < self.pending_seconds:
                self._settling.touch(annotation_id, actor, delay=self.pending_seconds - waited)
                return
            self._refuse(annotation_id, missing, actor,
                         f"{missing.reason}; not stored after {waited:.0f} s")
            return
        except Refusal as refusal:
            self._refuse(annotation_id, refusal, actor, refusal.reason)
            return
        with self.index.reader() as r:
            revision = r.annotations.get(annotation_id)["revision"]
        self._check(annotation_id, revision, grid, masks, actor)

    def _wait(self, annotation_id: int, missing: NotYetStored, actor: Actor) -> None:
        """An annotation found to miss images after it was received waits for them."""
        try:
            with self.index.transaction() as tx:
                entry = self.states.move(tx, annotation_id, S.PENDING, actor,
                                         reason=missing.reason)
        except TransitionRefused:
            return
        self.audit.committed(entry)

    def _refuse(self, annotation_id: int, refusal: Refusal, actor: Actor, reason: str) -> None:
        """A pending annotation becomes ``refused`` with why; its objects stay stored
        (they were answered 0x0000) and are marked refused with the same reason."""
        try:
            with self.index.transaction() as tx:
                tx.annotations.refuse_objects(annotation_id, refusal.check, reason)
                entry = self.states.move(tx, annotation_id, S.REFUSED, actor, reason=reason,
                                         detail={"check": refusal.check})
        except TransitionRefused:  # a new object moved it meanwhile: its own look decides
            return
        self.audit.committed(entry)
        log.info("pending annotation refused", extra={"fields": {
            "annotation_id": annotation_id, "check": refusal.check}})

    def _closed(self, info: ClaimInfo) -> IngestRefusal | None:
        """An object for an annotation in review (or approved) is refused: a signed or
        adjudicated annotation takes no new object; it is sent as a new annotation."""
        with self.index.reader() as r:
            row = r.annotations.by_key(info.key)
        if row is None or row["state"] == S.RECEIVED or S.RECEIVED in TRANSITIONS[S(row["state"])]:
            return None
        return IngestRefusal("review", f"annotation {row['id']} is {row['state']};"
                                       " it takes no new object")

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
                detail = {"check_id": check_id, "revision": revision,
                          "protocol_sha256": self.protocol.sha256, "structures": len(masks),
                          "findings": sorted({f.check for f in findings})}
                state = S(tx.annotations.get(annotation_id)["state"])
                if state in (S.RECEIVED, S.PENDING):
                    entry = self.states.move(tx, annotation_id, S.CHECKED, actor, detail=detail)
                else:  # a re-check (new protocol) leaves the review state as it is
                    entry = self.audit.append(tx, "annotation.checked", actor,
                                              {"annotation_id": annotation_id, **detail})
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
        actor = claim.incoming.source.actor
        entry = self.audit.append(tx, "annotation.refused", actor, {
            "annotation_id": annotation_id, "quarantine_id": quarantine_id,
            "sha256": receipt.blob_sha256, "check": refusal.check, "reason": refusal.reason},
            outcome="minor-failure")
        state = S(tx.annotations.get(annotation_id)["state"])
        if (S.REFUSED in TRANSITIONS[state]
                and not tx.annotations.current_objects(annotation_id)):
            entry = self.states.move(tx, annotation_id, S.REFUSED, actor, reason=refusal.reason,
                                     detail={"check": refusal.check})
        return entry


def _seconds_since(stamp: str | None) -> float:
    """Seconds since an index time stamp (``utc_now``'s ISO form); 0 when unknown."""
    if not stamp:
        return 0.0
    then = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    return (datetime.now(UTC) - then).total_seconds()
