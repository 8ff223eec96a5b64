"""read_received parses a file's head in memory: it gives exactly what parsing the file
gives (node.ingest.validate._read_file, the reading it replaces for most files).

Compared over every file pydicom and pydicom-data ship, a synthetic slice cut at every
few bytes, a header longer than the bytes read in memory, and an element over a small
max_element bound: the same elements (as read: VR, length, bytes, offset), the same
pixel element location, the same file the deferred values are read from, or the same
error with the same words.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from node.ingest import validate
from node.ingest.validate import HEAD_BYTES, ReadLimits, Received, read_received
from node.phantom import Phantom
from tests.harness import as_file
from tests.test_ingest_validate_corpus import corpus

CORPUS = corpus()

def outcome(read, path: Path, limits: ReadLimits) -> tuple:
    """Everything a caller of read_received can see, as plain values."""
    try:
        received: Received = read(path, limits)
    except Exception as exc:
        return ("raised", type(exc).__name__, str(exc))
    ds = received.dataset
    return ("read", _elements(ds), _elements(ds.file_meta), received.pixels,
            {tag: _raw(e) for tag, e in received.raw.items()}, ds.filename, ds.timestamp,
            ds.fileobj_type, type(ds.buffer), ds.preamble, ds.original_encoding,
            ds.original_character_set)


def _raw(elem) -> tuple:
    if getattr(elem, "is_raw", False):
        return (elem.tag, elem.VR, elem.length, elem.value, elem.value_tell)
    value = elem.value
    if isinstance(value, Sequence):
        value = [_elements(item) for item in value]
    return (elem.tag, elem.VR, value)


def _elements(ds: Dataset) -> list[tuple]:
    return [_raw(elem) for _, elem in ds.items()]


def same(path: Path, limits: ReadLimits = validate.DEFAULT_LIMITS) -> None:
    assert outcome(read_received, path, limits) == outcome(validate._read_file, path, limits), \
        path


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_every_shipped_file_reads_as_from_the_file(name):
    same(CORPUS[name])


def test_a_slice_cut_anywhere_reads_as_from_the_file(tmp_path):
    data = as_file(Phantom(seed="parse", slices_count=2, rows=16, columns=16).slice(0))
    path = tmp_path / "cut.dcm"
    for end in [*range(0, 200, 7), *range(200, len(data), 3)]:
        path.write_bytes(data[:end])
        same(path)


def test_a_header_longer_than_the_head_is_read_from_the_file(tmp_path, monkeypatch):
    ds = Phantom(seed="parse", slices_count=2, rows=16, columns=16).slice(0)
    ds.ImageComments = "x" * (HEAD_BYTES // 2)  # the head ends inside the next element
    ds.add_new(0x00291010, "OB", b"\0" * HEAD_BYTES)
    path = tmp_path / "long.dcm"
    path.write_bytes(as_file(ds))
    original, files = validate._read_file, []
    monkeypatch.setattr(validate, "_read_file",
                        lambda p, limits: files.append(p) or original(p, limits))
    received = read_received(path)
    assert files == [path]
    assert received.pixels is not None and received.pixels.value_tell > HEAD_BYTES
    monkeypatch.undo()
    same(path)
    # A small head: the cut falls in the middle of the header at each size.
    for size in (140, 300, 600, 1000):
        monkeypatch.setattr(validate, "HEAD_BYTES", size)
        same(path)


def test_an_element_over_max_element_stays_on_disk_and_is_refused_the_same(tmp_path):
    ds = Phantom(seed="parse", slices_count=2, rows=16, columns=16).slice(0)
    ds.add_new(0x00291010, "OB", b"\0" * 4096)
    path = tmp_path / "big.dcm"
    path.write_bytes(as_file(ds))
    limits = ReadLimits(max_element=1024)
    same(path, limits)
    assert outcome(read_received, path, limits)[:2] == ("raised", "TooLarge")
    path.write_bytes(as_file(ds)[:-3000])  # cut inside it: declares more than remains
    same(path, limits)
    assert outcome(read_received, path, limits)[:2] == ("raised", "Unparseable")


def test_a_slice_is_read_in_memory(tmp_path, monkeypatch):
    """The comparisons above are not of the file reading with itself."""
    path = tmp_path / "slice.dcm"
    path.write_bytes(as_file(Phantom(seed="parse", slices_count=2, rows=16,
                                     columns=16).slice(0)))

    def no_file(p, limits):
        raise AssertionError("read from the file")

    monkeypatch.setattr(validate, "_read_file", no_file)
    received = read_received(path)
    assert received.dataset.filename == str(path) and received.pixels.length == 512


def test_the_whole_object_is_what_a_deferred_read_of_the_file_gives(tmp_path):
    """with_deferred_pixels builds on the head parsed in memory: the elements as read,
    the pixel element deferred (or read, up to the size given), and the file and
    modification time deferred values are read and checked against."""
    from pydicom import dcmread

    from node.ingest.validate import with_deferred_pixels
    path = tmp_path / "slice.dcm"
    path.write_bytes(as_file(Phantom(seed="parse", slices_count=2, rows=16,
                                     columns=16).slice(1)))
    expected = dcmread(path, defer_size=1 << 20)
    for defer in (0, 1 << 20):
        whole = with_deferred_pixels(read_received(path), defer)
        assert whole is not None
        assert (_elements(whole)[:-1], whole.filename, whole.timestamp, whole.fileobj_type,
                whole.buffer, whole.preamble, whole.original_encoding) == (
            _elements(expected)[:-1], expected.filename, expected.timestamp,
            expected.fileobj_type, expected.buffer, expected.preamble,
            expected.original_encoding)
        pixels = whole.get_item(0x7FE00010, keep_deferred=True)
        assert (pixels.value is None) == (defer == 0)
        assert whole.PixelData == expected.PixelData  # a deferred value is read from the file
