"""The one mask model: what SEG intake, overlay intake, the checks and the bridges share.

A :class:`Mask` is one structure (a SEG segment, or one ROI label across
overlay slices) as a 3D boolean array on the source series' grid. Most
structures fill a tiny part of a 512×512×300 grid, so the array is kept as
its bounding box plus an offset; :attr:`Mask.array` gives the full grid when a
caller really needs it. Checks work on the box, which is what makes checking
a 10-segment SEG on a 300-slice series take milliseconds, not seconds.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Code:
    """A DICOM code triplet (CodeValue, CodingSchemeDesignator, CodeMeaning)."""

    value: str
    scheme: str
    meaning: str


@dataclass(frozen=True)
class Annotator:
    """Who made an annotation: the association's peer, plus the person the object names.

    ``person`` comes from ContentCreatorName (or, on overlay copies, an
    OperatorsName the annotator's tool set); it names staff, not patients.
    """

    ae_title: str
    address: str = ""
    person: str = ""

    @property
    def key(self) -> str:
        return f"{self.ae_title}|{self.person}"


@dataclass(frozen=True, eq=False)
class Mask:
    """One structure on a source grid, stored as its bounding box."""

    structure_id: str
    label: str
    category: Code | None
    type: Code | None
    annotator: Annotator
    source_series_uid: str
    shape: tuple[int, int, int]  # the grid: (slices, rows, columns)
    offset: tuple[int, int, int]  # where ``box`` starts on the grid
    box: np.ndarray  # bool, the smallest box holding every voxel (empty: shape 0)
    provenance: str  # SHA-256 of the annotation object(s) the mask came from

    @property
    def is_empty(self) -> bool:
        return self.box.size == 0 or not self.box.any()

    @property
    def voxel_count(self) -> int:
        return int(np.count_nonzero(self.box))

    @property
    def array(self) -> np.ndarray:
        """The full grid as a bool array (allocates slices × rows × columns bytes)."""
        full = np.zeros(self.shape, dtype=bool)
        if not self.is_empty:
            k, r, c = self.offset
            dk, dr, dc = self.box.shape
            full[k:k + dk, r:r + dr, c:c + dc] = self.box
        return full

    def slices(self) -> list[int]:
        """Grid slice indices on which the structure has voxels, ascending."""
        if self.is_empty:
            return []
        present = np.flatnonzero(self.box.any(axis=(1, 2)))
        return [int(k) + self.offset[0] for k in present]

    def slice_mask(self, k: int) -> np.ndarray:
        """The structure on grid slice ``k`` as a full rows × columns bool array."""
        plane = np.zeros(self.shape[1:], dtype=bool)
        k0, r, c = self.offset
        if not self.is_empty and k0 <= k < k0 + self.box.shape[0]:
            dr, dc = self.box.shape[1:]
            plane[r:r + dr, c:c + dc] = self.box[k - k0]
        return plane


class MaskBuilder:
    """Collects a structure slice by slice (frames or overlay planes) into a :class:`Mask`.

    Slices may arrive in any order and more than once (a SEG may carry two
    frames for one slice; overlay groups with the same label on one slice):
    they are OR-ed together.
    """

    def __init__(self, shape: tuple[int, int, int]) -> None:
        self.shape = shape
        self._planes: dict[int, list[tuple[int, int, np.ndarray]]] = {}

    def add(self, k: int, plane: np.ndarray, row: int = 0, column: int = 0) -> None:
        """Add a 2D bool array whose top-left voxel sits at (``row``, ``column``) of slice ``k``."""
        if not 0 <= k < self.shape[0]:
            raise IndexError(f"slice {k} outside the grid")
        bounds = bounding_box(plane)
        if bounds is None:
            return
        r0, r1, c0, c1 = bounds
        self._planes.setdefault(k, []).append(
            (row + r0, column + c0, np.ascontiguousarray(plane[r0:r1, c0:c1], bool)))

    def build(self, *, structure_id: str, label: str, category: Code | None, type: Code | None,
              annotator: Annotator, source_series_uid: str, provenance: str) -> Mask:
        if not self._planes:
            box, offset = np.zeros((0, 0, 0), dtype=bool), (0, 0, 0)
        else:
            parts = [(k, r, c, p) for k, items in self._planes.items() for r, c, p in items]
            k0 = min(k for k, *_ in parts)
            k1 = max(k for k, *_ in parts) + 1
            r0 = min(r for _, r, _, _ in parts)
            r1 = max(r + p.shape[0] for _, r, _, p in parts)
            c0 = min(c for _, _, c, _ in parts)
            c1 = max(c + p.shape[1] for _, _, c, p in parts)
            box = np.zeros((k1 - k0, r1 - r0, c1 - c0), dtype=bool)
            for k, r, c, p in parts:
                box[k - k0, r - r0:r - r0 + p.shape[0], c - c0:c - c0 + p.shape[1]] |= p
            offset = (k0, r0, c0)
        return Mask(structure_id, label, category, type, annotator, source_series_uid,
                    self.shape, offset, box, provenance)


def bounding_box(plane: np.ndarray) -> tuple[int, int, int, int] | None:
    """(first row, end row, first column, end column) of a 2D mask's voxels, or None if empty."""
    rows = np.flatnonzero(plane.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(plane.any(axis=0))
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def from_array(array: np.ndarray, **fields) -> Mask:
    """A mask from a full-grid bool array (label-map import, tests)."""
    builder = MaskBuilder(tuple(array.shape))
    for k in np.flatnonzero(array.any(axis=(1, 2))):
        builder.add(int(k), array[k])
    return builder.build(**fields)


def combined_provenance(hashes: Iterable[str]) -> str:
    """One provenance hash for a structure drawn from several objects (overlay copies).

    The SHA-256 of the sorted object hashes joined by newlines: anyone holding
    the objects can recompute it, and it changes when any contributing copy does.
    """
    return hashlib.sha256("\n".join(sorted(set(hashes))).encode()).hexdigest()
