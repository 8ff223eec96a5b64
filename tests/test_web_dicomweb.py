"""DICOMweb over real sockets: a node in this process (DIMSE and HTTP on port 0),
dicomweb-client and httpx as clients, pynetdicom for the C-FIND side of the comparison."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from dicomweb_client.api import DICOMwebClient
from pydicom import dcmread
from pydicom.filebase import DicomBytesIO
from pydicom.pixels import pack_bits
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

from node.dimse.ae import associate
from node.web.pixels import frame_layout
from tests.annotation_fixtures import PHANTOM, encode, valid_seg
from tests.harness import InProcessNode, http_root, memory_spools_open, peer, write_config
from tests.studies import QR_VALIDATION, StudySpec, identifier, qr_peer, write_study

TOKENS = {"full": "full-access-token-0123456789", "reader": "find-only-token-0123456789",
          "annotator": "annotator-token-0123456789"}
SPECS = [
    StudySpec("web-a", "Doe^Jane", "WEB-A", "20240105", "091500", "WA-1", "CT",
              description="Chest CT", slices=4),
    StudySpec("web-b", "Roe^Richard", "WEB-B", "20240210", "131500", "WB-2", "MR",
              description="Head MR", slices=3),
]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    folder: Path = tmp_path_factory.mktemp("web")
    peers = {
        "client": qr_peer("CLIENT", "store", "find", "move", "get", port=104),
        "reader": qr_peer("READER", "find", port=104),
        "workstation": peer("ANNOTATOR", "store", "find", "get", route="annotator"),
    }
    http = {"max_upload_mb": 8, "clients": {
        "full": {"token": TOKENS["full"], "peer": "client"},
        "reader": {"token": TOKENS["reader"], "peer": "reader"},
        "annotator": {"token": TOKENS["annotator"], "peer": "workstation"}}}
    with InProcessNode(write_config(folder / "node", peers=peers, validation=QR_VALIDATION,
                                    http=http)) as node:
        for spec in SPECS:
            files = write_study(folder / spec.seed, spec)
            assert node.store(files, "CLIENT") == [(0, "")] * len(files)
        with http_root(node.ctx) as root:
            yield node, f"{root}/dicom-web"


def client(url: str, token: str = TOKENS["full"]) -> DICOMwebClient:
    return DICOMwebClient(url, headers={"Authorization": f"Bearer {token}"})


def get(url: str, path: str, token: str | None = TOKENS["full"], **kwargs) -> httpx.Response:
    headers = kwargs.pop("headers", {})
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return httpx.get(url + path, headers=headers, timeout=30, **kwargs)


def c_find(node, level: str, **keys) -> set[str]:
    ae = AE(ae_title="CLIENT")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = associate(ae, "127.0.0.1", node.port, node.ae_title)
    unique = {"STUDY": "StudyInstanceUID", "SERIES": "SeriesInstanceUID",
              "IMAGE": "SOPInstanceUID"}[level]
    try:
        found = {str(ds[unique].value) for status, ds in assoc.send_c_find(
            identifier(level, **{unique: "", **keys}), StudyRootQueryRetrieveInformationModelFind)
            if ds is not None and status.Status in (0xFF00, 0xFF01)}
    finally:
        assoc.release()
    return found


def uids(results: list[dict], tag: str) -> set[str]:
    return {r[tag]["Value"][0] for r in results}


@pytest.mark.parametrize(("level", "keys"), [
    ("STUDY", {}),
    ("STUDY", {"PatientName": "doe*"}),
    ("STUDY", {"StudyDate": "20240101-20240131"}),
    ("STUDY", {"ModalitiesInStudy": "MR"}),
    ("SERIES", {"Modality": "CT"}),
    ("IMAGE", {"PatientID": "WEB-B"}),
])
def test_qido_and_c_find_give_the_same_matches(site, level, keys):
    node, url = site
    web = client(url)
    if level == "STUDY":
        found, tag = web.search_for_studies(search_filters=keys), "0020000D"
    elif level == "SERIES":
        found, tag = web.search_for_series(search_filters=keys), "0020000E"
    else:
        found, tag = web.search_for_instances(search_filters=keys), "00080018"
    assert found, "the query matches something"
    assert uids(found, tag) == c_find(node, level, **keys)


def test_qido_keys_by_tag_and_includefield_encoded_comma(site):
    _node, url = site
    response = get(url, "/studies?00100020=WEB-A&includefield=StudyDescription%2C00080061"
                        "&includefield=NumberOfStudyRelatedInstances")
    assert response.status_code == 200
    [study] = response.json()
    assert study["00081030"]["Value"] == ["Chest CT"]
    assert study["00080061"]["Value"] == ["CT"]
    assert study["00201208"]["Value"] == [4]
    assert study["00081190"]["Value"][0].endswith(f"/studies/{study['0020000D']['Value'][0]}")


def test_qido_all_limit_offset(site):
    _node, url = site
    everything = get(url, "/instances?includefield=all").json()
    assert len(everything) == 7
    assert "00100010" in everything[0]
    first = get(url, "/instances?limit=3&offset=0").json()
    rest = get(url, "/instances?limit=10&offset=3").json()
    assert len(first) == 3 and len(rest) == 4
    assert not uids(first, "00080018") & uids(rest, "00080018")


def test_wado_study_series_instance_and_metadata(site):
    _node, url = site
    web = client(url)
    study = web.search_for_studies(search_filters={"PatientID": "WEB-A"})[0]["0020000D"]["Value"][0]
    instances = web.retrieve_study(study)
    assert len(instances) == 4
    series = str(instances[0].SeriesInstanceUID)
    assert len(web.retrieve_series(study, series)) == 4
    sop = str(instances[0].SOPInstanceUID)
    one = web.retrieve_instance(study, series, sop)
    assert one.SOPInstanceUID == sop
    metadata = web.retrieve_series_metadata(study, series)
    assert len(metadata) == 4
    assert metadata[0]["7FE00010"]["BulkDataURI"].endswith("/bulkdata/7FE00010")
    frames = web.retrieve_instance_frames(study, series, sop, frame_numbers=[1])
    assert frames[0] == one.PixelData
    hits = frame_layout.cache_info().hits
    assert web.retrieve_instance_frames(study, series, sop, frame_numbers=[1]) == frames
    assert frame_layout.cache_info().hits == hits + 1, "the layout is worked out once per blob"
    bulk = httpx.get(metadata[0]["7FE00010"]["BulkDataURI"], timeout=30,
                     headers={"Authorization": f"Bearer {TOKENS['full']}"})
    assert bulk.status_code == 200
    assert bulk.headers["content-type"].startswith("multipart/related")
    assert one.PixelData in bulk.content or len(bulk.content) > len(one.PixelData)
    png = get(url, f"/studies/{study}/series/{series}/instances/{sop}/rendered",
              headers={"Accept": "image/png"})
    assert png.status_code == 200 and png.content.startswith(b"\x89PNG")
    thumb = get(url, f"/studies/{study}/thumbnail")
    assert thumb.status_code == 200 and thumb.content.startswith(b"\xff\xd8")


def test_wado_type_unquoted_and_transcoding_to_implicit(site):
    _node, url = site
    web = client(url)
    inst = web.search_for_instances(search_filters={"PatientID": "WEB-B"})[0]
    study, series, sop = (inst[t]["Value"][0] for t in ("0020000D", "0020000E", "00080018"))
    path = f"/studies/{study}/series/{series}/instances/{sop}"
    for accept in ("multipart/related; type=application/dicom",
                   'multipart/related; type="application/dicom"; transfer-syntax=*'):
        assert get(url, path, headers={"Accept": accept}).status_code == 200
    bare = get(url, path, headers={"Accept": "application/dicom"})
    assert bare.status_code == 200 and bare.headers["content-type"] == "application/dicom"
    assert dcmread(DicomBytesIO(bare.content)).SOPInstanceUID == sop
    bulk = get(url, path + "/bulkdata/7FE00010", headers={"Accept": "application/octet-stream"})
    assert bulk.status_code == 200 and bulk.content == dcmread(DicomBytesIO(bare.content)).PixelData
    assert get(url, f"/studies/{study}", headers={"Accept": "application/dicom"}).status_code == 406
    implicit = get(url, path, headers={
        "Accept": 'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2'})
    assert implicit.status_code == 200
    assert "transfer-syntax=1.2.840.10008.1.2\r\n" in implicit.content[:400].decode("latin-1")


def test_stow_seg_then_wado_back_byte_identical(tmp_path, site):
    node, url = site
    seg_store = [PHANTOM.slice(k) for k in range(PHANTOM.slices_count)]
    assert node.store(seg_store, "CLIENT") == [(0, "")] * len(seg_store)
    seg = valid_seg(PHANTOM)
    sent = encode(seg)
    web = client(url)
    answer = web.store_instances([dcmread(DicomBytesIO(sent))])
    assert "FailedSOPSequence" not in answer
    item = answer.ReferencedSOPSequence[0]
    assert item.ReferencedSOPInstanceUID == seg.SOPInstanceUID
    assert item.RetrieveURL == (f"{url}/studies/{seg.StudyInstanceUID}/series/"
                                f"{seg.SeriesInstanceUID}/instances/{seg.SOPInstanceUID}")
    back = get(url, f"/studies/{seg.StudyInstanceUID}/series/{seg.SeriesInstanceUID}"
                    f"/instances/{seg.SOPInstanceUID}",
               headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'})
    assert back.status_code == 200
    assert sent in back.content, "the part carries the stored bytes exactly as sent"
    # 1-bit frames do not start on a byte: each is unpacked and packed again on its own.
    last = int(seg.NumberOfFrames)
    frames = web.retrieve_instance_frames(seg.StudyInstanceUID, seg.SeriesInstanceUID,
                                          seg.SOPInstanceUID, frame_numbers=[1, last])
    assert frames == [pack_bits(seg.pixel_array[k - 1]) for k in (1, last)]


# --- identity ---------------------------------------------------------------------------------


def test_tokens_401_and_403(site):
    _node, url = site
    assert get(url, "/studies", token=None).status_code == 401
    assert get(url, "/studies", token="not-a-configured-token-000").status_code == 401
    assert get(url, "/studies", token=TOKENS["reader"]).status_code == 200
    study = get(url, "/studies").json()[0]["0020000D"]["Value"][0]
    refused = get(url, f"/studies/{study}/metadata", token=TOKENS["reader"])
    assert refused.status_code == 403 and "get" in refused.json()["reason"]
    stow = httpx.post(url + "/studies", content=b"--x\r\n\r\nabc\r\n--x--\r\n",
                      headers={"Authorization": f"Bearer {TOKENS['reader']}",
                               "Content-Type": 'multipart/related; type="application/dicom"; boundary=x'})
    assert stow.status_code == 403


# --- bad input: a 4xx with a reason, never a 500 -----------------------------------------------


def _reason(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    reason = response.json()["reason"]
    assert reason
    return reason


@pytest.mark.parametrize(("path", "fragment"), [
    ("/studies?NoSuchKeyword=1", "unknown attribute"),
    ("/studies?includefield=Bogus", "unknown attribute"),
    ("/studies?StudyDate=2024-13-99x", "StudyDate"),
    ("/studies?StudyInstanceUID=1.2.abc", "UID"),
    ("/studies?limit=-1", "limit"),
    ("/studies?fuzzymatching=maybe", "fuzzymatching"),
    ("/studies?00400275.00321060=X", "sequence"),
    ("/studies/1.2.x/series", "UID"),
])
def test_bad_query_400(site, path, fragment):
    _node, url = site
    assert fragment in _reason(get(url, path), 400)


def test_not_found_404(site):
    _node, url = site
    assert "no such study" in _reason(get(url, "/studies/1.2.3.4.5.6"), 404)
    inst = get(url, "/instances?PatientID=WEB-A").json()[0]
    study, series, sop = (inst[t]["Value"][0] for t in ("0020000D", "0020000E", "00080018"))
    base = f"/studies/{study}/series/{series}/instances/{sop}"
    assert "frame 9" in _reason(get(url, base + "/frames/9"), 404)
    assert "no bulk data" in _reason(get(url, base + "/bulkdata/00091001"), 404)
    assert _reason(get(url, "/no/such/route"), 404)


def test_unsupported_accept_406(site):
    _node, url = site
    inst = get(url, "/instances?PatientID=WEB-A").json()[0]
    study, series, sop = (inst[t]["Value"][0] for t in ("0020000D", "0020000E", "00080018"))
    base = f"/studies/{study}/series/{series}/instances/{sop}"
    assert _reason(get(url, base, headers={"Accept": "application/pdf"}), 406)
    assert _reason(get(url, "/studies", headers={"Accept": "application/dicom+xml"}), 406)
    assert _reason(get(url, base + "/frames/1",
                       headers={"Accept": 'multipart/related; type="image/jp2"'}), 406)
    assert _reason(get(url, base + "/rendered", headers={"Accept": "image/gif"}), 406)


def post(url: str, body: bytes, content_type: str, token: str = TOKENS["full"]) -> httpx.Response:
    return httpx.post(url + "/studies", content=body, timeout=30,
                      headers={"Authorization": f"Bearer {token}", "Content-Type": content_type})


def test_stow_bad_bodies(site):
    node, url = site
    related = 'multipart/related; type="application/dicom"; boundary=XX'
    assert _reason(post(url, b"{}", "application/json"), 415)
    assert _reason(post(url, b"--XX\r\n", 'multipart/related; type="application/dicom"'), 400)
    broken = b"--XX\r\nContent-Type: application/dicom\r\n\r\nDICM...no closing delimiter"
    assert "closing" in _reason(post(url, broken, related), 400)
    text_part = b"--XX\r\nContent-Type: text/plain\r\n\r\nhello\r\n--XX--\r\n"
    assert _reason(post(url, text_part, related), 415)
    garbage = b"--XX\r\nContent-Type: application/dicom\r\n\r\nnot dicom at all\r\n--XX--\r\n"
    refused = post(url, garbage, related)
    assert refused.status_code == 409
    failed = refused.json()["00081198"]["Value"][0]
    assert failed["00081197"]["Value"] == [0xC000]
    assert failed["00080418"]["Value"][0].startswith("cannot parse")
    too_big = b"--XX\r\nContent-Type: application/dicom\r\n\r\n" + b"\0" * (9 << 20) + b"\r\n--XX--\r\n"
    assert "max_upload_mb" in _reason(post(url, too_big, related), 413)
    # A conflicting resend: other bytes under a stored SOP Instance UID.
    inst = get(url, "/instances?PatientID=WEB-A&includefield=all").json()[0]
    study, series, sop = (inst[t]["Value"][0] for t in ("0020000D", "0020000E", "00080018"))
    stored = client(url).retrieve_instance(study, series, sop)
    stored.ImageComments = "changed"
    part = encode(stored)
    conflict = post(url, b"--XX\r\nContent-Type: application/dicom\r\n\r\n" + part
                    + b"\r\n--XX--\r\n", related)
    assert conflict.status_code == 409
    assert conflict.json()["00081198"]["Value"][0]["00081197"]["Value"] == [0x0111]
    # The node keeps serving DIMSE and HTTP after all of this.
    assert node.echo("CLIENT") == 0x0000
    assert get(url, "/studies").status_code == 200


def test_health_and_metrics(site):
    node, url = site
    root = url.rsplit("/dicom-web", 1)[0]
    assert httpx.get(root + "/livez").status_code == 200
    ready = httpx.get(root + "/readyz")
    assert ready.status_code == 200 and ready.json()["ready"] is True
    get(url, "/studies")
    ae = AE(ae_title="CLIENT")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = associate(ae, "127.0.0.1", node.port, node.ae_title)
    try:
        text = httpx.get(root + "/metrics").text
    finally:
        assoc.release()
    assert "lamina_associations_open 1.0" in text
    assert "lamina_instances_stored " in text
    assert 'lamina_http_requests_total{method="GET",route="/studies"' in text
    assert "lamina_query_duration_seconds_bucket" in text


def test_more_bad_input(site):
    """The remaining "Bad input" cases: a boundary the body never uses, metadata of a series that
    does not exist, and a STOW to a study path with an instance of another study."""
    node, url = site
    other = 'multipart/related; type="application/dicom"; boundary=YY'
    body = b"--XX\r\nContent-Type: application/dicom\r\n\r\nDICM\r\n--XX--\r\n"
    assert _reason(post(url, body, other), 400)
    inst = get(url, "/instances?PatientID=WEB-A&includefield=all").json()[0]
    study, series, sop = (inst[t]["Value"][0] for t in ("0020000D", "0020000E", "00080018"))
    assert _reason(get(url, f"/studies/{study}/series/1.2.3.999/metadata"), 404)
    part = encode(client(url).retrieve_instance(study, series, sop))
    wrong = httpx.post(url + "/studies/1.2.3.4.5.999", timeout=30,
                       content=b"--XX\r\nContent-Type: application/dicom\r\n\r\n" + part + b"\r\n--XX--\r\n",
                       headers={"Authorization": f"Bearer {TOKENS['full']}",
                                "Content-Type": 'multipart/related; type="application/dicom"; boundary=XX'})
    assert wrong.status_code == 409, wrong.text
    assert wrong.json()["00081198"]["Value"][0]["00081197"]["Value"] == [0xA900]
    assert node.echo("CLIENT") == 0x0000
    assert get(url, "/studies").status_code == 200


def test_stow_spools_in_memory_on_a_rewriting_route(site):
    """On a route that rewrites what it receives (the annotator's), neither the body nor its
    parts touch the spool folder: files made and deleted there per part slowed every file
    the node made next (node.web.dicomweb). Every memory spool is closed after the answer."""
    node, url = site
    inst = get(url, "/instances?PatientID=WEB-A&includefield=all").json()[0]
    study, series, sop = (inst[t]["Value"][0] for t in ("0020000D", "0020000E", "00080018"))
    part = encode(client(url).retrieve_instance(study, series, sop))
    body = b"--XX\r\nContent-Type: application/dicom\r\n\r\n" + part + b"\r\n--XX--\r\n"
    spool = node.ctx.settings.spool_dir
    before = (spool.stat().st_mtime_ns, sorted(p.name for p in spool.iterdir()))
    spools_open = memory_spools_open()
    wrong = httpx.post(url + "/studies/1.2.3.4.5.998", content=body, timeout=30, headers={
        "Authorization": f"Bearer {TOKENS['annotator']}",
        "Content-Type": 'multipart/related; type="application/dicom"; boundary=XX'})
    assert wrong.status_code == 409, wrong.text
    assert wrong.json()["00081198"]["Value"][0]["00081197"]["Value"] == [0xA900]
    assert (spool.stat().st_mtime_ns, sorted(p.name for p in spool.iterdir())) == before
    assert memory_spools_open() == spools_open


def test_stow_with_no_memory_to_spare_spools_to_the_folder(tmp_path, site, monkeypatch):
    """When the STOW-RS memory budget is spent (other uploads hold it), body and parts go
    to the spool folder even on a rewriting route, are stored all the same, and leave
    nothing there."""
    node, url = site
    monkeypatch.setattr("node.web.dicomweb.STOW_MEMORY", 0)  # read when the app is built
    inst = get(url, "/instances?PatientID=WEB-A&includefield=all").json()[0]
    study, series, sop = (inst[t]["Value"][0] for t in ("0020000D", "0020000E", "00080018"))
    part = encode(client(url).retrieve_instance(study, series, sop))
    spec = StudySpec("web-c", "Poe^Edgar", "WEB-C", "20240301", "101500", "WC-3", "CT",
                     slices=2)
    sent = [dcmread(f) for f in write_study(tmp_path / "web-c", spec)]
    spool = node.ctx.settings.spool_dir
    before = spool.stat().st_mtime_ns
    spools_open = memory_spools_open()
    with http_root(node.ctx) as root:
        # The annotator's route rewrites what it stores: with memory, no spool file at all.
        wrong = httpx.post(f"{root}/dicom-web/studies/1.2.3.4.5.997", timeout=30, content=(
            b"--XX\r\nContent-Type: application/dicom\r\n\r\n" + part + b"\r\n--XX--\r\n"),
            headers={"Authorization": f"Bearer {TOKENS['annotator']}", "Content-Type":
                     'multipart/related; type="application/dicom"; boundary=XX'})
        assert wrong.status_code == 409, wrong.text
        assert spool.stat().st_mtime_ns != before, "no memory: the spool folder was used"
        answer = client(f"{root}/dicom-web").store_instances(sent)
        found = get(f"{root}/dicom-web", "/instances?PatientID=WEB-C").json()
    assert "FailedSOPSequence" not in answer
    assert {i.ReferencedSOPInstanceUID for i in answer.ReferencedSOPSequence} == \
        {ds.SOPInstanceUID for ds in sent}
    assert {i["00080018"]["Value"][0] for i in found} == {ds.SOPInstanceUID for ds in sent}
    assert list(spool.iterdir()) == []
    assert memory_spools_open() == spools_open
