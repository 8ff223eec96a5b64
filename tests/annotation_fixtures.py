"""Test data for the annotation tests: a small phantom series, its spheres as
ground-truth masks, SEGs built with highdicom, and overlay copies built the
way the Horos/OsiriX pipeline builds them (seed 004: one ROI per group 6000 +
2j, same SOP Instance UID, same pixels).

The workflow the node tests follow: the phantom series arrives from the
hospital PACS (a ``clinical`` peer) and is de-identified on the way in; the
annotators draw on what the node serves them, the stored pseudonymous slices
(:class:`Served`, read back from the node's blob store), and push their SEGs
and overlay copies from an ``annotator`` peer of their own. Every builder takes
the series it draws on; its default, the phantom as the PACS holds it, is for
the unit tests that never reach a node (the geometry is the same either way).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import highdicom as hd
import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.filebase import DicomBytesIO
from pydicom.pixels import pack_bits
from pydicom.tag import Tag
from pydicom.uid import RLELossless

from node.context import NodeContext
from node.ingest.types import Source, StoreResult
from node.phantom import Phantom, Sphere
from tests.harness import TEST_AET, NodeConfig, peer, write_config

if TYPE_CHECKING:
    from tests.harness import Node, Response

#: 40 slices of 256×256 at 1.4 mm (the phantom's 358 mm field), 2.5 mm apart:
#: every sphere fits, and a script hard-coding 512×512 overlays is wrong here.
PHANTOM = Phantom(seed="annotations", slices_count=40, rows=256, columns=256, pixel_spacing=1.4)

NODULE = hd.sr.CodedConcept("27925004", "SCT", "Nodule")
ABNORMAL = hd.sr.CodedConcept("49755003", "SCT", "Morphologically Abnormal Structure")
VESSEL = hd.sr.CodedConcept("59820001", "SCT", "Blood Vessel")
ANATOMY = hd.sr.CodedConcept("91723000", "SCT", "Anatomical Structure")


def sphere_mask(phantom: Phantom, sphere: Sphere) -> np.ndarray:
    """The voxels the phantom fills with ``sphere`` (the same rule as its pixels)."""
    x = phantom.origin[0] + np.arange(phantom.columns) * phantom.pixel_spacing
    y = phantom.origin[1] + np.arange(phantom.rows) * phantom.pixel_spacing
    xx, yy = np.meshgrid(x, y)
    out = np.zeros((phantom.slices_count, phantom.rows, phantom.columns), dtype=bool)
    for k in range(phantom.slices_count):
        dz2 = (phantom.z_of(k) - sphere.center_mm[2]) ** 2
        if dz2 < sphere.radius_mm ** 2:
            out[k] = (xx - sphere.center_mm[0]) ** 2 + (yy - sphere.center_mm[1]) ** 2 \
                < sphere.radius_mm ** 2 - dz2
    return out


@functools.cache
def truth(phantom: Phantom = PHANTOM) -> tuple[np.ndarray, ...]:
    """Ground truth of the three spheres: big soft tissue, bone, small nodule (read-only)."""
    masks = tuple(sphere_mask(phantom, s) for s in phantom.spheres)
    for m in masks:
        m.flags.writeable = False
    return masks


class Served:
    """The phantom series as a node serves it: its stored, de-identified slices.

    What an annotator's tool retrieves and draws on: pseudonymous UIDs, patient
    and shifted dates, as the clinical route stored them. Quacks like the
    :class:`Phantom` for the builders below (``slice``, ``sop_uid``,
    ``series_uid`` and the geometry, which de-identification leaves alone:
    checked when it is read back). Equal (and cached alike) by its slices' UIDs.
    """

    def __init__(self, datasets: list[Dataset]) -> None:
        by_depth = sorted(datasets, key=lambda ds: float(ds.ImagePositionPatient[2]))
        assert len(by_depth) == PHANTOM.slices_count, "the whole series is stored"
        for k, ds in enumerate(by_depth):
            assert float(ds.ImagePositionPatient[2]) == PHANTOM.z_of(k)
            assert str(ds.PatientID).startswith("LAMINA-"), "served slices are pseudonymous"
        self._slices = tuple(by_depth)
        self._uids = tuple(str(ds.SOPInstanceUID) for ds in by_depth)
        for name in ("slices_count", "rows", "columns", "origin", "pixel_spacing", "spheres"):
            setattr(self, name, getattr(PHANTOM, name))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Served) and other._uids == self._uids

    def __hash__(self) -> int:
        return hash(self._uids)

    @property
    def series_uid(self) -> str:
        return str(self._slices[0].SeriesInstanceUID)

    @property
    def study_uid(self) -> str:
        return str(self._slices[0].StudyInstanceUID)

    def sop_uid(self, k: int) -> str:
        return self._uids[k]

    def z_of(self, k: int) -> float:
        return PHANTOM.z_of(k)

    def slice(self, k: int) -> Dataset:
        """A copy of stored slice ``k`` (pixels included), as a retrieve would give it."""
        return copy.deepcopy(self._slices[k])

    def write(self, folder: Path) -> list[Path]:
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for k in range(self.slices_count):
            path = folder / f"CT{k + 1:04d}.dcm"
            self.slice(k).save_as(path, enforce_file_format=True)
            paths.append(path)
        return paths


#: What the builders draw on: the phantom as the PACS holds it, or as a node serves it.
Series = Phantom | Served


def served(ctx: NodeContext) -> Served:
    """The phantom series stored in an in-process node, read back from its blob store.

    Found through the index by the pseudonym the clinical route gave its series UID.
    """
    series_uid = ctx.key.uid(PHANTOM.series_uid)
    with ctx.index.connection() as conn:
        shas = [r[0] for r in conn.execute(
            "SELECT i.blob_sha256 FROM instance i JOIN series s ON s.id = i.series_fk"
            " WHERE s.series_instance_uid = ?", (series_uid,))]
    return Served([dcmread(ctx.blobs.local_path(sha)) for sha in shas])


def served_by(node: Node) -> Served:
    """The phantom series stored by a running node (in-process or not), read back from its
    blob store."""
    series_uid = node.project_key().uid(PHANTOM.series_uid)
    shas = [sha for (sha,) in node.rows(
        "SELECT i.blob_sha256 FROM instance i JOIN series s ON s.id = i.series_fk"
        " WHERE s.series_instance_uid = ?", series_uid)]
    return Served([dcmread(node.blob_path(sha)) for sha in shas])


def headers(series: Series = PHANTOM) -> list[Dataset]:
    out = []
    for k in range(series.slices_count):
        ds = series.slice(k)
        del ds.PixelData
        out.append(ds)
    return out


def description(number: int, label: str, category=ABNORMAL, type_=NODULE) -> hd.seg.SegmentDescription:
    return hd.seg.SegmentDescription(
        segment_number=number, segment_label=label, segmented_property_category=category,
        segmented_property_type=type_, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL)


def make_seg(masks: list[np.ndarray], labels: list[str], *, seg_type: str = "BINARY",
             omit_empty: bool = True, series: Series = PHANTOM, codes=None,
             fractional: np.ndarray | None = None) -> hd.seg.Segmentation:
    """A SEG of ``masks`` (full-grid bool arrays) on ``series``.

    FRACTIONAL uses ``fractional`` (slices, rows, cols, segments) floats when given.
    """
    codes = codes or [(ABNORMAL, NODULE)] * len(masks)
    descriptions = [description(i + 1, label, *codes[i]) for i, label in enumerate(labels)]
    if seg_type == "LABELMAP":
        pixels = np.zeros(masks[0].shape, dtype=np.uint8)
        for i, m in enumerate(masks):
            pixels[m] = i + 1
    elif seg_type == "FRACTIONAL" and fractional is not None:
        pixels = fractional.astype(np.float32)
    else:
        pixels = np.stack(masks, axis=-1).astype(np.uint8 if seg_type == "BINARY" else np.float32)
    return hd.seg.Segmentation(
        source_images=headers(series), pixel_array=pixels,
        segmentation_type=getattr(hd.seg.SegmentationTypeValues, seg_type),
        segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=100,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="Lamina tests",
        manufacturer_model_name="fixtures", software_versions="1", device_serial_number="1",
        content_creator_name="Reader^One", omit_empty_frames=omit_empty,
        max_fractional_value=255)


def permute_frames(seg: Dataset, seed: int = 7) -> Dataset:
    """The same SEG with its frames (pixels and per-frame groups) in a shuffled order."""
    parsed = hd.seg.Segmentation.from_dataset(copy.deepcopy(seg), copy=True)
    frames = np.stack([parsed.get_stored_frame(i + 1) for i in range(int(seg.NumberOfFrames))])
    order = np.random.default_rng(seed).permutation(len(frames))
    out = copy.deepcopy(seg)
    out.PerFrameFunctionalGroupsSequence = [seg.PerFrameFunctionalGroupsSequence[i] for i in order]
    shuffled = frames[order]
    if int(seg.BitsAllocated) == 1:
        out.PixelData = pack_bits(shuffled.ravel())
    else:
        out.PixelData = shuffled.astype(np.uint8).tobytes()
    return out


def overlay_copy(k: int, rois: list[tuple[int, str | None, np.ndarray]],
                 series: Series = PHANTOM, size: tuple[int, int] | None = None) -> Dataset:
    """The annotator's copy of slice ``k`` of ``series``: same UID and pixels, one ROI
    per overlay group.

    ``rois`` are (group, label or None, rows × columns bool plane). ``size``
    overrides OverlayRows/Columns (the 512×512 hard-coding of scripts in the wild).
    """
    ds = series.slice(k)
    for group, label, plane in rois:
        rows, cols = size or plane.shape
        data = np.zeros((rows, cols), dtype=np.uint8)
        r, c = min(rows, plane.shape[0]), min(cols, plane.shape[1])
        data[:r, :c] = plane[:r, :c]
        ds.add_new(Tag(group, 0x0010), "US", rows)
        ds.add_new(Tag(group, 0x0011), "US", cols)
        ds.add_new(Tag(group, 0x0040), "CS", "R")
        ds.add_new(Tag(group, 0x0050), "SS", [1, 1])
        ds.add_new(Tag(group, 0x0100), "US", 1)
        ds.add_new(Tag(group, 0x0102), "US", 0)
        if label is not None:
            ds.add_new(Tag(group, 0x0022), "LO", label)
            ds.add_new(Tag(group, 0x1500), "LO", label)
        ds.add_new(Tag(group, 0x3000), "OW", pack_bits(data.ravel(), pad=True))
    return ds


#: The protocol the annotation tests run under. The phantom's spheres are
#: "Nodule 1" (r 20 mm), "Bone" (r 12 mm) and "Nodule 2" (r 8 mm): all fit.
TEST_PROTOCOL = """
[protocol]
name = "tests"
version = "1"

