"""The one state machine of an annotation's life, from receipt to approval.

::

    received ──▶ checked ──▶ approved
       │  ▲         │  ├───▶ rejected (with a reason; never deleted)
       │  │         │  └───▶ needs-adjudication ──▶ adjudicated ──▶ approved | rejected
       ▼  │         ▼
    pending      refused

``pending``: the source series has not (fully) arrived; the annotation is kept
and checked once it does, or refused when it does not arrive in time.
``received`` is re-entered when an annotator sends a corrected object (a new
revision) to an annotation that is not yet signed.

Every transition goes through :meth:`AnnotationStates.move`, inside the
caller's transaction: the state is compare-and-set (two reviewers racing
cannot both win), an audit event ``annotation.<state>`` is written in the same
transaction, and listeners (the forwarding outbox, for one) run there too, so
an approval and what it triggers commit or roll back together.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

from node.audit.trail import Actor, AuditEntry, AuditTrail, utc_now
from node.storage.interface import Transaction


class AnnotationState(StrEnum):
    RECEIVED = "received"
    PENDING = "pending"
    CHECKED = "checked"
    REFUSED = "refused"
    NEEDS_ADJUDICATION = "needs-adjudication"
    ADJUDICATED = "adjudicated"
    APPROVED = "approved"
    REJECTED = "rejected"


S = AnnotationState

TRANSITIONS: Mapping[AnnotationState, frozenset[AnnotationState]] = {
    S.RECEIVED: frozenset({S.CHECKED, S.REFUSED, S.PENDING}),
    S.PENDING: frozenset({S.RECEIVED, S.CHECKED, S.REFUSED}),
    S.CHECKED: frozenset({S.RECEIVED, S.APPROVED, S.REJECTED, S.NEEDS_ADJUDICATION}),
    S.REFUSED: frozenset({S.RECEIVED}),
    S.NEEDS_ADJUDICATION: frozenset({S.ADJUDICATED, S.REJECTED}),
    S.ADJUDICATED: frozenset({S.APPROVED, S.REJECTED}),
    S.REJECTED: frozenset({S.RECEIVED}),
    S.APPROVED: frozenset(),
}
"""Which states each state may move to; anything else is refused."""


class TransitionRefused(ValueError):
    """A move the state machine does not allow, or one another writer got to first."""


@dataclass(frozen=True)
class Transition:
    """One committed-together change of an annotation's state."""

    annotation_id: int
    before: AnnotationState
    after: AnnotationState
    actor: Actor
    reason: str = ""
    detail: dict[str, Any] = field(default_factory=dict)


class TransitionListener(Protocol):
    def on_transition(self, tx: Transaction, transition: Transition) -> None:
        """Runs inside the transition's transaction; raising rolls the transition back."""


class AnnotationStates:
    """Moves annotations between states, audits each move and tells the listeners."""

    def __init__(self, audit: AuditTrail) -> None:
        self.audit = audit
        self._listeners: list[TransitionListener] = []

    def listen(self, listener: TransitionListener) -> None:
        self._listeners.append(listener)

    def move(self, tx: Transaction, annotation_id: int, after: AnnotationState, actor: Actor,
             *, reason: str = "", detail: dict[str, Any] | None = None) -> AuditEntry:
        """Move one annotation inside ``tx``; call ``audit.committed`` with the result
        after the commit. Raises :class:`TransitionRefused` (nothing written)."""
        row = tx.annotations.get(annotation_id)
        if row is None:
            raise TransitionRefused(f"annotation {annotation_id} does not exist")
        before = AnnotationState(row["state"])
        if after not in TRANSITIONS[before]:
            raise TransitionRefused(f"annotation {annotation_id} is {before}, it cannot become {after}")
        if not tx.annotations.set_state(annotation_id, before, after, utc_now(), reason):
            raise TransitionRefused(f"annotation {annotation_id} changed state meanwhile")
        transition = Transition(annotation_id, before, after, actor, reason, dict(detail or {}))
        event = {"annotation_id": annotation_id, "from": str(before), "to": str(after),
                 **({"reason": reason} if reason else {}), **transition.detail}
        entry = self.audit.append(tx, f"annotation.{after}", actor, event)
        for listener in self._listeners:
            listener.on_transition(tx, transition)
        return entry
