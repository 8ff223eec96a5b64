"""Annotations end to end: SEGs and overlay copies over real associations into a node subprocess.

The workflow: the PACS (a ``clinical`` peer) sends the phantom series, which is
stored de-identified; the annotators draw on the slices the node serves (read
back from its blob store) and push their work from their workstation (an
``annotator`` peer with its own AE title). pynetdicom sends the SEGs (its
responses carry the ErrorComment we assert on); DCMTK's storescu sends the
Horos-pipeline overlay copies and a SEG, as the annotators' own tools would.
Every valid object must be stored without a finding; every defective one must
give exactly its refusal or its finding.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from pydicom import dcmread

from node import status
from node.storage.sqlite.index import SqliteIndex
from tests import annotation_fixtures as fx
from tests.conftest import require
from tests.nodeproc import TEST_AET, NodeProcess, store

REFUSED = status.DOES_NOT_MATCH_SOP_CLASS.code
#: The annotators' workstation; the PACS calls as TEST_AET.
ANNOTATOR_AET = "ANNOTATOR"
PEERS = {
    "pacs": {"ae_title": TEST_AET, "host": "127.0.0.1", "port": 1, "services": ["store"],
             "route": "clinical"},
    "workstation": {"ae_title": ANNOTATOR_AET, "host": "127.0.0.1", "port": 1,
                    "services": ["store", "find", "move", "get"], "route": "annotator"},
}


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    root = tmp_path_factory.mktemp("annotations-e2e")
    (root / "protocol.toml").write_text(fx.TEST_PROTOCOL)
    process = NodeProcess(root / "node", peers=PEERS, sections={"annotations": {
        "protocol": str(root / "protocol.toml"), "settle_seconds": 0.3}})
    with process:
        slices = [fx.PHANTOM.slice(k) for k in range(fx.PHANTOM.slices_count)]
        assert store(process.port, slices) == [(0, "")] * len(slices)  # from the PACS
        yield process
    assert "Traceback" not in process.log()


@pytest.fixture(scope="module")
def served(node) -> fx.Served:
    """The series as the node serves it (stored de-identified): what annotators draw on."""
    return fx.served_by(node)


def send(node: NodeProcess, datasets: list) -> list[tuple[int, str]]:
    """C-STORE from the annotators' workstation."""
    return store(node.port, datasets, aet=ANNOTATOR_AET)


def annotations(node: NodeProcess) -> dict[str, dict]:
    """The node's annotations by key, read from its index as ``annotations list`` does."""
    index = SqliteIndex(node.data / "index.sqlite3")
    try:
        with index.reader() as r:
            return {row["key"]: row for row in r.annotations.list()}
    finally:
        index.close()


def settled(node: NodeProcess, key: str, timeout: float = 30.0) -> dict:
    """An annotation once its check after the answer has run: an overlay set settles after
    its last copy, a SEG is checked on the node's worker. Refused ones never wait."""
    deadline = time.monotonic() + timeout
    while True:
        row = annotations(node).get(key)
        if (row and row["state"] != "received") or time.monotonic() > deadline:
            return row
        time.sleep(0.1)


def findings(node: NodeProcess, annotation_id: int) -> list[dict]:
    """The current findings, as ``lamina annotations show ID --json`` reports them."""
    run = node.lamina("annotations", "show", str(annotation_id), "--json")
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)["findings"]


def finding_checks(node: NodeProcess, annotation_id: int) -> list[str]:
    index = SqliteIndex(node.data / "index.sqlite3")
    try:
        with index.reader() as r:
            check = r.annotations.get(annotation_id)["current_check_fk"]
            return [f["check_name"] for f in r.annotations.findings(check)]
    finally:
        index.close()


def seg_annotation(node: NodeProcess, seg) -> dict:
    return settled(node, f"seg|{seg.SOPInstanceUID}")


def storescu(node: NodeProcess, files: list[Path]) -> subprocess.CompletedProcess:
    """DCMTK's storescu on the annotators' workstation."""
    binary = require("storescu")
    return subprocess.run([binary, "-v", "-R", "-aet", ANNOTATOR_AET, "-aec", "LAMINA", "127.0.0.1",
                           str(node.port), *map(str, files)],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "TCP_NODELAY": "1"})


def write(folder: Path, datasets) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, ds in enumerate(datasets):
        path = folder / f"{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


#: Each builder takes the series the SEG is drawn on.
VALID_SEGS = {
    "binary": lambda s: fx.valid_seg(s),
    "binary, empty frames present": lambda s: fx.valid_seg(s, omit_empty=False),
    "binary, frames permuted": lambda s: fx.permute_frames(fx.valid_seg(s)),
    "binary, float32 positions": lambda s: fx.float32_positions(fx.valid_seg(s)),
    "fractional": fx.fractional_seg,
    "labelmap": lambda s: fx.valid_seg(s, seg_type="LABELMAP"),
}


def test_valid_segs_from_pynetdicom_are_stored_without_findings(node, served) -> None:
    segs = {name: build(served) for name, build in VALID_SEGS.items()}
    assert send(node, list(segs.values())) == [(0, "")] * len(segs)
    for name, seg in segs.items():
        row = seg_annotation(node, seg)
        assert (row["state"], row["verdict"], row["structures"]) == ("checked", "pass", 3), name
        assert finding_checks(node, row["id"]) == [], name


def test_dcmqi_seg_is_stored_without_findings(node, served, tmp_path) -> None:
    seg = fx.dcmqi_seg(tmp_path, served)
    assert send(node, [seg]) == [(0, "")]
    row = seg_annotation(node, seg)
    assert (row["verdict"], row["structures"], row["annotator_person"]) == \
        ("pass", 3, "Reader^Dcmqi")


