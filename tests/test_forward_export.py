"""``lamina export``: approved annotations as nnU-Net v2 / MONAI NIfTI, read back with
SimpleITK: the series grid's geometry, the approved masks' voxels, the split by patient."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace

import numpy as np
import pytest
import SimpleITK as sitk
from pydicom import dcmread
from pydicom.pixels import apply_rescale

from node.context import NodeContext
from node.forward.export import split_patients
from tests import annotation_fixtures as fx
from tests.forward_fixtures import approve, audit, build_template, config
from tests.harness import lamina
from tests.review_fixtures import ADMIN, PASSPHRASE, REVIEWER

SECOND = replace(fx.PHANTOM, seed="annotations-second", patient_id="SYN-0002",
                 patient_name="PHANTOM^SECOND")
LABELS = {"background": 0, "nodule": 1, "bone": 2, "vessel": 3}  # TEST_PROTOCOL's order


def served(ctx: NodeContext, phantom) -> fx.Served:
    with ctx.index.reader() as r:
        shas = [sha for _, sha in r.instances.series_members(ctx.key.uid(phantom.series_uid))]
    return fx.Served([dcmread(ctx.blobs.open(sha)) for sha in shas])


def expected_labels() -> np.ndarray:
    """The valid SEG's spheres as the export labels them: nodules 1, bone 2."""
    out = np.zeros(fx.truth()[0].shape, dtype=np.uint8)
    for mask, value in zip(fx.truth(), (1, 2, 1), strict=True):
        out[mask] = value
    return out


@pytest.fixture(scope="module")
def node(tmp_path_factory) -> dict:
    """Patient A: two approved SEGs; patient B: one approved SEG and one only checked."""
    template = build_template(tmp_path_factory.mktemp("export") / "node")
    cfg = config(template.root, 1)
    ctx = NodeContext.open(cfg.settings(), with_key=True)
    try:
        ids = {"a1": template.annotation_id}
        second_a = fx.valid_seg(fx.served(ctx))
        fx.ingest(ctx, second_a)
        ids["a2"] = fx.annotation_of(ctx, str(second_a.SOPInstanceUID))
        for k in range(SECOND.slices_count):
            assert fx.ingest(ctx, SECOND.slice(k), fx.PACS).action == "stored"
        series_b = served(ctx, SECOND)
        for name in ("b1", "b_unapproved"):
            seg = fx.valid_seg(series_b)
            fx.ingest(ctx, seg)
            ids[name] = fx.annotation_of(ctx, str(seg.SOPInstanceUID))
        for name in ("a1", "a2"):
            approve(ctx, ids[name])
        # b1 is approved with an electronic signature, as a reviewer does.
        ctx.review.users.add("rad1", "Ann Radiologist", PASSPHRASE, ADMIN)
        ctx.review.decide(ids["b1"], "approve", "rad1", PASSPHRASE, "approved", REVIEWER)
        with ctx.index.reader() as r:
            [signed] = r.signatures.list(ids["b1"])
        grid = ctx.annotations.grid(fx.served(ctx).series_uid)
    finally:
        ctx.close()
    return {"config": cfg, "ids": ids, "grid": grid,
            "signature": hashlib.sha256(signed.manifest.encode() + signed.signature).hexdigest()}


