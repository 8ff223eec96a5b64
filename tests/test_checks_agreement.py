"""Overlap and distance between two raters' structures (node.checks.agreement), on masks
whose Dice and Hausdorff distance are known from how they were made."""

from __future__ import annotations

import numpy as np
import pytest

from node.annotations.masks import Annotator, Code, from_array
from node.checks.agreement import ABSENT, compare, disagreements, measure, type_answer
from node.checks.protocol import LabelClass, Protocol

SHAPE = (40, 64, 64)
NODULE = Code("27925004", "SCT", "Nodule")
CATEGORY = Code("49755003", "SCT", "Morphologically Abnormal Structure")


def sphere(center=(20, 32, 30), radius=8.0) -> np.ndarray:
    k, r, c = np.indices(SHAPE)
    return ((k - center[0]) ** 2 + (r - center[1]) ** 2 + (c - center[2]) ** 2) <= radius ** 2


def dilate_by_one_voxel(array: np.ndarray) -> np.ndarray:
    """Add every face neighbour (6-connectivity): each new voxel is exactly one step from
    the original."""
    out = array.copy()
    for axis in range(3):
        for step in (1, -1):
            out |= np.roll(array, step, axis=axis)
    return out


def mask(array: np.ndarray, label: str = "Nodule 1", rater: str = "A", **kw):
    return from_array(array, structure_id=kw.pop("structure_id", f"segment {label}"), label=label,
                      category=CATEGORY, type=kw.pop("type", NODULE),
                      annotator=Annotator(rater), source_series_uid="1.2.3", provenance="x")


def test_sphere_and_the_same_sphere_dilated_by_one_voxel():
    a = sphere()
    b = dilate_by_one_voxel(a)
    spacing = (0.8, 0.8, 0.8)  # isotropic: every added voxel is exactly 0.8 mm from the sphere
    m = measure(mask(a), mask(b, rater="B"), spacing)
    na, nb = int(a.sum()), int(b.sum())
    assert m.dice == pytest.approx(2 * na / (na + nb), abs=1e-9)  # a ⊂ b
    assert m.jaccard == pytest.approx(na / nb, abs=1e-9)
    assert m.hausdorff_mm == pytest.approx(0.8, abs=1e-6)
    assert m.hd95_mm == pytest.approx(0.8, abs=1e-6)  # every surface voxel of b is 0.8 mm out
    assert m.volume_difference_mm3 == pytest.approx((nb - na) * 0.8 ** 3)


def test_sphere_and_the_same_sphere_shifted_by_two_columns():
    a = sphere()
    b = np.roll(a, 2, axis=2)
    spacing = (0.7, 0.9, 2.5)  # (column, row, slice): the shift is 2 × 0.7 mm
    m = measure(mask(a), mask(b, rater="B"), spacing)
    both = int((a & b).sum())
    assert m.dice == pytest.approx(2 * both / (int(a.sum()) + int(b.sum())), abs=1e-9)
    assert m.hausdorff_mm == pytest.approx(1.4, abs=1e-6)
    assert 0 < m.hd95_mm <= 1.4 + 1e-6
    assert m.volume_difference_mm3 == pytest.approx(0.0)


def test_structures_are_matched_by_class_then_overlap_and_loners_are_reported():
    protocol = Protocol(classes=(LabelClass("lung_nodule", "Lung nodule", CATEGORY, NODULE,
                                            aliases=("nodule 1", "nodule 2", "nodule a")),),
                        dice_min=0.8)
    first = sphere(center=(10, 20, 20), radius=5)
    second = sphere(center=(28, 44, 44), radius=5)
    third = sphere(center=(10, 48, 14), radius=3)
    a = [mask(first, "Nodule 1"), mask(second, "Nodule 2"), mask(third, "Vessel X", type=None)]
    b = [mask(np.roll(second, 3, axis=1), "nodule a", rater="B"),
         mask(first, "Nodule 1", rater="B")]
    pairs = compare(a, b, (1.0, 1.0, 1.0), protocol)
    matched = [p for p in pairs if p.one_rater_only is None]
    assert {(p.a.label, p.b.label) for p in matched} == {("Nodule 1", "Nodule 1"),
                                                         ("Nodule 2", "nodule a")}
    assert all(p.class_key == "lung_nodule" and not p.classes_differ for p in matched)
    exact = next(p for p in matched if p.a.label == "Nodule 1")
    assert exact.measures.dice == pytest.approx(1.0) and exact.measures.hausdorff_mm == 0.0
    [alone] = [p for p in pairs if p.one_rater_only]
    assert alone.one_rater_only == "a" and alone.class_key == "vessel x"
    assert type_answer(alone.b) == ABSENT and type_answer(alone.a) == "vessel x"
    reasons = disagreements(pairs, protocol)
    assert reasons[0].startswith("lung_nodule: Dice 0.")  # the shifted one, below 0.8
    assert reasons[1] == "vessel x: drawn by rater A only"
    assert len(reasons) == 2


def test_overlapping_structures_of_different_classes_are_a_class_disagreement():
    a = [mask(sphere(), "Nodule 1")]
    b = [mask(sphere(), "Vessel", rater="B", type=Code("59820001", "SCT", "Blood Vessel"))]
    [pair] = compare(a, b, (1.0, 1.0, 1.0), Protocol())
    assert pair.classes_differ and pair.measures.dice == pytest.approx(1.0)
    assert disagreements([pair], Protocol()) == ["nodule 1: the raters gave different classes"]
