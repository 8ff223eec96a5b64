"""Choosing the transfer syntax an instance travels in, and re-encoding it (pydicom's files)."""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom.data
import pytest
from pydicom import dcmread
from pydicom.filereader import read_dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGLossless,
    JPEGLSLossless,
    RLELossless,
)

from node.dimse.sender import dataset_offset
from node.dimse.transcode import (
    TranscodeError,
    can_decode,
    choose,
    file_bytes,
    offered,
    transcode,
    why_not,
)

FILES = Path(pydicom.data.__file__).parent / "test_files"  # shipped with pydicom: no download
CT = "1.2.840.10008.5.1.4.1.1.2"


def test_offered_is_the_stored_syntax_then_the_uncompressed_ones():
    assert offered(RLELossless) == (RLELossless, ExplicitVRLittleEndian, ImplicitVRLittleEndian)
    assert offered(ImplicitVRLittleEndian) == (ImplicitVRLittleEndian, ExplicitVRLittleEndian)


@pytest.mark.parametrize(("stored", "accepted", "expected"), [
    (ExplicitVRLittleEndian, [ImplicitVRLittleEndian, ExplicitVRLittleEndian],
     ExplicitVRLittleEndian),                                     # as stored: the fast path
    (ExplicitVRLittleEndian, [ImplicitVRLittleEndian], ImplicitVRLittleEndian),
    (ExplicitVRBigEndian, [ImplicitVRLittleEndian, ExplicitVRLittleEndian],
     ExplicitVRLittleEndian),                                     # explicit preferred
    (RLELossless, [ImplicitVRLittleEndian], ImplicitVRLittleEndian),  # numpy decodes RLE
    (RLELossless, [RLELossless, ImplicitVRLittleEndian], RLELossless),
    (JPEGLossless, [ImplicitVRLittleEndian], None),               # without a decoder: none
    (ExplicitVRLittleEndian, [JPEGBaseline8Bit], None),           # never encoded into lossy
    (ExplicitVRLittleEndian, [], None),
])
def test_choose(stored, accepted, expected):
    if stored == JPEGLossless and can_decode(JPEGLossless):
        expected = ImplicitVRLittleEndian  # a decoder is installed here: it can be re-encoded
    assert choose(stored, accepted) == expected


def test_why_not_names_the_sop_class_and_the_syntaxes():
    assert why_not(CT, ExplicitVRLittleEndian, [], offered(ExplicitVRLittleEndian),
                   "the destination") == (
        "CT Image Storage (1.2.840.10008.5.1.4.1.1.2) stored as Explicit VR Little Endian:"
        " offered Explicit VR Little Endian, Implicit VR Little Endian;"
        " the destination accepted none of them")
    assert why_not(CT, RLELossless, [JPEGLSLossless], who="the C-GET requester") == (
        "CT Image Storage (1.2.840.10008.5.1.4.1.1.2) stored as RLE Lossless:"
        " the C-GET requester accepted JPEG-LS Lossless Image Compression")
    assert why_not(CT, RLELossless, [], who="the C-GET requester").endswith(
        "accepted no storage context for it")
    if not can_decode(JPEGLossless):
        assert why_not(CT, JPEGLossless, [ImplicitVRLittleEndian]).endswith(
            "; no pixel decoder for JPEG Lossless, Non-Hierarchical (Process 14) is installed")


def _decoded(data: bytes, syntax: str):
    ds = read_dataset(BytesIO(data), syntax == ImplicitVRLittleEndian, True)
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    return ds


@pytest.mark.parametrize(("name", "target"), [
    ("MR_small.dcm", ImplicitVRLittleEndian),
    ("MR_small_implicit.dcm", ExplicitVRLittleEndian),
    ("MR_small_bigendian.dcm", ExplicitVRLittleEndian),
    ("rtdose_expb.dcm", ImplicitVRLittleEndian),  # big endian, 32-bit pixel cells in OW
    ("MR_small_RLE.dcm", ImplicitVRLittleEndian),
    ("MR_small_jpeg_ls_lossless.dcm", ExplicitVRLittleEndian),
    ("MR_small_jp2klossless.dcm", ImplicitVRLittleEndian),
    ("image_dfl.dcm", ExplicitVRLittleEndian),
])
def test_transcode_keeps_the_instance_and_its_pixels(name, target):
    path = FILES / name
    original = dcmread(path)
    if not can_decode(original.file_meta.TransferSyntaxUID):
        name = original.file_meta.TransferSyntaxUID.name
        pytest.skip(f"decoder not installed for {name} (pyjpegls, pylibjpeg-openjpeg)")
    with open(path, "rb") as stored:
        data = transcode(stored, target)
    ds = _decoded(data, target)
    assert ds.SOPInstanceUID == original.SOPInstanceUID  # the same instance, not a new UID
    assert ds.PatientName == original.PatientName
    assert np.array_equal(ds.pixel_array, original.pixel_array)
    if original.file_meta.TransferSyntaxUID.is_compressed:
        assert len(ds.PixelData) == ds.Rows * ds.Columns * ds.SamplesPerPixel * \
            ds.BitsAllocated // 8 * int(ds.get("NumberOfFrames", 1))


def test_transcode_refuses_a_compressed_target_and_bad_input():
    with open(FILES / "MR_small.dcm", "rb") as stored, pytest.raises(TranscodeError):
        transcode(stored, RLELossless)
    with pytest.raises(TranscodeError, match="cannot re-encode the stored instance"):
        transcode(BytesIO(b"\0" * 128 + b"DICM" + b"garbage"), ImplicitVRLittleEndian)


def test_file_bytes_make_a_file_pynetdicom_and_pydicom_read(tmp_path):
    with open(FILES / "MR_small.dcm", "rb") as stored:
        data = transcode(stored, ImplicitVRLittleEndian)
    original = dcmread(FILES / "MR_small.dcm")
    path = tmp_path / "x.dcm"
    path.write_bytes(file_bytes(original.SOPClassUID, original.SOPInstanceUID,
                                ImplicitVRLittleEndian, data))
    back = dcmread(path)
    assert back.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
    assert back.file_meta.MediaStorageSOPInstanceUID == original.SOPInstanceUID
    assert np.array_equal(back.pixel_array, original.pixel_array)
    with open(path, "rb") as f:
        assert path.read_bytes()[dataset_offset(f):] == data


def test_deflated_is_uncompressed_for_the_choice():
    assert can_decode(DeflatedExplicitVRLittleEndian)
    assert choose(DeflatedExplicitVRLittleEndian, [ImplicitVRLittleEndian]) == \
        ImplicitVRLittleEndian
