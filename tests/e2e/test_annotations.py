"""Annotations end to end into ``lamina serve`` running as a subprocess, sent with DCMTK's
storescu as the annotators' own tools would: a SEG, and the Horos-pipeline overlay copies.

The PACS (a ``clinical`` peer) sends the phantom series, stored de-identified; the
annotators draw on the slices the node serves and push their work from their
workstation (an ``annotator`` peer). The same checks with pynetdicom as the
sender, in-process, are tests/test_annotations_service.py.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from pydicom import dcmread

from tests import annotation_fixtures as fx
from tests.harness import ProcessNode, require


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    require("storescu")
    config = fx.node_config(tmp_path_factory.mktemp("annotations-e2e") / "node",
                            settle_seconds=0.3)
    with ProcessNode(config) as process:
        fx.store_phantom(process)  # from the PACS
        yield process
    assert "Traceback" not in process.log()


@pytest.fixture(scope="module")
def served(node) -> fx.Served:
    """The series as the node serves it (stored de-identified): what annotators draw on."""
    return fx.served_by(node)


def storescu(node: ProcessNode, files: list[Path]) -> subprocess.CompletedProcess:
    """DCMTK's storescu on the annotators' workstation."""
    binary = require("storescu")
    return subprocess.run([binary, "-v", "-R", "-aet", fx.ANNOTATOR_AET, "-aec", "LAMINA",
                           "127.0.0.1", str(node.port), *map(str, files)],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "TCP_NODELAY": "1"})


def test_a_seg_sent_with_storescu_is_an_annotation(node, served, tmp_path) -> None:
    seg = fx.valid_seg(served)
    sent = storescu(node, fx.write(tmp_path / "seg", [seg]))
    assert sent.returncode == 0, sent.stderr
    assert fx.seg_annotation(node, seg)["verdict"] == "pass"


@pytest.fixture(scope="module")
def horos_set(node, served, tmp_path_factory) -> tuple[dict, subprocess.CompletedProcess, int]:
    """The three spheres as Horos-pipeline overlay copies, pushed with storescu."""
    copies = fx.rotating_overlays(fx.truth(), fx.LABELS, person="Reader^Horos", series=served)
    sent = storescu(node, fx.write(tmp_path_factory.mktemp("horos"), copies))
    row = fx.settled(node, f"overlay|{served.series_uid}|{fx.ANNOTATOR_AET}|Reader^Horos")
    return row, sent, len(copies)


def test_horos_overlay_copies_from_storescu_form_one_clean_annotation(node, horos_set) -> None:
    row, sent, count = horos_set
    assert sent.returncode == 0, sent.stderr
    assert (sent.stdout + sent.stderr).count("Received Store Response (Success)") == count
    assert (row["state"], row["verdict"], row["objects"], row["structures"]) == \
        ("checked", "pass", count, 3)
    run = node.cli("fsck")
    assert run.exit_code == 0, run.stdout
    assert "unreferenced" not in run.stdout  # overlay copies are referenced by their annotation


def test_overlay_copies_with_a_missing_slice_give_a_slice_gap(node, served, tmp_path) -> None:
    sent = storescu(node, fx.write(tmp_path / "gap", fx.overlay_gap_copies(served)))
    assert sent.returncode == 0, sent.stderr
    row = fx.settled(node, f"overlay|{served.series_uid}|{fx.ANNOTATOR_AET}|Reader^Gap")
    [found] = fx.findings(node, row["id"])
    assert (found["check"], found["structure_id"]) == ("slice-gap", "roi Nodule 2")
    assert [(s["slice"], s["position_mm"]) for s in found["slices"]] == [(15, -15.0)]


def test_the_seg_lamina_writes_passes_dciodvfy_and_comes_back_clean(node, horos_set,
                                                                     tmp_path) -> None:
    row, _, _ = horos_set
    out = tmp_path / "from-overlays.dcm"
    run = node.cli("annotations", "to-seg", str(row["id"]), "--out", str(out))
    assert run.exit_code == 0, run.stderr
    dciodvfy = subprocess.run([fx.tool("dciodvfy", "Debian package dicom3tools"), str(out)],
                              capture_output=True, text=True, timeout=120)
    assert not [line for line in (dciodvfy.stdout + dciodvfy.stderr).splitlines()
                if line.startswith("Error")]
    sent = storescu(node, [out])
    assert sent.returncode == 0, sent.stderr
    uid = dcmread(out, stop_before_pixels=True).SOPInstanceUID
    seg = fx.settled(node, f"seg|{uid}")
    assert (seg["verdict"], seg["structures"]) == ("pass", 3)
