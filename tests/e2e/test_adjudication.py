"""Double reading end to end over real associations (issue 10 §1–§3, §6): two annotator
peers read a chosen study, neither sees the other's SEG until both are in, their
readings disagree, the pair is adjudicated from the command line, and the QA report
shows it."""

from __future__ import annotations

import json

import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, build_role, evt
from pynetdicom.pdu_primitives import UserIdentityNegotiation
from pynetdicom.sop_class import (
    CTImageStorage,
    SegmentationStorage,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
)

from tests import annotation_fixtures as fx
from tests.harness import NODE_AET, TEST_AET, InProcessNode, peer, write_config

READER_A, READER_B = "READER_A", "READER_B"


@pytest.fixture
def node(tmp_path):
    folder = tmp_path / "node"
    folder.mkdir()
    (folder / "protocol.toml").write_text(fx.TEST_PROTOCOL)
    config = write_config(folder, peers={
        "pacs": peer(TEST_AET, "store", route="clinical"),
        "a": peer(READER_A, "store", "find", "get", route="annotator"),
        "b": peer(READER_B, "store", "find", "get", route="annotator"),
    }, annotations={"protocol": str(folder / "protocol.toml"), "settle_seconds": 0.3,
                    "double_read_fraction": 1.0})  # every study is read twice
    with InProcessNode(config) as running:
        fx.store_phantom(running)
        yield running
    assert "Traceback" not in running.log()


def seg_series_seen(node: InProcessNode, aet: str, study_uid: str) -> set[str]:
    """SEG series a peer finds in a study (C-FIND, SERIES level)."""
    ae = AE(ae_title=aet)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    query = Dataset()
    query.QueryRetrieveLevel = "SERIES"
    query.StudyInstanceUID = study_uid
    query.SeriesInstanceUID = ""
    query.Modality = "SEG"
    assoc = ae.associate("127.0.0.1", node.port, ae_title=NODE_AET)
    assert assoc.is_established
    found = set()
    try:
        for status, identifier in assoc.send_c_find(query,
                                                    StudyRootQueryRetrieveInformationModelFind):
            if status and status.Status in (0xFF00, 0xFF01):
                found.add(str(identifier.SeriesInstanceUID))
    finally:
        assoc.release()
    return found


def classes_got(node: InProcessNode, aet: str, study_uid: str) -> list[str]:
    """SOP classes a peer receives when it C-GETs the whole study."""
    received: list[str] = []

    def on_store(event):
        received.append(str(event.request.AffectedSOPClassUID))
        return 0x0000

    ae = AE(ae_title=aet)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    for cls in (CTImageStorage, SegmentationStorage):
        ae.add_requested_context(cls)
    roles = [build_role(CTImageStorage, scp_role=True),
             build_role(SegmentationStorage, scp_role=True)]
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = study_uid
    assoc = ae.associate("127.0.0.1", node.port, ae_title=NODE_AET, ext_neg=roles,
                         evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert assoc.is_established
    try:
        statuses = [s.Status for s, _ in assoc.send_c_get(
            query, StudyRootQueryRetrieveInformationModelGet) if s]
    finally:
        assoc.release()
    assert statuses[-1] == 0x0000
    return received


def store_as_user(node: InProcessNode, ds: Dataset, aet: str, username: str) -> int:
    """C-STORE one object over an association that negotiates a DICOM user identity."""
    identity = UserIdentityNegotiation()
    identity.user_identity_type = 1
    identity.primary_field = username.encode()
    ae = AE(ae_title=aet)
    ae.add_requested_context(SegmentationStorage)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=NODE_AET, ext_neg=[identity])
    assert assoc.is_established
    try:
        return assoc.send_c_store(ds).Status
    finally:
        assoc.release()


def annotation(node: InProcessNode, seg) -> dict:
    return fx.seg_annotation(node, seg)