[classes.nodule]
label = "Nodule"
pattern = "nodule[ _-]?\\\\d+"
category = { scheme = "SCT", value = "49755003", meaning = "Morphologically Abnormal Structure" }
type = { scheme = "SCT", value = "27925004", meaning = "Nodule" }
window = "lung"
geometry = "volume"
components = 1
diameter_mm = [3.0, 45.0]
volume_mm3 = [50.0, 40000.0]
diameter_jump_mm = 3.0
exclusive_with = ["nodule", "vessel"]

[classes.bone]
label = "Bone"
category = { scheme = "SCT", value = "91723000", meaning = "Anatomical Structure" }
type = { scheme = "SCT", value = "272673000", meaning = "Bone" }
window = "bone"

[classes.vessel]
label = "Vessel"
category = { scheme = "SCT", value = "91723000", meaning = "Anatomical Structure" }
type = { scheme = "SCT", value = "59820001", meaning = "Blood Vessel" }
window = "mediastinal"
components = 3
"""

BONE = hd.sr.CodedConcept("272673000", "SCT", "Bone")
LABELS = ["Nodule 1", "Bone", "Nodule 2"]
CODES = [(ABNORMAL, NODULE), (ANATOMY, BONE), (ABNORMAL, NODULE)]


def valid_seg(series: Series = PHANTOM, **kwargs) -> hd.seg.Segmentation:
    """The three spheres, correctly labelled and coded: a SEG without findings."""
    return make_seg(truth(), LABELS, codes=CODES, series=series, **kwargs)


def fractional_seg(series: Series = PHANTOM) -> hd.seg.Segmentation:
    """FRACTIONAL: 0.8 inside each sphere, 0.3 in a one-voxel halo the threshold must drop."""
    masks = truth()
    values = np.zeros((*masks[0].shape, len(masks)), dtype=np.float32)
    for i, m in enumerate(masks):
        halo = np.zeros_like(m)
        halo[:, 1:, :] |= m[:, :-1, :]
        halo[:, :, 1:] |= m[:, :, :-1]
        values[..., i][halo & ~m] = 0.3
        values[..., i][m] = 0.8
    return make_seg(masks, LABELS, codes=CODES, seg_type="FRACTIONAL", fractional=values,
                    series=series)


def float32_positions(seg: Dataset) -> Dataset:
    """Plane positions rewritten the way dcmqi writes them (float32 text, e.g. -44.4500008)."""
    out = copy.deepcopy(seg)
    for item in out.PerFrameFunctionalGroupsSequence:
        plane = item.PlanePositionSequence[0]
        plane.ImagePositionPatient = [f"{np.float32(v):.9g}" for v in plane.ImagePositionPatient]
    return out


def rotating_overlays(masks: list[np.ndarray], labels: list[str | None],
                      person: str = "Reader^Horos", series: Series = PHANTOM) -> list[Dataset]:
    """Overlay copies of every slice a mask touches, the Horos-pipeline way.

    Each slice's ROIs take groups 6000 + 2j in an order that rotates from
    slice to slice, so the same ROI sits in different groups on different
    slices; OperatorsName carries the annotator.
    """
    copies = []
    for k in range(masks[0].shape[0]):
        present = [(labels[i], m[k]) for i, m in enumerate(masks) if m[k].any()]
        if not present:
            continue
        shift = k % len(present)
        present = present[shift:] + present[:shift]
        ds = overlay_copy(k, [(0x6000 + 2 * j, label, plane)
                              for j, (label, plane) in enumerate(present)], series)
        ds.OperatorsName = person
        copies.append(ds)
    return copies


# --- the catalogue: valid objects, and one defective variant per check ------------


def _nodule3(mask: np.ndarray, series: Series) -> hd.seg.Segmentation:
    return make_seg([mask], ["Nodule 3"], series=series)


def _line(length: int) -> np.ndarray:
    """A 1-voxel-thick line of ``length`` voxels along the rows, on slices 30 and 31."""
    m = np.zeros((PHANTOM.slices_count, PHANTOM.rows, PHANTOM.columns), dtype=bool)
    m[30:32, 200, 100:100 + length] = True
    return m


def _with_stray() -> np.ndarray:
    m = truth()[2].copy()
    m[20:22, 10:13, 10:13] = True  # two slices, far from the nodule, two slices above it
    return m


def _with_gap() -> np.ndarray:
    m = truth()[2].copy()
    m[14] = False  # the nodule's equator
    return m


def _with_dent() -> np.ndarray:
    m = truth()[0].copy()
    x = PHANTOM.origin[0] + np.arange(PHANTOM.columns) * PHANTOM.pixel_spacing
    xx, yy = np.meshgrid(x, x)
    m[20] = xx ** 2 + yy ** 2 < 14.0 ** 2  # the 20 mm sphere's equator drawn at 14 mm
    return m


def _vessel_through_nodule() -> np.ndarray:
    m = np.zeros_like(truth()[2])
    center_row = round((40.0 - PHANTOM.origin[1]) / PHANTOM.pixel_spacing)
    center_col = round((-70.0 - PHANTOM.origin[0]) / PHANTOM.pixel_spacing)
    m[8:21, center_row - 1:center_row + 2, center_col - 1:center_col + 2] = True
    return m


FINDING_CHECKS = ("components", "diameter", "diameter-jump", "empty", "geometry", "overlap",
                  "slice-gap", "unknown-label", "volume")
SEG_REFUSAL_CHECKS = ("frame-of-reference", "instances", "plane-position", "seg-format", "series")
OVERLAY_REFUSAL_CHECKS = ("frame-of-reference", "overlay-data", "overlay-group", "overlay-size",
                          "pixel-data", "series")


@functools.cache
def seg_finding_variants(series: Series = PHANTOM) -> dict[str, hd.seg.Segmentation]:
    """Finding name → a SEG on ``series`` that should produce exactly that one finding."""
    t = truth()
    return {
        "empty": make_seg([t[2], np.zeros_like(t[2])], ["Nodule 2", "Nodule 3"], series=series),
        "components": make_seg([_with_stray()], ["Nodule 2"], series=series),
        "slice-gap": make_seg([_with_gap()], ["Nodule 2"], series=series),
        "diameter-jump": make_seg([_with_dent()], ["Nodule 1"], series=series),
        "volume": _nodule3(_line(4), series),
        "diameter": _nodule3(_line(40), series),
        "geometry": _nodule3(np.where(np.arange(40)[:, None, None] == 14, t[2], False), series),
        "overlap": make_seg([t[2], _vessel_through_nodule()], ["Nodule 2", "Vessel"],
                            codes=[(ABNORMAL, NODULE), (ANATOMY, VESSEL)], series=series),
        "unknown-label": make_seg([t[0]], ["Liver"], codes=[(ANATOMY, ANATOMY)],
                                  series=series),
    }


@functools.cache
def seg_refusal_variants(series: Series = PHANTOM) -> dict[str, Dataset]:
    """Refusal check → a SEG on ``series`` (otherwise valid) failing exactly that check.

    Each is a valid SEG IOD to validation, which runs first on every object (a SEG
    without its SegmentSequence, say, is refused there as a missing Type 1 attribute).
    """
    variants = {}
    ds = copy.deepcopy(valid_seg(series))
    ds.PerFrameFunctionalGroupsSequence[0].SegmentIdentificationSequence[0] \
        .ReferencedSegmentNumber = 9  # described are 1 to 3
    variants["seg-format"] = ds
    ds = copy.deepcopy(valid_seg(series))
    ds.ReferencedSeriesSequence[0].SeriesInstanceUID = hd.UID()
    variants["series"] = ds
    ds = copy.deepcopy(valid_seg(series))
    source = ds.PerFrameFunctionalGroupsSequence[0].DerivationImageSequence[0]
    source.SourceImageSequence[0].ReferencedSOPInstanceUID = hd.UID()
    variants["instances"] = ds
    ds = copy.deepcopy(valid_seg(series))
    ds.FrameOfReferenceUID = hd.UID()
    variants["frame-of-reference"] = ds
    ds = copy.deepcopy(valid_seg(series))
    plane = ds.PerFrameFunctionalGroupsSequence[1].PlanePositionSequence[0]
    x, y, z = (float(v) for v in plane.ImagePositionPatient)
    plane.ImagePositionPatient = [x, y, z + 1.0]
    variants["plane-position"] = ds
    return variants


@functools.cache
def overlay_refusal_variants(series: Series = PHANTOM) -> dict[str, Dataset]:
    """Refusal check → one overlay copy of slice 20 of ``series`` failing exactly that check.

    Each copy names its own annotator, so each lands in an annotation of its own.
    """
    k, t = 20, truth()
    plane = t[0][k]

    def good(person: str) -> Dataset:
        ds = overlay_copy(k, [(0x6000, "Nodule 1", plane)], series)
        ds.OperatorsName = person
        return ds

    variants = {}
    ds = overlay_copy(k, [(0x6000 + 2 * j, f"Nodule {j + 1}", plane) for j in range(17)],
                      series)
    ds.OperatorsName = "Reader^Spill"
    variants["overlay-group"] = ds
    ds = overlay_copy(k, [(0x6000, "Nodule 1", plane)], series, size=(512, 512))
    ds.OperatorsName = "Reader^Hardcoded"
    variants["overlay-size"] = ds
    ds = good("Reader^Truncated")
    ds[0x60003000].value = ds[0x60003000].value[: len(ds[0x60003000].value) // 2]
    variants["overlay-data"] = ds
    ds = good("Reader^Rewindowed")
    pixels = ds.pixel_array.copy()
    pixels[100:110, 100:110] += 50
    ds.PixelData = pixels.tobytes()
    variants["pixel-data"] = ds
    ds = good("Reader^Frame")
    ds.FrameOfReferenceUID = hd.UID()
    variants["frame-of-reference"] = ds
    ds = good("Reader^Series")
    ds.SeriesInstanceUID = hd.UID()
    variants["series"] = ds
    return variants


def undecodable_seg(series: Series = PHANTOM) -> Dataset:
    """An RLE-compressed SEG whose frames are whole fragments of the right count that do
    not decode: it passes validation (which reads no pixels) and only decoding finds it."""
    seg = hd.seg.Segmentation(
        source_images=headers(series), pixel_array=truth()[2].astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.FRACTIONAL,
        segment_descriptions=[description(1, "Nodule 2")], series_instance_uid=hd.UID(),
        series_number=100, sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer="Lamina tests", manufacturer_model_name="fixtures", software_versions="1",
        device_serial_number="1", transfer_syntax_uid=RLELossless, max_fractional_value=255)
    frames = generate_frames(seg.PixelData, number_of_frames=int(seg.NumberOfFrames))
    seg.PixelData = encapsulate([b"\xff" * len(frame) for frame in frames])  # no RLE header
    return seg


def overlay_gap_copies(series: Series = PHANTOM) -> list[Dataset]:
    """Overlay copies of "Nodule 2" with slice 14's copy never sent: a slice gap."""
    copies = rotating_overlays([truth()[2]], ["Nodule 2"], person="Reader^Gap", series=series)
    return [c for c in copies if int(c.InstanceNumber) != 15]


