"""The annotator route: remapping original UIDs an annotation still references, and
telling an object that still carries identity from a pseudonymous one."""

from __future__ import annotations

import copy

import highdicom as hd
import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.sr.codedict import codes
from pydicom.uid import CTImageStorage

from node.anonymize.anonymizer import (
    Deidentifier,
    UidEntry,
    encode,
    looks_identified,
    remap_known_uids,
)
from node.anonymize.keys import ProjectKey
from node.anonymize.settings import DeidSettings
from tests.phi_corpus import PATIENTS, UNKNOWN_PUBLIC_UID_TAG
from tests.test_anonymize_engine import ct

KEY = ProjectKey(b"annotator-test-key-0123456789abc")


pytestmark = pytest.mark.usefixtures("quiet_pydicom_validation")


@pytest.fixture(scope="module")
def deidentified(corpus) -> dict:
    """Every CT of the corpus de-identified: output bytes per path, and the map's
    pseudonymous UIDs (what the node's is_known_pseudonym asks about)."""
    engine = Deidentifier(DeidSettings(), KEY)
    outputs, pseudonyms, originals = {}, set(), set()
    for paths in corpus.ct.values():
        for path in paths:
            result = engine.deidentify(dcmread(path))
            outputs[path] = encode(result.dataset)
            for entry in result.entries:
                if isinstance(entry, UidEntry):
                    pseudonyms.add(entry.pseudonym_uid)
                    originals.add(entry.original_uid)
    return {"outputs": outputs, "pseudonyms": frozenset(pseudonyms),
            "originals": frozenset(originals)}


def _parsed(data: bytes) -> Dataset:
    return dcmread(DicomBytesIO(data))


def _walk(ds: Dataset):
    for elem in ds:
        yield elem
        if elem.VR == "SQ":
            for item in elem.value:
                yield from _walk(item)


def _uid_values(ds: Dataset) -> list[str]:
    values = []
    for elem in _walk(ds):
        if elem.VR == "UI" and elem.value:
            values += [str(v) for v in (elem.value if elem.VM > 1 else [elem.value])]
    return values


def test_a_seg_referencing_original_uids_is_remapped_onto_the_pseudonymous_ones(
        corpus, deidentified):
    original = dcmread(corpus.seg)  # highdicom SEG built on the original CT A1
    before = copy.deepcopy(original)
    remapped, count = remap_known_uids(original, KEY, deidentified["pseudonyms"].__contains__)
    assert original == before  # the input is not modified

    ct_out = [_parsed(deidentified["outputs"][p]) for p in corpus.ct[("A", 1)]]
    assert remapped.StudyInstanceUID == ct_out[0].StudyInstanceUID
    assert remapped.FrameOfReferenceUID == ct_out[0].FrameOfReferenceUID
    series = remapped.ReferencedSeriesSequence[0]
    assert series.SeriesInstanceUID == ct_out[0].SeriesInstanceUID
    assert {i.ReferencedSOPInstanceUID for i in series.ReferencedInstanceSequence} == {
        ds.SOPInstanceUID for ds in ct_out}
    for frame in remapped.PerFrameFunctionalGroupsSequence:
        source = frame.DerivationImageSequence[0].SourceImageSequence[0]
        assert source.ReferencedSOPInstanceUID in {ds.SOPInstanceUID for ds in ct_out}
    # The SEG's own UIDs were never de-identified: they stay as they are.
    assert remapped.SOPInstanceUID == original.SOPInstanceUID
    assert remapped.SeriesInstanceUID == original.SeriesInstanceUID
    assert remapped.file_meta.MediaStorageSOPInstanceUID == original.SOPInstanceUID
    # Every original UID of a de-identified object is gone; count is per value.
    assert not set(_uid_values(remapped)) & deidentified["originals"]
    replaced = [u for u in _uid_values(original) if u in deidentified["originals"]]
    assert count == len(replaced) > 10
    # Everything else is untouched.
    changed = [(a.tag, a.VR) for a, b in zip(_walk(original), _walk(remapped), strict=True)
               if a.VR != "SQ" and a.value != b.value]
    assert changed and all(vr == "UI" for _, vr in changed)
    assert remapped.PixelData == original.PixelData


