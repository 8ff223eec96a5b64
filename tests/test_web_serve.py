"""``lamina serve`` serves HTTP beside DIMSE: two worker processes share the HTTP port as they
share the DICOM port, a STOW-RS store is found by C-FIND, metrics (STOW-RS and C-STORE) add up
across workers, and the HTTP port stops with the node."""

from __future__ import annotations

import socket
from pathlib import Path

import httpx
from pydicom import dcmread

from tests.annotation_fixtures import encode
from tests.harness import ProcessNode, free_port, lamina, write_config
from tests.studies import StudySpec, qr_peer, write_study

TOKEN = "serve-test-token-0123456789"


def test_serve_runs_http_with_the_workers_and_stops_it(tmp_path: Path):
    http_port = free_port()
    node = ProcessNode.with_workers(
        tmp_path / "node", 2,
        peers={"client": qr_peer("CLIENT", "store", "find", "get", port=104)},
        http={"port": http_port, "clients": {"c": {"token": TOKEN, "peer": "client"}}})
    node.start()
    base = f"http://127.0.0.1:{http_port}"
    auth = {"Authorization": f"Bearer {TOKEN}"}
    try:
        assert httpx.get(base + "/livez", timeout=10).status_code == 200
        assert httpx.get(base + "/readyz", timeout=10).json()["ready"] is True
        spec = StudySpec("serve-web", "Doe^Web", "SRV-1", "20240301", "101500", "SV-1", "CT",
                         slices=2)
        files = write_study(tmp_path / "study", spec)
        body = b""
        for path in files:
            body += (b"--B\r\nContent-Type: application/dicom\r\n\r\n"
                     + encode(dcmread(path)) + b"\r\n")
        body += b"--B--\r\n"
        stored = httpx.post(base + "/dicom-web/studies", content=body, timeout=30, headers={
            **auth, "Content-Type": 'multipart/related; type="application/dicom"; boundary=B'})
        assert stored.status_code == 200, stored.text
        assert len(stored.json()["00081199"]["Value"]) == 2
        for _ in range(6):  # several connections: both workers answer from one index
            found = httpx.get(base + "/dicom-web/studies?PatientID=SRV-1", headers=auth,
                              timeout=10).json()
            assert found[0]["00201208"]["Value"] == [2]
        more = write_study(tmp_path / "dimse", StudySpec(
            "serve-dimse", "Doe^Dimse", "SRV-2", "20240302", "101500", "SV-2", "CT", slices=4))
        for path in more:  # one association each: the kernel spreads them over both workers
            assert node.store([path], "CLIENT") == [(0, "")]
        metrics = httpx.get(base + "/metrics", timeout=10).text
        assert "lamina_instances_stored 6.0" in metrics
        assert 'lamina_stow_instances_total{status="0x0000"} 2.0' in metrics
        # events counted in whichever worker took them, summed in every scrape
        assert 'lamina_cstore_instances_total{status="0x0000"} 4.0' in metrics
        assert 'lamina_ingest_duration_seconds_count{protocol="dimse"} 4.0' in metrics
        assert "lamina_forward_queue_items" in metrics
    finally:
        node.stop()
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(("127.0.0.1", http_port))  # the HTTP port was released with the node


def test_serve_refuses_an_http_port_in_use(tmp_path: Path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        config = write_config(tmp_path / "node", http={"port": port})
        result = lamina("serve", config=config)
    assert result.exit_code == 2
    assert f"port {port} is already in use" in result.output
