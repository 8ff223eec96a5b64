"""DeidSettings: strict defaults and config errors that name the key."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from node.anonymize.settings import DeidSettings, MaskRegion, SafePrivateTag


def test_defaults_are_the_strict_profile_with_modified_dates():
    s = DeidSettings()
    assert s.retain_longitudinal == "modified"
    assert s.burned_in_policy == "quarantine"
    assert not any((s.retain_safe_private, s.retain_uids, s.retain_device_identity,
                    s.retain_institution_identity, s.retain_patient_characteristics,
                    s.clean_descriptors, s.clean_structured_content, s.clean_graphics))
    assert s.safe_private == s.mask_regions == s.safe_descriptors == ()
    assert DeidSettings.from_mapping({}) == s


def test_from_mapping_reads_every_option():
    s = DeidSettings.from_mapping({
        "retain_safe_private": True,
        "safe_private": [{"creator": " ACME 1.0 ", "element": 0x10, "group": 0x0019}],
        "retain_uids": True,
        "retain_longitudinal": "full",
        "clean_graphics": True,
        "safe_descriptors": ["liver", " CT CHEST "],
        "burned_in_policy": "mask",
        "mask_regions": [{"x": 0, "y": 0, "width": 640, "height": 40, "rows": 480}],
        "key_file": "~/lamina.key",
    })
    assert s.safe_private == (SafePrivateTag("ACME 1.0", 0x10, 0x0019),)
    assert s.safe_descriptors == ("liver", "CT CHEST")
    assert s.mask_regions == (MaskRegion(0, 0, 640, 40, rows=480),)
    assert s.retain_uids and s.clean_graphics and s.retain_longitudinal == "full"
    assert s.key_file == Path("~/lamina.key").expanduser()
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.retain_uids = False


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"retain_uid": True}, "deidentify.retain_uid: unknown setting"),
        ({"retain_uids": "yes"}, "deidentify.retain_uids: must be true or false"),
        ({"retain_longitudinal": "shifted"}, "deidentify.retain_longitudinal: must be one of"),
        ({"burned_in_policy": "ignore"}, "deidentify.burned_in_policy: must be one of"),
        ({"burned_in_policy": "mask"}, "deidentify.mask_regions: burned_in_policy 'mask'"),
        ({"safe_descriptors": "liver"}, "deidentify.safe_descriptors: must be a list"),
        ({"safe_private": [{"creator": "A"}]}, r"deidentify.safe_private\[0\].element: missing"),
        ({"safe_private": [{"creator": "A", "element": 0x1010}]},
         r"deidentify.safe_private\[0\].element: must be an integer from 0 to 255"),
        ({"safe_private": [{"creator": "A", "element": 1, "group": 0x0010}]},
         r"deidentify.safe_private\[0\].group: private groups are odd"),
        ({"safe_private": [{"creator": "", "element": 1}]},
         r"deidentify.safe_private\[0\].creator: must be a non-empty string"),
        ({"safe_private": [{"creator": "A", "element": 1, "tag": 2}]},
         r"deidentify.safe_private\[0\].tag: unknown setting"),
        ({"mask_regions": [{"x": -1, "y": 0, "width": 1, "height": 1}]},
         r"deidentify.mask_regions\[0\].x: must be an integer"),
        ({"mask_regions": [{"x": 0, "y": 0, "width": 1}]},
         r"deidentify.mask_regions\[0\].height: missing"),
        ({"key_file": ""}, "deidentify.key_file: must be a non-empty path string"),
        ({"retain_uids": 1}, "deidentify.retain_uids: must be true or false"),
    ],
)
def test_bad_values_raise_value_error_naming_the_key(data, message):
    with pytest.raises(ValueError, match=message):
        DeidSettings.from_mapping(data)


def test_safe_private_matching_uses_creator_and_low_byte():
    tag = SafePrivateTag("ACME 1.0", 0x10)
    assert tag.matches(0x0019, "ACME 1.0 ", 0x1010)
    assert tag.matches(0x0019, "ACME 1.0", 0x1110)  # other reservation block
    assert not tag.matches(0x0019, "ACME 2.0", 0x1010)
    assert not SafePrivateTag("ACME 1.0", 0x10, 0x0021).matches(0x0019, "ACME 1.0", 0x1010)
