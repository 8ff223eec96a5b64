"""OHIF v3 in a real browser on our DICOMweb: the study list, the CT rendered, the SEG loaded.

The prebuilt viewer is the npm package ``@ohif/app`` (its ``dist/``), fetched
once with ``npm pack`` into ``~/.cache/lamina/ohif`` (or taken from
``$LAMINA_OHIF_DIST``) and served beside the node with an ``app-config.js``
whose one data source is the node's DICOMweb root; the browser is Debian's
``chromium``, headless, driven from its command line (``--dump-dom``,
``--screenshot`` after a virtual-time budget), and for the clicks that load the
SEG by ``tests/e2e/ohif_seg.js`` on npm's ``playwright-core`` (no browser download:
it drives the same system Chromium).
Screenshots and DOM dumps are kept in ``$LAMINA_TEST_ARTIFACTS`` (default
``test-artifacts/ohif`` in the repository). Skips with the reason when
Chromium, npm or the package is missing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
from dicomweb_client.api import DICOMwebClient
from PIL import Image
from pydicom import dcmread
from pydicom.filebase import DicomBytesIO
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Route

from node.web.app import build_app
from node.web.server import HttpServer
from tests.annotation_fixtures import PHANTOM, encode, valid_seg
from tests.harness import InProcessNode, free_port, write_config
from tests.studies import QR_VALIDATION, qr_peer

OHIF_VERSION = "3.13.2"
ROOT = Path(__file__).resolve().parents[2]
DESCRIPTION = "Lamina phantom CT"
ARTIFACTS = Path(os.environ.get("LAMINA_TEST_ARTIFACTS", ROOT / "test-artifacts")) / "ohif"


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    return found


def ohif_dist() -> Path:
    """The viewer's prebuilt dist/, fetched once with npm pack."""
    given = os.environ.get("LAMINA_OHIF_DIST")
    if given:
        return Path(given)
    cache = Path.home() / ".cache" / "lamina" / "ohif" / OHIF_VERSION
    dist = cache / "package" / "dist"
    if (dist / "index.html").is_file():
        return dist
    npm = shutil.which("npm")
    if not npm:
        pytest.skip("npm is not installed: cannot fetch @ohif/app (or set LAMINA_OHIF_DIST)")
    cache.mkdir(parents=True, exist_ok=True)
    packed = subprocess.run([npm, "pack", f"@ohif/app@{OHIF_VERSION}"], cwd=cache,
                            capture_output=True, text=True, timeout=600)
    tarballs = list(cache.glob("ohif-app-*.tgz"))
    if packed.returncode != 0 or not tarballs:
        pytest.skip(f"npm registry unavailable: npm pack @ohif/app@{OHIF_VERSION} failed:"
                    f" {packed.stderr.strip()[-200:]}")
    with tarfile.open(tarballs[0]) as archive:
        archive.extractall(cache, filter="data")
    tarballs[0].unlink()
    return dist


def playwright_core() -> Path:
    """npm's playwright-core (the driver only), installed once into the cache."""
    given = os.environ.get("LAMINA_PLAYWRIGHT_CORE")
    if given:
        return Path(given)
    cache = Path.home() / ".cache" / "lamina" / "playwright"
    package = cache / "node_modules" / "playwright-core"
    if (package / "package.json").is_file():
        return package
    npm = shutil.which("npm")
    if not npm or not shutil.which("node"):
        pytest.skip("node/npm are not installed: cannot drive the browser's clicks")
    cache.mkdir(parents=True, exist_ok=True)
    installed = subprocess.run([npm, "install", "--no-audit", "--no-fund", "playwright-core@1"],
                               cwd=cache, capture_output=True, text=True, timeout=600)
    if installed.returncode != 0 or not package.is_dir():
        pytest.skip(f"npm registry unavailable: npm install playwright-core failed:"
                    f" {installed.stderr.strip()[-200:]}")
    return package


def app_config(root: str) -> str:
    """OHIF's window.config with the node as its one DICOMweb data source."""
    return (
        "window.config = {routerBasename: '/', showStudyList: true, extensions: [], modes: [],"
        " defaultDataSourceName: 'lamina', investigationalUseDialog: {option: 'never'},"
        " dataSources: [{namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',"
        " sourceName: 'lamina', configuration: {friendlyName: 'Lamina', name: 'lamina',"
        f" wadoUriRoot: '{root}', qidoRoot: '{root}', wadoRoot: '{root}',"
        " qidoSupportsIncludeField: true, imageRendering: 'wadors',"
        " thumbnailRendering: 'wadors', enableStudyLazyLoad: true,"
        " supportsFuzzyMatching: false, supportsWildcard: true, staticWado: false,"
        " singlepart: 'bulkdata,video', bulkDataURI: {enabled: true}}}]};")


