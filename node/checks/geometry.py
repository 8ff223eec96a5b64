"""Series geometry and completeness, from the per-instance geometry kept in the index.

Slices are sorted along their normal; the findings name the slice positions
involved, in millimetres along that normal (for an axial series, the patient
z). highdicom decides whether the positions form a regular volume and builds
the reconstructed grid (its ``VolumeGeometry``), so the geometry stored for the
annotation checks follows the same conventions highdicom uses to read SEGs:
array axes (slice, row, column), right-handed.

Pure functions of their inputs: the series service (``node.checks.series``)
reads the rows and records the result.
"""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from node.storage.records import InstanceGeometry

#: Two slices closer than this along the normal are at the same position (mm).
DUPLICATE_TOLERANCE_MM = 0.01
#: A gap larger than this many median spacings means missing slices (the issue's rule).
GAP_FACTOR = 1.5


@dataclass(frozen=True)
class SeriesFinding:
    """A series-level problem and the slice positions (mm along the normal) it concerns."""

    rule: str
    message: str
    positions: tuple[float, ...] = ()


@dataclass(frozen=True)
class VolumeGeometry:
    """The reconstructed grid: what annotation masks are mapped onto.

    Axes are highdicom's (slice, row, column); ``direction`` holds one unit
    vector per axis (as columns of a 3x3 matrix, row-major here), ``affine``
    maps (slice, row, column) indices to patient millimetres. ``instances``
    lists SOP Instance UIDs by slice index; ``regular`` is False when the
    positions do not form an evenly spaced stack (the grid then uses the median
    spacing and is only approximate).
    """

    origin: tuple[float, float, float]
    spacing: tuple[float, float, float]
    direction: tuple[tuple[float, float, float], ...]
    affine: tuple[tuple[float, ...], ...]
    size: tuple[int, int, int]
    frame_of_reference_uid: str | None
    regular: bool
    instances: tuple[str, ...]

    def as_dict(self) -> dict:
        return {"axes": ["slice", "row", "column"], "origin": list(self.origin),
                "spacing": list(self.spacing), "direction": [list(r) for r in self.direction],
                "affine": [list(r) for r in self.affine], "size": list(self.size),
                "frame_of_reference_uid": self.frame_of_reference_uid,
                "regular": self.regular, "instances": list(self.instances)}

    @classmethod
    def from_dict(cls, data: dict) -> VolumeGeometry:
        return cls(tuple(data["origin"]), tuple(data["spacing"]),
                   tuple(tuple(r) for r in data["direction"]),
                   tuple(tuple(r) for r in data["affine"]), tuple(data["size"]),
                   data["frame_of_reference_uid"], data["regular"], tuple(data["instances"]))


@dataclass
class SeriesReport:
    """Everything one series check found, and the grid when the series has slice geometry."""

    instances: int
    findings: list[SeriesFinding] = field(default_factory=list)
    geometry: VolumeGeometry | None = None


def _mm(value: float) -> str:
    return f"{value:.6g}"


def _minority(values: list, positions: np.ndarray) -> tuple[object, list[float]]:
    """The most common value and the positions of the slices that differ from it."""
    common = Counter(values).most_common(1)[0][0]
    return common, sorted(float(p) for v, p in zip(values, positions, strict=True)
                          if v != common)


def _mixed(rule: str, what: str, values: list, positions: np.ndarray) -> list[SeriesFinding]:
    if len(set(values)) <= 1:
        return []
    _, odd = _minority(values, positions)
    shown = ", ".join(_mm(p) for p in odd[:8]) + (" ..." if len(odd) > 8 else "")
    return [SeriesFinding(rule, f"mixed {what}: {len(set(values))} values; {len(odd)} of"
                          f" {len(values)} slices differ from the rest, at {shown} mm",
                          tuple(odd))]


