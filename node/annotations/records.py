"""How annotations become index rows and back: ROI boxes, structures, findings.

The statements live in the storage backend (``tx.annotations``); this module
turns the annotation model (masks, check summaries, findings on a grid) into
the plain rows of :mod:`node.storage.records`. Slices are stored 0-based (grid
indices) in the object and ROI rows, and shown 1-based with their position in
findings.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from node.annotations.grid import SeriesGrid
from node.annotations.masks import Code, Mask, bounding_box
from node.checks.consistency import Finding, StructureSummary
from node.storage.records import AnnotationFindingRow, RoiRow, StructureRow


@dataclass(frozen=True)
class RoiBox:
    """One overlay plane's mask, cut to its bounding box on slice ``slice_index``."""

    group: int
    label: str
    slice_index: int
    row0: int
    col0: int
    box: np.ndarray  # bool

    @classmethod
    def from_plane(cls, group: int, label: str, slice_index: int, plane: np.ndarray) -> RoiBox:
        bounds = bounding_box(plane)
        if bounds is None:
            return cls(group, label, slice_index, 0, 0, np.zeros((0, 0), dtype=bool))
        r0, r1, c0, c1 = bounds
        return cls(group, label, slice_index, r0, c0, plane[r0:r1, c0:c1].copy())

    def row(self) -> RoiRow:
        return RoiRow(self.group, self.label, self.slice_index, self.row0, self.col0,
                      self.box.shape[0], self.box.shape[1], np.packbits(self.box).tobytes())

    @classmethod
    def from_row(cls, row: RoiRow) -> RoiBox:
        box = np.unpackbits(np.frombuffer(row.bits, np.uint8),
                            count=row.rows * row.cols).astype(bool)
        return cls(row.group, row.label, row.slice_index, row.row0, row.col0,
                   box.reshape(row.rows, row.cols))


def structure_rows(masks: list[Mask], summaries: list[StructureSummary]) -> list[StructureRow]:
    """One row per checked structure: label, class, measures, first and last slice (1-based)."""
    return [StructureRow(s.structure_id, s.label, s.class_key, _code_json(m.category),
                         _code_json(m.type), s.voxels, s.volume_mm3, s.max_diameter_mm,
                         s.slices[0] + 1 if s.slices else None,
                         s.slices[-1] + 1 if s.slices else None, len(s.slices), m.provenance)
            for m, s in zip(masks, summaries, strict=True)]


def finding_rows(grid: SeriesGrid, findings: list[Finding]) -> list[AnnotationFindingRow]:
    return [AnnotationFindingRow(f.check, f.structure_id, f.label, slices_json(grid, f.slices),
                                 f.detail) for f in findings]


def slices_json(grid: SeriesGrid, slices: Iterable[int]) -> str:
    return json.dumps([{"slice": k + 1, "position_mm": round(float(grid.depths[k]), 3),
                        "sop_instance_uid": grid.sop_instance_uids[k]} for k in slices])


def _code_json(code: Code | None) -> str | None:
    if code is None:
        return None
    return json.dumps({"value": code.value, "scheme": code.scheme, "meaning": code.meaning})
