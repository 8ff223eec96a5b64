"""Series geometry and completeness: node.checks.geometry and the series service."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import pytest
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import dcmwrite

from node.checks.geometry import InstanceGeometry, analyse_series
from node.config import Settings, ValidationSettings
from node.context import NodeContext
from node.ingest.types import Source
from node.phantom import Phantom
from tests.harness import write_config

SPACING = 2.5  # the phantom's slice spacing; z of slice i is -50 + 2.5 i


def phantom(count: int, **kwargs) -> Phantom:
    return Phantom(seed="geometry", slices_count=count, rows=16, columns=16, **kwargs)


def rows_of(ph: Phantom, indices) -> list[tuple[str, int, InstanceGeometry]]:
    return [(ph.sop_uid(i), i + 1, InstanceGeometry.from_dataset(ph.slice(i))) for i in indices]


def rules(report) -> list[str]:
    return [f.rule for f in report.findings]


def test_clean_series_has_no_findings_and_a_regular_grid():
    ph = phantom(40)
    report = analyse_series(rows_of(ph, range(40))[::-1])  # arrival order must not matter
    assert report.findings == []
    grid = report.geometry
    assert grid.regular and grid.size == (40, 16, 16)
    assert grid.spacing == pytest.approx((SPACING, 0.7, 0.7))
    # highdicom's right-handed stacking: slice axis runs against the normal (+z here),
    # so index 0 is the top slice and the origin is its ImagePositionPatient.
    assert grid.instances[0] == ph.sop_uid(39) and grid.instances[-1] == ph.sop_uid(0)
    assert grid.origin == pytest.approx((-179.2, -179.2, ph.z_of(39)))
    affine = np.array(grid.affine)
    assert affine @ [39, 0, 0, 1] == pytest.approx([-179.2, -179.2, ph.z_of(0), 1])


def test_missing_slice_is_reported_with_the_positions_around_the_gap():
    ph = phantom(20)
    report = analyse_series(rows_of(ph, [i for i in range(20) if i not in (7, 8)]))
    assert rules(report) == ["missing_slice"]
    finding = report.findings[0]
    assert finding.positions == (ph.z_of(6), ph.z_of(9))
    assert "gap of 7.5 mm between -35 and -27.5 mm" in finding.message
    assert "about 2 slices missing" in finding.message
    assert not report.geometry.regular


def test_duplicate_slice_names_its_position_and_instance_numbers():
    ph = phantom(10)
    rows = rows_of(ph, range(10))
    _, _, geometry = rows[4]
    rows.append(("1.2.3.4.5", 99, geometry))  # another instance at slice 4's position
    report = analyse_series(rows)
    assert rules(report) == ["duplicate_slice"]
    assert report.findings[0].positions == (ph.z_of(4),)
    assert "at position -40 mm (InstanceNumber 5, 99)" in report.findings[0].message


def test_uneven_spacing_names_the_odd_intervals():
    ph = phantom(12)
    rows = rows_of(ph, range(12))
    uid, number, g = rows[6]
    moved = dataclasses.replace(g, image_position_patient=f"-179.2\\-179.2\\{ph.z_of(6) + 0.6:g}")
    rows[6] = (uid, number, moved)
    report = analyse_series(rows)
    assert rules(report) == ["uneven_spacing"]
    assert report.findings[0].positions == pytest.approx(
        (ph.z_of(5), ph.z_of(6) + 0.6, ph.z_of(7)))
    assert "3.1 mm from -37.5 to -34.4" in report.findings[0].message


def test_mixed_frame_of_reference_names_the_odd_slices():
    ph = phantom(10)
    rows = rows_of(ph, range(10))
    for i in (2, 3):
        uid, number, g = rows[i]
        rows[i] = (uid, number, dataclasses.replace(g, frame_of_reference_uid="1.2.3"))
    report = analyse_series(rows)
    assert rules(report) == ["mixed_frame_of_reference"]
    assert report.findings[0].positions == (ph.z_of(2), ph.z_of(3))
    assert "2 of 10 slices differ from the rest, at -45, -42.5 mm" in report.findings[0].message


def test_mixed_orientation_matrix_and_pixel_spacing():
    ph = phantom(6)
    rows = rows_of(ph, range(6))
    uid, number, g = rows[5]
    rows[5] = (uid, number, dataclasses.replace(
        g, image_orientation_patient="1\\0\\0\\0\\0\\-1", rows=32, pixel_spacing="0.5\\0.5"))
    report = analyse_series(rows)
    assert set(rules(report)) >= {"mixed_orientation", "mixed_matrix", "mixed_pixel_spacing"}
    mixed = [f for f in report.findings if f.rule.startswith("mixed_")]
    assert all(f.positions == (ph.z_of(5),) for f in mixed)


def test_gantry_tilt_is_reported_with_its_angle():
    ph = phantom(10)
    rows = []
    for uid, number, g in rows_of(ph, range(10)):
        x, y, z = (float(v) for v in g.image_position_patient.split("\\"))
        shifted = f"{x:g}\\{y + (z + 50) * np.tan(np.radians(15)):.4f}\\{z:g}"
        rows.append((uid, number, dataclasses.replace(g, image_position_patient=shifted)))
    report = analyse_series(rows)
    assert rules(report) == ["gantry_tilt"]
    assert "15.00 degrees" in report.findings[0].message
    assert report.findings[0].positions == (ph.z_of(0), ph.z_of(9))


def test_count_differs_from_number_of_series_related_instances_and_images_in_acquisition():
    ph = phantom(5)
    rows = [(u, n, dataclasses.replace(g, number_of_series_related_instances=6,
                                       images_in_acquisition=7))
            for u, n, g in rows_of(ph, range(5))]
    messages = [f.message for f in analyse_series(rows).findings]
    assert messages == [
        "received 5 instances, NumberOfSeriesRelatedInstances (0020,1209) says 6",
        "received 5 images of acquisition 1, ImagesInAcquisition (0020,1002) says 7",
    ]


def test_series_without_slice_geometry_gets_no_grid():
    g = InstanceGeometry(None, None, None, None, None, None, None, None, None, None)
    report = analyse_series([("1.2.3", 1, g), ("1.2.4", 2, g)])
    assert report.findings == [] and report.geometry is None


# --- the service, over the real ingest pipeline --------------------------------


@pytest.fixture
def ctx(tmp_path: Path):
    settings = write_config(tmp_path, validation={"quiet_period": 0.5}).settings()
    assert settings.validation == ValidationSettings(quiet_period=0.5)
    context = NodeContext.open(settings, with_key=True)
    yield context
    context.close()


def encoded(ds) -> bytes:
    buffer = DicomBytesIO()
    dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def ingest(ctx: NodeContext, ph: Phantom, indices) -> None:
    source = Source("TESTSCU", "127.0.0.1", "test")
    for i in indices:
        assert ctx.ingest.ingest_bytes(encoded(ph.slice(i)), source).action == "stored"


def series_state_row(ctx: NodeContext) -> str:
    with ctx.index.connection() as conn:
        return conn.execute("SELECT state FROM series_state").fetchone()[0]


def test_slices_arriving_together_keep_their_series_time_and_the_quiet_period_is_never_shorter(
        ctx: NodeContext):
    """A receiving series' time is rewritten only when it is older than the checker's
    resolution (a tenth of the quiet period here); the sweep allows for that, so a series
    is checked no earlier than a quiet period after its newest instance."""
    ph = phantom(2)
    ingest(ctx, ph, range(1))
    uid = ctx.key.uid(ph.series_uid)
    quiet, resolution = ctx.series.settings.quiet_period, ctx.series.resolution
    assert resolution == quiet / 10
    t0 = time.time() + 100  # ahead of the ingest's own mark
    newest = t0 + resolution / 2
    with ctx.index.transaction() as tx:
        tx.series.mark_receiving(uid, t0, resolution)
        tx.series.mark_receiving(uid, newest, resolution)  # within the resolution: kept
    with ctx.index.connection() as conn:
        assert conn.execute("SELECT last_received FROM series_state").fetchone()[0] == t0
    assert ctx.series.sweep(now=newest + quiet - resolution / 10) == []
    assert [s.state for s in ctx.series.sweep(now=newest + quiet + resolution)] == ["complete"]
    with ctx.index.transaction() as tx:  # checked: the next instance restarts it at once
        tx.series.mark_receiving(uid, newest + 0.01, resolution)
    assert series_state_row(ctx) == "receiving"
    with ctx.index.connection() as conn:
        assert conn.execute("SELECT last_received FROM series_state").fetchone()[0] == newest + 0.01


def test_clean_300_slice_series_becomes_complete_after_the_quiet_period(ctx: NodeContext):
    ph = phantom(300)
    ingest(ctx, ph, range(300))
    assert series_state_row(ctx) == "receiving"
    assert ctx.series.sweep(now=time.time() - 10) == []  # quiet period not over yet
    checked = ctx.series.sweep(now=time.time() + 1)
    assert [s.state for s in checked] == ["complete"]
    stored = ctx.series.state(ctx.key.uid(ph.series_uid))
    assert stored.state == "complete" and stored.instances == 300 and stored.findings == ()
    assert stored.geometry.size == (300, 16, 16) and stored.geometry.regular
    assert stored.geometry.instances[0] == ctx.key.uid(ph.sop_uid(299))
    with ctx.index.connection() as conn:
        events = [json.loads(o) for (o,) in conn.execute(
            "SELECT object FROM audit_event WHERE action = 'series.complete'")]
    assert events and events[0]["instances"] == 300 and events[0]["trigger"] == "quiet-period"


def test_incomplete_series_goes_back_to_receiving_and_completes_when_the_gap_fills(ctx):
    ph = phantom(10)
    ingest(ctx, ph, [i for i in range(10) if i != 4])
    state = ctx.series.check(ctx.key.uid(ph.series_uid))
    assert state.state == "incomplete"
    assert [(f.rule, f.positions, sev) for f, sev in state.findings] == [
        ("missing_slice", (ph.z_of(3), ph.z_of(5)), "reject")]
    ingest(ctx, ph, [4])
    assert series_state_row(ctx) == "receiving"
    assert ctx.series.check(ctx.key.uid(ph.series_uid)).state == "complete"
    with ctx.index.connection() as conn:
        actions = [a for (a,) in conn.execute(
            "SELECT action FROM audit_event WHERE action LIKE 'series.%' ORDER BY seq")]
        checks = conn.execute("SELECT count(*) FROM series_check").fetchone()[0]
    assert actions == ["series.incomplete", "series.complete"]
    assert checks == 2  # the first run is kept, not overwritten


def test_warn_rule_leaves_the_series_complete_with_the_finding(tmp_path: Path, ctx):
    warn = dataclasses.replace(ctx.settings.validation,
                               rules={**ctx.settings.validation.rules, "missing_slice": "warn"})
    ctx.series.settings = warn
    ph = phantom(8)
    ingest(ctx, ph, [0, 1, 2, 5, 6, 7])
    state = ctx.series.check(ctx.key.uid(ph.series_uid))
    assert state.state == "complete"
    assert [(f.rule, sev) for f, sev in state.findings] == [("missing_slice", "warn")]


def test_check_of_unknown_series_is_none(ctx: NodeContext):
    assert ctx.series.check("1.2.3.4") is None


def test_settings_default_quiet_period_is_ten_seconds():
    assert Settings().validation.quiet_period == 10.0