def _counts(instances: list[tuple[str, int | None, InstanceGeometry]]) -> list[SeriesFinding]:
    findings = []
    received = len(instances)
    declared = {g.number_of_series_related_instances for _, _, g in instances} - {None}
    if declared and received != max(declared):
        findings.append(SeriesFinding(
            "instance_count", f"received {received} instances, NumberOfSeriesRelatedInstances"
            f" (0020,1209) says {max(declared)}"))
    by_acquisition: dict[int | None, list[InstanceGeometry]] = {}
    for _, _, g in instances:
        by_acquisition.setdefault(g.acquisition_number, []).append(g)
    for number, group in sorted(by_acquisition.items(), key=lambda kv: (kv[0] is None, kv[0])):
        expected = {g.images_in_acquisition for g in group} - {None}
        if expected and len(group) != max(expected):
            label = f"acquisition {number}" if number is not None else "the series"
            findings.append(SeriesFinding(
                "instance_count", f"received {len(group)} images of {label},"
                f" ImagesInAcquisition (0020,1002) says {max(expected)}"))
    return findings


def analyse_series(instances: list[tuple[str, int | None, InstanceGeometry]],
                   spacing_tolerance: float = 0.01,
                   orientation_tolerance: float = 1e-3) -> SeriesReport:
    """Check a series' completeness and geometry; build its grid when it has slices.

    ``instances`` are (SOP Instance UID, InstanceNumber, geometry) in any order.
    """
    report = SeriesReport(len(instances), _counts(instances))
    slices = [(uid, number, g) for uid, number, g in instances if g.is_slice]
    if not slices:
        return report

    orientations = [tuple(round(v / orientation_tolerance) for v in g.orientation)
                    for _, _, g in slices] if orientation_tolerance else \
        [g.orientation for _, _, g in slices]
    common_key = Counter(orientations).most_common(1)[0][0]
    reference = next(g for (_, _, g), key in zip(slices, orientations, strict=True)
                     if key == common_key)
    row, col = np.array(reference.orientation[:3]), np.array(reference.orientation[3:])
    normal = np.cross(row, col)
    normal /= np.linalg.norm(normal)
    points = np.array([g.position for _, _, g in slices])
    along = points @ normal

    report.findings += _mixed("mixed_orientation", "ImageOrientationPatient (0020,0037)",
                              orientations, along)
    report.findings += _mixed("mixed_frame_of_reference", "FrameOfReferenceUID (0020,0052)",
                              [g.frame_of_reference_uid for _, _, g in slices], along)
    report.findings += _mixed("mixed_matrix", "Rows x Columns (0028,0010/0011)",
                              [(g.rows, g.columns) for _, _, g in slices], along)
    report.findings += _mixed("mixed_pixel_spacing", "PixelSpacing (0028,0030)",
                              [tuple(round(v, 4) for v in g.spacing or ()) for _, _, g in slices],
                              along)

    order = np.argsort(along, kind="stable")
    ordered = along[order]
    report.findings += _duplicates(slices, order, ordered)
    unique = _unique_positions(ordered)
    median = float(np.median(np.diff(unique))) if len(unique) > 1 else 0.0
    report.findings += _spacing(unique, median, spacing_tolerance)
    report.findings += _tilt(points[order], normal, orientation_tolerance)
    report.geometry = _grid(slices, reference, points, along, median, spacing_tolerance)
    return report


def _unique_positions(ordered: np.ndarray) -> np.ndarray:
    keep = np.concatenate(([True], np.diff(ordered) > DUPLICATE_TOLERANCE_MM))
    return ordered[keep]


def _duplicates(slices: list, order: np.ndarray, ordered: np.ndarray) -> list[SeriesFinding]:
    findings = []
    start = 0
    for i in range(1, len(ordered) + 1):
        if i < len(ordered) and ordered[i] - ordered[i - 1] <= DUPLICATE_TOLERANCE_MM:
            continue
        if i - start > 1:
            numbers = [slices[j][1] for j in order[start:i]]
            shown = ", ".join(str(n) if n is not None else "?" for n in numbers)
            findings.append(SeriesFinding(
                "duplicate_slice", f"{i - start} slices at position {_mm(ordered[start])} mm"
                f" (InstanceNumber {shown})", (float(ordered[start]),)))
        start = i
    return findings