def test_implicit_vr_un_uids_and_file_meta_are_remapped(corpus, deidentified):
    path = corpus.ct[("A", 2)][1]  # implicit VR: the unknown public tag arrives as UN
    original = dcmread(path)
    assert original.get_item(UNKNOWN_PUBLIC_UID_TAG).VR in (None, "UN")
    remapped, count = remap_known_uids(original, KEY, deidentified["pseudonyms"].__contains__)
    target = _parsed(deidentified["outputs"][path])
    assert remapped.SOPInstanceUID == target.SOPInstanceUID
    assert remapped.file_meta.MediaStorageSOPInstanceUID == target.SOPInstanceUID
    assert remapped[UNKNOWN_PUBLIC_UID_TAG].value == target[UNKNOWN_PUBLIC_UID_TAG].value
    assert remapped[0x00091003].value.rstrip(b"\x00").decode() in deidentified["pseudonyms"]
    assert count >= 8
    again, _ = remap_known_uids(original, KEY, deidentified["pseudonyms"].__contains__)
    assert encode(again) == encode(remapped)  # deterministic
    reread = _parsed(encode(remapped))
    assert reread.SOPInstanceUID == target.SOPInstanceUID
    assert reread.PatientName == original.PatientName  # remapping is not de-identifying


@pytest.mark.parametrize("which", ["explicit", "implicit", "seg"])
def test_an_object_already_pseudonymous_comes_back_byte_identical(corpus, deidentified, which):
    if which == "seg":
        engine = Deidentifier(DeidSettings(), KEY)
        data = encode(engine.deidentify(dcmread(corpus.seg)).dataset)
    else:
        path = corpus.ct[("A", 1) if which == "explicit" else ("A", 2)][0]
        data = deidentified["outputs"][path]
    asked = []

    def known(uid: str) -> bool:
        asked.append(uid)
        return uid in deidentified["pseudonyms"]

    remapped, count = remap_known_uids(_parsed(data), KEY, known)
    assert count == 0
    assert encode(remapped) == data
    assert asked  # it did look


def test_well_known_uids_are_never_remapped_and_lookups_are_memoised():
    ds = ct()
    ds.ReferencedFrameOfReferenceUID = "1.2.840.10008.1.4.1.1"
    ds.FailedSOPInstanceUIDList = ["1.2.3.4.5.6.1", "1.2.3.4.5.6.1"]
    asked = []

    def everything(uid: str) -> bool:
        asked.append(uid)
        return True

    remapped, count = remap_known_uids(ds, KEY, everything)
    assert remapped.SOPClassUID == CTImageStorage
    assert remapped.file_meta.TransferSyntaxUID == ds.file_meta.TransferSyntaxUID
    assert remapped.ReferencedFrameOfReferenceUID == "1.2.840.10008.1.4.1.1"
    assert remapped.SOPInstanceUID == KEY.uid("1.2.3.4.5.6.1")
    assert list(remapped.FailedSOPInstanceUIDList) == [KEY.uid("1.2.3.4.5.6.1")] * 2
    # SOPInstanceUID, StudyInstanceUID, SeriesInstanceUID, the list's two, file meta
    assert count == 6
    assert sorted(asked) == sorted({KEY.uid(u) for u in ("1.2.3.4.5.6.1", "1.2.3.4.5",
                                                         "1.2.3.4.5.6")})


def test_looks_identified_flags_clinical_objects(corpus):
    original = dcmread(corpus.ct[("A", 1)][0])
    reason = looks_identified(original)
    assert reason is not None and "PatientIdentityRemoved is not YES" in reason
    p = PATIENTS[0]
    assert not {p.family, p.given, p.patient_id} & set(reason.split())
    foreign = ct(PatientIdentityRemoved="YES", PatientID="ANON-17", PatientName="ANON")
    assert "not a Lamina pseudonym" in looks_identified(foreign)


