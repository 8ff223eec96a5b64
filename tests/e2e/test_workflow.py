"""Issue 10's "Done when", end to end over the network: ``lamina serve`` runs as a
subprocess; a PACS sends a CT series; two annotator peers (their own AE titles, one with a
negotiated DICOM user identity) push SEGs of that study, which is chosen for double
reading, and disagree; the agreement is computed and the pair waits for adjudication;
``lamina adjudicate pick`` decides it; a reviewer added with ``lamina users add`` signs
the approval with ``lamina review approve`` (passphrase on a file descriptor);
``review verify`` and ``audit verify`` pass; ``qa report`` (text and HTML) shows the
agreement and the approval; and a forward rule delivers the approved SEG, and only it,
to DCMTK's storescp. Every command is its own process, as a person would run it.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest
from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.pdu_primitives import UserIdentityNegotiation
from pynetdicom.sop_class import SegmentationStorage

from tests import annotation_fixtures as fx
from tests.harness import (
    NODE_AET,
    TEST_AET,
    ProcessNode,
    free_port,
    peer,
    require,
    stop_process,
    storescp,
    write_config,
)
from tests.review_fixtures import PASSPHRASE, lamina_process

READER_A, READER_B, DEST = "READER_A", "READER_B", "STORESCP"



def ok(run: subprocess.CompletedProcess) -> str:
    assert run.returncode == 0, (run.args, run.stdout, run.stderr)
    return run.stdout


def store_as_user(port: int, seg, aet: str, username: str) -> int:
    """C-STORE one SEG over an association that negotiates a DICOM user identity."""
    identity = UserIdentityNegotiation()
    identity.user_identity_type = 1
    identity.primary_field = username.encode()
    ae = AE(ae_title=aet)
    ae.add_requested_context(SegmentationStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AET, ext_neg=[identity])
    assert assoc.is_established
    try:
        return int(assoc.send_c_store(seg).Status)
    finally:
        assoc.release()


def wait_for(predicate, timeout: float = 60.0, what: str = ""):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.1)
    return value


def received_uids(folder: Path) -> set[str]:
    """SOP Instance UIDs of the complete files storescp wrote into ``folder``."""
    uids = set()
    for path in folder.iterdir():
        if path.is_file():
            try:
                uids.add(str(dcmread(path, stop_before_pixels=True).SOPInstanceUID))
            except Exception:  # a file storescp is still writing
                continue
    return uids


@pytest.fixture
def setup(tmp_path):
    """The node (a subprocess) and DCMTK's storescp as the forward destination."""
    require("storescp")
    dest_port = free_port()
    folder = tmp_path / "node"
    folder.mkdir()
    (folder / "protocol.toml").write_text(fx.TEST_PROTOCOL)
    config = write_config(
        folder,
        peers={"pacs": peer(TEST_AET, "store", route="clinical"),
               "reader_a": peer(READER_A, "store", "find", "get", route="annotator"),
               "reader_b": peer(READER_B, "store", "find", "get", route="annotator"),
               "dest": peer(DEST, port=dest_port)},
        annotations={"protocol": str(folder / "protocol.toml"), "settle_seconds": 0.3,
                     "double_read_fraction": 1.0},  # every study is read twice
        audit={"checkpoint_path": str(tmp_path / "vault" / "checkpoints.jsonl")},
        forward={"poll_seconds": 0.1, "backoff_seconds": 0.0,
                 "rules": {"approved_to_dest": {"class": "*", "destination": "dest"}}})
    received = tmp_path / "received"
    scp = storescp(dest_port, received, aet=DEST)
    node = ProcessNode(config)
    try:
        node.start()
        yield node, received
    finally:
        node.stop()
        stop_process(scp)
    assert "Traceback" not in node.log()


