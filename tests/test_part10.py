"""The header encoder writes, byte for byte, what pydicom's dcmwrite writes: on every
small file pydicom ships (explicit and implicit VR, big endian, character sets,
sequences, private tags, odd file meta), on de-identified headers, and again from
its memo on a second encode."""

from __future__ import annotations

import copy
from pathlib import Path

import pydicom.data
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import dcmwrite
from pydicom.sequence import Sequence
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pydicom.valuerep import IS, DSdecimal, DSfloat

from node.part10 import HeaderEncoder
from tests import annotation_fixtures as fx

_PIXELS = 0x7FE00010


def _reference(ds) -> bytes | type[Exception]:
    """dcmwrite's bytes of the header (everything before the pixel data), or what it raises."""
    ds = copy.deepcopy(ds)
    for tag in [t for t in ds.keys() if t >= _PIXELS]:  # noqa: SIM118 (iterating decodes)
        del ds[tag]
    buffer = DicomBytesIO()
    try:
        dcmwrite(buffer, ds, enforce_file_format=True)
    except Exception as exc:
        return type(exc)
    return buffer.getvalue()


def _encoded(encoder: HeaderEncoder, ds) -> bytes | type[Exception]:
    try:
        return encoder.encode(ds)
    except Exception as exc:
        return type(exc)


def _small_test_files() -> list[Path]:
    """pydicom's own test files under 1 MB (its package folder: no download)."""
    folder = Path(pydicom.data.__file__).parent / "test_files"
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.stat().st_size < (1 << 20)
                  and p.suffix in ("", ".dcm"))


def test_same_bytes_as_dcmwrite_on_pydicom_test_files():
    """As read (file meta undecoded: left to dcmwrite) and with the file meta decoded, as
    de-identification builds it (the fast path)."""
    encoder = HeaderEncoder()
    compared = fast = 0
    for path in _small_test_files():
        for decode_meta in (False, True):
            try:
                ds = dcmread(path, defer_size=4096)
            except Exception:
                break
            if decode_meta:
                list(ds.file_meta)  # iterating a dataset decodes its elements
            expected = _reference(ds)
            for _ in range(2):  # the second time from the memo
                assert _encoded(encoder, ds) == expected, path
            if decode_meta and isinstance(expected, bytes):
                fast += encoder._fast(ds, _PIXELS) is not None
        else:
            compared += 1
    assert compared > 50
    assert fast > 30  # most took the fast path, not dcmwrite


def test_same_bytes_on_decoded_datasets():
    """Every element decoded (as after de-identification, sequences and their items
    included): the memo keys decoded values, and these bytes are still dcmwrite's."""
    encoder = HeaderEncoder()
    compared = 0
    for path in _small_test_files():
        try:
            ds = dcmread(path, defer_size=4096)
            ds.walk(lambda _ds, _elem: None)  # walking decodes every element, nested too
            list(ds.file_meta)
        except Exception:
            continue
        expected = _reference(ds)
        if not isinstance(expected, bytes):
            continue
        for _ in range(2):
            assert _encoded(encoder, ds) == expected, path
        compared += 1
    assert compared > 50


def test_same_bytes_on_deidentified_headers(tmp_path):
    """The clinical route's case: a de-identified CT slice and a SEG, each encoded twice,
    and a second slice of the series (mostly remembered bytes, some new)."""
    from node.anonymize.anonymizer import Deidentifier
    from node.anonymize.keys import ProjectKey
    from node.anonymize.settings import DeidSettings

    engine = Deidentifier(DeidSettings(), ProjectKey(bytes(range(32))))
    encoder = HeaderEncoder()
    for ds in (fx.PHANTOM.slice(0), fx.PHANTOM.slice(1), fx.valid_seg()):
        path = tmp_path / "in.dcm"
        ds.save_as(path, enforce_file_format=True)
        out = engine.deidentify(dcmread(path)).dataset
        expected = _reference(out)
        assert isinstance(expected, bytes)
        assert encoder.encode(out) == expected
        assert encoder.encode(out) == expected


def test_same_bytes_on_nested_sequences_that_differ_per_slice(tmp_path):
    """The PHI corpus plants nested sequences whose items differ per slice (referenced
    images, content items): no key for the whole sequence, so its items are joined from
    the elements' bytes (the encoder's own sequence path), and these are dcmwrite's."""
    from node.anonymize.anonymizer import Deidentifier
    from node.anonymize.keys import ProjectKey
    from node.anonymize.settings import DeidSettings
    from tests.phi_corpus import STUDIES, write_ct_series

    engine = Deidentifier(DeidSettings(), ProjectKey(bytes(range(32))))
    encoder = HeaderEncoder()
    for path in write_ct_series(STUDIES[0], tmp_path)[:3]:
        for ds in (dcmread(path), engine.deidentify(dcmread(path)).dataset):
            ds.walk(lambda _ds, _elem: None)
            list(ds.file_meta)
            expected = _reference(ds)
            assert isinstance(expected, bytes)
            assert encoder._fast(ds, _PIXELS) == expected
            assert encoder._fast(ds, _PIXELS) == expected
            nested = [e for e in ds if e.VR == "SQ" and any(
                i.VR == "SQ" for item in e.value for i in item)]
            assert nested, "the corpus plants nested sequences"
            assert all(encoder._sequence(e, (False, True), "iso8859") is not None
                       for e in nested)