def test_nnunet_export_has_the_grid_the_masks_and_a_split_by_patient(node, tmp_path) -> None:
    out = tmp_path / "Dataset001_Lamina"
    run = lamina("export", str(out), "--format", "nnunet", "--split", "0.5",
                 config=node["config"])
    assert run.exit_code == 0, run.output
    assert "exported 3 case(s) (" in run.stdout
    dataset = json.loads((out / "dataset.json").read_text())
    assert dataset["labels"] == LABELS and dataset["channel_names"] == {"0": "CT"}
    assert dataset["file_ending"] == ".nii.gz"
    manifest = json.loads((out / "manifest.json").read_text())
    cases = {c["annotation_id"]: c for c in manifest["cases"]}
    ids = node["ids"]
    assert set(cases) == {ids["a1"], ids["a2"], ids["b1"]}  # approved only
    assert dataset["numTraining"] == sum(c["split"] == "train" for c in cases.values())
    sides = {side: {c["patient"] for c in cases.values() if c["split"] == side}
             for side in ("train", "test")}
    assert sides["train"] and sides["test"] and not sides["train"] & sides["test"]
    assert cases[ids["a1"]]["split"] == cases[ids["a2"]]["split"]  # one patient, one side
    # Traceable to the signed approval (a state moved without a signature has none).
    assert cases[ids["b1"]]["signatures"] == [node["signature"]]
    assert cases[ids["a1"]]["signatures"] == []
    grid = node["grid"]
    for case in cases.values():
        assert case["approval"] and case["objects"]  # traceable to its approval and bytes
        folder = "Ts" if case["split"] == "test" else "Tr"
        assert case["image"] == f"images{folder}/{case['case_id']}_0000.nii.gz"
        image = sitk.ReadImage(str(out / case["image"]))
        label = sitk.ReadImage(str(out / case["label"]))
        for read in (image, label):
            assert read.GetSpacing() == pytest.approx(grid.spacing)
            assert read.GetOrigin() == pytest.approx(grid.origin)
            assert read.GetDirection() == pytest.approx(grid.direction)
        assert np.array_equal(sitk.GetArrayFromImage(label), expected_labels())
    a1 = sitk.GetArrayFromImage(sitk.ReadImage(str(out / cases[ids["a1"]]["image"])))
    k = 20
    ct = fx.PHANTOM.slice(k)
    assert np.array_equal(a1[k], apply_rescale(ct.pixel_array, ct))  # HU, as stored
    [event] = audit_events(node, "export.training")
    assert event["cases"] == 3 and sorted(event["annotations"]) == sorted(cases)


def audit_events(node, prefix: str) -> list[dict]:
    ctx = NodeContext.open(node["config"].settings())
    try:
        return audit(ctx, prefix)
    finally:
        ctx.close()


def test_the_split_is_deterministic_and_nifti_pairs_have_a_datalist(node, tmp_path) -> None:
    runs = []
    for name in ("first", "second"):
        run = lamina("export", str(tmp_path / name), "--format", "nifti", "--split", "0.5",
                     config=node["config"])
        assert run.exit_code == 0, run.output
        runs.append(json.loads((tmp_path / name / "datalist.json").read_text()))
    assert runs[0]["training"] == runs[1]["training"] and runs[0]["test"] == runs[1]["test"]
    first = runs[0]
    assert len(first["training"]) + len(first["test"]) == 3 and first["labels"] == LABELS
    for pair in first["training"] + first["test"]:
        assert (tmp_path / "first" / pair["image"]).is_file()
        assert pair["label"].startswith("labels/")


def test_split_patients_holds_out_whole_patients_by_fraction() -> None:
    patients = {f"LAMINA-{i}" for i in range(10)}
    held = split_patients(patients, 0.3)
    assert len(held) == 3 and held == split_patients(set(sorted(patients)), 0.3)
    assert split_patients(patients, 0.0) == set()


def test_bad_exports_are_one_line_and_exit_2(node, tmp_path) -> None:
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    run = lamina("export", str(tmp_path / "full"), config=node["config"])
    assert run.exit_code == 2 and "is not an empty folder" in run.stderr
    run = lamina("export", str(tmp_path / "o"), "--split", "1.5", config=node["config"])
    assert run.exit_code == 2
    empty = build_template(tmp_path / "none")  # nothing approved
    run = lamina("export", str(tmp_path / "o"), config=config(empty.root, 1))
    assert run.exit_code == 2 and "no annotation is approved" in run.stderr
    assert not (tmp_path / "o").exists()
