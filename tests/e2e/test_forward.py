"""Forwarding end to end: ``lamina serve`` as a subprocess sends what an approval (made by
another process, as a reviewer's would be) queued; killed mid-queue and restarted it resumes
without losing or repeating more than the unrecorded in-flight instances. With Orthanc as the
clinical PACS, a re-identified SEG lands on the original study and its references resolve.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.request

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

from node.context import NodeContext
from node.forward.worker import RECORD_EVERY
from tests import annotation_fixtures as fx
from tests.forward_fixtures import CountingSCP, Template, approve, build_template
from tests.harness import ProcessNode, free_port, stop_process, wait_port


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Template:
    return build_template(tmp_path_factory.mktemp("forward-e2e-template"))


def approve_elsewhere(config, annotation_id: int) -> None:
    """The approval made by another process on the node's data (the review's CLI or web)."""
    ctx = NodeContext.open(config.settings())
    try:
        approve(ctx, annotation_id)
    finally:
        ctx.close()


def states(node: ProcessNode) -> dict[str, int]:
    return dict(node.rows("SELECT state, count(*) FROM forward_item GROUP BY state"))


def wait_for(predicate, timeout: float = 60.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.05)


def test_a_node_killed_mid_queue_resumes_after_restart_without_loss(template,
                                                                    tmp_path) -> None:
    expected = fx.PHANTOM.slices_count + 1
    with CountingSCP("DEST", delay=0.05) as scp:
        config = template.copy(tmp_path / "node", scp.port, {"source_series": True})
        node = ProcessNode(config)
        try:
            node.start()
            approve_elsewhere(config, template.annotation_id)
            wait_for(lambda: sum(scp.counts.values()) >= 12, what="forwarding never started")
            node.kill9()
            before = sum(scp.counts.values())
            assert before < expected, "the queue was not interrupted: slow the SCP down"
            assert states(node).get("queued", 0) + states(node).get("failed", 0) > 0
            node.start()
            wait_for(lambda: states(node) == {"sent": expected}, what=str(states(node)))
            counts = dict(scp.counts)
            time.sleep(0.5)  # several polls later, nothing is sent again
            assert dict(scp.counts) == counts
        finally:
            node.stop()
    stored = set(node.rows("SELECT sop_instance_uid FROM forward_item"))
    assert {(uid,) for uid in counts} == stored  # every row delivered
    assert max(counts.values()) <= 2  # at most one identical duplicate each, after the crash
    assert sum(counts.values()) - expected <= RECORD_EVERY
    assert "Traceback" not in node.log()


# --- Orthanc as the clinical PACS ---------------------------------------------------------


@pytest.fixture
def orthanc(tmp_path):
    """Orthanc (the Debian package) on ephemeral DICOM and HTTP ports, stopped by PID."""
    # Debian installs it in /usr/sbin, which a user's PATH may lack.
    binary = shutil.which("Orthanc", path=f"{os.environ.get('PATH', '')}:/usr/sbin")
    if binary is None:
        pytest.skip("Orthanc is not installed (Debian package orthanc)")
    dicom, http = free_port(), free_port()
    folder = tmp_path / "orthanc"
    folder.mkdir()
    (folder / "orthanc.json").write_text(json.dumps({
        "Name": "tests", "StorageDirectory": str(folder / "db"),
        "IndexDirectory": str(folder / "db"), "DicomAet": "ORTHANC", "DicomPort": dicom,
        "HttpPort": http, "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
        "DicomAlwaysAllowStore": True, "DicomAlwaysAllowFind": True,
        "DicomModalities": {"finder": ["FINDER", "127.0.0.1", 104]}, "Plugins": []}))
    process = subprocess.Popen([binary, str(folder / "orthanc.json")],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(http)
        wait_port(dicom)
        yield dicom, f"http://127.0.0.1:{http}"
    finally:
        stop_process(process)


def rest(url: str, data: bytes | None = None) -> object:
    request = urllib.request.Request(url, data=data, method="POST" if data else "GET")
    with urllib.request.urlopen(request, timeout=30) as answer:
        return json.loads(answer.read())


def find_series(port: int, study_uid: str) -> list[Dataset]:
    """C-FIND (study root, SERIES level) under ``study_uid``."""
    ae = AE(ae_title="FINDER")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", port, ae_title="ORTHANC")
    assert assoc.is_established
    query = Dataset()
    query.QueryRetrieveLevel = "SERIES"
    query.StudyInstanceUID = study_uid
    query.SeriesInstanceUID = ""
    query.Modality = ""
    try:
        return [identifier for status, identifier in
                assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind)
                if status and status.Status in (0xFF00, 0xFF01)]
    finally:
        assoc.release()


def test_a_reidentified_seg_lands_on_the_original_study_in_orthanc(template, tmp_path,
                                                                   orthanc) -> None:
    dicom_port, base = orthanc
    for path in fx.PHANTOM.write(tmp_path / "clinical"):  # the PACS holds the original CT
        rest(f"{base}/instances", path.read_bytes())
    config = template.copy(tmp_path / "node", dicom_port, {"reidentify": True})
    ctx = NodeContext.open(config.settings(), with_key=True)
    try:
        approve(ctx, template.annotation_id)
        assert ctx.forwarder.deliver_due() == 1
    finally:
        ctx.close()
    found = {str(s.Modality): str(s.SeriesInstanceUID)
             for s in find_series(dicom_port, fx.PHANTOM.study_uid)}
    assert set(found) == {"CT", "SEG"} and found["CT"] == fx.PHANTOM.series_uid
    [seg_id] = rest(f"{base}/tools/find", json.dumps(
        {"Level": "Instance", "Query": {"SOPInstanceUID": template.seg_uid}}).encode())
    with urllib.request.urlopen(f"{base}/instances/{seg_id}/file", timeout=30) as answer:
        (tmp_path / "seg.dcm").write_bytes(answer.read())
    seg = dcmread(tmp_path / "seg.dcm")
    references = {src.ReferencedSOPInstanceUID
                  for frame in seg.PerFrameFunctionalGroupsSequence
                  for derivation in frame.DerivationImageSequence
                  for src in derivation.SourceImageSequence}
    assert references
    for uid in references:  # each resolves to an original CT slice Orthanc holds
        assert rest(f"{base}/tools/find", json.dumps(
            {"Level": "Instance", "Query": {"SOPInstanceUID": uid}}).encode()), uid
    assert str(seg.PatientID) == fx.PHANTOM.patient_id