def _sequence_of(*items: Dataset, undefined: bool) -> Dataset:
    """A slice read back from its bytes (so the encoder's fast path takes it) with a
    ReferencedImageSequence of ``items``."""
    buffer = DicomBytesIO()
    fx.PHANTOM.slice(0).save_as(buffer, enforce_file_format=True)
    ds = dcmread(DicomBytesIO(buffer.getvalue()))
    list(ds.file_meta)  # decoded, as de-identification leaves it
    ds.ReferencedImageSequence = Sequence(list(items))
    ds["ReferencedImageSequence"].is_undefined_length = undefined
    return ds


@pytest.mark.parametrize("undefined", [False, True])
def test_sequences_and_items_of_undefined_length(undefined):
    """Undefined lengths are kept as pydicom writes them: item and sequence delimiters."""
    item = Dataset()
    item.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    item.ReferencedSOPInstanceUID = "1.2.3.4"
    item.is_undefined_length_sequence_item = undefined
    empty = Dataset()
    ds = _sequence_of(item, empty, undefined=undefined)
    encoder = HeaderEncoder()
    assert encoder._sequence(ds["ReferencedImageSequence"], (False, True), "iso8859")
    assert encoder._fast(ds, _PIXELS) == _reference(ds)


@pytest.mark.parametrize("case", ["own_charset", "ambiguous_vr"])
def test_items_pydicom_would_rewrite_are_left_to_it(case):
    """An item with a character set of its own, or an element of an ambiguous VR (which
    write_dataset resolves from the item's context): pydicom writes that sequence."""
    item = Dataset()
    item.ReferencedSOPInstanceUID = "1.2.3.4"
    if case == "own_charset":
        item.SpecificCharacterSet = "ISO_IR 100"
        item.PatientName = "Müller^Eva"
    else:
        item.add_new(0x00283002, "US or SS", [256, 0, 16])  # LUTDescriptor
        item.PixelRepresentation = 0
    ds = _sequence_of(item, undefined=False)
    encoder = HeaderEncoder()
    assert encoder._sequence(ds["ReferencedImageSequence"], (False, True), "iso8859") is None
    assert encoder._fast(ds, _PIXELS) == _reference(ds)


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
@pytest.mark.parametrize(("keyword", "value"), [
    ("SOPInstanceUID", "1.2.3"),  # odd: a NUL after it
    ("SOPInstanceUID", UID("1.2.840.10008.1.2.1")),
    ("SeriesInstanceUID", ""),
    ("SeriesInstanceUID", "1.2.\u00e9"),  # not in pydicom's default encoding: it raises
    ("InstanceNumber", IS("7")),
    ("InstanceNumber", IS(" 12 ")),  # written as read
    ("InstanceNumber", IS(123)),
    ("SliceThickness", DSfloat("1.50")),  # written as read
    ("SliceThickness", DSfloat(0.1234567890123, auto_format=True)),
    ("SliceThickness", DSdecimal("3.14159")),
    ("ImagePositionPatient", [DSfloat("-1.5"), DSfloat("2"), DSfloat("3.25")]),  # pydicom's
])
def test_decoded_uids_and_numbers_are_written_as_pydicom_writes_them(keyword, value, syntax):
    """De-identification leaves new UIDs and decoded numbers in every header, which the
    memo never holds: the encoder writes a single one itself, and its bytes (or the error
    pydicom raises) are dcmwrite's, explicit and implicit VR, first time and again."""
    buffer = DicomBytesIO()
    slice_ = fx.PHANTOM.slice(0)
    slice_.file_meta.TransferSyntaxUID = syntax
    slice_.save_as(buffer, enforce_file_format=True)
    ds = dcmread(DicomBytesIO(buffer.getvalue()))
    list(ds.file_meta)  # decoded, as de-identification leaves it
    setattr(ds, keyword, value)
    if keyword == "SOPInstanceUID":
        ds.file_meta.MediaStorageSOPInstanceUID = value
    encoder = HeaderEncoder()
    expected = _reference(ds)
    for _ in range(2):
        assert _encoded(encoder, ds) == expected


@pytest.mark.parametrize("change", ["meta_class", "no_meta_version", "no_version_name",
                                    "no_preamble"])
def test_meta_dcmwrite_would_complete_is_left_to_dcmwrite(tmp_path, change):
    """Where dcmwrite corrects or completes the file meta, the bytes are still its bytes."""
    ds = fx.PHANTOM.slice(0)
    path = tmp_path / "in.dcm"
    ds.save_as(path, enforce_file_format=True)
    ds = dcmread(path)
    if change == "meta_class":
        ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
    elif change == "no_meta_version":
        del ds.file_meta.FileMetaInformationVersion
    elif change == "no_version_name":
        del ds.file_meta.ImplementationVersionName
    else:
        ds.preamble = None
    expected = _reference(ds)
    assert isinstance(expected, bytes)
    assert HeaderEncoder().encode(ds) == expected
