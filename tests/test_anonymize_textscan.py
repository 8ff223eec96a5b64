"""Names and identifiers typed where they do not belong (issue 16 §2)."""

from __future__ import annotations

import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from node.anonymize.anonymizer import Deidentifier
from node.anonymize.settings import DeidSettings, SafePrivateTag
from node.anonymize.textscan import REPLACEMENT, TextMatcher, clean_text
from tests.test_anonymize_engine import KEY, ct

pytestmark = pytest.mark.usefixtures("quiet_pydicom_validation")

CREATOR = "ACME TEXT 1.0"
SAFE = DeidSettings(
    retain_safe_private=True, retain_patient_characteristics=True,
    safe_private=tuple(SafePrivateTag(CREATOR, e) for e in (0x10, 0x11, 0x12, 0x13, 0x14)),
)


def _people(**extra) -> Dataset:
    """A CT naming staff and places besides the patient, deep in sequences too."""
    operator = Dataset()
    operator.PersonName = "Kowalski^Anna"  # PN at depth: content, not a top-level name
    ds = ct(OperatorsName="Nakamura^Kenji", PerformingPhysicianName="Okafor^Chidi",
            PatientMotherBirthName="Vantwerpel^Greta", InstitutionName="Riverside Clinic",
            StationName="CTSCAN07", AccessionNumber="ACC-99812",
            ContentSequence=Sequence([operator]), PatientSex="F", **extra)
    return ds


def _with_private(ds: Dataset, texts: dict[int, tuple[str, str]]) -> Dataset:
    ds.add_new(0x00290010, "LO", CREATOR)
    for element, (vr, value) in texts.items():
        ds.add_new(0x00291000 | element, vr, value)
    return ds


def test_matcher_is_case_insensitive_whole_word_and_allows_separators():
    matcher = TextMatcher(["Kowalski", "Anna", "ACC-99812", "Riverside Clinic"])
    for text in ("dr. KOWALSKI", "kowalski_a", "Kowalski,A", "ref acc99812", "ACC_99812",
                 "riverside-clinic ward", "RIVERSIDE^CLINIC", "ANNA"):
        assert matcher.search(text), text
    for text in ("KOWALSKIS", "annals", "ACC-998123", "riverside", "Hanna"):
        assert not matcher.search(text), text
    assert not TextMatcher([])
    assert clean_text("Read by Kowalski, Anna.", matcher) == f"Read by {REPLACEMENT}, {REPLACEMENT}."
    assert clean_text("no findings", matcher) == "no findings"


def test_the_matcher_takes_every_name_and_identifier_the_object_carries():
    matcher = TextMatcher.from_dataset(_people())
    for term in ("Doe", "Jonathan", "MRN001", "Nakamura", "Kenji", "Okafor", "Vantwerpel",
                 "Kowalski", "Riverside Clinic", "CTSCAN07", "ACC-99812"):
        assert matcher.search(term), term
    # Initials, short IDs and ordinary words are no terms.
    for text in ("J", "CT", "Clinic", "ORIGINAL", "F"):
        assert not matcher.search(text), text


def test_names_planted_in_each_text_vr_are_cleaned_and_clinical_text_stays():
    ds = _with_private(_people(
        ImageType=["ORIGINAL", "PRIMARY", "AXIAL", "KOWALSKI"],    # CS, multi-valued
        ScanOptions="NAKAMURA",                                    # CS, one value
        BodyPartExamined="CHEST",                                  # CS, clinical: stays
        ConvolutionKernel="B30F_OKAFOR",                           # SH
        Manufacturer="CTSCAN07 unit",                              # LO
        AnatomicRegionSequence=Sequence([_code("Chest of Vantwerpel")]),  # code meaning
    ), {
        0x10: ("ST", "Read by Riverside Clinic staff"),
        0x11: ("LT", "Dose checked by okafor; no acute findings"),
        0x12: ("UT", "Protocol for acc 99812 approved"),
        0x13: ("UC", "Jonathan"),
        0x14: ("LT", "No acute findings."),                        # clinical: stays
    })
    result = Deidentifier(SAFE, KEY).deidentify(ds)
    out = result.dataset
    assert list(out.ImageType) == ["ORIGINAL", "PRIMARY", "AXIAL"]
    assert out.ScanOptions in (None, "")
    assert out.BodyPartExamined == "CHEST"
    assert out.ConvolutionKernel == f"B30F_{REPLACEMENT}"
    assert out.Manufacturer == f"{REPLACEMENT} unit"
    assert out.AnatomicRegionSequence[0].CodeMeaning == f"Chest of {REPLACEMENT}"
    assert out.AnatomicRegionSequence[0].CodeValue == "T-D3000"
    assert out[0x00291010].value == f"Read by {REPLACEMENT} staff"
    assert out[0x00291011].value == f"Dose checked by {REPLACEMENT}; no acute findings"
    assert out[0x00291012].value == f"Protocol for {REPLACEMENT} approved"
    assert out[0x00291013].value in (None, "")
    assert out[0x00291014].value == "No acute findings."
    assert out.PatientSex == "F"
    planted = ("kowalski", "nakamura", "okafor", "vantwerpel", "riverside", "ctscan07",
               "99812", "jonathan")
    text = " ".join(str(e.value) for e in out.iterall() if e.VR not in ("OB", "OW", "SQ"))
    assert not [p for p in planted if p in text.lower()]
    evidence = result.evidence
    assert {"ImageType", "ScanOptions", "ConvolutionKernel", "Manufacturer",
            "AnatomicRegionSequence>CodeMeaning", "(0029,1010)"} <= set(evidence.residual_phi)
    assert evidence.residual_phi_values == 9
    assert "BodyPartExamined" not in evidence.residual_phi


def test_an_attribute_kept_under_its_option_is_not_scanned_for_itself():
    out = Deidentifier(DeidSettings(retain_institution_identity=True, retain_device_identity=True),
                       KEY).deidentify(_people()).dataset
    assert out.InstitutionName == "Riverside Clinic"
    assert out.StationName == "CTSCAN07"


def _code(meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = "T-D3000"
    item.CodingSchemeDesignator = "SRT"
    item.CodeMeaning = meaning
    return item
