"""The validation rules by name, with their default strictness.

Kept free of imports so that the config loader can check ``[validation.rules]``
against it without pulling in pydicom or the standard's tables.

``reject``: an instance that breaks the rule is quarantined and the sender
gets 0xA900; a series that breaks it is ``incomplete``.
``warn``: the instance is stored (the series is ``complete``) and the finding
is recorded in the index.

The defaults follow what PACS (DCMTK, Orthanc, dcm4chee) store: what makes an
object unusable or unplaceable refuses it (a Type 1 attribute missing or empty,
a bad UID, a wrong pixel length, impossible geometry, a SOP class / modality
mismatch); a Type 2 attribute left out, which scanners routinely do
(EchoTrainLength, PositionReferenceIndicator, AcquisitionNumber,
SliceThickness), is stored with a recorded finding. Type 3 attributes are
never required. config/node.toml shows the whole table.
"""

from __future__ import annotations

REJECT = "reject"
WARN = "warn"
ACTIONS = (REJECT, WARN)

#: Per-instance rules, checked before anything is kept (config/node.toml says what each checks).
INSTANCE_RULES: dict[str, str] = {
    "sop_class": REJECT,
    "type1_missing": REJECT,
    "type1_empty": REJECT,
    "type2_missing": WARN,
    "uid_syntax": REJECT,
    "pixel_data": REJECT,
    "orientation": REJECT,
    "spacing": REJECT,
    "slice_thickness": WARN,
    "modality": REJECT,
    "file_meta": REJECT,
    "patient_conflict": REJECT,
}

#: Per-series rules, checked when a series stops growing or on demand. Gantry
#: tilt leaves the series whole (only sheared), so it warns by default.
SERIES_RULES: dict[str, str] = {
    "missing_slice": REJECT,
    "duplicate_slice": REJECT,
    "uneven_spacing": REJECT,
    "mixed_orientation": REJECT,
    "mixed_frame_of_reference": REJECT,
    "mixed_matrix": REJECT,
    "mixed_pixel_spacing": REJECT,
    "gantry_tilt": WARN,
    "instance_count": REJECT,
}


def default_actions() -> dict[str, str]:
    """Every rule with its default action."""
    return {**INSTANCE_RULES, **SERIES_RULES}
