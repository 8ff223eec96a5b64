"""The synthetic CT phantom's files: each slice written as made, or as ``shaped`` makes it."""

from __future__ import annotations

from pydicom import dcmread

from node.phantom import Phantom


def test_write_gives_each_slice_and_its_index_to_shaped(tmp_path):
    def shaped(ds, index):
        ds.ImageComments = f"slice {index}"
        return ds

    phantom = Phantom(seed="shaped", slices_count=3, rows=8, columns=8)
    paths = phantom.write(tmp_path / "shaped", shaped)
    assert [dcmread(p).ImageComments for p in paths] == ["slice 0", "slice 1", "slice 2"]
    plain = phantom.write(tmp_path / "plain")
    assert [p.name for p in plain] == [p.name for p in paths]
    assert "ImageComments" not in dcmread(plain[0])