def _spacing(unique: np.ndarray, median: float, tolerance: float) -> list[SeriesFinding]:
    findings: list[SeriesFinding] = []
    if median <= 0:
        return findings
    uneven: list[tuple[float, float, float]] = []
    for low, high in itertools.pairwise(unique):
        gap = float(high - low)
        if gap > GAP_FACTOR * median:
            missing = max(1, round(gap / median) - 1)
            findings.append(SeriesFinding(
                "missing_slice", f"gap of {_mm(gap)} mm between {_mm(low)} and {_mm(high)} mm"
                f" (median spacing {_mm(median)} mm): about {missing} slice"
                f"{'s' if missing > 1 else ''} missing", (float(low), float(high))))
        elif abs(gap - median) > tolerance * median:
            uneven.append((float(low), float(high), gap))
    if uneven:
        shown = ", ".join(f"{_mm(g)} mm from {_mm(lo)} to {_mm(hi)}" for lo, hi, g in uneven[:6])
        findings.append(SeriesFinding(
            "uneven_spacing", f"{len(uneven)} spacings differ from the median {_mm(median)} mm"
            f" by more than {tolerance:.0%}: {shown}{' ...' if len(uneven) > 6 else ''}",
            tuple(sorted({p for lo, hi, _ in uneven for p in (lo, hi)}))))
    return findings


def _tilt(points: np.ndarray, normal: np.ndarray, tolerance: float) -> list[SeriesFinding]:
    """Slices stacked obliquely to their normal: the in-plane drift of the stack."""
    if len(points) < 2:
        return []
    stack = points[-1] - points[0]
    length = float(np.linalg.norm(stack))
    if length == 0:
        return []
    sine = float(np.linalg.norm(np.cross(stack / length, normal)))
    if sine <= max(tolerance, 1e-6):
        return []
    angle = float(np.degrees(np.arcsin(min(sine, 1.0))))
    first, last = float(points[0] @ normal), float(points[-1] @ normal)
    return [SeriesFinding("gantry_tilt", f"slices stacked {angle:.2f} degrees off their normal"
                          f" (gantry tilt) from {_mm(first)} to {_mm(last)} mm", (first, last))]


def _grid(slices: list, reference: InstanceGeometry, points: np.ndarray, along: np.ndarray,
          median: float, tolerance: float) -> VolumeGeometry | None:
    """highdicom's volume geometry for the slices (its slice order and conventions)."""
    if reference.rows is None or reference.columns is None or reference.spacing is None:
        return None
    # lazy: highdicom (and the pydicom.sr it brings) costs every process ~20 MB
    from highdicom.spatial import get_volume_positions
    from highdicom.volume import VolumeGeometry as HighdicomGeometry

    spacing, indices = (None, None)
    if len(slices) > 1:
        spacing, indices = get_volume_positions(points, reference.orientation,
                                                rtol=tolerance or None, sort=True)
    regular = len(slices) == 1 or indices is not None
    if indices is None:
        # Not a regular stack: order against highdicom's right-handed stacking
        # (slice axis = column direction x row direction, i.e. minus the normal).
        indices = list(np.argsort(np.argsort(-along, kind="stable"), kind="stable"))
    first = int(np.argmin(indices))
    geometry = HighdicomGeometry.from_attributes(
        image_position=points[first], image_orientation=reference.orientation,
        rows=reference.rows, columns=reference.columns, pixel_spacing=reference.spacing,
        spacing_between_slices=float(spacing or median or 1.0), number_of_frames=len(slices),
        coordinate_system="PATIENT", frame_of_reference_uid=reference.frame_of_reference_uid,
    )
    by_index = [uid for _, (uid, _, _) in sorted(zip(indices, slices, strict=True),
                                                 key=lambda pair: pair[0])]
    direction = geometry.direction
    return VolumeGeometry(
        tuple(float(v) for v in geometry.position), tuple(float(v) for v in geometry.spacing),
        tuple(tuple(float(v) for v in r) for r in direction),
        tuple(tuple(float(v) for v in r) for r in geometry.affine),
        tuple(int(v) for v in geometry.spatial_shape), reference.frame_of_reference_uid,
        regular, tuple(by_index),
    )
