"""The AE helpers: presentation-context batching."""

from __future__ import annotations

from pathlib import Path

from pydicom.uid import ExplicitVRLittleEndian

from node.dimse.ae import context_batches
from node.storage.query import StoredInstance


def test_context_batches_stay_within_128_contexts():
    items = [(StoredInstance(f"1.2.{i % 200}", f"9.{i}", ExplicitVRLittleEndian, "0" * 64),
              Path("x")) for i in range(400)]
    batches = list(context_batches(items, lambda i: [(i[0].sop_class_uid,
                                                      i[0].transfer_syntax_uid)]))
    assert [len({i.sop_class_uid for i, _ in b}) for b in batches] == [128, 128, 128, 16]
    assert [i for b in batches for i in b] == items  # order kept, nothing lost


def test_context_batches_count_every_syntax_an_item_is_offered_in():
    """The sender offers each SOP class in its stored syntax and two uncompressed ones."""
    items = [f"1.2.{i}" for i in range(100)]
    batches = list(context_batches(items, lambda uid: [(uid, s) for s in ("a", "b", "c")]))
    assert [len(b) for b in batches] == [42, 42, 16]  # 42 × 3 = 126 contexts ≤ 128
    assert [i for b in batches for i in b] == items
    shared = list(context_batches(items, lambda uid: [("1.2", "a"), (uid, "b")]))
    assert [len(b) for b in shared] == [100]  # ("1.2", "a") counted once per batch
