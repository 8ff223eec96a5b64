"""The one mask model: bounding-box storage that behaves like a full-grid bool array."""

from __future__ import annotations

import numpy as np

from node.annotations.masks import Annotator, MaskBuilder, combined_provenance, from_array

FIELDS = {"structure_id": "s", "label": "l", "category": None, "type": None,
          "annotator": Annotator("AE", "127.0.0.1", "Reader^One"), "source_series_uid": "1.2",
          "provenance": "0" * 64}


def test_builder_ors_planes_in_any_order_into_a_box() -> None:
    builder = MaskBuilder((10, 20, 30))
    a = np.zeros((20, 30), bool)
    a[5:8, 10:12] = True
    b = np.zeros((4, 4), bool)
    b[0, 0] = True
    builder.add(7, a)
    builder.add(2, b, row=1, column=1)
    builder.add(7, a)  # the same plane twice (two frames, two groups): no change
    mask = builder.build(**FIELDS)
    assert mask.offset == (2, 1, 1) and mask.box.shape == (6, 7, 11)
    full = mask.array
    assert full.shape == (10, 20, 30) and full.sum() == 7
    assert full[2, 1, 1] and full[7, 5:8, 10:12].all()
    assert mask.slices() == [2, 7]
    assert np.array_equal(mask.slice_mask(7), a)
    assert not mask.slice_mask(5).any()


def test_from_array_round_trips_and_empty_masks_are_empty() -> None:
    rng = np.random.default_rng(0)
    array = rng.random((6, 9, 9)) > 0.8
    assert np.array_equal(from_array(array, **FIELDS).array, array)
    empty = from_array(np.zeros((6, 9, 9), bool), **FIELDS)
    assert empty.is_empty and empty.voxel_count == 0 and empty.slices() == []
    assert empty.array.shape == (6, 9, 9) and not empty.array.any()


def test_provenance_of_several_objects_is_order_free_and_content_bound() -> None:
    assert combined_provenance(["b", "a"]) == combined_provenance(["a", "b", "a"])
    assert combined_provenance(["a"]) != combined_provenance(["a", "c"])
    assert FIELDS["annotator"].key == "AE|Reader^One"