def test_looks_identified_accepts_pseudonymous_objects_with_or_without_markers(
        corpus, deidentified):
    output = _parsed(deidentified["outputs"][corpus.ct[("A", 1)][0]])
    assert looks_identified(output) is None
    del output.PatientIdentityRemoved  # annotation tools rarely copy the marker
    assert looks_identified(output) is None
    nobody = ct(PatientID="", PatientName="")
    assert "IssuerOfPatientID" in looks_identified(nobody)
    del nobody.IssuerOfPatientID
    assert looks_identified(nobody) is None


def test_a_seg_an_annotator_made_on_the_pseudonymous_ct_is_not_flagged(corpus, deidentified):
    sources = [_parsed(deidentified["outputs"][p]) for p in corpus.ct[("B", 1)]]
    mask = np.zeros((len(sources), sources[0].Rows, sources[0].Columns), dtype=np.uint8)
    mask[1:3, 4:8, 4:8] = 1
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=mask,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[hd.seg.SegmentDescription(
            segment_number=1, segment_label="Liver",
            segmented_property_category=codes.SCT.Organ,
            segmented_property_type=codes.SCT.Liver,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL)],
        series_instance_uid="2.25.1001", series_number=100, sop_instance_uid="2.25.1002",
        instance_number=1, manufacturer="Annotator", manufacturer_model_name="Tool",
        software_versions="1", device_serial_number="1",
    )
    assert seg.PatientID == sources[0].PatientID
    assert looks_identified(seg) is None
    _, count = remap_known_uids(seg, KEY, deidentified["pseudonyms"].__contains__)
    assert count == 0  # it references pseudonymous UIDs only


def test_looks_identified_flags_identity_that_came_back_into_a_pseudonymous_object(
        corpus, deidentified):
    output = _parsed(deidentified["outputs"][corpus.ct[("A", 1)][0]])
    named = copy.deepcopy(output)
    named.PatientName = PATIENTS[0].name
    reason = looks_identified(named)
    assert "PatientName is not the pseudonym" in reason
    assert PATIENTS[0].family not in reason
    other = copy.deepcopy(output)
    other.OtherPatientNames = PATIENTS[0].name
    assert "OtherPatientNames" in looks_identified(other)
    empty = copy.deepcopy(output)
    empty.OtherPatientNames = ""
    assert looks_identified(empty) is None
    trailing = copy.deepcopy(output)
    trailing.PatientName = str(output.PatientName) + "^^"
    assert looks_identified(trailing) is None


def test_the_annotator_engine_keeps_labels_and_rater_cleaned_of_the_patient():
    """Issue 10 §1: labels and the rater's name are the annotation's content; only the
    patient's own identifiers are taken out of them."""
    ds = ct(ContentCreatorName="Reader^Ann")
    ds.add_new(0x60000010, "US", 4)
    ds.add_new(0x60000011, "US", 4)
    ds.add_new(0x60000022, "LO", "Nodule 2 of Jonathan")  # OverlayDescription
    ds.add_new(0x60001500, "LO", "Nodule 2")  # OverlayLabel
    ds.add_new(0x60020022, "LO", "Nodule 3")
    segment = Dataset()
    segment.SegmentNumber = 1
    segment.SegmentLabel = "left nodule MRN001"
    ds.SegmentSequence = [segment]
    plain = Deidentifier(DeidSettings(clean_graphics=True), KEY).deidentify(ds).dataset
    # The clinical engine still drops or replaces them.
    assert 0x60000022 not in plain and str(plain.ContentCreatorName) == "ANONYMOUS^"
    out = Deidentifier(DeidSettings(clean_graphics=True), KEY,
                       keep_annotation_text=True).deidentify(ds)
    kept = out.dataset
    assert kept[0x60000022].value == "Nodule 2 of REMOVED"  # the patient's name cleaned out
    assert kept[0x60001500].value == "Nodule 2"
    assert kept[0x60020022].value == "Nodule 3"  # a second ROI keeps its own name
    assert str(kept.ContentCreatorName) == "Reader^Ann"
    assert kept.SegmentSequence[0].SegmentLabel == "left nodule REMOVED"
    assert kept.PatientName != ds.PatientName
