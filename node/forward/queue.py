"""The outbox: what approval queues for forwarding, and what operators do with the queue.

:class:`Outbox` listens to the annotation state machine
(:mod:`node.annotations.states`): when an annotation becomes ``approved`` it
writes one row per (object, destination) for every matching rule, inside the
approval's own transaction, so an approval and its forwards commit or roll
back together. Nothing else queues rows: only approved annotations (and the
source series a rule names) can leave. A SEG is sent as it was received; an
overlay annotation (Horos/OsiriX copies) is sent as a SEG made from its masks
when its first row is sent, kept in the blob store and reused for every
destination and retry, so that a resend is byte-identical. The rows live behind the storage
interface (``tx.outbox``); :mod:`node.forward.worker` sends them.

Operators list, show, retry and cancel rows (``lamina queue ...``); each
change is audited in the transaction that makes it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from pydicom.uid import SegmentationStorage

from node.annotations.states import AnnotationState, Transition
from node.audit.trail import Actor, AuditTrail, utc_now
from node.forward.rules import ForwardSettings
from node.storage.interface import Index, Transaction
from node.storage.records import Row

#: Row states, in the order reports show them.
STATES = ("queued", "failed", "sent", "dead", "cancelled", "refused")


def placeholder_uid(annotation_id: int) -> str:
    """What a row for a SEG not yet made is keyed by (one per annotation and destination)."""
    return f"annotation-{annotation_id}-seg"


class QueueError(ValueError):
    """An operator's request the queue cannot carry out (unknown row, wrong state)."""


@dataclass(frozen=True)
class Queued:
    """What one rule queued for one approval."""

    rule: str
    destination: str
    mode: str
    seg: int
    source: int


class Outbox:
    """The approval listener and the operators' view of the forwarding queue."""

    def __init__(self, index: Index, audit: AuditTrail, settings: ForwardSettings) -> None:
        self.index = index
        self.audit = audit
        self.settings = settings

    # --- the listener ----------------------------------------------------------------

    def on_transition(self, tx: Transaction, transition: Transition) -> None:
        """On approval, queue what each matching rule sends (in the approval's transaction)."""
        if transition.after is not AnnotationState.APPROVED or not self.settings.rules:
            return
        annotation_id = transition.annotation_id
        row = tx.annotations.get(annotation_id)
        if row is None:  # the state machine has just moved it: cannot happen
            raise RuntimeError(f"annotation {annotation_id} vanished during its approval")
        classes = tx.outbox.annotation_classes(annotation_id)
        now, at = utc_now(), time.time()
        queued = []
        for rule in self.settings.rules:
            if not rule.applies_to(classes):
                continue
            if row["kind"] == "seg":
                seg = tx.outbox.enqueue_annotation(annotation_id, rule.name, rule.destination,
                                                   rule.mode, now, at)
            else:  # overlay copies: their SEG is made (once) when first sent
                seg = tx.outbox.enqueue_to_build(annotation_id, placeholder_uid(annotation_id),
                                                 SegmentationStorage, rule.name,
                                                 rule.destination, rule.mode, now, at)
            source = 0
            if rule.source_series and row["source_series_uid"]:
                source = tx.outbox.enqueue_series(annotation_id, row["source_series_uid"],
                                                  rule.name, rule.destination, rule.mode, now,
                                                  at)
            queued.append(Queued(rule.name, rule.destination, rule.mode, seg, source))
        if queued:
            self.audit.append(tx, "forward.queued", transition.actor, {
                "annotation_id": annotation_id, "queued": [q.__dict__ for q in queued]})

    # --- operators -------------------------------------------------------------------

    def list(self, state: str | None = None, destination: str | None = None,
             annotation_id: int | None = None) -> list[Row]:
        if state is not None and state not in STATES:
            raise QueueError(f"unknown state {state!r} (known: {', '.join(STATES)})")
        with self.index.reader() as r:
            return r.outbox.list(state, destination, annotation_id)

    def show(self, item_id: int) -> Row:
        with self.index.reader() as r:
            row = r.outbox.get(item_id)
        if row is None:
            raise QueueError(f"queue entry {item_id} does not exist")
        return row

    def retry(self, item_id: int, actor: Actor) -> None:
        """Queue a failed, dead-lettered or cancelled row again, with fresh attempts."""
        self._change(item_id, actor, "forward.retry", "failed, dead or cancelled",
                     lambda tx: tx.outbox.retry(item_id, time.time(), utc_now()))

    def cancel(self, item_id: int, actor: Actor) -> None:
        """A row not yet sent will never be sent."""
        self._change(item_id, actor, "forward.cancel", "queued or failed",
                     lambda tx: tx.outbox.cancel(item_id, utc_now()))

    def _change(self, item_id: int, actor: Actor, action: str, allowed: str, change) -> None:
        with self.index.transaction() as tx:
            row = tx.outbox.get(item_id)
            if row is None:
                raise QueueError(f"queue entry {item_id} does not exist")
            if not change(tx):
                raise QueueError(f"queue entry {item_id} is {row['state']}: only {allowed}"
                                 " entries can be changed so")
            entry = self.audit.append(tx, action, actor, {
                "item": item_id, "destination": row["destination"],
                "sop_instance_uid": row["sop_instance_uid"], "was": row["state"]})
        self.audit.committed(entry)

    def counts(self) -> dict[str, dict[str, int]]:
        """Rows by destination and state (``lamina status``)."""
        with self.index.reader() as r:
            return r.outbox.counts()
