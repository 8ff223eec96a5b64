"""The AE helpers: presentation-context batching."""

from __future__ import annotations

from pathlib import Path

from pydicom.uid import ExplicitVRLittleEndian

from node.dimse.ae import context_batches
from node.storage.query import StoredInstance


def test_context_batches_stay_within_128_contexts():
    items = [(StoredInstance(f"1.2.{i % 200}", f"9.{i}", ExplicitVRLittleEndian, "0" * 64),
              Path("x")) for i in range(400)]
    batches = list(context_batches(items, lambda i: (i[0].sop_class_uid,
                                                     i[0].transfer_syntax_uid)))
    assert [len({i.sop_class_uid for i, _ in b}) for b in batches] == [128, 128, 128, 16]
    assert [i for b in batches for i in b] == items  # order kept, nothing lost
