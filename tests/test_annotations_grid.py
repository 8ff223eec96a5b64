"""SeriesGrid: the source grid computed from stored headers, and the header-backed source."""

from __future__ import annotations

import random

import numpy as np
import pytest
from pydicom.filebase import DicomBytesIO

from node.annotations.grid import GridError, HeaderGridSource, SeriesGrid
from node.context import NodeContext
from tests import annotation_fixtures as fx
from tests.harness import write_config


def test_grid_sorts_slices_along_the_normal_whatever_the_input_order() -> None:
    headers = fx.headers()
    shuffled = headers[:]
    random.Random(3).shuffle(shuffled)
    grid = SeriesGrid.from_headers(shuffled)
    assert grid.sop_instance_uids == tuple(str(h.SOPInstanceUID) for h in headers)
    assert grid.shape == (40, 256, 256)
    assert grid.spacing == (1.4, 1.4, 2.5)
    assert grid.origin == (-179.2, -179.2, -50.0)
    assert grid.depths[3] == pytest.approx(-42.5)
    assert grid.frame_of_reference_uid == str(headers[0].FrameOfReferenceUID)


def test_slice_at_matches_float32_positions_within_tolerance_only() -> None:
    grid = SeriesGrid.from_headers(fx.headers())
    position = [float(np.float32(-179.2)), float(np.float32(-179.2)), float(np.float32(-42.5))]
    assert grid.slice_at(position, 0.01) == 3
    assert grid.slice_at([-179.2, -179.2, -42.4], 0.01) is None  # between slices
    assert grid.slice_at([-178.0, -179.2, -42.5], 0.01) is None  # right depth, shifted in plane


def test_grid_image_round_trip_and_mismatch() -> None:
    grid = SeriesGrid.from_headers(fx.headers())
    image = grid.to_image(np.zeros(grid.shape, dtype=np.uint8))
    assert grid.image_mismatch(image, 0.01) is None
    image.SetOrigin((0.0, 0.0, 0.0))
    assert "origin" in grid.image_mismatch(image, 0.01)


@pytest.mark.parametrize("keyword, value, message", [
    ("ImageOrientationPatient", [0, 1, 0, 0, 0, -1], "orientation"),
    ("FrameOfReferenceUID", "1.2.3", "frame of reference"),
    ("Rows", 128, "size"),
    ("ImagePositionPatient", [-179.2, -179.2, -50.0], "share a position"),
])
def test_a_series_that_is_not_one_grid_is_a_grid_error(keyword, value, message) -> None:
    headers = fx.headers()[:3]
    setattr(headers[1], keyword, value)
    with pytest.raises(GridError, match=message):
        SeriesGrid.from_headers(headers)


def test_header_source_caches_until_the_series_grows(tmp_path) -> None:
    settings = write_config(tmp_path).settings()  # the key in tmp_path/keys: outside the data
    ctx = NodeContext.open(settings, with_key=True)
    try:
        series_uid = ctx.key.uid(fx.PHANTOM.series_uid)  # as the PACS's series is stored
        for k in range(3):
            buffer = DicomBytesIO()
            fx.PHANTOM.slice(k).save_as(buffer, enforce_file_format=True)
            assert ctx.ingest.ingest_bytes(buffer.getvalue(), fx.PACS).action == "stored"
        grids = HeaderGridSource(ctx.index, ctx.blobs)
        first = grids.grid(series_uid)
        assert first is grids.grid(series_uid)
        buffer = DicomBytesIO()
        fx.PHANTOM.slice(3).save_as(buffer, enforce_file_format=True)
        assert ctx.ingest.ingest_bytes(buffer.getvalue(), fx.PACS).action == "stored"
        grown = grids.grid(series_uid)
        assert grown.shape[0] == 4 and first.shape[0] == 3
        assert grids.grid("1.2.3.4") is None
    finally:
        ctx.close()
