"""Review end to end: ``lamina serve`` runs as a subprocess, the PACS and an annotator send
over real associations, and the reviewer signs with ``lamina review approve`` as a separate
process that reads the passphrase from an inherited file descriptor. Then every check a
submission would run: ``review verify``, ``audit verify`` (with the checkpoints kept outside
the data folder) and the ATNA export."""

from __future__ import annotations

import json

import pytest

from tests import annotation_fixtures as fx
from tests.harness import ProcessNode
from tests.review_fixtures import PASSPHRASE, lamina_process


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    root = tmp_path_factory.mktemp("review-e2e")
    config = fx.node_config(root / "node", settle_seconds=0.3,
                            audit={"checkpoint_path": str(root / "vault" / "checkpoints.jsonl")})
    with ProcessNode(config) as process:
        fx.store_phantom(process)
        yield process
    assert "Traceback" not in process.log()


def test_a_seg_pushed_over_the_network_is_approved_with_a_signature(node):
    served = fx.served_by(node)
    seg = fx.valid_seg(served)
    assert fx.send(node, [seg]) == [(0, "")]
    annotation = fx.seg_annotation(node, seg)
    assert annotation["state"] == "checked"
    added = lamina_process(node, "users", "add", "rad1", "--name", "Ann Radiologist", passphrase=PASSPHRASE)
    assert added.returncode == 0, added.stderr
    wrong = lamina_process(node, "review", "approve", str(annotation["id"]), "--as", "rad1",
                           "--meaning", "reviewed and approved", passphrase="not the passphrase")
    assert wrong.returncode == 2 and wrong.stderr.strip().splitlines()[-1].endswith(
        "wrong passphrase for 'rad1'")
    approved = lamina_process(node, "review", "approve", str(annotation["id"]), "--as", "rad1",
                              "--meaning", "reviewed and approved", passphrase=PASSPHRASE)
    assert approved.returncode == 0, approved.stderr
    assert fx.annotations(node)[f"seg|{seg.SOPInstanceUID}"]["state"] == "approved"

    verified = lamina_process(node, "review", "verify")
    assert verified.returncode == 0 and "signatures valid: 1" in verified.stdout
    audit = lamina_process(node, "audit", "verify")
    assert audit.returncode == 0, audit.stderr
    kept = [json.loads(line) for line in
            (node.config.root.parent / "vault" / "checkpoints.jsonl").read_text().splitlines()]
    (approval,) = node.audit_events("annotation.approved")
    seq = node.rows("SELECT seq FROM audit_event WHERE action = 'annotation.approved'")[0][0]
    assert any(c["seq"] >= seq for c in kept), (kept, approval)
    exported = lamina_process(node, "audit", "export", "--format", "atna")
    assert exported.returncode == 0
    assert sum('csd-code="110103"' in line and "annotation.approved" in line
               for line in exported.stdout.splitlines()) == 1