def viewer_app(dist: Path, config: str) -> Starlette:
    """The dist as a single-page app: files as they are, every other path index.html."""
    async def serve(request: Request) -> Response:
        path = request.path_params["path"]
        if path == "app-config.js":
            return Response(config, media_type="application/javascript")
        target = (dist / path).resolve()
        if path and target.is_file() and target.is_relative_to(dist.resolve()):
            return FileResponse(target)
        return FileResponse(dist / "index.html")
    return Starlette(routes=[Route("/{path:path}", serve)])


def browse(browser: str, url: str, *extra: str, budget_ms: int = 60_000) -> str:
    """Load ``url`` in headless Chromium for ``budget_ms`` of virtual time; its stdout."""
    run = subprocess.run(
        [browser, "--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
         "--use-angle=swiftshader", "--enable-unsafe-swiftshader", "--window-size=1400,900",
         "--hide-scrollbars", f"--virtual-time-budget={budget_ms}", *extra, url],
        capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    return run.stdout


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    browser = chromium()
    dist = ohif_dist()
    folder: Path = tmp_path_factory.mktemp("ohif")
    viewer_port = free_port()
    origin = f"http://127.0.0.1:{viewer_port}"
    peers = {"viewer": qr_peer("VIEWER", "store", "find", "get", port=104)}
    http = {"anonymous": "viewer", "cors_origins": [origin]}
    with InProcessNode(write_config(folder / "node", peers=peers, validation=QR_VALIDATION,
                                    http=http)) as node:
        slices = [PHANTOM.slice(k) for k in range(PHANTOM.slices_count)]
        for ds in slices:
            ds.StudyDescription = DESCRIPTION
        assert node.store(slices, "VIEWER") == [(0, "")] * len(slices)
        web = HttpServer(build_app(node.ctx), "127.0.0.1", 0).start()
        root = f"http://127.0.0.1:{web.port}/dicom-web"
        seg = valid_seg(PHANTOM)
        answer = DICOMwebClient(root).store_instances([dcmread(DicomBytesIO(encode(seg)))])
        assert "FailedSOPSequence" not in answer
        viewer = HttpServer(viewer_app(dist, app_config(root)), "127.0.0.1", viewer_port).start()
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        try:
            yield browser, origin
        finally:
            viewer.stop()
            web.stop()


def test_study_list_shows_the_study_with_its_description(site):
    browser, origin = site
    dom = browse(browser, origin + "/", "--dump-dom", budget_ms=30_000)
    (ARTIFACTS / "study-list.html").write_text(dom)
    assert DESCRIPTION in dom, "the study list shows the study's description"


def overlay_pixels(png: Path) -> int:
    """Pixels of the viewport that OHIF's segmentation colours (green), not grey CT."""
    rgb = np.asarray(Image.open(png).convert("RGB"), dtype=np.int16)[60:880, 290:1360]
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    return int(((g - r > 40) & (g - b > 40)).sum())


def test_the_seg_loads_over_its_ct(site):
    browser, origin = site
    driver = playwright_core()
    url = f"{origin}/viewer?StudyInstanceUIDs={PHANTOM.study_uid}"
    run = subprocess.run(["node", str(Path(__file__).with_name("ohif_seg.js")), url,
                          str(ARTIFACTS)], capture_output=True, text=True, timeout=400,
                         env={**os.environ, "PLAYWRIGHT_CORE": str(driver), "CHROMIUM": browser})
    assert run.returncode == 0, run.stderr[-2000:]
    shots = json.loads(run.stdout.strip().splitlines()[-1])
    assert overlay_pixels(Path(shots["hydrated"])) > 50, "the SEG's segment is drawn on the CT"
    assert "SEG" in shots["text"]


def test_viewer_renders_the_ct_and_lists_the_seg(site):
    browser, origin = site
    url = f"{origin}/viewer?StudyInstanceUIDs={PHANTOM.study_uid}"
    shot = ARTIFACTS / "viewer.png"
    browse(browser, url, f"--screenshot={shot}")
    dom = browse(browser, url, "--dump-dom")
    (ARTIFACTS / "viewer.html").write_text(dom)
    assert "SEG" in dom and DESCRIPTION in dom, "the series list shows the CT study and its SEG"
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.int16)
    centre = pixels[300:600, 550:850]  # inside the main viewport, on the phantom's body
    assert 40 < float(np.median(centre)) < 220, "the CT is drawn (grey water, not a blank view)"
    assert overlay_pixels(shot) == 0, "no segmentation is drawn before the SEG is loaded"
