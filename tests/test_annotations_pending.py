"""Annotations that arrive before their images (issue 16 §5): a PACS forwarding a study that
holds a SEG sends its objects in any order, often in one association.

Over real associations into a node in this process: the PACS (a ``clinical`` peer)
sends a study with its SEG first, between its slices, and last (one association
each); every object is answered 0x0000 and the SEG is checked once its series is
there. A SEG whose series never comes is refused after the configured wait (the
annotation service's own test, tests/test_annotations_service.py, covers that for
both "not stored" checks).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from pydicom.dataset import Dataset

from node.phantom import Phantom
from tests import annotation_fixtures as fx
from tests.harness import InProcessNode

#: Where the SEG goes among its study's slices.
ORDERS: dict[str, Callable[[list[Dataset], Dataset], list[Dataset]]] = {
    "first": lambda slices, seg: [seg, *slices],
    "interleaved": lambda slices, seg: [*slices[:15], seg, *slices[15:]],
    "last": lambda slices, seg: [*slices, seg],
}
PENDING_SECONDS = 2.0


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    config = fx.node_config(tmp_path_factory.mktemp("pending") / "node", settle_seconds=0.3,
                            pending_seconds=PENDING_SECONDS)
    with InProcessNode(config) as running:
        yield running
    assert "Traceback" not in running.log()


def study(name: str) -> Phantom:
    """A study of its own per test, on the fixtures' grid (so their masks fit)."""
    p = fx.PHANTOM
    return Phantom(seed=f"pending-{name}", slices_count=p.slices_count, rows=p.rows,
                   columns=p.columns, pixel_spacing=p.pixel_spacing)


def transitions(node: InProcessNode, annotation_id: int) -> list[tuple[str, str]]:
    """The state machine's moves of one annotation, in order (from, to)."""
    return [(e["object"]["from"], e["object"]["to"]) for e in node.audit_events("annotation.")
            if e["object"].get("annotation_id") == annotation_id and "from" in e["object"]]


@pytest.mark.parametrize("order", ORDERS)
def test_a_seg_sent_before_between_or_after_its_series_is_checked(node, order: str) -> None:
    phantom = study(order)
    seg = fx.valid_seg(phantom)
    slices = [phantom.slice(k) for k in range(phantom.slices_count)]
    sent = ORDERS[order](slices, seg)
    assert node.store(sent) == [(0, "")] * len(sent)  # one association, every object 0x0000
    key = f"seg|{node.project_key().uid(seg.SOPInstanceUID)}"
    row = fx.in_state(node, key, "checked")
    assert (row["state"], row["verdict"], row["structures"], row["refused"]) == \
        ("checked", "pass", 3, 0)
    assert row["source_series_uid"] == node.project_key().uid(phantom.series_uid)
    moves = transitions(node, row["id"])
    if order == "last":
        assert moves == [("received", "checked")]
    else:
        assert moves == [("received", "pending"), ("pending", "checked")]
    assert node.rows("SELECT count(*) FROM quarantine") == [(0,)]


def test_a_pending_seg_whose_series_never_comes_is_refused_after_the_wait(node) -> None:
    phantom = study("never")
    seg = fx.valid_seg(phantom)
    assert node.store([seg]) == [(0, "")]
    key = f"seg|{node.project_key().uid(seg.SOPInstanceUID)}"
    assert fx.annotations(node)[key]["state"] == "pending"
    pending = node.cli("annotations", "list", "--state", "pending")
    assert "(series: referenced series is not stored)" in pending.stdout
    row = fx.in_state(node, key, "refused", timeout=PENDING_SECONDS + 20)
    assert row["state"] == "refused"
    assert row["state_reason"].startswith("series: referenced series is not stored; not stored"
                                          " after ")
    assert transitions(node, row["id"])[-1] == ("pending", "refused")
    shown = node.cli("annotations", "show", str(row["id"]))
    assert "0 accepted, 1 refused" in shown.stdout
    run = node.cli("audit", "verify")
    assert run.exit_code == 0, run.output


def test_overlay_copies_sent_before_their_slices_wait_and_are_checked(tmp_path) -> None:
    """An annotator's Horos-style overlay copies, drawn on the study as the PACS holds it,
    reach the node before the PACS forwards the study: they are de-identified with the
    same keyed pseudonyms the study will get, stored pending (0x0000, not as images), and
    checked once the slices are stored."""
    phantom = study("early-overlays")
    # Overlay labels survive de-identification when they are project vocabulary.
    config = fx.node_config(tmp_path / "node", settle_seconds=0.3,
                            pending_seconds=PENDING_SECONDS * 30,
                            deidentify={"safe_descriptors": fx.LABELS})
    with InProcessNode(config) as node:
        copies = fx.rotating_overlays(fx.truth(), fx.LABELS, person="Reader^Early",
                                      series=phantom)
        assert fx.send(node, copies) == [(0, "")] * len(copies)
        series_uid = node.project_key().uid(phantom.series_uid)
        node.drain()
        [row] = [r for r in fx.annotations(node).values() if r["kind"] == "overlay"]
        assert (row["state"], row["objects"], row["source_series_uid"]) == \
            ("pending", len(copies), series_uid)
        assert row["state_reason"].startswith("instances: ")
        assert node.rows("SELECT count(*) FROM instance") == [(0,)]  # not stored as images
        slices = [phantom.slice(k) for k in range(phantom.slices_count)]
        assert node.store(slices) == [(0, "")] * len(slices)  # the PACS, clinical route
        row = fx.in_state(node, row["key"], "checked")
        assert (row["state"], row["verdict"], row["structures"], row["objects"]) == \
            ("checked", "pass", 3, len(copies))
        assert transitions(node, row["id"]) == [("received", "pending"),
                                                ("pending", "checked")]
        assert node.rows("SELECT count(*) FROM instance") == [(len(slices),)]
    assert "Traceback" not in node.log()