def test_a_seg_sent_with_storescu_is_an_annotation(node, served, tmp_path) -> None:
    seg = fx.valid_seg(served)
    sent = storescu(node, write(tmp_path / "seg", [seg]))
    assert sent.returncode == 0, sent.stderr
    assert seg_annotation(node, seg)["verdict"] == "pass"


@pytest.fixture(scope="module")
def horos_set(node, served, tmp_path_factory) -> tuple[dict, subprocess.CompletedProcess, int]:
    """The three spheres as Horos-pipeline overlay copies, pushed with storescu."""
    copies = fx.rotating_overlays(fx.truth(), fx.LABELS, person="Reader^Horos", series=served)
    sent = storescu(node, write(tmp_path_factory.mktemp("horos"), copies))
    row = settled(node, f"overlay|{served.series_uid}|{ANNOTATOR_AET}|Reader^Horos")
    return row, sent, len(copies)


def test_horos_overlay_copies_from_storescu_form_one_clean_annotation(node, horos_set) -> None:
    row, sent, count = horos_set
    assert sent.returncode == 0, sent.stderr
    assert (sent.stdout + sent.stderr).count("Received Store Response (Success)") == count
    assert (row["state"], row["verdict"], row["objects"], row["structures"]) == \
        ("checked", "pass", count, 3)
    run = node.lamina("fsck")
    assert run.returncode == 0, run.stdout
    assert "unreferenced" not in run.stdout  # overlay copies are referenced by their annotation


@pytest.mark.parametrize("check", fx.SEG_REFUSAL_CHECKS)
def test_each_seg_defect_is_refused_with_its_check(node, served, check: str) -> None:
    seg = fx.seg_refusal_variants(served)[check]
    [(code, comment)] = send(node, [seg])
    assert code == REFUSED and comment.startswith(f"{check}: "), comment
    row = seg_annotation(node, seg)
    assert (row["state"], row["refused"]) == ("refused", 1)


@pytest.mark.parametrize("check", fx.OVERLAY_REFUSAL_CHECKS)
def test_each_overlay_defect_is_refused_with_its_check_and_slice(node, served,
                                                                 check: str) -> None:
    [(code, comment)] = send(node, [fx.overlay_refusal_variants(served)[check]])
    assert code == REFUSED and comment.startswith(f"{check}: ") and "slice 21" in comment, comment


@pytest.mark.parametrize("check", fx.FINDING_CHECKS)
def test_each_inconsistent_seg_is_stored_with_exactly_its_finding(node, served,
                                                                   check: str) -> None:
    seg = fx.seg_finding_variants(served)[check]
    assert send(node, [seg]) == [(0, "")]
    row = seg_annotation(node, seg)
    assert (row["state"], row["verdict"]) == ("checked", "findings")
    assert finding_checks(node, row["id"]) == [check]


def test_overlay_copies_with_a_missing_slice_give_a_slice_gap(node, served, tmp_path) -> None:
    sent = storescu(node, write(tmp_path / "gap", fx.overlay_gap_copies(served)))
    assert sent.returncode == 0, sent.stderr
    row = settled(node, f"overlay|{served.series_uid}|{ANNOTATOR_AET}|Reader^Gap")
    [found] = findings(node, row["id"])
    assert (found["check"], found["structure_id"]) == ("slice-gap", "roi Nodule 2")
    assert [(s["slice"], s["position_mm"]) for s in found["slices"]] == [(15, -15.0)]


def test_everything_is_audited_and_the_trail_verifies(node) -> None:
    run = node.lamina("audit", "verify")
    assert run.returncode == 0, run.stderr
    counts = node.lamina("status").stdout
    assert "quarantined" in counts


def test_the_seg_lamina_writes_passes_dciodvfy_and_comes_back_clean(node, horos_set,
                                                                     tmp_path) -> None:
    row, _, _ = horos_set
    out = tmp_path / "from-overlays.dcm"
    run = node.lamina("annotations", "to-seg", str(row["id"]), "--out", str(out))
    assert run.returncode == 0, run.stderr
    dciodvfy = subprocess.run([fx.tool("dciodvfy", "Debian package dicom3tools"), str(out)],
                              capture_output=True, text=True, timeout=120)
    assert not [line for line in (dciodvfy.stdout + dciodvfy.stderr).splitlines()
                if line.startswith("Error")]
    sent = storescu(node, [out])
    assert sent.returncode == 0, sent.stderr
    uid = dcmread(out, stop_before_pixels=True).SOPInstanceUID
    seg = settled(node, f"seg|{uid}")
    assert (seg["verdict"], seg["structures"]) == ("pass", 3)


def test_overlays_sent_with_lamina_come_back_as_the_same_annotation(node, served,
                                                                    tmp_path) -> None:
    seg = fx.valid_seg(served)
    path = tmp_path / "seg.dcm"
    seg.save_as(path, enforce_file_format=True)
    run = node.lamina("overlays", str(path), "--series", served.series_uid,
                      "--out", str(tmp_path / "copies"), "--send",
                      f"LAMINA@127.0.0.1:{node.port}", "--aet", ANNOTATOR_AET)
    assert run.returncode == 0, run.stderr
    covered = {int(k) for m in fx.truth() for k in m.any(axis=(1, 2)).nonzero()[0]}
    assert f"sent {len(covered)}" in run.stdout
    row = settled(node, f"overlay|{served.series_uid}|{ANNOTATOR_AET}|")
    assert (row["verdict"], row["structures"], row["objects"]) == ("pass", 3, len(covered))
