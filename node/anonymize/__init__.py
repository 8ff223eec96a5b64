"""De-identification by DICOM PS3.15 Annex E with keyed pseudonyms (issue 6).

``settings`` holds the options, ``profile`` the standard's table as data, ``keys`` the
project key and the pseudonyms derived from it, ``anonymizer`` the pure engine,
``temporal`` how it shifts dates and times, ``textscan`` how it finds names and IDs in
kept text, ``descriptions`` which descriptors it keeps (issue 16),
``evidence`` what the engine did to each object, ``report`` the per-study report
built from it, ``reidmap`` the encrypted re-identification map (the commands are in
:mod:`node.cli.deid`).

The names of ``reidmap`` and ``report`` are imported when first used (module
``__getattr__``): they bring the index's storage interface and the encryption
library, a tenth of ``lamina anonymize``'s start-up, which only a run that records
the map needs.
"""

from importlib import import_module
from typing import Any

from node.anonymize.anonymizer import (
    BurnedInTextRisk,
    DeidentificationError,
    Deidentifier,
    DeidResult,
    PatientEntry,
    UidEntry,
    burned_in_risk,
    encode,
    looks_identified,
    remap_known_uids,
)
from node.anonymize.evidence import DeidEvidence
from node.anonymize.keys import ProjectKey, ProjectKeyError, load_project_key
from node.anonymize.settings import DeidConfigError, DeidSettings
from node.anonymize.textscan import TextMatcher, clean_text

_LAZY = {
    "ReidentificationError": "node.anonymize.reidmap",
    "ReidentificationMap": "node.anonymize.reidmap",
    "reidentify_dataset": "node.anonymize.reidmap",
    "reidentify_uid": "node.anonymize.reidmap",
    "study_report": "node.anonymize.report",
    "study_report_json": "node.anonymize.report",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(module), name)

__all__ = [
    "BurnedInTextRisk",
    "DeidConfigError",
    "DeidEvidence",
    "DeidResult",
    "DeidSettings",
    "DeidentificationError",
    "Deidentifier",
    "PatientEntry",
    "ProjectKey",
    "ProjectKeyError",
    "ReidentificationError",
    "ReidentificationMap",
    "TextMatcher",
    "UidEntry",
    "burned_in_risk",
    "clean_text",
    "encode",
    "load_project_key",
    "looks_identified",
    "reidentify_dataset",
    "reidentify_uid",
    "remap_known_uids",
    "study_report",
    "study_report_json",
]
