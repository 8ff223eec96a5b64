"""PS3.15 Table E.1-1 as data, and the option switches resolved into one action per tag.

The table itself is generated (``tools/gen_deid_profile.py``) into
``data/confidentiality_profile.json``; this module only loads it, adds the few rows
Lamina needs that the standard lacks (each with its reason), and resolves the
project's options into the single action the engine applies to each attribute.

The table is a list of what must go. Lamina turns it into a whitelist: attributes the
table does not name survive only if their value representation cannot carry free text
(numbers, binary data, code strings), or they are UIDs (remapped), dates (shifted or
removed), or they are on the short list of technical text attributes below.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from types import MappingProxyType

from pydicom.datadict import tag_for_keyword

from node.anonymize.settings import DeidSettings

PRIVATE_ROW = "ggggeeee"
CURVE_ROW = "50xxxxxx"
OVERLAY_DATA_ROW = "60xx3000"

# Compound actions resolved without knowing the IOD's attribute type: Z is valid
# wherever the standard allows X or Z, D wherever it allows D; U* keeps a reference
# sequence and remaps the UIDs inside it.
_COMPOUND = {"X/Z": "Z", "X/D": "D", "Z/D": "D", "X/Z/D": "D", "X/Z/U*": "U"}


@dataclass(frozen=True)
class ProfileRow:
    """One row of Table E.1-1 (or a Lamina addition): tag key as 8 hex digits,
    with ``xx`` for repeating groups, or ``ggggeeee`` for private attributes."""

    tag: str
    name: str
    basic: str
    options: Mapping[str, str]
    source: str


@dataclass(frozen=True)
class ProfileTable:
    edition: str
    rows: tuple[ProfileRow, ...]


# PHI carriers the standard's table misses (NOTES: "De-identification"). Same shape
# as a table row; ``source`` says why each is here.
LAMINA_ROWS: tuple[ProfileRow, ...] = (
    ProfileRow("00620005", "Segment Label", "D", {"clean_descriptors": "C"},
               "lamina: free text naming a segment, Type 1 in SEG"),
    ProfileRow("00620006", "Segment Description", "X", {"clean_descriptors": "C"},
               "lamina: free text describing a segment"),
    ProfileRow("00700080", "Content Label", "D", {"clean_descriptors": "C"},
               "lamina: user-entered label, Type 1 in SEG and presentation states"),
    ProfileRow("00700081", "Content Description", "Z", {"clean_descriptors": "C"},
               "lamina: user-entered description, Type 2"),
    ProfileRow("60xx0022", "Overlay Description", "X", {"clean_graphics": "C"},
               "lamina: free text in the overlay plane"),
    ProfileRow("60xx1500", "Overlay Label", "X", {"clean_graphics": "C"},
               "lamina: free text naming the overlay"),
)

# Text-VR attributes outside the table that carry technical, not personal, content.
# Anything else with a free-text VR that the table does not name is emptied.
SAFE_TEXT_KEYWORDS: frozenset[str] = frozenset({
    "Manufacturer", "ManufacturerModelName", "SoftwareVersions",
    "CodeValue", "CodingSchemeDesignator", "CodingSchemeVersion", "CodeMeaning",
    "LongCodeValue", "URNCodeValue", "MappingResourceName", "ContextGroupExtensionFlag",
    "CodingSchemeName", "CodingSchemeResponsibleOrganization",
    "ConvolutionKernel", "FilterType", "RescaleType", "WindowCenterWidthExplanation",
    "LUTExplanation", "ReconstructionMethod", "ReceiveCoilName", "TransmitCoilName",
    "SequenceName", "PulseSequenceName", "ImagedNucleus", "ContrastBolusRoute",
    "SegmentAlgorithmName", "AlgorithmName", "AlgorithmVersion",
    "DimensionDescriptionLabel", "ImplementationVersionName",
})

# Code-string attributes that hold user-entered text despite their VR; they are
# handled through LAMINA_ROWS and listed here so the VR rule never keeps them.
USER_TEXT_CS_KEYWORDS: frozenset[str] = frozenset({"ContentLabel"})

# UI attributes naming a kind of thing (class, syntax, scheme), never an instance:
# kept as they are even when the UID is outside pydicom's dictionary (vendor classes).
CLASS_UID_KEYWORDS: frozenset[str] = frozenset({
    "SOPClassUID", "ReferencedSOPClassUID", "MediaStorageSOPClassUID",
    "AffectedSOPClassUID", "RequestedSOPClassUID", "TransferSyntaxUID",
    "ReferencedTransferSyntaxUIDInFile", "ReferencedSOPClassUIDInFile",
    "RelatedGeneralSOPClassUID", "OriginalSpecializedSOPClassUID",
    "CodingSchemeUID", "ContextUID", "MappingResourceUID", "ImplementationClassUID",
    "PrivateInformationCreatorUID", "ReferencedRelatedGeneralSOPClassUIDInFile",
    "ContextGroupExtensionCreatorUID", "TemplateExtensionOrganizationUID",
})

@dataclass(frozen=True)
class Code:
    """A coded concept of the de-identification method (CodeValue, scheme, meaning)."""

    value: str
    scheme_designator: str
    meaning: str


def _dcm(value: str, meaning: str) -> Code:
    return Code(value, "DCM", meaning)


# CID 7050 codes, one per option (PS3.16). Written out rather than read from
# pydicom.sr.codedict: importing it costs every process ~16 MB for twelve codes;
# tests/test_anonymize_profile.py checks these against pydicom's copy.
BASIC_PROFILE_CODE = _dcm("113100", "Basic Application Confidentiality Profile")
CLEAN_PIXEL_DATA_CODE = _dcm("113101", "Clean Pixel Data Option")
OPTION_CODES: Mapping[str, Code] = MappingProxyType({
    "retain_safe_private": _dcm("113111", "Retain Safe Private Option"),
    "retain_uids": _dcm("113110", "Retain UIDs Option"),
    "retain_device_identity": _dcm("113109", "Retain Device Identity Option"),
    "retain_institution_identity": _dcm("113112", "Retain Institution Identity Option"),
    "retain_patient_characteristics": _dcm("113108", "Retain Patient Characteristics Option"),
    "retain_longitudinal_full_dates":
        _dcm("113106", "Retain Longitudinal Temporal Information Full Dates Option"),
    "retain_longitudinal_modified_dates":
        _dcm("113107", "Retain Longitudinal Temporal Information Modified Dates Option"),
    "clean_descriptors": _dcm("113105", "Clean Descriptors Option"),
    "clean_structured_content": _dcm("113104", "Clean Structured Content Option"),
    "clean_graphics": _dcm("113103", "Clean Graphics Option"),
})


@cache
def load_table() -> ProfileTable:
    """The generated table, read once per process."""
    text = resources.files("node.anonymize").joinpath(
        "data/confidentiality_profile.json"
    ).read_text(encoding="utf-8")
    data = json.loads(text)
    rows = tuple(
        ProfileRow(tag, name, basic, MappingProxyType(dict(options)), source)
        for tag, name, basic, options, source in data["rows"]
    )
    if len(rows) != data["row_count"]:
        raise ValueError("confidentiality_profile.json: row_count does not match its rows")
    return ProfileTable(edition=data["edition"], rows=rows)


def enabled_options(settings: DeidSettings) -> tuple[str, ...]:
    """Option column names switched on, in table column order."""
    on = []
    for name in ("retain_safe_private", "retain_uids", "retain_device_identity",
                 "retain_institution_identity", "retain_patient_characteristics"):
        if getattr(settings, name):
            on.append(name)
    if settings.retain_longitudinal == "full":
        on.append("retain_longitudinal_full_dates")
    elif settings.retain_longitudinal == "modified":
        on.append("retain_longitudinal_modified_dates")
    for name in ("clean_descriptors", "clean_structured_content", "clean_graphics"):
        if getattr(settings, name):
            on.append(name)
    return tuple(on)


def effective_action(row: ProfileRow, options: tuple[str, ...]) -> str:
    """One of X, Z, D, K, C, U for a row under the switched-on options: an option's
    cell overrides the basic profile, and of several options the one retaining the
    most wins (K over C over X), as each option is a permission to keep more."""
    cells = {row.options[o] for o in options if o in row.options}
    for action in ("K", "C", "X"):
        if action in cells:
            return action
    return _COMPOUND.get(row.basic, row.basic)


def deciding_option(row: ProfileRow, options: tuple[str, ...]) -> str | None:
    """The option whose cell decided a row's action (the first, in column order, of
    those giving the winning action), or None when the basic profile decided it."""
    action = effective_action(row, options)
    for option in options:
        if row.options.get(option) == action:
            return option
    return None


@dataclass(frozen=True)
class ActionPlan:
    """The table resolved for one settings value: what the engine looks up per element."""

    by_tag: Mapping[int, str]
    overlay: Mapping[int, str]
    curve: str
    private: str
    options: tuple[str, ...]
    edition: str
    # Tag -> the option whose cell decided its action, for tags an option decided
    # (what the evidence reports as "kept under an option").
    because: Mapping[int, str] = field(default_factory=lambda: MappingProxyType({}))


def plan(settings: DeidSettings) -> ActionPlan:
    table = load_table()
    options = enabled_options(settings)
    by_tag: dict[int, str] = {}
    because: dict[int, str] = {}
    overlay: dict[int, str] = {}
    curve = private = "X"
    for row in table.rows + LAMINA_ROWS:
        action = effective_action(row, options)
        if row.tag == PRIVATE_ROW:
            private = action
        elif row.tag == CURVE_ROW:
            curve = action
        elif row.tag.startswith("60xx"):
            overlay[int(row.tag[4:], 16)] = action
        else:
            tag = int(row.tag, 16)
            if tag in by_tag:
                raise ValueError(f"profile row {row.tag} appears twice")
            by_tag[tag] = action
            option = deciding_option(row, options)
            if option is not None:
                because[tag] = option
    return ActionPlan(
        by_tag=MappingProxyType(by_tag),
        overlay=MappingProxyType(overlay),
        curve=curve,
        private=private,
        options=options,
        edition=table.edition,
        because=MappingProxyType(because),
    )


def keyword_tags(keywords: frozenset[str]) -> frozenset[int]:
    """Tags of dictionary keywords (the engine matches on tags, not names)."""
    tags = {tag_for_keyword(k) for k in keywords}
    if None in tags:
        raise ValueError("unknown DICOM keyword in a profile list")
    return frozenset(tags)
