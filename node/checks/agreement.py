"""Agreement between two raters' structures on one series: matching, overlap and distance.

Structures are matched by label class first and overlap second: within one
class, pairs that overlap are taken greedily by their Dice (best first); what
is left is matched across classes when it overlaps (the raters drew the same
thing and named it differently, recorded as a class disagreement); anything
still alone was found by one rater only.

Per matched pair, on the series grid (spacing in mm, so distances are mm):

* Dice and Jaccard: SimpleITK's ``LabelOverlapMeasuresImageFilter``;
* Hausdorff distance and HD95 from the directed surface distances: the
  surface is SimpleITK's ``LabelContourImageFilter`` of one mask, the
  distances are read off SimpleITK's ``SignedMaurerDistanceMapImageFilter``
  of the other (clamped at 0 inside it). Hausdorff is the larger directed
  maximum, which is what ``HausdorffDistanceImageFilter`` returns (the
  farthest voxel of a set from the other set lies on its surface); that
  filter computes two more distance maps of its own, which cost 40 % of a
  comparison, so the two maps are computed once and both figures read off
  them. HD95 is the larger of the two directed 95th percentiles (numpy);
* volume of each structure and their difference (B − A), from voxel counts.

Masks are kept as bounding boxes (:mod:`node.annotations.masks`); a pair is
measured on the union of its two boxes plus a one-voxel margin, never on the
whole grid: that is what keeps two 10-segment SEGs on a 300-slice series
well under a second (``benchmarks/agreement.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from node.annotations.masks import Mask
from node.checks.protocol import Protocol

if TYPE_CHECKING:  # SimpleITK costs a process ~100 MB: imported where a measure runs
    import SimpleITK as sitk

ABSENT = "(absent)"
"""The categorical answer of a rater who did not draw a structure the other one drew."""


@dataclass(frozen=True)
class Measures:
    """Overlap and distance of one matched pair (distances in mm; None when one is empty)."""

    dice: float
    jaccard: float
    hausdorff_mm: float | None
    hd95_mm: float | None
    volume_a_mm3: float
    volume_b_mm3: float

    @property
    def volume_difference_mm3(self) -> float:
        return self.volume_b_mm3 - self.volume_a_mm3


@dataclass(frozen=True)
class StructurePair:
    """One structure of rater A matched to one of rater B, or found by one rater only."""

    class_key: str
    a: Mask | None
    b: Mask | None
    measures: Measures | None
    #: Matched by overlap although the raters put it in different classes (``class_key`` is A's).
    classes_differ: bool = False

    @property
    def one_rater_only(self) -> str | None:
        """``a`` or ``b``: the rater who alone drew it; None for a matched pair."""
        if self.a is not None and self.b is not None:
            return None
        return "a" if self.a is not None else "b"


def class_key(mask: Mask, protocol: Protocol) -> str:
    """The protocol class of a structure, or its label (case-folded) when the protocol has none."""
    cls = protocol.class_for(mask.label, mask.type)
    return cls.key if cls is not None else mask.label.strip().casefold()


def type_answer(mask: Mask | None) -> str:
    """A rater's categorical answer for a structure: its SEG type code (scheme:value), else
    its label; :data:`ABSENT` when the rater did not draw it."""
    if mask is None:
        return ABSENT
    if mask.type is not None:
        return f"{mask.type.scheme}:{mask.type.value}"
    return mask.label.strip().casefold()


def category_question(mask: Mask) -> str:
    """The question a structure's type answers: its SEG category code, else 'structure'."""
    if mask.category is not None:
        return f"{mask.category.scheme}:{mask.category.value} {mask.category.meaning}"
    return "structure"


def compare(masks_a: Sequence[Mask], masks_b: Sequence[Mask], spacing: Sequence[float],
            protocol: Protocol) -> list[StructurePair]:
    """Match two raters' structures on one grid and measure every matched pair.

    ``spacing`` is the grid's (column, row, slice) spacing in mm (ITK order).
    """
    a_list = [m for m in masks_a if not m.is_empty]
    b_list = [m for m in masks_b if not m.is_empty]
    keys_a = [class_key(m, protocol) for m in a_list]
    keys_b = [class_key(m, protocol) for m in b_list]
    overlaps = {(i, j): _overlap_dice(a, b) for i, a in enumerate(a_list)
                for j, b in enumerate(b_list)}
    overlaps = {ij: d for ij, d in overlaps.items() if d > 0}
    taken_a: set[int] = set()
    taken_b: set[int] = set()
    pairs: list[StructurePair] = []
    for same_class in (True, False):
        candidates = sorted(((d, i, j) for (i, j), d in overlaps.items()
                             if (keys_a[i] == keys_b[j]) == same_class),
                            key=lambda t: (-t[0], t[1], t[2]))
        for _, i, j in candidates:
            if i in taken_a or j in taken_b:
                continue
            taken_a.add(i)
            taken_b.add(j)
            pairs.append(StructurePair(keys_a[i], a_list[i], b_list[j],
                                       measure(a_list[i], b_list[j], spacing),
                                       classes_differ=not same_class))
    pairs += [StructurePair(keys_a[i], m, None, None) for i, m in enumerate(a_list)
              if i not in taken_a]
    pairs += [StructurePair(keys_b[j], None, m, None) for j, m in enumerate(b_list)
              if j not in taken_b]
    return pairs


