"""The in-memory header reader gives exactly what ``dcmread(stop_before_pixels=True)`` gives
(every element as read, the file meta as pydicom decodes it, the encodings, where the
parse stopped) on every small file pydicom ships and on CT slices shaped like a
hospital's, and hands everything outside its common case back to ``dcmread``."""

from __future__ import annotations

import io
import struct
from pathlib import Path

import pydicom.data
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from node.ingest.header import read_header
from node.phantom import Phantom

DEFER = 128 << 20


def _named(data: bytes, name: str = "received.dcm") -> io.BytesIO:
    buffer = io.BytesIO(data)
    buffer.name = name
    return buffer


def _state(ds: Dataset) -> object:
    """Everything a reader decides, comparable: each element as it is held (raw elements
    are tuples; decoded ones by tag, VR, value and undefined length), recursively."""
    def elements(d: Dataset) -> list[object]:
        out = []
        for tag, elem in d._dict.items():
            if elem.is_raw:
                out.append(tuple(elem))
            elif elem.VR == "SQ":
                out.append((tag, [elements(item) for item in elem.value]))
            else:
                out.append((tag, elem.VR, elem.value, elem.is_undefined_length))
        return out
    return (elements(ds), elements(ds.file_meta), ds.preamble, ds.original_encoding,
            ds.original_character_set, ds._character_set, ds.file_meta.original_encoding,
            ds.filename, type(ds))


def _compare(data: bytes) -> bool:
    """Compare with dcmread on the same bytes; True when the fast path took them."""
    expected_buffer = _named(data)
    try:
        expected = dcmread(expected_buffer, stop_before_pixels=True, defer_size=DEFER)
    except Exception:
        expected = None
    buffer = _named(data)
    got = read_header(buffer, DEFER)
    if got is None:
        assert buffer.tell() == 0  # untouched: dcmread starts from the beginning
        return False
    assert expected is not None, "read where dcmread refuses"
    assert _state(got) == _state(expected)
    assert buffer.tell() == expected_buffer.tell()
    return True


def _small_test_files() -> list[Path]:
    folder = Path(pydicom.data.__file__).parent / "test_files"
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.stat().st_size < (1 << 20)
                  and p.suffix in ("", ".dcm"))


def test_same_as_dcmread_on_pydicom_test_files():
    files = _small_test_files()
    taken = sum(_compare(path.read_bytes()) for path in files)
    assert len(files) > 50
    assert taken >= 20  # the common case is common there too


def _slices(tmp_path: Path, syntax: str, shaped: bool) -> list[Path]:
    def shape(ds: Dataset, index: int) -> Dataset:
        ds.file_meta.TransferSyntaxUID = syntax
        if shaped:  # a scanner's private group, a sequence, names in odd places
            ds.add_new(0x00091010, "LO", "GEMS_IDEN_01")
            ds.add_new(0x00091001, "LO", f"scanner text {index}")
            item = Dataset()
            item.CodeValue, item.CodingSchemeDesignator = "T-D0050", "SRT"
            ds.AnatomicRegionSequence = Sequence([item])
            ds.SpecificCharacterSet = "ISO_IR 100"
            ds.InstitutionName = "Hôpital Général"
        return ds
    return Phantom(seed="header", slices_count=2).write(tmp_path / syntax, shape)


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
@pytest.mark.parametrize("shaped", [False, True])
def test_ct_slices_take_the_fast_path(tmp_path, syntax, shaped):
    for path in _slices(tmp_path, syntax, shaped):
        data = path.read_bytes()
        assert _compare(data)
        assert _compare(data[:64 << 10])  # the reader's head: stops at the pixels inside it


