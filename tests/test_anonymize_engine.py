"""The engine on small hand-made datasets: one rule per test."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pydicom.data
import pytest
from pydicom import config, dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.sequence import Sequence
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    RLELossless,
    SecondaryCaptureImageStorage,
    UltrasoundImageStorage,
)

from node.anonymize.anonymizer import (
    BurnedInTextRisk,
    DeidentificationError,
    Deidentifier,
    PatientEntry,
    UidEntry,
    burned_in_risk,
    encode,
)
from node.anonymize.keys import ProjectKey
from node.anonymize.settings import DeidSettings, MaskRegion, SafePrivateTag
from node.anonymize.temporal import TemporalOffset, shift_value

KEY = ProjectKey(b"engine-test-key-0123456789abcdef")
VENDOR_CLASS = "1.3.12.2.1107.5.9.1"


@pytest.fixture(autouse=True)
def _quiet_validation(monkeypatch):
    monkeypatch.setattr(config.settings, "reading_validation_mode", config.IGNORE)


def ct(**extra) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4.5.6.1"
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.SourceApplicationEntityTitle = "SENDERAE"
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = "1.2.3.4.5.6.1"
    ds.StudyInstanceUID = "1.2.3.4.5"
    ds.SeriesInstanceUID = "1.2.3.4.5.6"
    ds.Modality = "CT"
    ds.PatientName = "Doe^Jonathan"
    ds.PatientID = "MRN001"
    ds.IssuerOfPatientID = "NORTH"
    ds.StudyDate = "20200301"
    ds.Rows = ds.Columns = 4
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.PixelData = bytes(range(32))
    for keyword, value in extra.items():
        setattr(ds, keyword, value)
    return ds


def run(ds: Dataset, **settings) -> Dataset:
    return Deidentifier(DeidSettings(**settings), KEY).deidentify(ds).dataset


def test_dates_shift_by_one_offset_per_patient_at_any_depth():
    item = Dataset()
    item.Date = "20200311"
    inner = Dataset()
    inner.AnatomicRegionSequence = Sequence([item])
    ds = ct(SeriesDate="20200302", AnatomicRegionSequence=Sequence([inner]))
    out = run(ds)
    offset = TemporalOffset(KEY.date_offset_days("NORTH", "MRN001"))  # dates alone: days
    assert out.StudyDate == shift_value("DA", "20200301", offset)
    assert out.SeriesDate == shift_value("DA", "20200302", offset)
    assert out.AnatomicRegionSequence[0].AnatomicRegionSequence[0].Date == shift_value(
        "DA", "20200311", offset
    )
    assert out.StudyDate != "20200301"
    assert out.LongitudinalTemporalInformationModified == "MODIFIED"


def test_full_dates_keep_and_no_dates_remove():
    full = run(ct(SeriesDate="20200302"), retain_longitudinal="full")
    assert (full.StudyDate, full.SeriesDate) == ("20200301", "20200302")
    assert full.LongitudinalTemporalInformationModified == "UNMODIFIED"
    off = run(ct(SeriesDate="20200302", ExpiryDate="20200303"), retain_longitudinal="off")
    assert off.StudyDate in (None, "")  # Z
    assert off.SeriesDate == "19000101"  # X/D: a dummy, not the date
    assert "ExpiryDate" not in off  # outside the table: removed
    assert off.LongitudinalTemporalInformationModified == "REMOVED"


@pytest.mark.parametrize(("age", "kept"), [("095Y", "090Y"), ("089Y", "089Y"),
                                           ("999M", "999M"), ("120Y", "090Y"), ("12Y", None)])
def test_ages_over_89_become_090y_when_characteristics_are_kept(age, kept):
    assert "PatientAge" not in run(ct(PatientAge=age))
    out = run(ct(PatientAge=age), retain_patient_characteristics=True)
    assert out.get("PatientAge") == kept


def test_uids_are_remapped_but_well_known_and_class_uids_are_not():
    code = Dataset()
    code.CodingSchemeUID = "2.16.840.1.113883.6.96"
    ds = ct(
        SOPClassUID=VENDOR_CLASS,
        FrameOfReferenceUID="1.2.3.4.5.99",
        ReferencedFrameOfReferenceUID="1.2.840.10008.1.4.1.1",  # well-known FoR
        FailedSOPInstanceUIDList=["1.2.3.4.5.6.1", "1.2.3.4.5.6.2"],
        CodingSchemeIdentificationSequence=Sequence([code]),
    )
    out = run(ds)
    assert out.SOPClassUID == VENDOR_CLASS
    assert out.FrameOfReferenceUID == KEY.uid("1.2.3.4.5.99")
    assert out.SOPInstanceUID == KEY.uid("1.2.3.4.5.6.1")
    assert out.ReferencedFrameOfReferenceUID == "1.2.840.10008.1.4.1.1"
    assert list(out.FailedSOPInstanceUIDList) == [KEY.uid("1.2.3.4.5.6.1"),
                                                  KEY.uid("1.2.3.4.5.6.2")]
    assert out.CodingSchemeIdentificationSequence[0].CodingSchemeUID == "2.16.840.1.113883.6.96"
    kept = run(ct(), retain_uids=True)
    assert kept.SOPInstanceUID == "1.2.3.4.5.6.1"
    assert kept.file_meta.MediaStorageSOPInstanceUID == "1.2.3.4.5.6.1"


def test_unknown_tags_of_unknown_vr_survive_only_as_remapped_uids():
    ds = ct()
    ds.add_new(0x0012EE42, "UN", b"1.2.3.4.5.6.1\x00")
    ds.add_new(0x0012EE44, "UN", b"Doe Jonathan")
    ds.add_new(0x0012EE46, "LO", "free text in an unknown tag")
    out = run(ds)
    assert out[0x0012EE42].value.rstrip(b"\x00").decode() == KEY.uid("1.2.3.4.5.6.1")
    assert 0x0012EE44 not in out
    assert out[0x0012EE46].value in (None, "")


def _private(ds: Dataset) -> Dataset:
    ds.add_new(0x00190010, "LO", "ACME 1.0")
    ds.add_new(0x00191010, "UI", "1.2.3.4.5.6.1")
    ds.add_new(0x00191011, "LO", "note about Doe")
    ds.add_new(0x00191012, "US", 42)
    ds.add_new(0x00211010, "US", 7)  # no creator for group 0021
    return ds


def test_private_tags_go_unless_safe_listed_with_the_option_on():
    safe = (SafePrivateTag("ACME 1.0", 0x10), SafePrivateTag("ACME 1.0", 0x12),
            SafePrivateTag("ACME 1.0", 0x10, 0x0021))
    assert not any(e.tag.is_private for e in run(_private(ct())))
    assert not any(e.tag.is_private for e in run(_private(ct()), safe_private=safe))
    out = run(_private(ct()), retain_safe_private=True, safe_private=safe)
    assert out[0x00190010].value == "ACME 1.0"
    assert out[0x00191010].value == KEY.uid("1.2.3.4.5.6.1")
    assert out[0x00191012].value == 42
    assert 0x00191011 not in out
    assert 0x00211010 not in out  # matching element, but no creator vouches for it


def _overlay(ds: Dataset, label: str) -> Dataset:
    ds.add_new(0x60000010, "US", 4)
    ds.add_new(0x60000011, "US", 4)
    ds.add_new(0x60000040, "CS", "G")
    ds.add_new(0x60000022, "LO", "drawn by Dr Who")
    ds.add_new(0x60001500, "LO", label)
    ds.add_new(0x60003000, "OW", b"\x01\x00")
    ds.add_new(0x50000022, "LO", "curve label")
    ds.add_new(0x50003000, "OW", b"\x02\x00")
    return ds


def test_overlays_and_curves_removed_or_kept_cleaned_under_clean_graphics():
    assert not any(0x5000 <= e.tag.group <= 0x60FF for e in run(_overlay(ct(), "liver")))
    out = run(_overlay(ct(), "liver"), clean_graphics=True, safe_descriptors=("Liver",))
    assert out[0x60003000].value == b"\x01\x00"
    assert out[0x60000040].value == "G"
    assert out[0x60001500].value == "liver"
    assert 0x60000022 not in out and 0x50000022 not in out
    assert out[0x50003000].value == b"\x02\x00"
    named = run(_overlay(ct(), "Doe"), clean_graphics=True, safe_descriptors=("Doe",))
    assert 0x60001500 not in named  # vocabulary, but the patient's own name


def _segment(label: str, meaning: str = "Liver") -> Dataset:
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "10200004", "SCT", meaning
    segment = Dataset()
    segment.SegmentNumber = 3
    segment.SegmentLabel = label
    segment.SegmentDescription = "drawn for Mr Doe"
    segment.SegmentedPropertyTypeCodeSequence = Sequence([code])
    return segment


def test_segment_labels_keep_coded_meanings_and_lose_free_text():
    out = run(ct(SegmentSequence=Sequence([_segment("liver"), _segment("Doe lesion")]),
                 ContentLabel="DOE", ContentDescription="for Doe"))
    first, second = out.SegmentSequence
    assert first.SegmentLabel == "liver"
    assert second.SegmentLabel == "Segment 3"
    assert "SegmentDescription" not in first
    assert out.ContentLabel == "ANONYMOUS"
    assert out.ContentDescription in (None, "")
    vocab = run(ct(SegmentSequence=Sequence([_segment("Tumour A")]), ContentLabel="TUMOURS"),
                clean_descriptors=True, safe_descriptors=("tumour a", "tumours"))
    assert vocab.SegmentSequence[0].SegmentLabel == "Tumour A"
    assert vocab.ContentLabel == "TUMOURS"


def test_clean_descriptors_keep_only_project_vocabulary():
    ds = ct(StudyDescription="CT CHEST", SeriesDescription="Doe follow-up")
    # The strict setting: without Clean Descriptors, descriptions go (issue 16's
    # vocabulary is the default and has its own tests).
    assert "StudyDescription" not in run(ds, safe_descriptors=("ct chest",),
                                         descriptions="remove")
    out = run(ds, clean_descriptors=True, safe_descriptors=("ct chest", "doe follow-up"),
              descriptions="remove")
    assert out.StudyDescription == "CT CHEST"
    assert "SeriesDescription" not in out  # names the patient: never clean


def test_residual_scan_empties_kept_values_naming_the_patient():
    out = run(ct(BodyPartExamined="DOE", Manufacturer="Jonathan Medical",
                 ConvolutionKernel="B30f"))
    assert out.BodyPartExamined in (None, "")
    # Free text loses the matching words only (issue 16), not the whole value.
    assert out.Manufacturer == "REMOVED Medical"
    assert out.ConvolutionKernel == "B30f"


def test_free_text_and_names_outside_the_table_are_emptied():
    item = Dataset()
    item.TextValue = "Jonathan Doe said hello"
    item.ValueType = "TEXT"
    out = run(ct(PositionReferenceIndicator="near Dr Smith", StrainDescription="x",
                 ContentSequence=Sequence([item])))
    assert out.PositionReferenceIndicator in (None, "")
    assert out.StrainDescription in (None, "")
    assert out.ContentSequence[0].TextValue in (None, "")
    assert out.ContentSequence[0].ValueType == "TEXT"


def test_structured_content_is_emptied_or_cleaned_recursively():
    item = Dataset()
    item.ValueType = "TEXT"
    item.TextValue = "secret"
    assert len(run(ct(AcquisitionContextSequence=Sequence([item]))).AcquisitionContextSequence) == 0
    out = run(ct(AcquisitionContextSequence=Sequence([item])), clean_structured_content=True)
    assert out.AcquisitionContextSequence[0].ValueType == "TEXT"
    assert out.AcquisitionContextSequence[0].TextValue in (None, "")


def test_markers_name_the_profile_and_each_option():
    out = run(ct(PatientIdentityRemoved="NO"), retain_uids=True, clean_graphics=True)
    assert out.PatientIdentityRemoved == "YES"
    codes = [i.CodeValue for i in out.DeidentificationMethodCodeSequence]
    assert codes == ["113100", "113110", "113107", "113103"]
    assert {i.CodingSchemeDesignator for i in out.DeidentificationMethodCodeSequence} == {"DCM"}
    assert out.DeidentificationMethod[0].endswith("PS3.15 E.1-1 2024b")
    assert all(len(v) <= 64 for v in out.DeidentificationMethod)


def test_file_meta_is_rebuilt_preamble_zeroed_and_input_untouched():
    ds = ct()
    ds.preamble = b"MZ" + b"\x90" * 126
    before = copy.deepcopy(ds)
    result = Deidentifier(DeidSettings(), KEY).deidentify(ds)
    data = encode(result.dataset)
    assert data[:128] == b"\x00" * 128 and data[128:132] == b"DICM"
    meta = result.dataset.file_meta
    assert meta.MediaStorageSOPInstanceUID == result.dataset.SOPInstanceUID
    assert "SourceApplicationEntityTitle" not in meta
    assert meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert ds == before and ds.file_meta == before.file_meta
    reread = dcmread(DicomBytesIO(data))
    assert reread.PatientID == result.dataset.PatientID


def test_entries_record_patient_and_every_replaced_uid():
    result = Deidentifier(DeidSettings(), KEY).deidentify(ct())
    patient, *uids = result.entries
    assert isinstance(patient, PatientEntry)
    assert (patient.original_id, patient.original_name, patient.issuer) == (
        "MRN001", "Doe^Jonathan", "NORTH")
    assert patient.pseudonym_id == result.dataset.PatientID
    assert patient.date_offset_days == KEY.date_offset_days("NORTH", "MRN001")
    assert all(isinstance(u, UidEntry) for u in uids)
    assert {u.original_uid for u in uids} == {"1.2.3.4.5", "1.2.3.4.5.6", "1.2.3.4.5.6.1"}


def test_patients_without_id_are_pseudonymised_per_study():
    a = run(ct(PatientID="", StudyInstanceUID="1.2.3.1"))
    b = run(ct(PatientID="", StudyInstanceUID="1.2.3.2"))
    again = run(ct(PatientID="", StudyInstanceUID="1.2.3.1"))
    assert a.PatientID and a.PatientID != b.PatientID
    assert a.PatientID == again.PatientID


def test_no_transfer_syntax_is_an_error():
    ds = ct()
    del ds.file_meta.TransferSyntaxUID
    with pytest.raises(DeidentificationError, match="transfer syntax"):
        run(ds)


@pytest.mark.parametrize(
    ("extra", "risky"),
    [
        ({"BurnedInAnnotation": "YES"}, True),
        ({}, False),
        ({"SOPClassUID": SecondaryCaptureImageStorage}, True),
        ({"SOPClassUID": UltrasoundImageStorage, "Modality": "US"}, True),
        ({"SOPClassUID": UltrasoundImageStorage, "BurnedInAnnotation": "NO"}, False),
        ({"Modality": "US"}, True),
        ({"ConversionType": "WSD"}, True),
    ],
)
def test_burned_in_risk(extra, risky):
    ds = ct(**extra)
    reason = burned_in_risk(ds, DeidSettings())
    assert (reason is not None) == risky
    assert burned_in_risk(ds, DeidSettings(burned_in_policy="accept")) is None
    if risky:
        with pytest.raises(BurnedInTextRisk):
            run(ds)


def test_mask_policy_blanks_configured_regions_only():
    pixels = np.arange(1, 17, dtype=np.uint16).reshape(4, 4)
    ds = ct(BurnedInAnnotation="YES", PixelData=pixels.tobytes())
    settings = DeidSettings(burned_in_policy="mask",
                            mask_regions=(MaskRegion(x=0, y=0, width=4, height=1, rows=4),))
    assert burned_in_risk(ds, settings) is None
    result = Deidentifier(settings, KEY).deidentify(ds)
    out = np.frombuffer(result.dataset.PixelData, dtype="<u2").reshape(4, 4)
    assert (out[0] == 0).all() and (out[1:] == pixels[1:]).all()
    assert result.pixels_masked
    assert "113101" in [i.CodeValue for i in result.dataset.DeidentificationMethodCodeSequence]
    elsewhere = DeidSettings(burned_in_policy="mask", mask_regions=(MaskRegion(0, 0, 4, 1, rows=8),))
    assert "no mask region" in burned_in_risk(ds, elsewhere)
    compressed = ct(BurnedInAnnotation="YES")
    compressed.compress(RLELossless, np.zeros((4, 4), dtype=np.uint16), encoding_plugin="pydicom")
    assert "compressed" in burned_in_risk(compressed, settings)


def _same_objects_twice(tmp_path: Path) -> list[Path]:
    """Objects that share elements' bytes but not what the engine's results depend on
    besides them: another patient (text matcher, date shift), another paired time, the
    same bytes under another character set."""
    paths = []

    def save(name: str, ds: Dataset) -> None:
        path = tmp_path / f"{name}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)

    # A kept code string and free text that name the patient of one object only.
    for patient, (name, mrn) in enumerate((("Doe^Jonathan", "MRN001"),
                                           ("Roe^Richard", "MRN002"))):
        save(f"patient{patient}", ct(PatientName=name, PatientID=mrn, BodyPartExamined="DOE",
                                     ImageComments="seen by Doe", StudyTime="235959",
                                     ContentDate="20200301", ContentTime="101500"))
    # A name only a sequence carries, of the same length in both: a kept code string
    # naming it is cleaned in one object only.
    for number, operator in enumerate(("Kowalski^Anna", "Nowakowa^Anna")):
        item = Dataset()
        item.PersonName = operator
        save(f"sequence{number}", ct(ContentSequence=Sequence([item]),
                                     BodyPartExamined="KOWALSKI"))
    # A series description not kept, written from each series' modality and number.
    for modality, number in (("CT", 3), ("MR", 4)):
        save(f"series{number}", ct(Modality=modality, SeriesNumber=number,
                                   SeriesDescription="Zephyr protocol"))
    # The same StudyDate bytes with another StudyTime: shifted across midnight or not.
    save("early", ct(StudyTime="000000"))
    # The same bytes of a kept text element under two character sets: decoded apart.
    for number, (charset, text) in enumerate((("ISO_IR 100", "\u00e9TUDE"),
                                              ("ISO_IR 144", "\u0449TUDE"))):
        save(f"charset{number}", ct(SpecificCharacterSet=charset, Manufacturer=text))
    assert len({p.read_bytes().split(b"\x08\x00\x70\x00LO")[1][:8] for p in paths[-2:]}) == 1
    return paths


def test_an_engine_that_has_seen_other_objects_gives_what_a_fresh_one_gives(tmp_path):
    """The engine remembers what it did with elements and sequences a series repeats
    (decoded values, each element's output and evidence, the text scan's terms of
    sequences, the markers' bytes): after pydicom's test files (character sets,
    implicit and big-endian syntaxes, sequences), a planted-PHI corpus (nested
    sequences, private elements, several patients) and objects that share bytes but
    not patients or paired times have gone through it, each file again gives the
    bytes, re-identification entries and evidence a fresh engine gives it, under
    the default options and under others."""
    from tests.phi_corpus import build_corpus

    folder = Path(pydicom.data.__file__).parent / "test_files"
    paths = sorted(p for p in folder.rglob("*") if p.is_file()
                   and p.stat().st_size < (1 << 20) and p.suffix in ("", ".dcm"))
    paths += build_corpus(tmp_path / "corpus").files
    paths += _same_objects_twice(tmp_path)

    def deidentified(engine: Deidentifier, path: Path) -> tuple[object, ...] | str:
        try:
            result = engine.deidentify(dcmread(path, defer_size=4096))
            return encode(result.dataset), result.entries, result.evidence.as_dict()
        except Exception as exc:
            return type(exc).__name__

    for settings in (DeidSettings(),
                     DeidSettings(retain_longitudinal="off", clean_descriptors=True,
                                  clean_graphics=True, safe_descriptors=("CHEST", "CT"))):
        seasoned = Deidentifier(settings, KEY)
        for path in paths:
            deidentified(seasoned, path)
        compared = 0
        for path in paths:
            fresh = deidentified(Deidentifier(settings, KEY), path)
            assert deidentified(seasoned, path) == fresh, path
            compared += isinstance(fresh, tuple)
        assert compared > 50


def test_changing_an_input_after_de_identification_does_not_change_the_next_output(tmp_path):
    """The engine remembers decoded elements: not the caller's own, which it may change."""
    path = tmp_path / "in.dcm"
    ct(Manufacturer="ACME").save_as(path, enforce_file_format=True)
    engine = Deidentifier(DeidSettings(), KEY)
    first = dcmread(path)
    assert engine.deidentify(first).dataset.Manufacturer == "ACME"
    first.Manufacturer = "CHANGED"  # pydicom sets the decoded element's value in place
    assert engine.deidentify(dcmread(path)).dataset.Manufacturer == "ACME"


def test_changing_an_output_does_not_change_the_next_output(tmp_path):
    """The engine remembers element results and shares the markers' undecoded elements:
    whatever a caller does to the elements of one output, the next is as a fresh
    engine makes it."""
    path = tmp_path / "in.dcm"
    ct(Manufacturer="ACME", ImageType=["ORIGINAL", "PRIMARY"]).save_as(
        path, enforce_file_format=True)
    engine = Deidentifier(DeidSettings(), KEY)
    engine.deidentify(dcmread(path))
    out = engine.deidentify(dcmread(path)).dataset  # from remembered results
    # pydicom sets a decoded element's value in place, and lists and sequences change.
    out.Manufacturer = "CHANGED"
    out.ImageType.append("CHANGED")
    out.StudyInstanceUID = "1.2.3"
    out.DeidentificationMethod.append("CHANGED")
    out.DeidentificationMethodCodeSequence[0].CodeValue = "CHANGED"
    out.PatientIdentityRemoved = "NO"
    again = engine.deidentify(dcmread(path)).dataset
    assert encode(again) == encode(Deidentifier(DeidSettings(), KEY).deidentify(
        dcmread(path)).dataset)
    assert again.Manufacturer == "ACME" and again.PatientIdentityRemoved == "YES"
    assert again.DeidentificationMethodCodeSequence[0].CodeValue == "113100"
