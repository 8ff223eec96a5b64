"""Overlay intake: the Horos/OsiriX pipeline's annotated slice copies as mask slices.

The pipeline (pyOsiriX scripts, see the project's seed notes) sends back the
annotator's copy of a stored slice: same SOP Instance UID, same pixels, and
one ROI per overlay group 6000, 6002, … 601E. The same ROI can sit in a
different group on another slice, so structures are formed by label
(OverlayLabel, else OverlayDescription), falling back to the group number.

pydicom's ``overlay_array`` reads any group up to 60FF and trusts the
element values; range, size and length are checked by
:mod:`node.checks.references` before any plane is decoded here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset
from pydicom.tag import Tag

FIRST_GROUP, LAST_GROUP = 0x6000, 0x601E  # what Horos displays (1-bit overlays)
_SCAN_END = 0x60FF  # every group pydicom would read as an overlay


@dataclass(frozen=True)
class OverlayPlane:
    """One overlay group's header values, as received."""

    group: int
    rows: int | None
    columns: int | None
    origin: tuple[int, int]
    bits_allocated: int | None
    bit_position: int | None
    frames: int
    data_length: int | None  # None: no OverlayData
    label: str | None

    @property
    def structure_label(self) -> str:
        return self.label or f"overlay {self.group:04X}"

    @property
    def expected_length(self) -> int | None:
        """Bytes OverlayData must hold: one bit per pixel, padded to even length."""
        if not self.rows or not self.columns:
            return None
        size = (self.rows * self.columns * self.frames + 7) // 8
        return size + (size % 2)

    @property
    def length_fits(self) -> bool:
        """OverlayData holds its size's bits, padded to even (or, leniently, unpadded)."""
        expected = self.expected_length
        if expected is None or self.data_length is None:
            return False
        unpadded = (self.rows * self.columns * self.frames + 7) // 8
        return self.data_length in (expected, unpadded)


def overlay_groups(ds: Dataset) -> list[int]:
    """Even groups 6000–60FE carrying overlay data or overlay dimensions."""
    # One pass over the tags the dataset holds (some seventy in a CT header), not
    # 128 membership tests, one per candidate group: this runs on every instance.
    # keys(), not the Dataset itself: iterating a Dataset decodes every element.
    return sorted({tag >> 16 for tag in ds.keys()  # noqa: SIM118
                   if 0x6000 <= tag >> 16 < _SCAN_END and not (tag >> 16) & 1
                   and tag & 0xFFFF in (0x3000, 0x0010)})


def read_planes(ds: Dataset) -> list[OverlayPlane]:
    planes = []
    for group in overlay_groups(ds):
        def value(element: int, group: int = group):
            elem = ds.get(Tag(group, element))
            return None if elem is None or elem.value in (None, b"", "") else elem.value

        origin = value(0x0050) or [1, 1]
        data = value(0x3000)
        label = value(0x1500) or value(0x0022)
        planes.append(OverlayPlane(
            group=group,
            rows=_int(value(0x0010)),
            columns=_int(value(0x0011)),
            origin=(int(origin[0]), int(origin[1])),
            bits_allocated=_int(value(0x0100)),
            bit_position=_int(value(0x0102)),
            frames=_int(value(0x0015)) or 1,
            data_length=len(data) if data is not None else None,
            label=(str(label).strip() or None) if label is not None else None,
        ))
    return planes


def plane_mask(ds: Dataset, plane: OverlayPlane) -> np.ndarray:
    """The plane's bits as a rows × columns bool array (checked planes only)."""
    return ds.overlay_array(plane.group).astype(bool)


def _int(value: object) -> int | None:
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None