def test_two_readers_are_blinded_then_adjudicated(node, tmp_path):
    served = fx.served_by(node)
    study = served.study_uid

    # Reader A: all three structures. Reader B misses the small nodule.
    seg_a = fx.valid_seg(served)
    seg_a.ContentCreatorName = "Reader^A"
    seg_b = fx.make_seg(list(fx.truth()[:2]), fx.LABELS[:2], codes=fx.CODES[:2], series=served)
    seg_b.ContentCreatorName = "Reader^B"

    assert store_as_user(node, seg_a, READER_A, "reader.a") == 0x0000
    a = annotation(node, seg_a)
    # The negotiated user identity names the rater (over ContentCreatorName), never logged.
    assert (a["state"], a["rater"]) == ("checked", "reader.a")
    assert node.rows("SELECT study_uid, state FROM double_read") == [(study, "waiting")]
    seg_a_series = str(seg_a.SeriesInstanceUID)

    # Until B's reading is in, B cannot see A's SEG; A (and the PACS route) can.
    assert seg_series_seen(node, READER_A, study) == {seg_a_series}
    assert seg_series_seen(node, READER_B, study) == set()
    assert SegmentationStorage not in classes_got(node, READER_B, study)
    assert SegmentationStorage in classes_got(node, READER_A, study)

    assert node.store([seg_b], aet=READER_B) == [(0, "")]
    b = annotation(node, seg_b)
    node.drain()
    assert node.rows("SELECT state FROM double_read") == [("complete",)]
    assert seg_series_seen(node, READER_B, study) == {seg_a_series, str(seg_b.SeriesInstanceUID)}

    # The readings disagree (a nodule drawn by A only): both wait for adjudication.
    states = dict(node.rows("SELECT id, state FROM annotation"))
    assert states[a["id"]] == states[b["id"]] == "needs-adjudication"
    [(verdict, reasons)] = node.rows("SELECT verdict, reasons FROM agreement")
    assert verdict == "disagree" and json.loads(reasons) == ["nodule: drawn by rater A only"]
    dice = dict(node.rows("SELECT class_key, dice FROM agreement_structure"
                          " WHERE dice IS NOT NULL"))
    assert dice == {"nodule": pytest.approx(1.0), "bone": pytest.approx(1.0)}

    listed = node.cli("adjudicate", "list")
    assert listed.exit_code == 0, listed.output
    [line] = listed.stdout.splitlines()
    adjudication_id = line.split("\t")[0]
    assert f"readings {a['id']} / {b['id']}" in line and "drawn by rater A only" in line

    picked = node.cli("adjudicate", "pick", adjudication_id, "--reading", str(a["id"]),
                      "--as", "adjudicator")
    assert picked.exit_code == 0, picked.output
    states = dict(node.rows("SELECT id, state FROM annotation"))
    assert (states[a["id"]], states[b["id"]]) == ("adjudicated", "rejected")
    actions = node.audit_actions()
    assert {"double-read.chosen", "double-read.complete", "agreement.computed",
            "annotation.needs-adjudication", "annotation.adjudicated", "annotation.rejected",
            "adjudication.decided"} <= set(actions)

    again = node.cli("adjudicate", "pick", adjudication_id, "--reading", str(b["id"]))
    assert again.exit_code == 2
    assert again.stderr.strip().endswith(f"adjudication {adjudication_id} is already decided")
    assert node.audit_actions()[-1] == "adjudication.refused"
    assert dict(node.rows("SELECT id, state FROM annotation"))[b["id"]] == "rejected"

    html = tmp_path / "qa.html"
    report = node.cli("qa", "report", "--html", str(html))
    assert report.exit_code == 0, report.output
    assert "Double reads: 1 chosen, 0 waiting" in report.stdout
    assert "Adjudications: 1 (0 open)" in report.stdout
    page = html.read_text()
    assert page.count("<svg") == 4 and "nodule" in page and "reader.a" in page
    assert "reader.a" not in node.log() and "Reader^B" not in node.log()
