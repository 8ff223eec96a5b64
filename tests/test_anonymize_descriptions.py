"""Descriptions annotators can read (issue 16 §3)."""

from __future__ import annotations

import pytest

from node.anonymize.anonymizer import Deidentifier
from node.anonymize.descriptions import Vocabulary, describe, tokens
from node.anonymize.settings import DeidConfigError, DeidSettings
from node.anonymize.textscan import TextMatcher
from tests.test_anonymize_engine import KEY, ct

pytestmark = pytest.mark.usefixtures("quiet_pydicom_validation")


def deid(ds, **settings):
    return Deidentifier(DeidSettings(**settings), KEY).deidentify(ds)


def test_a_vocabulary_descriptor_is_kept_and_any_other_becomes_neutral():
    ds = ct(SeriesDescription="AXIAL 2.5MM LUNG", StudyDescription="CT CHEST SMITH FOLLOWUP",
            ProtocolName="Dr Smith special", SeriesNumber=3)
    result = deid(ds)
    out = result.dataset
    assert out.SeriesDescription == "AXIAL 2.5MM LUNG"
    assert out.StudyDescription == "CT CHEST FOLLOWUP"  # study-level: no series number
    assert out.ProtocolName == "CT SERIES 3"
    assert "SeriesDescription" in result.evidence.cleaned
    assert {"StudyDescription", "ProtocolName"} <= set(result.evidence.dummy)


def test_remove_is_the_strict_setting_one_key_away():
    out = deid(ct(SeriesDescription="AXIAL 2.5MM LUNG", StudyDescription="CT CHEST"),
               descriptions="remove").dataset
    assert "SeriesDescription" not in out and "StudyDescription" not in out


def test_project_terms_extend_the_vocabulary():
    ds = ct(SeriesDescription="AXIAL QUANTUMRECON")
    assert deid(ds).dataset.SeriesDescription == "CT AXIAL"  # no SeriesNumber to add
    kept = deid(ds, description_terms=["QuantumRecon"]).dataset
    assert kept.SeriesDescription == "AXIAL QUANTUMRECON"


def test_clean_descriptors_text_naming_the_patient_becomes_neutral_too():
    ds = ct(SeriesDescription="Doe follow-up", SeriesNumber=4)
    result = deid(ds, clean_descriptors=True, safe_descriptors=("doe follow-up",))
    assert result.dataset.SeriesDescription == "CT SERIES 4 FOLLOW-UP"
    assert result.evidence.residual_phi == ("SeriesDescription",)
    assert result.evidence.residual_phi_values == 1


def test_a_vocabulary_word_that_names_the_patient_is_not_vocabulary():
    ds = ct(PatientName="Head^Anna", SeriesDescription="CT HEAD W/O", SeriesNumber=2)
    result = deid(ds)
    assert result.dataset.SeriesDescription == "CT SERIES 2 W/O"
    assert "SeriesDescription" in result.evidence.residual_phi


@pytest.mark.parametrize(("text", "known"), [
    ("2.5MM", True), ("120KV", True), ("5", True), ("0.625", True), ("W/O", True),
    ("T2-FLAIR", True), ("5-MM", True), ("T2-SMITH", False), ("-", False),
    ("2023", False), ("12345678", False), ("SMITH", False), ("lung", False),
])
def test_tokens_known_to_the_vocabulary(text, known):
    assert Vocabulary().known(text) is known  # tokens() upper-cases before asking


def test_tokens_split_on_separators_but_not_inside_measurements():
    assert tokens("Axial 2.5mm_lung (W/O)") == ["AXIAL", "2.5MM", "LUNG", "W/O"]
    assert describe("", Vocabulary(), TextMatcher([]), ct(), series_level=False) == ("", False)


@pytest.mark.parametrize("value", ["bogus", 1, True])
def test_descriptions_setting_is_validated(value):
    with pytest.raises(DeidConfigError, match=r"deidentify\.descriptions"):
        DeidSettings.from_mapping({"descriptions": value})
    with pytest.raises(DeidConfigError, match=r"deidentify\.description_terms"):
        DeidSettings.from_mapping({"description_terms": "LUNG"})
