"""The labelling protocol: the shipped example loads, bad keys are named, labels find classes."""

from __future__ import annotations

from pathlib import Path

import pytest

from node import config
from node.annotations.masks import Code
from node.checks.protocol import DEFAULT_WINDOWS, Protocol, ProtocolError, load_protocol

REPO = Path(__file__).resolve().parents[1]


def test_the_shipped_lung_nodule_example_loads() -> None:
    protocol = load_protocol(REPO / "config" / "protocol.toml")
    nodule = next(c for c in protocol.classes if c.key == "lung_nodule")
    assert nodule.type == Code("27925004", "SCT", "Nodule")
    assert nodule.window == "lung" and protocol.windows["lung"] == (-600.0, 1500.0)
    assert nodule.diameter_mm == (3.0, 30.0) and nodule.exclusive_with == {"lung_nodule", "vessel"}
    assert {"lung", "mediastinal", "bone", "brain"} <= set(protocol.windows)
    assert len(protocol.sha256) == 64


def test_the_node_config_points_at_the_example() -> None:
    settings = config.load(REPO / "config" / "node.toml")
    assert settings.annotations.protocol == Path("config/protocol.toml")


@pytest.mark.parametrize("label, expected", [
    ("Lung nodule", "lung_nodule"), ("NODULE", "lung_nodule"), ("nodule_12", "lung_nodule"),
    ("Lung-Nodule 3", "lung_nodule"), ("blood vessel", "vessel"), ("Liver", None),
])
def test_labels_find_their_class(label: str, expected: str | None) -> None:
    protocol = load_protocol(REPO / "config" / "protocol.toml")
    found = protocol.class_for(label)
    assert (found.key if found else None) == expected


def test_an_unknown_label_still_finds_a_class_by_its_unique_type_code() -> None:
    protocol = load_protocol(REPO / "config" / "protocol.toml")
    assert protocol.class_for("Segment_1", Code("27925004", "SCT", "Nodule")).key == "lung_nodule"
    assert protocol.class_for("Segment_1", Code("1", "SCT", "Other")) is None


def test_no_protocol_means_defaults_and_no_unknown_labels() -> None:
    protocol = Protocol()
    assert not protocol.knows_labels
    assert protocol.limits_for(None) == (1, 3.0)
    assert protocol.windows == DEFAULT_WINDOWS


@pytest.mark.parametrize("text, message", [
    ("[protocol]\nposition_tolerance = 1\n", "protocol.position_tolerance: unknown key"),
    ("[protocol]\nfractional_threshold = 2\n", "protocol.fractional_threshold: must be in"),
    ("[classes.x]\ncategory = { scheme = 'SCT', value = '1', meaning = 'm' }\n",
     "classes.x.type: missing"),
    ("[classes.x]\ncategory = { scheme = 'SCT', value = '1', meaning = 'm' }\n"
     "type = { scheme = 'SCT', value = '2' }\n", "classes.x.type.meaning: missing"),
    ("[classes.x]\ncategory = { scheme = 'SCT', value = '1', meaning = 'm' }\n"
     "type = { scheme = 'SCT', value = '2', meaning = 'n' }\nwindow = 'abdomen'\n",
     "classes.x.window: unknown window 'abdomen'"),
    ("[classes.x]\ncategory = { scheme = 'SCT', value = '1', meaning = 'm' }\n"
     "type = { scheme = 'SCT', value = '2', meaning = 'n' }\nexclusive_with = ['y']\n",
     "classes.x.exclusive_with: unknown class 'y'"),
    ("[classes.x]\ncategory = { scheme = 'SCT', value = '1', meaning = 'm' }\n"
     "type = { scheme = 'SCT', value = '2', meaning = 'n' }\nvolume_mm3 = [5, 1]\n",
     "classes.x.volume_mm3: must be [min, max]"),
    ("[classes.x]\ncategory = { scheme = 'SCT', value = '1', meaning = 'm' }\n"
     "type = { scheme = 'SCT', value = '2', meaning = 'n' }\ncomponents = 0\n",
     "classes.x.components: must be a whole number"),
    ("[windows.wide]\ncenter = 0\n", "windows.wide.width: missing"),
    ("[rules]\n", "rules: unknown section"),
    ("[agreement]\nkappa_min = 1.5\n", "agreement.kappa_min: must be between 0 and 1"),
    ("[agreement]\ndouble_read_fraction = 0.1\n", "agreement.double_read_fraction: unknown key"),
    ("[agreement.categories]\nmalignancy = []\n",
     "agreement.categories.malignancy: must be a list of answers"),
    ("[classes.x]\ncategory = { scheme = 'SCT', value = '1', meaning = 'm' }\n"
     "type = { scheme = 'SCT', value = '2', meaning = 'n' }\ndice_min = -1\n",
     "classes.x.dice_min: must be between 0 and 1"),
])
def test_bad_protocols_are_refused_naming_the_key(tmp_path, text: str, message: str) -> None:
    path = tmp_path / "protocol.toml"
    path.write_text(text)
    with pytest.raises(ProtocolError) as error:
        load_protocol(path)
    assert message in str(error.value)


def test_agreement_thresholds_and_categories_are_read() -> None:
    protocol = load_protocol(REPO / "config" / "protocol.toml")
    assert (protocol.kappa_min, protocol.dice_min) == (0.6, 0.7)
    assert protocol.categories["malignancy"] == ("benign", "indeterminate", "malignant")
    assert protocol.dice_min_for("lung_nodule") == 0.7
    assert Protocol().kappa_min == 0.6 and Protocol().categories == {}


def test_a_missing_protocol_file_is_a_config_error(tmp_path) -> None:
    with pytest.raises(config.ConfigError, match=r"annotations\.protocol: file"):
        config.load(None, overrides={"annotations.protocol": str(tmp_path / "nope.toml")})
