"""Consistency checks: each defective structure gives exactly its finding; clean ones none.

The intake tests send SEGs drawn on the series the node serves (stored
de-identified from the PACS) from the annotator's workstation.
"""

from __future__ import annotations

import numpy as np
import pytest

from node.annotations.grid import SeriesGrid
from node.annotations.masks import Annotator, from_array
from node.checks.consistency import check_structures
from node.checks.protocol import Protocol, load_protocol
from tests import annotation_fixtures as fx

GRID = SeriesGrid.from_headers(fx.headers())


def _mask(array: np.ndarray, label: str, structure_id: str = "s"):
    return from_array(array, structure_id=structure_id, label=label, category=None, type=None,
                      annotator=Annotator("T"), source_series_uid=GRID.series_instance_uid,
                      provenance="0" * 64)


@pytest.fixture(scope="module")
def protocol(tmp_path_factory) -> Protocol:
    path = tmp_path_factory.mktemp("protocol") / "protocol.toml"
    path.write_text(fx.TEST_PROTOCOL)
    return load_protocol(path)


def test_the_phantom_spheres_have_no_finding(protocol) -> None:
    masks = [_mask(m, label, label) for m, label in zip(fx.truth(), fx.LABELS, strict=True)]
    summaries, findings = check_structures(masks, GRID, protocol)
    assert findings == []
    big = summaries[0]
    assert big.class_key == "nodule"
    assert big.volume_mm3 == pytest.approx(4 / 3 * np.pi * 20 ** 3, rel=0.05)
    assert big.max_diameter_mm == pytest.approx(40.0, abs=2 * 1.4)


def test_sphere_caps_are_not_diameter_jumps_but_a_spike_is() -> None:
    sphere = fx.truth()[0]  # r 20 mm on 2.5 mm slices: the cap grows ~10 mm in one slice
    _, findings = check_structures([_mask(sphere, "x")], GRID, Protocol())
    assert findings == []
    spiked = sphere.copy()
    spiked[20] = np.roll(sphere[20], 0) | np.pad(np.ones((60, 60), bool), ((98, 98), (98, 98)))
    _, findings = check_structures([_mask(spiked, "x")], GRID, Protocol())
    assert [(f.check, f.slices) for f in findings] == [("diameter-jump", (20,))]
    assert "3 mm" in findings[0].detail


def test_gap_is_reported_once_and_not_as_a_second_component() -> None:
    nodule = fx.truth()[2].copy()
    nodule[14] = False
    _, findings = check_structures([_mask(nodule, "x")], GRID, Protocol())
    assert [(f.check, f.slices) for f in findings] == [("slice-gap", (14,))]


def test_stray_component_names_its_slices_and_the_protocol_can_allow_it() -> None:
    nodule = fx.truth()[2].copy()
    nodule[20:22, 10:13, 10:13] = True
    _, findings = check_structures([_mask(nodule, "x")], GRID, Protocol())
    assert [(f.check, f.slices) for f in findings] == [("components", (20, 21))]
    _, findings = check_structures([_mask(nodule, "x")], GRID, Protocol(components=2))
    assert findings == []


def test_empty_structure() -> None:
    _, findings = check_structures([_mask(np.zeros(GRID.shape, bool), "x")], GRID, Protocol())
    assert [(f.check, f.slices) for f in findings] == [("empty", ())]


def test_overlap_only_between_exclusive_classes(protocol) -> None:
    t = fx.truth()
    shifted = np.roll(t[2], 3, axis=2)  # a second nodule half over the first
    _, findings = check_structures([_mask(t[2], "Nodule 2", "a"), _mask(shifted, "Nodule 3", "b")],
                                   GRID, protocol)
    assert [f.check for f in findings] == ["overlap"]
    assert findings[0].structure_id == "a" and "b" in findings[0].detail
    both = t[2] & shifted
    assert findings[0].slices == tuple(int(k) for k in np.flatnonzero(both.any(axis=(1, 2))))
    _, findings = check_structures([_mask(t[2], "Nodule 2", "a"), _mask(shifted, "Bone", "b")],
                                   GRID, protocol)
    assert findings == []


def test_unknown_labels_only_when_the_protocol_declares_classes(protocol) -> None:
    liver = _mask(fx.truth()[0], "Liver")
    assert [f.check for f in check_structures([liver], GRID, protocol)[1]] == ["unknown-label"]
    assert check_structures([liver], GRID, Protocol())[1] == []


def test_sizes_and_geometry_against_the_class(protocol) -> None:
    line = np.zeros(GRID.shape, bool)
    line[30:32, 200, 100:104] = True  # 39 mm³, 4.2 mm long
    assert [f.check for f in check_structures([_mask(line, "Nodule 3")], GRID, protocol)[1]] \
        == ["volume"]
    line[30:32, 200, 100:140] = True  # 54.6 mm long
    found = check_structures([_mask(line, "Nodule 3")], GRID, protocol)[1]
    assert [(f.check, f.slices) for f in found] == [("diameter", (30,))]
    flat = np.zeros(GRID.shape, bool)
    flat[14] = fx.truth()[2][14]
    assert [f.check for f in check_structures([_mask(flat, "Nodule 3")], GRID, protocol)[1]] \
        == ["geometry"]


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    context = fx.open_node(tmp_path_factory.mktemp("consistency"))
    yield context
    context.close()


def test_the_catalogue_has_one_variant_per_consistency_check() -> None:
    assert tuple(sorted(fx.seg_finding_variants())) == fx.FINDING_CHECKS


@pytest.fixture(scope="module")
def served(ctx) -> fx.Served:
    return fx.served(ctx)


@pytest.mark.parametrize("check", fx.FINDING_CHECKS)
def test_each_defective_seg_is_stored_with_exactly_its_finding(ctx, served, check: str) -> None:
    seg = fx.seg_finding_variants(served)[check]
    result = fx.ingest(ctx, seg)
    assert result.outcome.status.code == 0x0000
    annotation = fx.annotation_of(ctx, str(seg.SOPInstanceUID))
    findings = fx.current_findings(ctx, annotation)
    assert [f["check"] for f in findings] == [check]
    if check != "empty":
        assert findings[0]["slices"], "a finding names its slices"
        assert all("position_mm" in s and "sop_instance_uid" in s for s in findings[0]["slices"])
