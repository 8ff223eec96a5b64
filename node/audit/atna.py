"""Audit events as DICOM audit messages (PS3.15 A.5), for an ATNA audit record repository.

Each event of the trail becomes one ``AuditMessage`` XML document:

* EventIdentification: the DICOM event (DCM codes, PS3.15 A.5.3 / NOTES.md) chosen
  by the event's action, its time, the action code (C/R/U/D/E) and the outcome
  (0 success, 4 minor, 8 serious, 12 major failure);
* ActiveParticipant: who did it (a peer AE title and address, or a user) and
  the node itself;
* AuditSourceIdentification: this node;
* ParticipantObjectIdentification: the study (pseudonymous UIDs only), the
  annotation or user account the event concerns, and the trail entry itself
  (its sequence number and hash), so the repository's copy can be matched back
  to the hash chain.

Entries name UIDs, hashes, AE titles and user ids, never a patient: so do the
messages. The XML is built with the standard library's ElementTree.
"""

from __future__ import annotations

import base64
import json
import socket
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from xml.etree import ElementTree as ET

from node.storage.records import AuditRow

OUTCOMES = {"success": "0", "minor-failure": "4", "serious-failure": "8", "major-failure": "12"}


@dataclass(frozen=True)
class Code:
    code: str
    meaning: str
    system: str = "DCM"


APPLICATION_ACTIVITY = Code("110100", "Application Activity")
AUDIT_LOG_USED = Code("110101", "Audit Log Used")
INSTANCES_ACCESSED = Code("110103", "DICOM Instances Accessed")
INSTANCES_TRANSFERRED = Code("110104", "DICOM Instances Transferred")
EXPORT = Code("110106", "Export")
IMPORT = Code("110107", "Import")
PATIENT_RECORD = Code("110110", "Patient Record")
QUERY = Code("110112", "Query")
SECURITY_ALERT = Code("110113", "Security Alert")
USER_AUTHENTICATION = Code("110114", "User Authentication")

APPLICATION_START = Code("110120", "Application Start")
APPLICATION_STOP = Code("110121", "Application Stop")
LOGIN = Code("110122", "Login")
LOGOUT = Code("110123", "Logout")
USER_ATTRIBUTES_CHANGED = Code("110137", "User Security Attributes Changed")

#: (action prefix, event, action code, event type): the first prefix that matches wins.
EVENTS: tuple[tuple[str, Code, str, Code | None], ...] = (
    ("node.started", APPLICATION_ACTIVITY, "E", APPLICATION_START),
    ("node.stopped", APPLICATION_ACTIVITY, "E", APPLICATION_STOP),
    ("audit.", AUDIT_LOG_USED, "R", None),
    ("association.accepted", USER_AUTHENTICATION, "E", LOGIN),
    ("association.rejected", USER_AUTHENTICATION, "E", LOGIN),
    ("association.", USER_AUTHENTICATION, "E", LOGOUT),
    ("user.authentication", USER_AUTHENTICATION, "E", LOGIN),
    ("user.", SECURITY_ALERT, "E", USER_ATTRIBUTES_CHANGED),
    ("security.", SECURITY_ALERT, "E", None),
    ("query.", QUERY, "E", None),
    ("retrieve.", INSTANCES_TRANSFERRED, "R", None),
    ("instance.", INSTANCES_TRANSFERRED, "C", None),
    ("annotation.exported", EXPORT, "R", None),
    ("quarantine.exported", EXPORT, "R", None),
    ("annotation.imported", IMPORT, "C", None),
    ("annotation.received", INSTANCES_TRANSFERRED, "C", None),
    ("annotation.resend", INSTANCES_TRANSFERRED, "C", None),
    ("annotation.", INSTANCES_ACCESSED, "U", None),
    ("review.", INSTANCES_ACCESSED, "U", None),
    ("quarantine.", INSTANCES_ACCESSED, "U", None),
    ("series.", INSTANCES_ACCESSED, "R", None),
    ("patient-record.", PATIENT_RECORD, "R", None),
)


def event_of(action: str) -> tuple[Code, str, Code | None]:
    """The DICOM event, action code and event type of one of our actions."""
    for prefix, code, action_code, type_code in EVENTS:
        if action == prefix or (action.startswith(prefix) and prefix.endswith(".")):
            return code, action_code, type_code
    return APPLICATION_ACTIVITY, "E", None


