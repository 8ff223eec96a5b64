"""The voxel grid of a stored source series: where every annotation mask lives.

Masks from a SEG and from overlay copies are compared, checked and converted on
one grid, so both intake routes agree on what "slice k" means. Until the
validation issue records series geometry in the index, the grid is computed
here from the stored instances' headers (ImagePositionPatient, Orientation,
PixelSpacing, Rows, Columns), sorted along the slice normal. Everything else
asks a :class:`GridSource` for a grid, so a source backed by the stored
geometry can replace :class:`HeaderGridSource` without touching the callers.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Protocol

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset

from node.storage.interface import BlobStore, Index

if TYPE_CHECKING:  # SimpleITK costs a process ~100 MB: imported where an image is made
    import SimpleITK as sitk

#: Two orientation cosines closer than this are the same direction.
ORIENTATION_TOLERANCE = 1e-4
#: Relative difference under which two pixel spacings are the same.
SPACING_RTOL = 1e-4

_HEADER_TAGS = ["SOPInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID",
                "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing",
                "Rows", "Columns", "NumberOfFrames", "SliceThickness"]


class GridError(ValueError):
    """The stored series cannot be put on one grid (mixed sizes or orientations, no geometry)."""


@dataclass(frozen=True, eq=False)
class SeriesGrid:
    """One single-frame image series as a 3D grid: slice k, row r, column c.

    ``spacing`` and ``direction`` follow ITK's order (column, row, slice), so a
    mask array indexed ``[k, r, c]`` becomes a SimpleITK image without
    reordering. ``positions`` holds each slice's ImagePositionPatient in slice
    order; ``depths`` its distance along the normal, which is what findings
    report as a slice position (it is SliceLocation for axial series).
    """

    series_instance_uid: str
    frame_of_reference_uid: str
    rows: int
    columns: int
    spacing: tuple[float, float, float]
    direction: tuple[float, ...]  # 3x3 row-major; columns: row dir, column dir, normal
    sop_instance_uids: tuple[str, ...]
    positions: np.ndarray = field(repr=False)  # (slices, 3)

    @property
    def origin(self) -> tuple[float, float, float]:
        return tuple(float(v) for v in self.positions[0])

    @property
    def shape(self) -> tuple[int, int, int]:
        return (len(self.sop_instance_uids), self.rows, self.columns)

    @property
    def voxel_volume(self) -> float:
        return float(np.prod(self.spacing))

    @cached_property
    def axes(self) -> np.ndarray:
        """Rows of this matrix: the row direction, the column direction, the normal."""
        return np.asarray(self.direction, dtype=float).reshape(3, 3).T

    @cached_property
    def depths(self) -> np.ndarray:
        return self.positions @ self.axes[2]

    @cached_property
    def _slice_by_uid(self) -> dict[str, int]:
        return {uid: k for k, uid in enumerate(self.sop_instance_uids)}

    def slice_of(self, sop_instance_uid: str) -> int | None:
        """The slice index of a stored instance of this series, or None."""
        return self._slice_by_uid.get(sop_instance_uid)

    def slice_at(self, position: Sequence[float], tolerance: float) -> int | None:
        """The slice whose ImagePositionPatient is within ``tolerance`` mm of ``position``.

        Writers round positions differently (dcmqi writes float32 text such as
        ``-44.4500008``), so positions are matched by distance, never by text.
        """
        pos = np.asarray(position, dtype=float)
        depth = float(pos @ self.axes[2])
        k = int(np.searchsorted(self.depths, depth))
        candidates = [i for i in (k - 1, k) if 0 <= i < len(self.depths)]
        best = min(candidates, key=lambda i: abs(self.depths[i] - depth))
        if np.linalg.norm(self.positions[best] - pos) <= tolerance:
            return best
        return None

    def depth_of(self, position: Sequence[float]) -> float:
        return float(np.asarray(position, dtype=float) @ self.axes[2])

    def describe_slice(self, k: int) -> str:
        """How findings and refusals name a slice: 1-based index and depth in mm."""
        return f"slice {k + 1} @ {self.depths[k]:.2f} mm"

    def orientation_matches(self, orientation: Sequence[float]) -> bool:
        values = np.asarray(orientation, dtype=float)
        return bool(values.shape == (6,) and np.allclose(values[:3], self.axes[0],
                                                         atol=ORIENTATION_TOLERANCE)
                    and np.allclose(values[3:], self.axes[1], atol=ORIENTATION_TOLERANCE))

    def pixel_spacing_matches(self, pixel_spacing: Sequence[float]) -> bool:
        """``pixel_spacing`` in DICOM order (row spacing, column spacing)."""
        values = np.asarray(pixel_spacing, dtype=float)
        return bool(values.shape == (2,) and np.allclose(
            values, (self.spacing[1], self.spacing[0]), rtol=SPACING_RTOL, atol=0))

    def to_image(self, array: np.ndarray) -> sitk.Image:
        """A ``[k, r, c]`` array on this grid as a SimpleITK image with its geometry."""
        import SimpleITK as sitk  # lazy: ~100 MB per process

        image = sitk.GetImageFromArray(array)
        image.SetOrigin(self.origin)
        image.SetSpacing(self.spacing)
        image.SetDirection(self.direction)
        return image

    def image_mismatch(self, image: sitk.Image, tolerance: float) -> str | None:
        """Why ``image`` (a label map read by SimpleITK) is not on this grid, or None."""
        size = tuple(image.GetSize())
        if size != (self.columns, self.rows, len(self.sop_instance_uids)):
            return f"size {size} is not the series' {(self.columns, self.rows, self.shape[0])}"
        if not np.allclose(image.GetDirection(), self.direction, atol=ORIENTATION_TOLERANCE):
            return "direction differs from the series'"
        if not np.allclose(image.GetSpacing(), self.spacing, rtol=SPACING_RTOL,
                           atol=tolerance):
            return f"spacing {tuple(round(s, 4) for s in image.GetSpacing())} differs"
        if np.linalg.norm(np.subtract(image.GetOrigin(), self.origin)) > tolerance:
            return "origin differs from the series' first slice"
        return None

    @classmethod
    def from_headers(cls, headers: Iterable[Dataset]) -> SeriesGrid:
        """Build the grid from single-frame image headers of one series, in any order."""
        items = list(headers)
        if not items:
            raise GridError("no stored instances")
        first = items[0]
        try:
            orientation = np.asarray(first.ImageOrientationPatient, dtype=float)
            row_spacing, column_spacing = (float(v) for v in first.PixelSpacing)
            rows, columns = int(first.Rows), int(first.Columns)
        except (AttributeError, TypeError, ValueError) as exc:
            raise GridError(f"source geometry missing or malformed ({type(exc).__name__})") from None
        normal = np.cross(orientation[:3], orientation[3:])
        if not np.isclose(np.linalg.norm(normal), 1.0, atol=1e-3):
            raise GridError("source orientation is not orthonormal")
        uids, positions = [], []
        for ds in items:
            if int(ds.get("NumberOfFrames", 1) or 1) != 1:
                raise GridError("multi-frame source images are not supported")
            if (int(ds.get("Rows", 0)), int(ds.get("Columns", 0))) != (rows, columns):
                raise GridError("source slices differ in size")
            if "ImageOrientationPatient" not in ds or not np.allclose(
                    np.asarray(ds.ImageOrientationPatient, dtype=float), orientation,
                    atol=ORIENTATION_TOLERANCE):
                raise GridError("source slices differ in orientation")
            if "ImagePositionPatient" not in ds:
                raise GridError("a source slice has no ImagePositionPatient")
            if ds.get("FrameOfReferenceUID") != first.get("FrameOfReferenceUID"):
                raise GridError("source slices differ in frame of reference")
            uids.append(str(ds.SOPInstanceUID))
            positions.append(np.asarray(ds.ImagePositionPatient, dtype=float))
        pos = np.asarray(positions)
        order = np.argsort(pos @ normal, kind="stable")
        pos = pos[order]
        depths = pos @ normal
        if len(depths) > 1:
            steps = np.diff(depths)
            if np.any(steps <= 1e-6):
                raise GridError("two source slices share a position")
            slice_spacing = float(np.median(steps))
        else:
            slice_spacing = float(first.get("SliceThickness") or 1.0)
        direction = np.column_stack([orientation[:3], orientation[3:], normal])
        return cls(
            series_instance_uid=str(first.SeriesInstanceUID),
            frame_of_reference_uid=str(first.get("FrameOfReferenceUID", "")),
            rows=rows, columns=columns,
            spacing=(column_spacing, row_spacing, slice_spacing),
            direction=tuple(float(v) for v in direction.ravel()),
            sop_instance_uids=tuple(uids[i] for i in order),
            positions=pos,
        )


class GridSource(Protocol):
    """Anything that can give the grid of a stored series."""

    def grid(self, series_instance_uid: str) -> SeriesGrid | None:
        """The series' grid, or None when the series is not stored."""


