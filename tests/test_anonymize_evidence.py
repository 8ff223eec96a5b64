"""Evidence of what de-identification did, and the per-study report built from it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from node.anonymize.anonymizer import Deidentifier
from node.anonymize.evidence import DeidEvidence, KeptPrivate, element_name
from node.anonymize.keys import ProjectKey
from node.anonymize.report import study_report, study_report_json
from node.anonymize.settings import DeidSettings, MaskRegion, SafePrivateTag
from tests.phi_corpus import PRIVATE_CREATOR, Corpus
from tests.test_anonymize_engine import _overlay, _private, _segment, ct

KEY = ProjectKey(b"evidence-test-key-0123456789abcd")
SAFE = (SafePrivateTag("ACME 1.0", 0x10), SafePrivateTag("ACME 1.0", 0x12, 0x0019))
RICH = DeidSettings(retain_safe_private=True, safe_private=(SafePrivateTag(PRIVATE_CREATOR, 0x03),),
                    retain_patient_characteristics=True, clean_graphics=True)


pytestmark = pytest.mark.usefixtures("quiet_pydicom_validation")


def evidence(ds: Dataset, **settings) -> DeidEvidence:
    return Deidentifier(DeidSettings(**settings), KEY).deidentify(ds).evidence


def _item(**values) -> Dataset:
    item = Dataset()
    for keyword, value in values.items():
        setattr(item, keyword, value)
    return item


def test_each_action_is_recorded_by_keyword_and_sequence_path():
    study = _item(ReferencedSOPClassUID="1.2.840.10008.3.1.2.3.1",
                  ReferencedSOPInstanceUID="1.2.3.4.5.77")
    ds = ct(PatientComments="x", AccessionNumber="A1", InstitutionName="North",
            PatientAge="095Y", PatientSex="F", BodyPartExamined="DOE",
            ReferencedFrameOfReferenceUID="1.2.840.10008.1.4.1.1",
            ReferencedImageSequence=Sequence([study]))
    ev = evidence(ds)
    assert "PatientComments" in ev.removed and "PatientAge" in ev.removed
    assert {"AccessionNumber", "PatientSex", "BodyPartExamined"} <= set(ev.emptied)
    assert "InstitutionName" in ev.dummy
    assert ev.pseudonym == ("PatientID", "PatientName")
    assert {"SOPInstanceUID", "StudyInstanceUID", "MediaStorageSOPInstanceUID",
            "ReferencedImageSequence>ReferencedSOPInstanceUID"} <= set(ev.uid_remapped)
    assert "StudyDate" in ev.date_shifted
    assert {"Modality", "PixelData", "SOPClassUID", "ReferencedFrameOfReferenceUID",
            "ReferencedImageSequence", "ReferencedImageSequence>ReferencedSOPClassUID",
            "TransferSyntaxUID"} <= set(ev.kept)
    assert "SourceApplicationEntityTitle" in ev.removed  # file meta, not carried over
    assert set(ev.added) == {"PatientIdentityRemoved", "DeidentificationMethod",
                             "DeidentificationMethodCodeSequence",
                             "LongitudinalTemporalInformationModified"}
    assert ev.residual_phi == ("BodyPartExamined",)
    assert [o.code for o in ev.options] == ["113100", "113107"]
    assert ev.edition == "2024b" and not ev.pixels_masked


def test_options_say_what_they_kept():
    ev = evidence(ct(PatientAge="095Y", PatientSex="F", StudyTime="101112"),
                  retain_patient_characteristics=True)
    assert ev.age_capped == ("PatientAge",)
    assert "PatientSex" in ev.kept
    by_option = dict(ev.by_option)
    assert by_option["PatientSex"] == by_option["PatientAge"] == "retain_patient_characteristics"
    assert by_option["StudyDate"] == "retain_longitudinal_modified_dates"
    assert by_option["StudyTime"] == "retain_longitudinal_modified_dates"  # TM kept as is
    assert "Modality" not in by_option  # kept by the profile itself
    full = evidence(ct(), retain_longitudinal="full", retain_uids=True)
    assert "StudyDate" in full.kept and "SOPInstanceUID" in full.kept
    assert dict(full.by_option)["SOPInstanceUID"] == "retain_uids"
    assert dict(full.by_option)["StudyDate"] == "retain_longitudinal_full_dates"
    assert not full.uid_remapped and not full.date_shifted


def test_private_elements_kept_name_their_safe_list_entry_and_the_rest_are_counted():
    assert evidence(_private(ct())).private_removed == 5
    ev = evidence(_private(ct()), retain_safe_private=True, safe_private=SAFE)
    assert ev.private_kept == (
        KeptPrivate("(0019,1010)", "ACME 1.0", 0x10, None),
        KeptPrivate("(0019,1012)", "ACME 1.0", 0x12, 0x0019),
    )
    assert ev.private_removed == 2  # the note about the patient, the creatorless element
    assert "(0019,1010)" in ev.uid_remapped
    assert dict(ev.by_option)["(0019,1012)"] == "retain_safe_private"


def test_overlay_and_curve_groups_removed_or_kept_cleaned():
    ev = evidence(_overlay(ct(), "liver"))
    assert (ev.overlays_removed, ev.curves_removed) == (("6000",), ("5000",))
    assert not ev.overlays_cleaned and not any(p.startswith("Overlay") for p in ev.removed)
    named = evidence(_overlay(ct(), "Doe"), clean_graphics=True, safe_descriptors=("Doe",))
    assert (named.overlays_cleaned, named.curves_cleaned) == (("6000",), ("5000",))
    assert {"OverlayLabel", "OverlayDescription", "CurveDescription"} <= set(named.removed)
    assert named.residual_phi == ("OverlayLabel",)
    kept = evidence(_overlay(ct(), "liver"), clean_graphics=True, safe_descriptors=("liver",))
    assert "OverlayLabel" in kept.cleaned


def test_segment_labels_and_clean_descriptors():
    ds = ct(SegmentSequence=Sequence([_segment("liver"), _segment("Doe lesion")]),
            StudyDescription="CT CHEST")
    ev = evidence(ds)
    assert "SegmentSequence>SegmentLabel" in ev.kept
    assert "SegmentSequence>SegmentLabel" in ev.dummy  # the other segment's
    assert "SegmentSequence>SegmentDescription" in ev.removed
    clean = evidence(ds, clean_descriptors=True, safe_descriptors=("ct chest",))
    assert "StudyDescription" in clean.cleaned
    assert dict(clean.by_option)["StudyDescription"] == "clean_descriptors"


def test_masked_pixels_are_recorded_with_the_clean_pixel_data_code():
    pixels = np.arange(1, 17, dtype=np.uint16).reshape(4, 4)
    ev = evidence(ct(BurnedInAnnotation="YES", PixelData=pixels.tobytes()),
                  burned_in_policy="mask", mask_regions=(MaskRegion(0, 0, 4, 1),))
    assert ev.pixels_masked
    assert [o.name for o in ev.options] == [
        "basic_profile", "clean_pixel_data", "retain_longitudinal_modified_dates"]


def test_as_dict_is_json_deterministic_and_round_trips():
    ds = _overlay(_private(ct(PatientAge="095Y")), "liver")
    settings = {"retain_safe_private": True, "safe_private": SAFE,
                "retain_patient_characteristics": True, "clean_graphics": True}
    first, second = evidence(ds, **settings), evidence(ds, **settings)
    text = json.dumps(first.as_dict())
    assert text == json.dumps(second.as_dict())
    assert list(first.as_dict()) == ["schema", "engine", "edition", "options", "actions",
                                     "by_option", "private", "graphics", "residual_phi",
                                     "residual_phi_values", "pixels_masked", "temporal"]
    assert DeidEvidence.from_dict(json.loads(text)) == first
    with pytest.raises(ValueError, match="schema"):
        DeidEvidence.from_dict({**first.as_dict(), "schema": 99})
    with pytest.raises(ValueError, match="malformed"):
        DeidEvidence.from_dict({"schema": 1})


def _top_level_names(ds: Dataset) -> set[str]:
    names = set()
    for tag in ds.keys():  # noqa: SIM118
        group = tag >> 16
        if (0x5000 <= group <= 0x501E or 0x6000 <= group <= 0x601E) and not group & 1:
            names.add(f"{group:04X}")
        elif tag & 0xFFFF:
            names.add(element_name(tag))
    return names


@pytest.mark.parametrize("settings", [DeidSettings(), RICH], ids=["default", "options"])
def test_evidence_accounts_for_every_element_of_every_corpus_output(corpus, settings):
    """Each top-level element of the output is in exactly one category (graphics by
    group, private by the safe-list section); what is removed is not in the output."""
    engine = Deidentifier(settings, KEY)
    for path in corpus.files:
        if path == corpus.screen_capture:
            continue
        result = engine.deidentify(dcmread(path))
        ev, out = result.evidence, result.dataset
        present = _top_level_names(out) | _top_level_names(out.file_meta)
        categories = [ev.emptied, ev.dummy, ev.pseudonym, ev.uid_remapped, ev.date_shifted,
                      ev.age_capped, ev.cleaned, ev.kept, ev.added, ev.overlays_cleaned,
                      ev.curves_cleaned]
        top = [{p for p in c if ">" not in p} for c in categories]
        accounted = set().union(*top)
        assert sum(map(len, top)) == len(accounted), path.name  # no element twice
        creators = {element_name(t) for t in out.keys()  # noqa: SIM118
                    if (t >> 16) & 1 and 0x10 <= (t & 0xFFFF) <= 0xFF}
        private = {p.path for p in ev.private_kept if ">" not in p.path} | creators
        assert present == accounted | private, path.name
        assert not {p for p in ev.removed if ">" not in p} & present, path.name
        for keyword in ev.emptied:
            if ">" not in keyword:
                assert out[keyword].value in (None, "", []), (path.name, keyword)


def test_evidence_and_report_carry_no_planted_value(corpus):
    engine = Deidentifier(RICH, KEY)
    evidences = [engine.deidentify(dcmread(p)).evidence.as_dict()
                 for p in corpus.ct[("A", 1)] + [corpus.seg]]
    # The safe-list entry names the creator from the project's configuration, and
    # the creator element itself is kept in the object: it is not a leak.
    planted = {v.lower() for v in corpus.planted} - {PRIVATE_CREATOR.lower()}
    texts = [json.dumps(evidences).lower(), study_report(evidences, study_uid="2.25.1").lower(),
             json.dumps(study_report_json(evidences, study_uid="2.25.1")).lower()]
    for text in texts:
        assert not {v for v in planted if v in text}


def _study(corpus: Corpus, settings: DeidSettings = RICH) -> list[dict]:
    engine = Deidentifier(settings, KEY)
    return [engine.deidentify(dcmread(p)).evidence.as_dict()
            for p in corpus.ct[("A", 1)] + [corpus.seg]]


def test_study_report_json_counts_instances_per_keyword(corpus):
    report = study_report_json(_study(corpus), study_uid="2.25.42")
    assert json.loads(json.dumps(report)) == report
    assert report["study_uid"] == "2.25.42" and report["instances"] == 5
    assert report["editions"] == {"2024b": 5}
    assert [(o["code"], o["instances"]) for o in report["options"]] == [
        ("113100", 5), ("113103", 5), ("113107", 5), ("113108", 5), ("113111", 5)]
    actions = report["actions"]
    assert actions["uid_remapped"]["SOPInstanceUID"] == 5
    assert actions["uid_remapped"]["SourceImageSequence>ReferencedSOPInstanceUID"] == 4
    # "CT chest for <family>": not all vocabulary, so a neutral text (issue 16).
    assert actions["dummy"]["StudyDescription"] == 5
    assert actions["pseudonym"] == {"PatientID": 5, "PatientName": 5}
    assert actions["age_capped"] == {"PatientAge": 5}  # patient A is 93
    assert actions["dummy"]["SegmentSequence>SegmentLabel"] == 1
    assert report["by_option"]["PatientSex"] == ["retain_patient_characteristics"]
    assert report["private"]["kept"] == [{
        "creator": PRIVATE_CREATOR, "element": 3, "group": None, "tags": ["(0009,1003)"],
        "instances": 4}]
    assert report["private"]["removed_instances"] == 4
    assert report["graphics"]["overlays_cleaned"] == {"6000": 4}
    # The descriptors name the patient: replaced by neutral texts, and counted.
    assert report["residual_phi"] == {"BodyPartExamined": 4, "ProtocolName": 4,
                                      "SeriesDescription": 5, "StudyDescription": 5}
    assert report["residual_phi_values"] == 18
    assert report["temporal"] == {"shifted": 5}
    assert report["pixels_masked"] == 0


def test_study_report_text_is_readable_and_has_the_same_content(corpus):
    evidences = _study(corpus)
    text = study_report(evidences, study_uid="2.25.42")
    assert text == study_report(list(reversed(evidences)), study_uid="2.25.42")
    assert "Study Instance UID: 2.25.42\nInstances: 5\n" in text
    assert "Table E.1-1 edition 2024b (5 of 5 instances)" in text
    assert "113108 Retain Patient Characteristics Option (5 of 5 instances)" in text
    lines = text.splitlines()

    def line(path: str) -> str:
        return next(x for x in lines if x.split()[1:2] == [path])

    assert line("SOPInstanceUID").split()[0] == "5"
    assert line("PatientSex").endswith("(under Retain Patient Characteristics Option)")
    assert line("SourceImageSequence>ReferencedSOPInstanceUID").split()[0] == "4"
    assert f'creator "{PRIVATE_CREATOR}", element xx03, any odd group: (0009,1003) in 4' in text
    assert "BodyPartExamined: 4 instance(s)" in text
    assert "Overlay groups kept, text cleaned (Clean Graphics): 6000 in 4 instance(s)" in text
    assert "Pixel data: not modified" in text
    for category in ("Removed (X)", "Emptied (Z)", "Replaced with a dummy value (D)",
                     "UIDs replaced with keyed pseudonyms (U)", "Kept (K)"):
        assert category in text


def test_study_report_of_mixed_settings_and_masked_pixels():
    plain = evidence(ct()).as_dict()
    pixels = np.arange(1, 17, dtype=np.uint16).reshape(4, 4)
    masked = evidence(ct(BurnedInAnnotation="YES", PixelData=pixels.tobytes()),
                      burned_in_policy="mask", mask_regions=(MaskRegion(0, 0, 4, 1),)).as_dict()
    report = study_report_json([plain, masked], study_uid="2.25.7")
    assert report["pixels_masked"] == 1
    assert {o["code"]: o["instances"] for o in report["options"]}["113101"] == 1
    text = study_report([plain, masked], study_uid="2.25.7")
    assert "113101 Clean Pixel Data Option (1 of 2 instances)" in text
    assert "masked (Clean Pixel Data) in 1 of 2 instance(s)" in text
    assert "Residual-PHI scan" in text and "no hits" in text
    empty = study_report([], study_uid="2.25.8")
    assert "Instances: 0" in empty
    with pytest.raises(ValueError):
        study_report([{"schema": 1}], study_uid="2.25.9")


def test_evidence_path_is_recorded_at_every_depth(tmp_path: Path):
    inner = _item(ReferencedSOPInstanceUID="1.2.3.9", ReferencedSOPClassUID="1.2.840.10008.5.1.4.1.1.2")
    middle = _item(ReferencedImageSequence=Sequence([inner]), Date="20200101")
    ev = evidence(ct(AnatomicRegionSequence=Sequence([_item(AnatomicRegionSequence=Sequence([middle]))])))
    assert ("AnatomicRegionSequence>AnatomicRegionSequence>ReferencedImageSequence>"
            "ReferencedSOPInstanceUID") in ev.uid_remapped
    assert "AnatomicRegionSequence>AnatomicRegionSequence>Date" in ev.date_shifted
