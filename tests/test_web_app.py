"""The app behind a reverse proxy: forwarded headers build the URLs, CORS answers the
viewer's origin, a configured anonymous peer serves requests without a token, and the
protocol's review windows render."""

from __future__ import annotations

import socket
from pathlib import Path

import httpx
import pytest

from tests.harness import InProcessNode, http_root, write_config
from tests.studies import QR_VALIDATION, StudySpec, qr_peer, write_study

VIEWER = "http://viewer.example"


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    folder: Path = tmp_path_factory.mktemp("web-app")
    peers = {"client": qr_peer("CLIENT", "store", "find", "get", port=104)}
    http = {"forwarded": True, "cors_origins": [VIEWER], "anonymous": "client"}
    with InProcessNode(write_config(folder / "node", peers=peers, validation=QR_VALIDATION,
                                    http=http, node={"network_timeout": 1})) as node:
        spec = StudySpec("app-a", "Doe^Jane", "APP-A", "20240105", "091500", "AA-1", "CT",
                         slices=2)
        files = write_study(folder / spec.seed, spec)
        assert node.store(files, "CLIENT") == [(0, "")] * len(files)
        with http_root(node.ctx) as root:
            yield f"{root}/dicom-web"


def test_forwarded_headers_build_retrieve_and_bulk_urls(site):
    proxy = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "pacs.example",
             "X-Forwarded-Prefix": "/lamina"}
    [inst, *_] = httpx.get(site + "/instances", headers=proxy).json()
    assert inst["00081190"]["Value"][0].startswith("https://pacs.example/lamina/dicom-web/studies/")
    study, series = inst["0020000D"]["Value"][0], inst["0020000E"]["Value"][0]
    meta = httpx.get(f"{site}/studies/{study}/series/{series}/metadata", headers=proxy).json()
    assert meta[0]["7FE00010"]["BulkDataURI"].startswith("https://pacs.example/lamina/dicom-web/")


def test_cors_preflight_and_anonymous_peer(site):
    preflight = httpx.options(site + "/studies", headers={
        "Origin": VIEWER, "Access-Control-Request-Method": "GET",
        "Access-Control-Request-Headers": "Authorization"})
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == VIEWER
    plain = httpx.get(site + "/studies", headers={"Origin": VIEWER})
    assert plain.status_code == 200 and plain.headers["access-control-allow-origin"] == VIEWER
    elsewhere = httpx.get(site + "/studies", headers={"Origin": "http://other.example"})
    assert "access-control-allow-origin" not in elsewhere.headers


def test_rendered_window_from_query_or_protocol_preset(site):
    inst = httpx.get(site + "/instances").json()[0]
    study, series, sop = (inst[t]["Value"][0] for t in ("0020000D", "0020000E", "00080018"))
    url = f"{site}/studies/{study}/series/{series}/instances/{sop}/rendered"
    png = {"Accept": "image/png"}
    lung = httpx.get(url + "?window=lung", headers=png)
    same = httpx.get(url + "?window=-600,1500", headers=png)
    bone = httpx.get(url + "?window=bone", headers=png)
    assert lung.status_code == same.status_code == bone.status_code == 200
    assert lung.content == same.content != bone.content
    refused = httpx.get(url + "?window=sunset", headers=png)
    assert refused.status_code == 400 and "lung" in refused.json()["reason"]
    small = httpx.get(url + "?viewport=16,16", headers=png)
    assert small.status_code == 200
    assert httpx.get(url + "?viewport=0,5").status_code == 400


def test_a_body_that_stops_coming_is_answered_408(site):
    host, port = site.split("//")[1].split("/")[0].split(":")
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        conn.sendall(b"POST /dicom-web/studies HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n"
                     b'Content-Type: multipart/related; type="application/dicom"; boundary=B\r\n'
                     b"\r\n--B\r\n")
        answer = ""
        while "network_timeout" not in answer:
            data = conn.recv(4096)
            if not data:
                break
            answer += data.decode("latin-1")
    assert answer.startswith("HTTP/1.1 408") and "network_timeout" in answer
    assert httpx.get(site + "/studies").status_code == 200