def test_two_readers_adjudicated_signed_verified_reported_and_forwarded(setup, tmp_path):
    node, received = setup
    fx.store_phantom(node)  # the CT series, from the PACS (de-identified on the way in)
    served = fx.served_by(node)
    study = served.study_uid

    # Reader A draws all three structures; reader B misses the small nodule.
    seg_a = fx.valid_seg(served)
    seg_a.ContentCreatorName = "Reader^A"
    seg_b = fx.make_seg(list(fx.truth()[:2]), fx.LABELS[:2], codes=fx.CODES[:2], series=served)
    seg_b.ContentCreatorName = "Reader^B"
    assert store_as_user(node.port, seg_a, READER_A, "reader.a") == 0x0000
    a = fx.seg_annotation(node, seg_a)
    assert (a["state"], a["rater"]) == ("checked", "reader.a")
    assert node.rows("SELECT study_uid, state FROM double_read") == [(study, "waiting")]
    assert node.store([seg_b], aet=READER_B) == [(0, "")]
    b = fx.seg_annotation(node, seg_b)
    assert b["rater"] == "Reader^B"

    # Both readings are in: agreement computed, the pair waits for adjudication.
    a = fx.in_state(node, f"seg|{seg_a.SOPInstanceUID}", "needs-adjudication")
    b = fx.in_state(node, f"seg|{seg_b.SOPInstanceUID}", "needs-adjudication")
    assert a["state"] == b["state"] == "needs-adjudication"
    assert node.rows("SELECT state FROM double_read") == [("complete",)]
    [(verdict, reasons)] = node.rows("SELECT verdict, reasons FROM agreement")
    assert verdict == "disagree" and json.loads(reasons) == ["nodule: drawn by rater A only"]

    [line] = ok(lamina_process(node, "adjudicate", "list")).splitlines()
    adjudication = line.split("\t")[0]
    assert f"readings {a['id']} / {b['id']}" in line
    ok(lamina_process(node, "adjudicate", "pick", adjudication, "--reading", str(a["id"]),
                      "--as", "dr.adjudicator"))
    states = dict(node.rows("SELECT id, state FROM annotation"))
    assert (states[a["id"]], states[b["id"]]) == ("adjudicated", "rejected")
    time.sleep(0.5)
    assert received_uids(received) == set()  # nothing leaves before an approval

    # The reviewer: a user of the node, signing with a passphrase on a file descriptor.
    ok(lamina_process(node, "users", "add", "rad1", "--name", "Ann Radiologist", passphrase=PASSPHRASE))
    ok(lamina_process(node, "review", "approve", str(a["id"]), "--as", "rad1",
                      "--meaning", "reviewed and approved", passphrase=PASSPHRASE))
    refused = lamina_process(node, "review", "approve", str(b["id"]), "--as", "rad1",
                             "--meaning", "reviewed and approved", passphrase=PASSPHRASE)
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1
    assert dict(node.rows("SELECT id, state FROM annotation")) == {a["id"]: "approved",
                                                                   b["id"]: "rejected"}
    assert "signatures valid: 1" in ok(lamina_process(node, "review", "verify"))
    ok(lamina_process(node, "audit", "verify"))
    shown = ok(lamina_process(node, "review", "show", str(a["id"])))
    assert "approved by Ann Radiologist (rad1)" in shown and "[valid]" in shown

    # The QA report shows the agreement, the adjudication and the approval.
    text = ok(lamina_process(node, "qa", "report"))
    # per class: the matched nodule and bone drawn alike by both (mean Dice 1.000)
    assert re.search(r"^\s+nodule\s+seg\s+\d+\s+\S+\s+1\.000", text, re.M), text
    assert re.search(r"^\s+bone\s+seg\s+\d+\s+\S+\s+1\.000", text, re.M), text
    assert "Comparisons: 1 (1 disagree)" in text and "Adjudications: 1 (0 open)" in text
    assert "Approvals: 1" in text and "Double reads: 1 chosen, 0 waiting" in text
    html = tmp_path / "qa.html"
    ok(lamina_process(node, "qa", "report", "--html", str(html)))
    page = html.read_text()
    assert "<svg" in page and "nodule" in page and "approvals: 1." in page

    # The forward rule delivers the approved SEG to storescp; the rejected one never.
    wait_for(lambda: str(seg_a.SOPInstanceUID) in received_uids(received), what="not forwarded")
    time.sleep(0.5)  # a few polls later, nothing else went
    assert received_uids(received) == {str(seg_a.SOPInstanceUID)}
    assert node.rows("SELECT sop_instance_uid, state FROM forward_item") == [
        (str(seg_a.SOPInstanceUID), "sent")]
    ok(lamina_process(node, "audit", "verify"))
    assert "reader.a" not in node.log() and "Reader^B" not in node.log()
