"""Annotations over real associations into a node running in this process: SEGs and
overlay copies sent with pynetdicom from the annotators' workstation, checked by the
annotation service (node.annotations.service, an ingest hook).

The workflow: the PACS (a ``clinical`` peer) sends the phantom series, which is
stored de-identified; the annotators draw on the slices the node serves (read
back from its blob store) and push their work from their workstation (an
``annotator`` peer with its own AE title). Every valid object must be stored
without a finding; every defective one must give exactly its refusal or its
finding. The same workflow with DCMTK's storescu against ``lamina serve`` is
tests/e2e/test_annotations.py.
"""

from __future__ import annotations

import pytest

from node import status
from tests import annotation_fixtures as fx
from tests.harness import InProcessNode

REFUSED = status.DOES_NOT_MATCH_SOP_CLASS.code
#: How long an annotation waits for images that are not stored (short, for the test).
PENDING_SECONDS = 2.0
#: Refusal checks that mean "not stored": the SEG waits for its images, then is refused.
WAITS = ("instances", "series")


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    config = fx.node_config(tmp_path_factory.mktemp("annotations") / "node", settle_seconds=0.3,
                            pending_seconds=PENDING_SECONDS)
    with InProcessNode(config) as running:
        fx.store_phantom(running)  # from the PACS
        yield running
    assert "Traceback" not in running.log()


@pytest.fixture(scope="module")
def served(node) -> fx.Served:
    """The series as the node serves it (stored de-identified): what annotators draw on."""
    return fx.served_by(node)




def test_valid_segs_from_pynetdicom_are_stored_without_findings(node, served) -> None:
    segs = {name: build(served) for name, build in fx.VALID_SEGS.items()}
    assert fx.send(node, list(segs.values())) == [(0, "")] * len(segs)
    for name, seg in segs.items():
        row = fx.seg_annotation(node, seg)
        assert (row["state"], row["verdict"], row["structures"]) == ("checked", "pass", 3), name
        assert fx.finding_checks(node, row["id"]) == [], name


def test_dcmqi_seg_is_stored_without_findings(node, served, tmp_path) -> None:
    seg = fx.dcmqi_seg(tmp_path, served)
    assert fx.send(node, [seg]) == [(0, "")]
    row = fx.seg_annotation(node, seg)
    assert (row["verdict"], row["structures"], row["annotator_person"]) == \
        ("pass", 3, "Reader^Dcmqi")


@pytest.mark.parametrize("check", [c for c in fx.SEG_REFUSAL_CHECKS if c not in WAITS])
def test_each_seg_defect_is_refused_with_its_check(node, served, check: str) -> None:
    seg = fx.seg_refusal_variants(served)[check]
    [(code, comment)] = fx.send(node, [seg])
    assert code == REFUSED and comment.startswith(f"{check}: "), comment
    row = fx.seg_annotation(node, seg)
    assert (row["state"], row["refused"]) == ("refused", 1)


@pytest.mark.parametrize("check", WAITS)
def test_a_seg_whose_images_never_come_waits_then_is_refused(node, served, check: str) -> None:
    """Stored pending (0x0000) with what it waits for; after the configured wait it is
    refused with the reason, audited from pending, and listed with the reason."""
    seg = fx.seg_refusal_variants(served)[check]
    assert fx.send(node, [seg]) == [(0, "")]
    key = f"seg|{seg.SOPInstanceUID}"
    row = fx.annotations(node)[key]
    assert row["state"] == "pending" and row["state_reason"].startswith(f"{check}: ")
    row = fx.in_state(node, key, "refused", timeout=PENDING_SECONDS + 20)
    assert (row["state"], row["objects"], row["refused"]) == ("refused", 0, 1)
    assert row["state_reason"].startswith(f"{check}: ") and "not stored after" in row["state_reason"]
    [event] = [e for e in node.audit_events("annotation.refused")
               if e["object"]["annotation_id"] == row["id"]]
    assert (event["object"]["from"], event["object"]["check"]) == ("pending", check)
    listed = node.cli("annotations", "list", "--state", "refused")
    [line] = [x for x in listed.stdout.splitlines() if x.strip().startswith(str(row["id"]) + " ")]
    assert "not stored after" in line


@pytest.mark.parametrize("check", fx.OVERLAY_REFUSAL_CHECKS)
def test_each_overlay_defect_is_refused_with_its_check_and_slice(node, served,
                                                                 check: str) -> None:
    [(code, comment)] = fx.send(node, [fx.overlay_refusal_variants(served)[check]])
    assert code == REFUSED and comment.startswith(f"{check}: ") and "slice 21" in comment, comment


@pytest.mark.parametrize("check", fx.FINDING_CHECKS)
def test_each_inconsistent_seg_is_stored_with_exactly_its_finding(node, served,
                                                                   check: str) -> None:
    seg = fx.seg_finding_variants(served)[check]
    assert fx.send(node, [seg]) == [(0, "")]
    row = fx.seg_annotation(node, seg)
    assert (row["state"], row["verdict"]) == ("checked", "findings")
    assert fx.finding_checks(node, row["id"]) == [check]


def test_everything_is_audited_and_the_trail_verifies(node) -> None:
    node.drain()
    run = node.cli("audit", "verify")
    assert run.exit_code == 0, run.stderr
    counts = node.cli("status").stdout
    assert "quarantined" in counts


def test_overlays_sent_with_lamina_come_back_as_the_same_annotation(node, served,
                                                                    tmp_path) -> None:
    seg = fx.valid_seg(served)
    path = tmp_path / "seg.dcm"
    seg.save_as(path, enforce_file_format=True)
    run = node.cli("overlays", str(path), "--series", served.series_uid,
                   "--out", str(tmp_path / "copies"), "--send",
                   f"LAMINA@127.0.0.1:{node.port}", "--aet", fx.ANNOTATOR_AET)
    assert run.exit_code == 0, run.stderr
    covered = {int(k) for m in fx.truth() for k in m.any(axis=(1, 2)).nonzero()[0]}
    assert f"sent {len(covered)}" in run.stdout
    row = fx.settled(node, f"overlay|{served.series_uid}|{fx.ANNOTATOR_AET}|")
    assert (row["verdict"], row["structures"], row["objects"]) == ("pass", 3, len(covered))