# --- an in-process node (unit tests): same context and services as the server ---------

#: The hospital PACS: sends the phantom series identified; it is de-identified on the way in.
PACS = Source("PACS", "127.0.0.1", "unit-tests", route="clinical")
#: An annotator's workstation: sends SEGs and overlay copies drawn on the served series.
ANNOTATOR = Source("ANNOTATOR", "127.0.0.1", "unit-tests", route="annotator")


def encode(ds: Dataset) -> bytes:
    buffer = DicomBytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def node_config(folder: Path, protocol: str | None = TEST_PROTOCOL,
                settle_seconds: float = 1.0, pending_seconds: float | None = None,
                peers: dict[str, dict] | None = None, **sections: Any) -> NodeConfig:
    """A node's config (tests/harness.py) under ``protocol`` (written beside it), with
    the PACS and the annotators' workstation as peers (:data:`PEERS`, or ``peers``);
    ``pending_seconds``: how long an annotation waits for its images (default: the node's)."""
    annotations: dict[str, Any] = {}
    if protocol is not None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "protocol.toml").write_text(protocol)
        annotations = {"protocol": str(folder / "protocol.toml"),
                       "settle_seconds": settle_seconds}
    if pending_seconds is not None:
        annotations["pending_seconds"] = pending_seconds
    return write_config(folder, peers=PEERS if peers is None else peers,
                        annotations=annotations, **sections)