class HeaderGridSource:
    """Grids computed from the stored instances' headers, cached per series state.

    A cached grid is reused while the series' instance count and newest
    instance row are unchanged, so a series that grows gets a new grid and a
    series of 300 slices is read once, not once per annotation.
    """

    def __init__(self, index: Index, blobs: BlobStore, cache_size: int = 16) -> None:
        self.index = index
        self.blobs = blobs
        self.cache_size = cache_size
        self._cache: dict[str, tuple[tuple[int, int], SeriesGrid]] = {}
        self._lock = threading.Lock()

    def grid(self, series_instance_uid: str) -> SeriesGrid | None:
        with self.index.reader() as r:
            rows = r.instances.series_members(series_instance_uid)
        if not rows:
            return None
        state = (len(rows), rows[-1][0])
        with self._lock:
            cached = self._cache.get(series_instance_uid)
        if cached and cached[0] == state:
            return cached[1]
        grid = SeriesGrid.from_headers(self._header(sha) for _id, sha in rows)
        with self._lock:
            if len(self._cache) >= self.cache_size:
                self._cache.pop(next(iter(self._cache)))
            self._cache[series_instance_uid] = (state, grid)
        return grid

    def _header(self, sha256: str) -> Dataset:
        with self.blobs.open(sha256) as f:
            return dcmread(f, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
