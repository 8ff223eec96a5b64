"""The review page in a real browser: ``lamina serve`` runs as a subprocess, the PACS and an
annotator send over real associations, and a reviewer in headless Chromium (Debian's, driven
by npm's ``playwright-core``, as the OHIF test does) logs in, looks at the previews and
approves the annotation with a signature; then ``lamina review verify`` (its own process)
passes. Screenshots are kept in ``$LAMINA_TEST_ARTIFACTS`` (default ``test-artifacts/review``).
Skips with the reason when Chromium, node or npm is missing."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests import annotation_fixtures as fx
from tests.e2e.test_ohif import chromium, playwright_core
from tests.harness import ProcessNode, free_port
from tests.review_fixtures import PASSPHRASE
from tests.review_fixtures import lamina_process as lamina

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(os.environ.get("LAMINA_TEST_ARTIFACTS", ROOT / "test-artifacts")) / "review"


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    root = tmp_path_factory.mktemp("review-page-e2e")
    config = fx.node_config(root / "node", settle_seconds=0.3, http={"port": free_port()})
    with ProcessNode(config) as process:
        fx.store_phantom(process)
        yield process
    assert "Traceback" not in process.log()


def test_a_reviewer_approves_in_the_browser_and_the_signature_verifies(node):
    browser, driver = chromium(), playwright_core()
    seg = fx.valid_seg(fx.served_by(node))
    assert fx.send(node, [seg]) == [(0, "")]
    annotation = fx.seg_annotation(node, seg)
    assert annotation["state"] == "checked"
    added = lamina(node, "users", "add", "rad1", "--name", "Ann Radiologist",
                   passphrase=PASSPHRASE)
    assert added.returncode == 0, added.stderr
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    base = f"http://127.0.0.1:{node.config.settings().http.port}"
    run = subprocess.run(
        ["node", str(Path(__file__).with_name("review_page.js")), base, str(annotation["id"]),
         str(ARTIFACTS)], capture_output=True, text=True, timeout=300,
        env={**os.environ, "PLAYWRIGHT_CORE": str(driver), "CHROMIUM": browser,
             "REVIEW_USER": "rad1", "REVIEW_PASSPHRASE": PASSPHRASE})
    assert run.returncode == 0, run.stderr[-2000:]
    seen = json.loads(run.stdout.strip().splitlines()[-1])
    assert seen["previews"] >= 3 and seen["loaded"] == seen["previews"]
    assert seen["state"] == "approved" and "Signed" in seen["signed"]
    assert fx.annotations(node)[f"seg|{seg.SOPInstanceUID}"]["state"] == "approved"

    verified = lamina(node, "review", "verify")
    assert verified.returncode == 0 and "signatures valid: 1" in verified.stdout
    audit = lamina(node, "audit", "verify")
    assert audit.returncode == 0, audit.stderr