def open_node(folder: Path, protocol: str | None = TEST_PROTOCOL,
              settle_seconds: float = 1.0) -> NodeContext:
    """A NodeContext (not started: after-commit work runs inline) on ``folder`` under
    ``protocol``, with the phantom series stored as the PACS sends it (de-identified on
    the way in: :func:`served` reads it back).

    Its settings are in ``folder/node.toml``, so CLI commands can run against it;
    the project key is ``folder/keys/project.key``, outside the data folder.
    """
    ctx = NodeContext.open(node_config(folder, protocol, settle_seconds).settings(),
                           with_key=True)
    for k in range(PHANTOM.slices_count):
        assert ctx.ingest.ingest_bytes(encode(PHANTOM.slice(k)), PACS).action == "stored"
    return ctx


def ingest(ctx: NodeContext, ds: Dataset, source: Source = ANNOTATOR) -> StoreResult:
    """Receive ``ds`` in-process, from the annotator's workstation unless ``source`` says."""
    return ctx.ingest.ingest_bytes(encode(ds), source)


def annotation_of(ctx: NodeContext, sop_instance_uid: str) -> int:
    """The annotation an object (SEG, overlay copy) was filed under (its newest)."""
    with ctx.index.connection() as conn:
        return conn.execute("SELECT annotation_fk FROM annotation_object WHERE sop_instance_uid = ?"
                            " ORDER BY id DESC LIMIT 1", (sop_instance_uid,)).fetchone()[0]