def test_left_to_dcmread(tmp_path):
    """Each case outside the fast path returns None, and dcmread reads it as before."""
    data = _slices(tmp_path, ExplicitVRLittleEndian, False)[0].read_bytes()
    meta_end = 132 + 12 + struct.unpack_from("<L", data, 140)[0]
    cases = {
        "no DICM": data[:128] + b"NOPE" + data[132:],
        "cut inside an element": data[:meta_end + 20],
        "undefined length, not a sequence": _with_undefined_sequence(
            tmp_path, ExplicitVRLittleEndian, private_ob=True),
        "big endian": _slices(tmp_path, ExplicitVRBigEndian, False)[0].read_bytes(),
        "unknown VR": data[:meta_end + 4] + b"XX" + data[meta_end + 6:],
        "command group first": (data[:meta_end] + struct.pack("<HHL", 0, 0x0100, 2)
                                + b"\x01\x00" + data[meta_end:]),
    }
    for name, case in cases.items():
        buffer = _named(case)
        assert read_header(buffer, DEFER) is None, name
        assert buffer.tell() == 0, name


def _with_undefined_sequence(tmp_path: Path, syntax: str, private_ob: bool = False) -> bytes:
    """A shaped slice whose sequences (one nested in another) are written with undefined
    lengths, as many scanners write them; ``private_ob``: and a private OB value of
    undefined length (which pydicom reads to its delimiter)."""
    ds = dcmread(_slices(tmp_path / "u", syntax, True)[0])
    inner = Dataset()
    inner.CodeValue, inner.CodingSchemeDesignator = "M-02000", "SRT"
    ds.AnatomicRegionSequence[0].AnatomicRegionModifierSequence = Sequence([inner])
    for sequence in (ds.AnatomicRegionSequence,
                     ds.AnatomicRegionSequence[0].AnatomicRegionModifierSequence):
        sequence.is_undefined_length = True
        for item in sequence:
            item.is_undefined_length_sequence_item = True
    ds["AnatomicRegionSequence"].is_undefined_length = True
    ds.AnatomicRegionSequence[0]["AnatomicRegionModifierSequence"].is_undefined_length = True
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    data = buffer.getvalue()
    assert data.count(b"\xfe\xff\xdd\xe0") == 2  # two sequence delimiters: undefined
    if private_ob:  # (0009,1002) OB, undefined length, before the pixels
        pixels = data.index(b"\xe0\x7f\x10\x00")
        data = (data[:pixels] + struct.pack("<HH2sHL", 0x0009, 0x1002, b"OB", 0, 0xFFFFFFFF)
                + b"\x01\x02" + b"\xfe\xff\xdd\xe0\x00\x00\x00\x00" + data[pixels:])
    return data


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_sequences_of_undefined_length_as_dcmread(tmp_path, syntax):
    """Read by pydicom's read_sequence where its generator reads them, and every cut."""
    data = _with_undefined_sequence(tmp_path, syntax)
    assert _compare(data)
    got = read_header(_named(data), DEFER)
    assert got["AnatomicRegionSequence"].is_undefined_length
    assert got.AnatomicRegionSequence[0].AnatomicRegionModifierSequence[0].CodeValue == "M-02000"
    pixels = data.index(b"\xe0\x7f\x10\x00")
    for end in range(0, pixels + 16, 5):
        _compare(data[:end])


def test_deferred_values_as_dcmread(tmp_path):
    """Values longer than defer_size are left unread, as dcmread leaves them."""
    data = _slices(tmp_path, ExplicitVRLittleEndian, True)[0].read_bytes()
    buffer, expected = _named(data), dcmread(_named(data), stop_before_pixels=True,
                                             defer_size=8)
    got = read_header(buffer, 8)
    assert got is not None
    deferred = [tag for tag, e in got._dict.items() if e.is_raw and e.value is None]
    assert deferred and deferred == [
        tag for tag, e in expected._dict.items() if e.is_raw and e.value is None]
    assert 0x00080005 not in deferred  # the character set is always read


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_cut_anywhere_as_dcmread(tmp_path, syntax):
    """A file cut at any byte of its header: read as dcmread reads the same bytes, or left
    to it (an element cut short, a length cut off before the pixel data)."""
    data = _slices(tmp_path, syntax, True)[0].read_bytes()
    pixels = data.index(b"\xe0\x7f\x10\x00")
    taken = sum(_compare(data[:end]) for end in range(pixels + 16))
    assert taken >= 1  # at least the cuts after the pixel element's header