def _code(parent: ET.Element, tag: str, code: Code) -> ET.Element:
    return ET.SubElement(parent, tag, {"csd-code": code.code, "codeSystemName": code.system,
                                       "originalText": code.meaning})


def _participant_object(parent: ET.Element, object_id: str, type_code: str, role: str,
                        id_type: Code, name: str,
                        details: dict[str, str] | None = None) -> None:
    """The schema requires a name (or a query) for every object: ours is what the ID is."""
    obj = ET.SubElement(parent, "ParticipantObjectIdentification", {
        "ParticipantObjectID": object_id, "ParticipantObjectTypeCode": type_code,
        "ParticipantObjectTypeCodeRole": role})
    _code(obj, "ParticipantObjectIDTypeCode", id_type)
    ET.SubElement(obj, "ParticipantObjectName").text = name
    for key, value in (details or {}).items():
        ET.SubElement(obj, "ParticipantObjectDetail",
                      {"type": key, "value": base64.b64encode(value.encode()).decode()})


STUDY_UID = Code("110180", "Study Instance UID")
USER_IDENTIFIER = Code("11", "User Identifier", "RFC-3881")
ANNOTATION = Code("annotation", "Lamina annotation", "Lamina")
TRAIL_ENTRY = Code("audit-entry", "Lamina audit trail entry", "Lamina")


def to_message(row: AuditRow, node_ae_title: str, host: str | None = None) -> ET.Element:
    """One trail entry as an ``AuditMessage`` element."""
    host = host or socket.gethostname()
    actor = json.loads(row.actor) if row.actor else {}
    obj = json.loads(row.object) if row.object else {}
    code, action_code, type_code = event_of(row.action)
    message = ET.Element("AuditMessage")
    event = ET.SubElement(message, "EventIdentification", {
        "EventActionCode": action_code, "EventDateTime": row.time,
        "EventOutcomeIndicator": OUTCOMES.get(row.outcome, "4")})
    _code(event, "EventID", code)
    if type_code is not None:
        _code(event, "EventTypeCode", type_code)
    if row.outcome != "success":
        description = obj.get("refused") or obj.get("reason") or obj.get("alert") or row.action
        ET.SubElement(event, "EventOutcomeDescription").text = str(description)

    requestor = {"UserID": actor.get("user") or actor.get("ae_title") or "unknown",
                 "UserIsRequestor": "true"}
    if actor.get("ae_title"):
        requestor["AlternativeUserID"] = f"AETITLES={actor['ae_title']}"
    if actor.get("address"):
        requestor.update(NetworkAccessPointID=actor["address"], NetworkAccessPointTypeCode="2")
    ET.SubElement(message, "ActiveParticipant", requestor)
    ET.SubElement(message, "ActiveParticipant", {
        "UserID": node_ae_title, "AlternativeUserID": f"AETITLES={node_ae_title}",
        "UserIsRequestor": "false", "NetworkAccessPointID": host,
        "NetworkAccessPointTypeCode": "1"})

    source = ET.SubElement(message, "AuditSourceIdentification",
                           {"AuditSourceID": f"{node_ae_title}@{host}"})
    _code(source, "AuditSourceTypeCode", Code("4", "Application Server"))

    if obj.get("study_instance_uid"):
        _participant_object(message, obj["study_instance_uid"], "2", "3", STUDY_UID, "study")
    if obj.get("annotation_id") is not None:
        _participant_object(message, str(obj["annotation_id"]), "2", "3", ANNOTATION,
                            "annotation")
    if obj.get("user_id"):
        _participant_object(message, str(obj["user_id"]), "1", "11", USER_IDENTIFIER,
                            "reviewer")
    _participant_object(message, str(row.seq), "2", "13", TRAIL_ENTRY, name=row.action,
                        details={"hash": row.hash, "prev_hash": row.prev_hash})
    return message


def export(rows: Iterable[AuditRow], node_ae_title: str, since: str = "") -> Iterator[bytes]:
    """One XML document per event (UTF-8, no line breaks inside), from ``since`` (an ISO
    8601 UTC time prefix) on."""
    host = socket.gethostname()
    for row in rows:
        if since and row.time < since:
            continue
        yield ET.tostring(to_message(row, node_ae_title, host), encoding="utf-8",
                          xml_declaration=False)
