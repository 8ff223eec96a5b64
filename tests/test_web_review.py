"""The review pages over a real uvicorn socket: who may look (login cookie, bearer token with
the review service), what an annotation's page shows (structures, findings, previews drawn in
the class's window with the mask outlined), and decisions signed through ctx.review exactly
as the CLI signs them (CSRF, wrong passphrase, lockout, the signature verifies)."""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from node.context import NodeContext
from node.web.app import build_app
from node.web.pixels import frame_image
from node.web.review import PALETTE
from node.web.server import HttpServer
from node.web.session import COOKIE
from tests import annotation_fixtures as fx
from tests.harness import peer, write_config
from tests.review_fixtures import ADMIN, PASSPHRASE, Annotations

DESK = "review-desk-token-0123456789"
PACS = "pacs-only-token-0123456789ab"
FORM = {"Content-Type": "application/x-www-form-urlencoded"}


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    folder: Path = tmp_path_factory.mktemp("web-review")
    config = fx.node_config(
        folder / "node", peers={**fx.PEERS, "desk": peer("DESK", "review", "find", "get")},
        review={"lock_after": 3},
        http={"clients": {"desk": {"token": DESK, "peer": "desk"},
                          "pacs": {"token": PACS, "peer": "pacs"}}})
    ctx = NodeContext.open(config.settings(), with_key=True)
    for k in range(fx.PHANTOM.slices_count):
        assert ctx.ingest.ingest_bytes(fx.encode(fx.PHANTOM.slice(k)), fx.PACS).action == "stored"
    ctx.review.users.add("rad1", "Ann Radiologist", PASSPHRASE, ADMIN)
    ctx.review.users.add("rad2", "Bob Radiologist", PASSPHRASE, ADMIN)
    made = Annotations(ctx)
    server = HttpServer(build_app(ctx), "127.0.0.1", 0).start()
    try:
        yield ctx, made, f"http://127.0.0.1:{server.port}"
    finally:
        server.stop()
        ctx.close()


@contextmanager
def login(base: str, user: str = "rad1", passphrase: str = PASSPHRASE) -> Iterator[httpx.Client]:
    """A browser-like client logged in (the session cookie in its jar)."""
    with httpx.Client(base_url=base, timeout=30) as client:
        answer = client.post("/review/login", content=f"user_id={user}&passphrase="
                             + passphrase.replace(" ", "+"), headers=FORM)
        assert answer.status_code == 303, answer.text
        yield client


def csrf_of(page: str) -> str:
    return re.search(r'name="csrf" value="([0-9a-f]+)"', page).group(1)


def state(ctx: NodeContext, annotation_id: int) -> str:
    with ctx.index.reader() as r:
        return r.annotations.get(annotation_id)["state"]


def test_without_credentials_the_pages_send_to_the_login(site):
    _ctx, made, base = site
    annotation_id = made.checked()
    listing = httpx.get(base + "/review")
    assert listing.status_code == 303 and listing.headers["location"] == "/review/login"
    assert httpx.get(base + f"/review/annotations/{annotation_id}/slices/1.png").status_code == 401
    posted = httpx.post(base + f"/review/annotations/{annotation_id}/decide",
                        content="decision=approve", headers=FORM)
    assert posted.status_code == 401
    forged = httpx.get(base + "/review", cookies={COOKIE: "eyJ1IjoicmFkMSJ9.00ff"})
    assert forged.status_code == 303
    assert httpx.get(base + "/review/login").status_code == 200


def test_bearer_token_needs_the_review_service(site):
    _ctx, made, base = site
    annotation_id = made.checked()
    refused = httpx.get(base + "/review", headers={"Authorization": f"Bearer {PACS}"})
    assert refused.status_code == 403 and "review" in refused.text
    page = httpx.get(base + "/review", headers={"Authorization": f"Bearer {DESK}"})
    assert page.status_code == 200
    assert f'href="/review/annotations/{annotation_id}"' in page.text