def current_findings(ctx: NodeContext, annotation_id: int) -> list[dict]:
    """The current findings, once every overlay set still settling has been checked."""
    ctx.annotations.flush()
    with ctx.index.connection() as conn:
        rows = conn.execute(
            "SELECT f.check_name, f.structure_id, f.slices, f.detail FROM annotation_finding f"
            " JOIN annotation a ON a.current_check_fk = f.check_fk WHERE a.id = ?",
            (annotation_id,)).fetchall()
    return [{"check": r[0], "structure_id": r[1], "slices": json.loads(r[2]), "detail": r[3]}
            for r in rows]


# --- a running node (tests/harness.py): what the annotators send, what it made of it --------

#: The annotators' workstation; the PACS calls as TEST_AET.
ANNOTATOR_AET = "ANNOTATOR"
PEERS = {
    "pacs": peer(TEST_AET, "store", route="clinical"),
    "workstation": peer(ANNOTATOR_AET, "store", "find", "move", "get", route="annotator"),
}


#: A research archive that de-identifies upstream (TCIA, IDC): its studies are stored as
#: they are received; the annotators' workstation works on them.
ARCHIVE_AET = "ARCHIVE"
ARCHIVE_PEERS = {
    "archive": peer(ARCHIVE_AET, "store", route="deidentified"),
    "workstation": peer(ANNOTATOR_AET, "store", "find", "move", "get", route="annotator"),
}


