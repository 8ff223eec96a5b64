"""C-FIND over real sockets: a node in this process on port 0, pynetdicom as SCU."""

from __future__ import annotations

from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.pdu_primitives import SOPClassExtendedNegotiation
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
)

from node.dimse.ae import associate
from node.phantom import index_records
from tests.harness import InProcessNode, write_config
from tests.studies import QR_VALIDATION, StudySpec, identifier, qr_peer, write_study

STUDY_FIND = StudyRootQueryRetrieveInformationModelFind
PATIENT_FIND = PatientRootQueryRetrieveInformationModelFind

SPECS = [
    StudySpec("find-a", "Doe^Jane", "LAM-A", "20240105", "091500", "FA-1", "CT"),
    StudySpec("find-b", "Müller^Jürgen", "LAM-B", "20240210", "131500", "FA-2", "MR"),
]
BULK_STUDIES, BULK_PER_STUDY = 300, 20  # 6000 instances through the bulk index path


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def node(request, tmp_path_factory):
    """One node per backend: every C-FIND test runs on the SQLite and the PostgreSQL index."""
    folder: Path = tmp_path_factory.mktemp("find")
    peers = {
        "client": qr_peer("CLIENT", "store", "find", port=104),
        "storeonly": qr_peer("STOREONLY", "store", port=104),
    }
    index = None
    if request.param == "postgresql":
        index = {"backend": "postgresql",
                 "dsn": request.getfixturevalue("pg_cluster").database()}
    with InProcessNode(write_config(folder / "node", peers=peers, index=index,
                                    validation=QR_VALIDATION)) as running:
        for spec in SPECS:
            files = write_study(folder / spec.seed, spec)
            assert running.store(files, "CLIENT") == [(0, "")] * len(files)
        with running.index() as index, index.transaction() as tx:
            tx.instances.bulk_insert(index_records(60, BULK_STUDIES, BULK_PER_STUDY))
        yield running


def open_assoc(node, calling: str = "CLIENT", max_pdu: int = 0, ext_neg=None):
    ae = AE(ae_title=calling)
    ae.maximum_pdu_size = max_pdu
    ae.add_requested_context(STUDY_FIND)
    ae.add_requested_context(PATIENT_FIND)
    assoc = associate(ae, "127.0.0.1", node.port, node.ae_title) if ext_neg is None else \
        ae.associate("127.0.0.1", node.port, ae_title=node.ae_title, ext_neg=ext_neg)
    assert assoc.is_established
    return assoc


def run(assoc, query, model=STUDY_FIND):
    """All responses as (status, identifier or None)."""
    return [(int(status.Status), status, ds) for status, ds in assoc.send_c_find(query, model)]


def test_study_root_wildcard_name_over_the_wire(node):
    assoc = open_assoc(node)
    try:
        responses = run(assoc, identifier(
            "STUDY", PatientName="müller^jü*", StudyInstanceUID="", ModalitiesInStudy="",
            NumberOfStudyRelatedInstances="", SpecificCharacterSet="ISO_IR 192"))
    finally:
        assoc.release()
    pending = [ds for code, _, ds in responses if code == 0xFF00]
    assert [code for code, _, _ in responses][-1] == 0x0000
    assert len(pending) == 1
    ds = pending[0]
    assert str(ds.PatientName) == "Müller^Jürgen"
    assert ds.SpecificCharacterSet == "ISO_IR 192"
    assert ds.ModalitiesInStudy == "MR"
    assert ds.NumberOfStudyRelatedInstances == 3


def test_patient_root_every_level(node):
    assoc = open_assoc(node)
    try:
        [patient] = [ds for c, _, ds in run(assoc, identifier(
            "PATIENT", PatientID="LAM-A", PatientName="", NumberOfPatientRelatedInstances=""),
            PATIENT_FIND) if c == 0xFF00]
        [study] = [ds for c, _, ds in run(assoc, identifier(
            "STUDY", PatientID="LAM-A", StudyInstanceUID="", StudyDate="20240101-20240131"),
            PATIENT_FIND) if c == 0xFF00]
        [series] = [ds for c, _, ds in run(assoc, identifier(
            "SERIES", PatientID="LAM-A", StudyInstanceUID=study.StudyInstanceUID,
            SeriesInstanceUID="", Modality="CT"), PATIENT_FIND) if c == 0xFF00]
        images = [ds for c, _, ds in run(assoc, identifier(
            "IMAGE", PatientID="LAM-A", StudyInstanceUID=study.StudyInstanceUID,
            SeriesInstanceUID=series.SeriesInstanceUID, SOPInstanceUID="", InstanceNumber=""),
            PATIENT_FIND) if c == 0xFF00]
    finally:
        assoc.release()
    assert patient.NumberOfPatientRelatedInstances == 3
    assert study.QueryRetrieveLevel == "STUDY"
    assert sorted(int(ds.InstanceNumber) for ds in images) == [1, 2, 3]


def test_unsupported_keys_answer_empty_with_ff01(node):
    assoc = open_assoc(node)
    try:
        responses = run(assoc, identifier("STUDY", AccessionNumber="FA-1", StudyInstanceUID="",
                                          OtherPatientIDs="", InstitutionName="X"))
    finally:
        assoc.release()
    assert [code for code, _, _ in responses] == [0xFF01, 0x0000]
    ds = responses[0][2]
    assert ds.OtherPatientIDs in ("", None) and ds.InstitutionName in ("", None)


