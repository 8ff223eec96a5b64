"""Consistency checks per structure in 3D: findings, not refusals.

These catch the slice-to-slice inconsistencies that pass a visual spot-check
and only surface when a model trains on them. Every finding names its
structure and the grid slices concerned; the service turns slice indices into
positions in mm when it stores them.

* ``unknown-label``  the protocol declares classes and this label is none of them;
* ``empty``          the structure has no voxel;
* ``slice-gap``      present on slices k−1 and k+1, absent on k;
* ``components``     more 3D-connected components than the class allows (single-slice
                     gaps are bridged first, so a gap is reported once, as a gap);
* ``diameter-jump``  an interior slice whose in-plane diameter is above both
                     neighbours' or below both by more than the class threshold
                     (a sphere's cap grows monotonically and is never flagged);
* ``volume`` / ``diameter``  volume or maximum in-plane diameter outside the class's range;
* ``geometry``       a "volume" class drawn on one slice, or a "planar" one on several;
* ``overlap``        two structures of classes the protocol declares exclusive share voxels.

In-plane diameter is the maximum Feret diameter of the slice's pixel centres
(what a reader's calliper measures), computed from boundary pixels projected
on 90 directions: ITK's exact Feret is quadratic in the boundary and takes
minutes on an organ-sized slice.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from node.annotations.grid import SeriesGrid
from node.annotations.masks import Mask
from node.checks.protocol import LabelClass, Protocol

_ANGLES = np.linspace(0.0, np.pi, 90, endpoint=False)
_DIRECTIONS = np.stack([np.cos(_ANGLES), np.sin(_ANGLES)])  # (2, 90)


@dataclass(frozen=True)
class Finding:
    check: str
    structure_id: str
    label: str
    slices: tuple[int, ...]  # grid slice indices, ascending
    detail: str


@dataclass(frozen=True)
class StructureSummary:
    """What the index keeps about a checked structure."""

    structure_id: str
    label: str
    class_key: str | None
    voxels: int
    volume_mm3: float
    max_diameter_mm: float
    slices: tuple[int, ...]


def check_structures(masks: list[Mask], grid: SeriesGrid,
                     protocol: Protocol) -> tuple[list[StructureSummary], list[Finding]]:
    """Check every structure of one annotation, then the exclusive pairs between them."""
    summaries, findings = [], []
    classes: list[LabelClass | None] = []
    for mask in masks:
        cls = protocol.class_for(mask.label, mask.type)
        classes.append(cls)
        summary, found = _check_one(mask, cls, grid, protocol)
        summaries.append(summary)
        findings.extend(found)
    findings.extend(_overlaps(masks, classes))
    return summaries, findings


def _check_one(mask: Mask, cls: LabelClass | None, grid: SeriesGrid,
               protocol: Protocol) -> tuple[StructureSummary, list[Finding]]:
    def finding(check: str, slices, detail: str) -> Finding:
        return Finding(check, mask.structure_id, mask.label, tuple(int(k) for k in slices), detail)

    found = []
    if protocol.knows_labels and cls is None:
        found.append(finding("unknown-label", mask.slices(),
                             f"label {mask.label!r} is not a class of protocol {protocol.name!r}"))
    if mask.is_empty:
        found.append(finding("empty", (), "structure has no voxel"))
        return StructureSummary(mask.structure_id, mask.label, cls.key if cls else None, 0,
                                0.0, 0.0, ()), found

    column_mm, row_mm, _ = grid.spacing
    k0 = mask.offset[0]
    present = mask.box.any(axis=(1, 2))
    slices = [k0 + int(i) for i in np.flatnonzero(present)]
    diameters = _feret_per_slice(mask.box, present, row_mm, column_mm)
    voxels = mask.voxel_count
    volume = voxels * grid.voxel_volume
    widest = max(diameters, key=diameters.get)
    allowed, jump = protocol.limits_for(cls)

    gaps = [i for i in range(1, len(present) - 1)
            if not present[i] and present[i - 1] and present[i + 1]]
    if gaps:
        found.append(finding("slice-gap", [k0 + i for i in gaps],
                             f"absent on {len(gaps)} slice(s) between present neighbours"))

    strays = _stray_components(mask.box, gaps, allowed)
    if strays:
        found.append(finding("components", [k0 + i for i in strays],
                             f"more than {allowed} connected component(s); "
                             f"the extra ones lie on these slices"))

    jumps = []
    for i in range(1, len(present) - 1):
        if present[i - 1] and present[i] and present[i + 1]:
            d, before, after = diameters[i], diameters[i - 1], diameters[i + 1]
            if (d - before > jump and d - after > jump) or (before - d > jump and after - d > jump):
                jumps.append(i)
    if jumps:
        worst = ", ".join(f"{diameters[i - 1]:.1f}/{diameters[i]:.1f}/{diameters[i + 1]:.1f}"
                          for i in jumps[:3])
        found.append(finding("diameter-jump", [k0 + i for i in jumps],
                             f"in-plane diameter differs from both neighbours by more than "
                             f"{jump:g} mm (before/at/after: {worst} mm)"))

    if cls is not None:
        if cls.volume_mm3 and not cls.volume_mm3[0] <= volume <= cls.volume_mm3[1]:
            found.append(finding("volume", slices, f"volume {volume:.1f} mm³ outside "
                                 f"{cls.volume_mm3[0]:g}–{cls.volume_mm3[1]:g} mm³"))
        if cls.diameter_mm and not cls.diameter_mm[0] <= diameters[widest] <= cls.diameter_mm[1]:
            found.append(finding("diameter", [k0 + widest], f"maximum diameter "
                                 f"{diameters[widest]:.1f} mm outside "
                                 f"{cls.diameter_mm[0]:g}–{cls.diameter_mm[1]:g} mm"))
        if cls.geometry == "volume" and len(slices) < 2:
            found.append(finding("geometry", slices, f"class {cls.key} is drawn in 3D; "
                                 "structure is on one slice"))
        elif cls.geometry == "planar" and len(slices) > 1:
            found.append(finding("geometry", slices, f"class {cls.key} is drawn on one slice; "
                                 f"structure spans {len(slices)}"))

    summary = StructureSummary(mask.structure_id, mask.label, cls.key if cls else None, voxels,
                               round(volume, 3), round(diameters[widest], 3), tuple(slices))
    return summary, found


def _feret_per_slice(box: np.ndarray, present: np.ndarray, row_mm: float,
                     column_mm: float) -> dict[int, float]:
    """Maximum in-plane Feret diameter (mm) of each present slice of the box."""
    padded = np.pad(box, ((0, 0), (1, 1), (1, 1)))
    inner = (padded[:, 1:-1, 1:-1] & padded[:, :-2, 1:-1] & padded[:, 2:, 1:-1]
             & padded[:, 1:-1, :-2] & padded[:, 1:-1, 2:])
    boundary = box & ~inner
    diameters = {}
    for i in np.flatnonzero(present):
        rows, cols = np.nonzero(boundary[i])
        points = np.column_stack([cols * column_mm, rows * row_mm])
        projected = points @ _DIRECTIONS
        diameters[int(i)] = float((projected.max(axis=0) - projected.min(axis=0)).max())
    return diameters


def _stray_components(box: np.ndarray, gaps: list[int], allowed: int) -> list[int]:
    """Box slice indices of every component beyond the ``allowed`` largest, or [].

    One ITK thread: the node runs checks for several associations at once, and
    ITK's per-filter thread pool costs more than it gains on nodule-sized boxes.
    """
    bridged = box.copy()
    for i in gaps:
        bridged[i] = box[i - 1] & box[i + 1]
    import SimpleITK as sitk  # lazy: ~100 MB per process, loaded with the first annotation

    labeller = sitk.ConnectedComponentImageFilter()
    labeller.SetFullyConnected(True)
    labeller.SetNumberOfThreads(1)
    image = labeller.Execute(sitk.GetImageFromArray(bridged.view(np.uint8)))
    labels = sitk.GetArrayViewFromImage(image)  # a view: ``image`` must outlive it
    if labeller.GetObjectCount() <= allowed:
        return []
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    kept = np.argsort(sizes)[::-1][:allowed]
    extra = (labels != 0) & ~np.isin(labels, kept)
    return [int(i) for i in np.flatnonzero(extra.any(axis=(1, 2)))]


def _overlaps(masks: list[Mask], classes: list[LabelClass | None]) -> list[Finding]:
    found = []
    for i, (a, ca) in enumerate(zip(masks, classes, strict=True)):
        for b, cb in zip(masks[i + 1:], classes[i + 1:], strict=True):
            if ca is None or cb is None or a.is_empty or b.is_empty:
                continue
            if ca.key not in cb.exclusive_with and cb.key not in ca.exclusive_with:
                continue
            shared = _shared_slices(a, b)
            if shared:
                found.append(Finding("overlap", a.structure_id, a.label, tuple(shared),
                                     f"overlaps {b.structure_id} ({b.label!r}); "
                                     f"classes {ca.key} and {cb.key} are exclusive"))
    return found


def _shared_slices(a: Mask, b: Mask) -> list[int]:
    """Grid slices where two masks share a voxel (boxes intersected first)."""
    lo = [max(x, y) for x, y in zip(a.offset, b.offset, strict=True)]
    hi = [min(x + s, y + t) for x, s, y, t in
          zip(a.offset, a.box.shape, b.offset, b.box.shape, strict=True)]
    if any(h <= low for low, h in zip(lo, hi, strict=True)):
        return []

    def view(m: Mask) -> np.ndarray:
        return m.box[tuple(slice(low - o, h - o)
                           for low, h, o in zip(lo, hi, m.offset, strict=True))]

    both = view(a) & view(b)
    return [lo[0] + int(k) for k in np.flatnonzero(both.any(axis=(1, 2)))]