@dataclasses.dataclass(frozen=True)
class Archived(Phantom):
    """A study from a public collection: de-identified upstream, under its own IDs."""

    def slice(self, index: int) -> Dataset:
        ds = super().slice(index)
        ds.PatientIdentityRemoved = "YES"
        ds.DeidentificationMethod = "collection de-identification"
        return ds


def archived(seed: str) -> Archived:
    """A collection's study on the grid of :data:`PHANTOM` (so :func:`truth` fits it)."""
    return Archived(seed=seed, slices_count=PHANTOM.slices_count, rows=PHANTOM.rows,
                    columns=PHANTOM.columns, pixel_spacing=PHANTOM.pixel_spacing,
                    patient_id=f"LIDC-{seed}", patient_name=f"LIDC-{seed}")


def store_phantom(node: Node) -> None:
    """The phantom series from the PACS (stored de-identified: :func:`served_by`)."""
    slices = [PHANTOM.slice(k) for k in range(PHANTOM.slices_count)]
    assert node.store(slices) == [(0, "")] * len(slices)


def send(node: Node, datasets: list) -> list[Response]:
    """C-STORE from the annotators' workstation."""
    return node.store(datasets, aet=ANNOTATOR_AET)


def annotations(node: Node) -> dict[str, dict]:
    """The node's annotations by key, read from its index as ``annotations list`` does."""
    with node.index() as index, index.reader() as r:
        return {row["key"]: row for row in r.annotations.list()}