def measure(a: Mask, b: Mask, spacing: Sequence[float]) -> Measures:
    """Dice, Jaccard, Hausdorff, HD95 and volumes of two structures on one grid."""
    voxel = float(np.prod(spacing))
    vol_a, vol_b = a.voxel_count * voxel, b.voxel_count * voxel
    if a.is_empty or b.is_empty:
        return Measures(0.0, 0.0, None, None, vol_a, vol_b)
    import SimpleITK as sitk  # lazy: ~100 MB per process

    image_a, image_b = _union_images(a, b, spacing)
    overlap = sitk.LabelOverlapMeasuresImageFilter()
    overlap.Execute(image_a, image_b)
    a_to_b = _surface_distances(image_a, image_b)
    b_to_a = _surface_distances(image_b, image_a)
    hausdorff = max(float(a_to_b.max()), float(b_to_a.max()))
    hd95 = max(float(np.percentile(a_to_b, 95.0)), float(np.percentile(b_to_a, 95.0)))
    return Measures(float(overlap.GetDiceCoefficient()), float(overlap.GetJaccardCoefficient()),
                    hausdorff, hd95, vol_a, vol_b)


def _surface_distances(source: sitk.Image, target: sitk.Image) -> np.ndarray:
    """Distances (mm) from each surface voxel of ``source`` to ``target``: the contour by
    SimpleITK's label contour filter, the distances by its signed Maurer distance map
    (negative inside ``target``: clamped to 0). Never empty for a non-empty mask."""
    import SimpleITK as sitk  # lazy: ~100 MB per process

    contour = sitk.LabelContour(source, fullyConnected=False, backgroundValue=0)
    distance = sitk.SignedMaurerDistanceMap(target, insideIsPositive=False,
                                            squaredDistance=False, useImageSpacing=True)
    # Views, not copies: the images stay referenced above while the views are read.
    surface = sitk.GetArrayViewFromImage(contour) > 0
    return np.maximum(sitk.GetArrayViewFromImage(distance)[surface], 0.0)


def _union_images(a: Mask, b: Mask, spacing: Sequence[float]) -> tuple[sitk.Image, sitk.Image]:
    """Both masks on the union of their boxes plus one voxel of background all round
    (so a structure touching its box edge still has a contour), as uint8 images."""
    import SimpleITK as sitk  # lazy: ~100 MB per process

    lo = np.minimum(a.offset, b.offset) - 1
    hi = np.maximum(np.add(a.offset, a.box.shape), np.add(b.offset, b.box.shape)) + 1
    shape = tuple(int(v) for v in hi - lo)
    images = []
    for mask in (a, b):
        array = np.zeros(shape, dtype=np.uint8)
        k, r, c = (int(v) for v in np.subtract(mask.offset, lo))
        dk, dr, dc = mask.box.shape
        array[k:k + dk, r:r + dr, c:c + dc] = mask.box
        image = sitk.GetImageFromArray(array)
        image.SetSpacing(tuple(float(s) for s in spacing))
        images.append(image)
    return images[0], images[1]


def _overlap_dice(a: Mask, b: Mask) -> float:
    """Dice of two boxed masks from their boxes' intersection only (no grid allocated):
    cheap enough to try every pair before matching."""
    lo = np.maximum(a.offset, b.offset)
    hi = np.minimum(np.add(a.offset, a.box.shape), np.add(b.offset, b.box.shape))
    if np.any(hi <= lo):
        return 0.0
    ka, ra, ca = (int(v) for v in lo - a.offset)
    kb, rb, cb = (int(v) for v in lo - b.offset)
    dk, dr, dc = (int(v) for v in hi - lo)
    both = np.count_nonzero(a.box[ka:ka + dk, ra:ra + dr, ca:ca + dc]
                            & b.box[kb:kb + dk, rb:rb + dr, cb:cb + dc])
    return 2.0 * both / (a.voxel_count + b.voxel_count)


def disagreements(pairs: Sequence[StructurePair], protocol: Protocol) -> list[str]:
    """Why a pair of readings needs adjudication under the protocol (empty: they agree).

    A structure drawn by one rater only, a structure the raters put in
    different classes, or a matched pair whose Dice is below its class's
    ``dice_min`` (or the protocol's).
    """
    reasons = []
    for pair in pairs:
        if pair.one_rater_only:
            reasons.append(f"{pair.class_key}: drawn by rater {pair.one_rater_only.upper()} only")
        elif pair.classes_differ:
            reasons.append(f"{pair.class_key}: the raters gave different classes")
        elif pair.measures is not None:
            threshold = protocol.dice_min_for(pair.class_key)
            if pair.measures.dice < threshold:
                reasons.append(f"{pair.class_key}: Dice {pair.measures.dice:.3f} below "
                               f"{threshold:.2f}")
    return reasons