def test_wrong_passphrase_shows_the_form_again_and_locks_after_three(site):
    ctx, _made, base = site
    ctx.review.users.add("rad3", "Cy Radiologist", PASSPHRASE, ADMIN)
    for _ in range(3):
        answer = httpx.post(base + "/review/login", content="user_id=rad3&passphrase=nope-nope",
                            headers=FORM)
        assert answer.status_code == 401 and COOKIE not in answer.cookies
        assert 'id="login"' in answer.text and "wrong passphrase for" in answer.text
    assert "now locked" in answer.text
    locked = httpx.post(base + "/review/login", content="user_id=rad3&passphrase="
                        + PASSPHRASE.replace(" ", "+"), headers=FORM)
    assert locked.status_code == 401 and "user is locked" in locked.text
    assert httpx.post(base + "/review/login", content="user_id=rad3",
                      headers={"Content-Type": "application/json"}).status_code == 415


def test_annotation_page_shows_structures_findings_and_previews(site):
    _ctx, made, base = site
    annotation_id = made.checked()
    with login(base) as client:
        listing = client.get("/review")
        assert listing.status_code == 200 and f"#{annotation_id}" in listing.text
        page = client.get(f"/review/annotations/{annotation_id}")
    assert page.status_code == 200
    for label in fx.LABELS:
        assert label in page.text
    assert 'id="decide"' in page.text and csrf_of(page.text)
    previews = re.findall(rf"/review/annotations/{annotation_id}/slices/(\d+)\.png", page.text)
    assert previews