def settled(node: Node, key: str, timeout: float = 30.0) -> dict:
    """An annotation once its check after the answer has run: an overlay set settles after
    its last copy, a SEG is checked on the node's worker. Refused ones never wait."""
    deadline = time.monotonic() + timeout
    while True:
        node.drain()
        row = annotations(node).get(key)
        if (row and row["state"] != "received") or time.monotonic() > deadline:
            return row
        time.sleep(0.1)


def in_state(node: Node, key: str, state: str, timeout: float = 30.0) -> dict:
    """An annotation once it is in ``state`` (or its row as it is after ``timeout``)."""
    deadline = time.monotonic() + timeout
    while True:
        node.drain()
        row = annotations(node).get(key)
        if (row and row["state"] == state) or time.monotonic() > deadline:
            return row
        time.sleep(0.1)


def seg_annotation(node: Node, seg) -> dict:
    return settled(node, f"seg|{seg.SOPInstanceUID}")


def findings(node: Node, annotation_id: int) -> list[dict]:
    """The current findings, as ``lamina annotations show ID --json`` reports them."""
    run = node.cli("annotations", "show", str(annotation_id), "--json")
    assert run.exit_code == 0, run.output
    return json.loads(run.stdout)["findings"]


def finding_checks(node: Node, annotation_id: int) -> list[str]:
    with node.index() as index, index.reader() as r:
        check = r.annotations.get(annotation_id)["current_check_fk"]
        return [f["check_name"] for f in r.annotations.findings(check)]


def write(folder: Path, datasets) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, ds in enumerate(datasets):
        path = folder / f"{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


# --- dcmqi (PyPI "dcmqi"), and dicom3tools' dciodvfy ------------------------------------


