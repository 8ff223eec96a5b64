"""``/metrics`` counts what DIMSE does, not only HTTP: C-STORE instances by status (received
and refused), their bytes and ingest latency, C-FIND latency, and the forwarding queue depth
by destination and state. Figures are read before and after (prometheus-client keeps one
registry per process, shared by every test of the run), so each assertion is a difference."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

from node import status
from node.audit.trail import utc_now
from node.dimse.ae import associate
from tests import annotation_fixtures as fx
from tests.harness import InProcessNode, http_root, peer


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    folder: Path = tmp_path_factory.mktemp("web-metrics")
    config = fx.node_config(folder / "node",
                            peers={**fx.PEERS, "viewer": peer("VIEWER", "find")})
    with InProcessNode(config) as node, http_root(node.ctx) as root:
        yield node, f"{root}/metrics"


def sample(url: str, name: str, **labels: str) -> float:
    """One sample's value in a fresh scrape (0 when absent)."""
    text = httpx.get(url, timeout=10).text
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0


def test_cstore_counted_by_status_with_bytes_and_latency(site):
    node, url = site
    ok, refused = "lamina_cstore_instances_total", "0x0124"
    before = (sample(url, ok, status="0x0000"), sample(url, ok, status=refused),
              sample(url, "lamina_cstore_received_bytes_total"),
              sample(url, "lamina_ingest_duration_seconds_count", protocol="dimse"))
    fx.store_phantom(node)
    [(code, _)] = node.store([fx.PHANTOM.slice(0)], aet="VIEWER")
    assert code == status.NOT_AUTHORISED.code
    after = (sample(url, ok, status="0x0000"), sample(url, ok, status=refused),
             sample(url, "lamina_cstore_received_bytes_total"),
             sample(url, "lamina_ingest_duration_seconds_count", protocol="dimse"))
    slices = fx.PHANTOM.slices_count
    assert after[0] - before[0] == slices
    assert after[1] - before[1] == 1
    # every slice is 256×256×2 bytes of pixels at least, plus its header
    assert after[2] - before[2] > (slices + 1) * 256 * 256 * 2
    assert after[3] - before[3] == slices + 1


def test_cfind_latency_is_observed_by_level(site):
    node, url = site
    name = "lamina_query_duration_seconds_count"
    before = sample(url, name, protocol="dimse", level="study")
    ae = AE(ae_title="VIEWER")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = associate(ae, "127.0.0.1", node.port, node.ae_title)
    try:
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = ""
        answers = list(assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind))
    finally:
        assoc.release()
    assert answers[-1][0].Status == 0x0000
    assert sample(url, name, protocol="dimse", level="study") == before + 1


def test_forward_queue_depth_by_destination_and_state(site):
    node, url = site
    fx.store_phantom(node)
    seg = fx.valid_seg(fx.served_by(node))
    assert fx.send(node, [seg]) == [(0, "")]
    annotation_id = fx.seg_annotation(node, seg)["id"]
    name = "lamina_forward_queue_items"
    assert sample(url, name, destination="archive", state="queued") == 0
    # What an approval's forward rule writes, due in an hour: the node's forward worker
    # must not pick it up (and move it out of "queued") while the test reads the gauge.
    with node.ctx.index.transaction() as tx:
        assert tx.outbox.enqueue_annotation(annotation_id, "rule", "archive", "stored",
                                            utc_now(), time.time() + 3600) == 1
    assert sample(url, name, destination="archive", state="queued") == 1
    assert sample(url, name, destination="archive", state="sent") == 0