def test_malformed_identifier_is_refused_with_a_reason(node):
    assoc = open_assoc(node)
    try:
        responses = run(assoc, identifier("SERIES", StudyDate="yesterday",
                                          SeriesInstanceUID=""))
        wrong_level = run(assoc, identifier("PATIENT", PatientID=""))  # not in Study Root
    finally:
        assoc.release()
    [(code, status, ds)] = responses
    assert code == 0xA900 and ds is None
    assert "StudyDate" in status.ErrorComment
    assert wrong_level[0][0] == 0xA900 and "QueryRetrieveLevel" in wrong_level[0][1].ErrorComment


def test_peer_without_find_permission_is_refused(node):
    assoc = open_assoc(node, calling="STOREONLY")
    try:
        [(code, status, ds)] = run(assoc, identifier("STUDY", StudyInstanceUID=""))
    finally:
        assoc.release()
    assert code == 0x0124 and ds is None
    assert "may not query" in status.ErrorComment
    def mine(events):
        return [e for e in events if e["actor"]["ae_title"] == "STOREONLY"]

    [event] = mine(node.audit_events("query.refused", until=mine))
    assert event["object"]["status"] == "0x0124"


def test_large_result_set_is_streamed_whole_and_audited_without_values(node):
    assoc = open_assoc(node)
    try:
        responses = run(assoc, identifier("IMAGE", PatientName="*^*", SOPInstanceUID="",
                                          InstanceNumber=""))
    finally:
        assoc.release()
    pending = [ds for code, _, ds in responses if code == 0xFF00]
    assert len(pending) == BULK_STUDIES * BULK_PER_STUDY + 3 * len(SPECS)
    assert len({str(ds.SOPInstanceUID) for ds in pending}) == len(pending)
    assert responses[-1][0] == 0x0000
    def this_query(events):
        return [e for e in events if e["object"]["matches"] == len(pending)]

    event = this_query(node.audit_events("query.find", until=this_query))[-1]
    assert event["object"]["level"] == "IMAGE" and event["object"]["keys"] == ["PatientName"]
    assert "*^*" not in str(event)  # key names only, never values


def test_cancel_stops_the_stream(node):
    assoc = open_assoc(node)
    context_id = next(cx.context_id for cx in assoc.accepted_contexts
                      if cx.abstract_syntax == STUDY_FIND)
    received, codes = 0, []
    try:
        for status, ds in assoc.send_c_find(identifier("IMAGE", SOPInstanceUID=""),
                                            STUDY_FIND, msg_id=7):
            codes.append(int(status.Status))
            if ds is not None:
                received += 1
                if received == 50:
                    assoc.send_c_cancel(7, context_id)
        still_open = assoc.is_established
    finally:
        assoc.release()
    assert codes[-1] == 0xFE00
    assert 50 <= received < BULK_STUDIES * BULK_PER_STUDY
    assert still_open
    def cancelled(events):
        return [e for e in events if e["object"]["status"] == "0xFE00"]

    event = cancelled(node.audit_events("query.find", until=cancelled))
    assert event and event[-1]["object"]["matches"] < BULK_STUDIES * BULK_PER_STUDY


def test_responses_larger_than_the_peers_pdu_are_fragmented(node):
    assoc = open_assoc(node, max_pdu=4096)
    keys = {"StudyInstanceUID": "", "PatientName": "", "PatientID": "", "StudyDate": "",
            "StudyTime": "", "AccessionNumber": "", "StudyDescription": "",
            "ModalitiesInStudy": "", "NumberOfStudyRelatedInstances": ""}
    query = identifier("STUDY", AccessionNumber="FA-2",
                       **{k: v for k, v in keys.items() if k != "AccessionNumber"})
    # Many empty unsupported keys make the identifier bigger than one 4 KB PDU.
    for element in range(0x1000, 0x1000 + 600):
        query.add_new((0x0009 << 16) | element, "LO", "")
    try:
        responses = run(assoc, query)
    finally:
        assoc.release()
    assert [code for code, _, _ in responses] == [0xFF01, 0x0000]
    assert responses[0][2].AccessionNumber == "FA-2"


def test_relational_queries_are_agreed_when_asked(node):
    item = SOPClassExtendedNegotiation()
    item.sop_class_uid = STUDY_FIND
    item.service_class_application_information = b"\x01\x01"
    assoc = open_assoc(node, ext_neg=[item])
    try:
        agreed = assoc.acceptor.sop_class_extended
        responses = run(assoc, identifier("SERIES", PatientName="DOE^JANE", Modality="CT",
                                          SeriesInstanceUID=""))
    finally:
        assoc.release()
    assert agreed[STUDY_FIND] == b"\x01\x00"  # relational yes, combined date-time no
    assert [code for code, _, _ in responses] == [0xFF00, 0x0000]


def test_lamina_find_command(node):
    result = node.cli(
        "find", f"{node.ae_title}@127.0.0.1:{node.port}",
        "--aet", "CLIENT", "-L", "STUDY", "-k", "PatientName=DOE^JA*", "-k", "PatientID",
        "-k", "StudyDate=20240101-20240131")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == "PatientName\tPatientID\tStudyDate"
    assert lines[1:] == ["Doe^Jane\tLAM-A\t20240105"]
    denied = node.cli(
        "find", f"{node.ae_title}@127.0.0.1:{node.port}",
        "--aet", "STOREONLY", "-k", "PatientID")
    assert denied.exit_code == 1 and "0x0124" in denied.stderr