def test_preview_is_the_class_window_with_the_mask_outlined(site):
    ctx, made, base = site
    annotation_id = made.checked()
    grid, masks = ctx.annotations.masks_of(annotation_id)
    first = masks[0]  # "Nodule 1": class nodule, window lung
    k = first.slices()[len(first.slices()) // 2]
    with login(base) as client:
        png = client.get(f"/review/annotations/{annotation_id}/slices/{k + 1}.png")
        assert client.get(f"/review/annotations/{annotation_id}/slices/999.png"
                          ).status_code == 404
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    drawn = np.asarray(Image.open(io.BytesIO(png.content)).convert("RGB"))
    with ctx.index.reader() as r:
        path = ctx.blobs.local_path(r.instances.blob_of(grid.sop_instance_uids[k]))
    lung = np.asarray(frame_image(path, 1, ctx.annotations.protocol.windows["lung"]))
    plane = first.slice_mask(k)
    outlined = (drawn == PALETTE[0]).all(axis=2)
    assert outlined.any() and not (outlined & ~plane).any()  # the outline lies on the mask
    untouched = ~np.zeros_like(plane)
    for mask in masks:
        untouched &= ~mask.slice_mask(k)
    assert (drawn[untouched][:, 0] == lung[untouched]).all()  # drawn in the lung window


def test_decisions_are_signed_through_the_review_service(site):
    ctx, made, base = site
    annotation_id = made.checked()
    url = f"/review/annotations/{annotation_id}/decide"
    with login(base, "rad2") as client:
        token = csrf_of(client.get(f"/review/annotations/{annotation_id}").text)
        base_form = f"decision=approve&user_id=rad2&meaning=reviewed+and+approved&csrf={token}"
        stale = client.post(url, content=base_form.replace(token, "0" * 64)
                            + "&passphrase=x", headers=FORM)
        assert stale.status_code == 403 and "CSRF" in stale.text
        wrong = client.post(url, content=base_form + "&passphrase=not+it", headers=FORM)
        assert wrong.status_code == 403 and "wrong passphrase for" in wrong.text
        assert 'id="decide"' in wrong.text  # the form again, with the reason
        other = client.post(url, content=base_form.replace("user_id=rad2", "user_id=rad1")
                            + "&passphrase=" + PASSPHRASE.replace(" ", "+"), headers=FORM)
        assert other.status_code == 403 and "logged in" in other.text
        no_reason = client.post(url, content=base_form.replace("approve", "reject")
                                + "&passphrase=" + PASSPHRASE.replace(" ", "+"), headers=FORM)
        assert no_reason.status_code == 400 and "needs a reason" in no_reason.text
        assert state(ctx, annotation_id) == "checked"
        with ctx.index.reader() as r:
            assert r.signatures.list(annotation_id) == []
        signed = client.post(url, content=base_form + "&passphrase="
                             + PASSPHRASE.replace(" ", "+"), headers=FORM)
        assert signed.status_code == 303, signed.text
        page = client.get(signed.headers["location"])
        assert 'id="signed"' in page.text and "Bob Radiologist" in page.text
        again = client.post(url, content=base_form + "&passphrase="
                            + PASSPHRASE.replace(" ", "+"), headers=FORM)
        assert again.status_code == 409
    assert state(ctx, annotation_id) == "approved"
    checks = ctx.review.verify(annotation_id)
    assert len(checks) == 1 and checks[0].ok and checks[0].user_id == "rad2"
    with ctx.index.reader() as r:
        approvals = r.audit.of_action("annotation.approved")
        logins = r.audit.of_action("user.authentication")
    assert json.loads(approvals[-1].object)["annotation_id"] == annotation_id
    assert json.loads(approvals[-1].actor)["user"] == "rad2"
    assert any(json.loads(e.object).get("via") == "review page" for e in logins)


def test_rendered_takes_the_class_window_of_an_annotated_series(site):
    ctx, made, base = site
    grid, _ = ctx.annotations.masks_of(made.checked())  # Nodule 1 first: the lung window
    auth = {"Authorization": f"Bearer {DESK}", "Accept": "image/png"}
    with ctx.index.reader() as r:
        study = r.agreement.study_of_series(grid.series_instance_uid)
    url = (f"{base}/dicom-web/studies/{study}/series/{grid.series_instance_uid}/instances/"
           f"{grid.sop_instance_uids[20]}/rendered")
    plain, lung, bone = (httpx.get(url + q, headers=auth, timeout=30)
                         for q in ("", "?window=lung", "?window=bone"))
    assert plain.status_code == lung.status_code == bone.status_code == 200
    assert plain.content == lung.content != bone.content


def test_findings_are_listed_with_the_slices_they_concern(site):
    ctx, _, base = site
    seg = fx.seg_finding_variants(fx.served(ctx))["slice-gap"]
    assert fx.ingest(ctx, seg).action == "annotation"
    annotation_id = fx.annotation_of(ctx, str(seg.SOPInstanceUID))
    with ctx.index.reader() as r:
        row = r.annotations.get(annotation_id)
        (finding,) = r.annotations.findings(row["current_check_fk"])
    concerned = [x["slice"] for x in json.loads(finding["slices"])]
    assert concerned
    with login(base) as client:
        page = client.get(f"/review/annotations/{annotation_id}")
        for k in concerned:  # each a link to its preview, and the preview is drawn
            link = f"/review/annotations/{annotation_id}/slices/{k}.png"
            assert link in page.text
            assert client.get(link).status_code == 200
    assert 'id="findings"' in page.text and "slice-gap" in page.text


def test_agreement_figures_shown_where_a_second_reader_exists(tmp_path):
    folder = tmp_path / "node"
    folder.mkdir()
    (folder / "protocol.toml").write_text(fx.TEST_PROTOCOL)
    config = write_config(folder, peers=fx.PEERS, annotations={
        "protocol": str(folder / "protocol.toml"), "double_read_fraction": 1.0})
    ctx = NodeContext.open(config.settings(), with_key=True)
    server = None
    try:
        for k in range(fx.PHANTOM.slices_count):
            ctx.ingest.ingest_bytes(fx.encode(fx.PHANTOM.slice(k)), fx.PACS)
        ctx.review.users.add("rad1", "Ann Radiologist", PASSPHRASE, ADMIN)
        ids = []
        for reader in ("Reader^A", "Reader^B"):
            seg = fx.valid_seg(fx.served(ctx))
            seg.ContentCreatorName = reader
            assert fx.ingest(ctx, seg).action == "annotation"
            ids.append(fx.annotation_of(ctx, str(seg.SOPInstanceUID)))
        server = HttpServer(build_app(ctx), "127.0.0.1", 0).start()
        with login(f"http://127.0.0.1:{server.port}") as client:
            page = client.get(f"/review/annotations/{ids[0]}").text
        assert "Agreement with the second reading" in page
        assert f"#{ids[1]} (Reader^B)" in page and "<strong>agree</strong>" in page
        assert "1.000" in page  # Dice of identical readings
    finally:
        if server is not None:
            server.stop()
        ctx.close()
