"""Training export: approved annotations as NIfTI, in nnU-Net v2's layout or MONAI-style
image/label pairs, held out by pseudonymous patient, with a manifest tracing each case to
its approval.

One case per approved annotation: the stored series as a volume (modality LUT applied,
so CT is in HU) and a label map on the same grid, whose values are the protocol's
classes in their declared order (1, 2, ...; 0 is background). Geometry (spacing,
origin, direction) is the series grid's, written by SimpleITK. Only annotations in
the state ``approved`` are exported; structures whose class the protocol does not
know are left out and listed in the manifest.

``holdout`` puts that fraction of the patients (never of slices or studies) in the
test set, chosen deterministically by a hash of the pseudonymous PatientID, so two
exports of the same approvals split alike and no patient is on both sides.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from pydicom.pixels import apply_rescale

from node.annotations.service import AnnotationService
from node.annotations.states import AnnotationState
from node.audit.trail import Actor, AuditTrail, utc_now
from node.storage.interface import Index

FORMATS = ("nnunet", "nifti")
FILE_ENDING = ".nii.gz"


class ExportError(ValueError):
    """The export cannot be made (nothing approved, no classes, a folder in the way)."""


@dataclass
class Case:
    """One exported annotation: where it went and what it came from."""

    case_id: str
    annotation_id: int
    series_instance_uid: str
    patient: str  # the pseudonymous PatientID
    split: str  # "train" or "test"
    image: str = ""  # paths relative to the export folder
    label: str = ""
    objects: list[str] = field(default_factory=list)  # SHA-256 of the annotation's objects
    approval: str = ""  # hash of the audit event that approved it
    #: SHA-256 of each approving electronic signature (manifest + signature bytes), so a
    #: model's training set traces to the signed approvals (`lamina review verify`).
    signatures: list[str] = field(default_factory=list)
    structures: list[dict] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # structures of no protocol class
    overlap_voxels: int = 0  # voxels claimed by two classes (the later class kept them)


def split_patients(patients: set[str], holdout: float) -> set[str]:
    """The held-out patients: ``round(holdout × n)``, the first by a hash of their pseudonym."""
    ranked = sorted(patients, key=lambda p: hashlib.sha256(f"lamina-split\0{p}".encode())
                    .hexdigest())
    return set(ranked[:round(holdout * len(ranked))])


class TrainingExport:
    def __init__(self, index: Index, annotations: AnnotationService, audit: AuditTrail) -> None:
        self.index = index
        self.annotations = annotations
        self.audit = audit
        self.protocol = annotations.protocol

    def labels(self) -> dict[str, int]:
        return {"background": 0, **{c.key: i for i, c in enumerate(self.protocol.classes, 1)}}

    def plan(self, holdout: float) -> list[Case]:
        """The approved annotations as cases, each with its patient and side of the split."""
        if not self.protocol.classes:
            raise ExportError("the labelling protocol declares no classes: label values come"
                              " from its classes (annotations.protocol)")
        with self.index.reader() as r:
            approved = r.annotations.in_state(AnnotationState.APPROVED)
            approvals = {}
            for event in r.audit.of_action("annotation.approved"):
                approvals[json.loads(event.object)["annotation_id"]] = event.hash
            rows = {a: r.annotations.get(a) for a in approved}
            objects = {a: [o["blob_sha256"] for o in r.annotations.current_objects(a)]
                       for a in approved}
            signatures = {a: [hashlib.sha256(s.manifest.encode() + s.signature).hexdigest()
                              for s in r.signatures.list(a) if s.decision == "approved"]
                          for a in approved}
        if not approved:
            raise ExportError("no annotation is approved: nothing to export")
        cases = []
        for annotation_id in approved:
            series_uid = rows[annotation_id]["source_series_uid"]
            grid = self.annotations.grid(series_uid)
            header = self.annotations.stored_slice(grid.sop_instance_uids[0], pixels=False)
            cases.append(Case(f"lamina_{annotation_id:04d}", annotation_id, series_uid,
                              str(header.get("PatientID", "")), "train",
                              objects=objects[annotation_id],
                              approval=approvals.get(annotation_id, ""),
                              signatures=signatures[annotation_id]))
        held_out = split_patients({c.patient for c in cases}, holdout)
        for case in cases:
            case.split = "test" if case.patient in held_out else "train"
        return cases

    def write(self, out: Path, fmt: str, cases: list[Case], holdout: float, actor: Actor,
              progress: Callable[[int], None] = lambda n: None) -> None:
        """Write the planned cases, ``dataset.json`` (nnU-Net) or ``datalist.json`` (MONAI)
        and ``manifest.json`` into ``out`` (new, or an empty folder); audited as an export."""
        if fmt not in FORMATS:
            raise ExportError(f"unknown format {fmt!r} (known: {', '.join(FORMATS)})")
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise ExportError(f"{out} exists and is not an empty folder")
        out.mkdir(parents=True, exist_ok=True)
        channel = ""
        for case in cases:
            channel = self._write_case(out, fmt, case) or channel
            progress(1)
        labels = self.labels()
        if fmt == "nnunet":
            (out / "dataset.json").write_text(json.dumps({
                "channel_names": {"0": channel or "CT"}, "labels": labels,
                "numTraining": sum(c.split == "train" for c in cases),
                "file_ending": FILE_ENDING, "name": self.protocol.name,
                "description": f"Lamina export of approved annotations ({self.protocol.name}"
                               f" {self.protocol.version})".strip()}, indent=2))
        else:
            pairs = {side: [{"image": c.image, "label": c.label} for c in cases
                            if c.split == side] for side in ("train", "test")}
            (out / "datalist.json").write_text(json.dumps({
                "labels": labels, "training": pairs["train"], "test": pairs["test"]}, indent=2))
        manifest = json.dumps({
            "format": fmt, "created_at": utc_now(), "holdout": holdout,
            "protocol": {"name": self.protocol.name, "version": self.protocol.version,
                         "sha256": self.protocol.sha256},
            "labels": labels, "cases": [asdict(c) for c in cases]}, indent=2)
        (out / "manifest.json").write_text(manifest)
        self.audit.record("export.training", actor, {
            "format": fmt, "cases": len(cases),
            "test_cases": sum(c.split == "test" for c in cases),
            "annotations": [c.annotation_id for c in cases],
            "manifest_sha256": hashlib.sha256(manifest.encode()).hexdigest()})

    def _write_case(self, out: Path, fmt: str, case: Case) -> str:
        """The case's image and label files; the series' modality (the channel name)."""
        grid, masks = self.annotations.masks_of(case.annotation_id)
        slices = [self.annotations.stored_slice(uid) for uid in grid.sop_instance_uids]
        volume = _volume(slices)
        labels = self.labels()
        label_map = np.zeros(grid.shape, dtype=np.uint8)
        claimed = np.zeros(grid.shape, dtype=bool)
        for mask in masks:
            cls = self.protocol.class_for(mask.label, mask.type)
            if cls is None:
                case.skipped.append(mask.label)
                continue
            voxels = mask.array
            case.overlap_voxels += int(np.count_nonzero(voxels & claimed))
            claimed |= voxels
            label_map[voxels] = labels[cls.key]
            case.structures.append({"label": mask.label, "class": cls.key,
                                    "value": labels[cls.key], "voxels": int(voxels.sum())})
        if fmt == "nnunet":
            test = case.split == "test"
            case.image = f"{'imagesTs' if test else 'imagesTr'}/{case.case_id}_0000{FILE_ENDING}"
            case.label = f"{'labelsTs' if test else 'labelsTr'}/{case.case_id}{FILE_ENDING}"
        else:
            case.image = f"images/{case.case_id}{FILE_ENDING}"
            case.label = f"labels/{case.case_id}{FILE_ENDING}"
        for relative, array in ((case.image, volume), (case.label, label_map)):
            path = out / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            sitk.WriteImage(grid.to_image(array), str(path), useCompression=True)
        return str(slices[0].get("Modality", ""))


def _volume(slices: list) -> np.ndarray:
    """The series' pixels through the modality LUT (CT: HU), ``[k, r, c]``.

    The common case (one integral slope and intercept, no LUT sequence) is done
    in integers and kept as int16 when it fits: the same arithmetic as pydicom's
    ``apply_rescale``, without its float64 copy of every slice (the export's
    largest cost otherwise). Anything else goes through ``apply_rescale``, as
    float32.
    """
    rescales = {(float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0))
                for ds in slices}
    simple = (len(rescales) == 1 and all(v.is_integer() for v in next(iter(rescales)))
              and not any("ModalityLUTSequence" in ds for ds in slices))
    if simple:
        slope, intercept = (int(v) for v in next(iter(rescales)))
        volume = np.stack([ds.pixel_array for ds in slices]).astype(np.int32)
        volume = volume * slope + intercept
        if volume.min() >= np.iinfo(np.int16).min and volume.max() <= np.iinfo(np.int16).max:
            return volume.astype(np.int16)
        return volume
    return np.stack([apply_rescale(ds.pixel_array, ds).astype(np.float32) for ds in slices])
