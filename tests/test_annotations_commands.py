"""``lamina annotations | overlays | import-labels`` against an in-process node's data folder.

The series is stored de-identified from the PACS; annotations are drawn on the
served slices and sent from the annotator's workstation.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
from pydicom import dcmread

from tests import annotation_fixtures as fx
from tests import harness


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    ctx = fx.open_node(folder)
    yield ctx, folder / "node.toml"
    ctx.close()


@pytest.fixture(scope="module")
def served(node) -> fx.Served:
    return fx.served(node[0])


def lamina(config, *args: str):
    return harness.lamina(*args, config=config)


def test_list_and_show_name_findings_with_slice_positions(node, served) -> None:
    ctx, config = node
    seg = fx.seg_finding_variants(served)["slice-gap"]
    fx.ingest(ctx, seg)
    annotation = fx.annotation_of(ctx, str(seg.SOPInstanceUID))
    listed = lamina(config, "annotations", "list", "--json")
    assert listed.exit_code == 0, listed.output
    rows = {r["id"]: r for r in map(json.loads, listed.output.splitlines())}
    assert (rows[annotation]["state"], rows[annotation]["verdict"],
            rows[annotation]["findings"]) == ("checked", "findings", 1)
    shown = lamina(config, "annotations", "show", str(annotation))
    assert shown.exit_code == 0, shown.output
    assert "slice-gap" in shown.output and "slice 15 (-15.00 mm)" in shown.output
    assert "segment 1 'Nodule 2'" in shown.output
    assert "review window lung -600/1500" in shown.output
    report = json.loads(lamina(config, "annotations", "show", str(annotation), "--json").output)
    assert report["findings"][0]["slices"][0]["position_mm"] == -15.0
    assert report["structures"][0]["class_key"] == "nodule"
    assert lamina(config, "annotations", "show", "999").exit_code == 2


def test_check_again_exits_1_on_findings_and_keeps_the_history(node, served) -> None:
    ctx, config = node
    seg = fx.seg_finding_variants(served)["components"]
    fx.ingest(ctx, seg)
    annotation = fx.annotation_of(ctx, str(seg.SOPInstanceUID))
    result = lamina(config, "annotations", "check", str(annotation))
    assert result.exit_code == 1 and "components" in result.output
    with ctx.index.connection() as conn:
        checks = conn.execute("SELECT COUNT(*) FROM annotation_check WHERE annotation_fk = ?",
                              (annotation,)).fetchone()[0]
    assert checks == 2


def test_show_lists_refused_objects_with_their_reason(node, served) -> None:
    ctx, config = node
    copy_ = fx.overlay_refusal_variants(served)["overlay-size"]
    fx.ingest(ctx, copy_)
    annotation = fx.annotation_of(ctx, str(copy_.SOPInstanceUID))
    shown = lamina(config, "annotations", "show", str(annotation))
    assert "refused (1)" in shown.output and "overlay-size: group 6000 is 512x512" in shown.output
    assert "refused" in lamina(config, "annotations", "list", "--state", "refused").output


def test_overlays_from_a_seg_file_and_to_seg_of_an_overlay_set(node, served, tmp_path) -> None:
    ctx, config = node
    seg_path = tmp_path / "seg.dcm"
    fx.valid_seg(served).save_as(seg_path, enforce_file_format=True)
    out = tmp_path / "copies"
    result = lamina(config, "overlays", str(seg_path), "--series", served.series_uid,
                    "--out", str(out))
    assert result.exit_code == 0, result.output
    files = sorted(out.glob("OV*.dcm"))
    covered = sorted({int(k) for m in fx.truth() for k in np.flatnonzero(m.any(axis=(1, 2)))})
    assert [int(f.stem[2:]) - 1 for f in files] == covered
    first = dcmread(files[0])
    assert first.SOPInstanceUID == served.sop_uid(covered[0])
    assert float(first.WindowCenter) == -600  # "Nodule 1" is reviewed in the lung window
    for f in files:
        ds = dcmread(f)
        ds.OperatorsName = "Reader^Cli"
        assert fx.ingest(ctx, ds).action == "annotation"
    annotation = fx.annotation_of(ctx, str(first.SOPInstanceUID))
    seg_out = tmp_path / "set.dcm"
    result = lamina(config, "annotations", "to-seg", str(annotation), "--out", str(seg_out))
    assert result.exit_code == 0, result.output
    written = dcmread(seg_out)
    assert sorted(s.SegmentLabel for s in written.SegmentSequence) == sorted(fx.LABELS)
    assert written.ContentCreatorName == "Reader^Cli"


def test_import_labels_stores_a_checked_seg(node, served, tmp_path) -> None:
    ctx, config = node
    grid = ctx.annotations.grid(served.series_uid)
    labels = np.zeros(grid.shape, dtype=np.uint8)
    for i, m in enumerate(fx.truth()):
        labels[m] = i + 1
    path = tmp_path / "labels.nii.gz"
    sitk.WriteImage(grid.to_image(labels), str(path))
    result = lamina(config, "import-labels", str(path), "--series", served.series_uid,
                    "--label", "1=Nodule 1", "--label", "2=Bone", "--label", "3=Nodule 2",
                    "--creator", "Reader^Itksnap", "--store")
    assert result.exit_code == 0, result.output
    assert "stored: 0x0000 annotation" in result.output
    bad = lamina(config, "import-labels", str(path), "--series", served.series_uid,
                 "--label", "one=Nodule", "--store")
    assert bad.exit_code == 2 and "VALUE=NAME" in bad.output
    with ctx.index.connection() as conn:
        actions = [r[0] for r in conn.execute("SELECT action FROM audit_event ORDER BY seq")]
    assert "annotation.imported" in actions and "annotation.exported" in actions
    assert ctx.audit.verify().ok