def tool(name: str, package: str) -> str:
    """The path of an external tool, or a pytest skip naming what provides it.

    Tools pip installs land beside the interpreter, which may not be on PATH.
    """
    import os
    import shutil
    import sys
    import sysconfig

    import pytest

    search = os.pathsep.join([os.environ.get("PATH", ""), sysconfig.get_path("scripts"),
                              str(Path(sys.executable).parent)])
    path = shutil.which(name, path=search)
    if path is None:
        pytest.skip(f"{name} is not installed ({package}; .ci/run installs it)")
    return path


def dcmqi_seg(folder: Path, series: Series = PHANTOM) -> Dataset:
    """The three spheres as a SEG written by dcmqi's itkimage2segimage from a NRRD label map
    on ``series`` (its slices written out as the DICOM input dcmqi reads).

    dcmqi references only the slices that carry frames and writes float32 positions.
    """
    import subprocess

    import SimpleITK as sitk
    from pydicom import dcmread

    from node.annotations.grid import SeriesGrid

    binary = tool("itkimage2segimage", "PyPI package dcmqi")
    folder.mkdir(parents=True, exist_ok=True)
    series.write(folder / "ct")
    labels = np.zeros((PHANTOM.slices_count, PHANTOM.rows, PHANTOM.columns), dtype=np.uint8)
    for i, m in enumerate(truth()):
        labels[m] = i + 1
    sitk.WriteImage(SeriesGrid.from_headers(headers(series)).to_image(labels),
                    str(folder / "labels.nrrd"))

    def code(c: hd.sr.CodedConcept) -> dict:
        return {"CodeValue": c.value, "CodingSchemeDesignator": c.scheme_designator,
                "CodeMeaning": c.meaning}

    meta = {"ContentCreatorName": "Reader^Dcmqi", "ClinicalTrialSeriesID": "1",
            "ClinicalTrialTimePointID": "1", "SeriesDescription": "dcmqi", "SeriesNumber": "300",
            "InstanceNumber": "1", "segmentAttributes": [[
                {"labelID": i + 1, "SegmentLabel": label, "SegmentDescription": label,
                 "SegmentAlgorithmType": "MANUAL",
                 "SegmentedPropertyCategoryCodeSequence": code(CODES[i][0]),
                 "SegmentedPropertyTypeCodeSequence": code(CODES[i][1])}
                for i, label in enumerate(LABELS)]]}
    (folder / "meta.json").write_text(json.dumps(meta))
    subprocess.run([binary, "--inputImageList", str(folder / "labels.nrrd"),
                    "--inputDICOMDirectory", str(folder / "ct"),
                    "--outputDICOM", str(folder / "seg.dcm"),
                    "--inputMetadata", str(folder / "meta.json")],
                   check=True, capture_output=True, timeout=120)
    return dcmread(folder / "seg.dcm")


def seg_read_back_with_dcmqi(seg_path: Path, folder: Path, grid) -> dict[str, np.ndarray]:
    """segimage2itkimage's reading of a SEG: segment label → bool array on ``grid``.

    dcmqi writes each segment over the extent of its frames only; nearest-
    neighbour resampling onto the grid (voxel centres coincide) places it.
    """
    import subprocess

    import SimpleITK as sitk

    binary = tool("segimage2itkimage", "PyPI package dcmqi")
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run([binary, "--inputDICOM", str(seg_path), "--outputDirectory", str(folder),
                    "-t", "nrrd"], check=True, capture_output=True, timeout=120)
    meta = json.loads((folder / "meta.json").read_text())
    reference = grid.to_image(np.zeros(grid.shape, dtype=np.uint8))
    out = {}
    for attributes in meta["segmentAttributes"]:
        for item in attributes:
            image = sitk.ReadImage(str(folder / f"{item['labelID']}.nrrd"))
            placed = sitk.Resample(image, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
            out[item["SegmentLabel"]] = sitk.GetArrayFromImage(placed) != 0
    return out


#: Valid SEGs of every kind the node takes in, each built on the series it is drawn on.
VALID_SEGS = {
    "binary": lambda s: valid_seg(s),
    "binary, empty frames present": lambda s: valid_seg(s, omit_empty=False),
    "binary, frames permuted": lambda s: permute_frames(valid_seg(s)),
    "binary, float32 positions": lambda s: float32_positions(valid_seg(s)),
    "fractional": fractional_seg,
    "labelmap": lambda s: valid_seg(s, seg_type="LABELMAP"),
}
