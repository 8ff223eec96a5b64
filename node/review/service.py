"""Approve and reject with an electronic signature; verify every signature.

One approval is one transaction: the signature row, the state move (through
the one state machine, :meth:`AnnotationStates.move`, with its audit event and
listeners) commit together or not at all. What is hashed and signed is read
before the transaction (hashing blobs is slow) and checked again inside it:
if the annotation changed meanwhile (a new revision, another reviewer), the
move is refused and nothing is recorded. Every refusal is audited
(``review.refused``), in its own transaction. An approval also writes the
audit head and the external checkpoint before it returns.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from node.annotations.states import (
    TRANSITIONS,
    AnnotationState,
    AnnotationStates,
    TransitionRefused,
)
from node.audit.trail import Actor, AuditTrail, utc_now
from node.config import ReviewSettings
from node.review.signatures import (
    Manifest,
    blob_sha256,
    object_list,
    problems,
    report_sha256,
)
from node.review.users import Unlocked, UserDirectory, UserRefused
from node.storage.interface import BlobStore, Index
from node.storage.records import Row, UserRow

DECISIONS = {"approve": AnnotationState.APPROVED, "reject": AnnotationState.REJECTED}


class ReviewRefused(ValueError):
    """An approval or rejection that was not recorded; one line, already audited."""


@dataclass(frozen=True)
class Signed:
    annotation_id: int
    signature_id: int
    decision: str
    manifest_sha256: str


@dataclass(frozen=True)
class SignatureCheck:
    """The verdict on one stored signature."""

    signature_id: int
    annotation_id: int
    user_id: str
    decision: str
    problems: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems


def _names(value: str) -> frozenset[str]:
    """A person's name as a set of lower-case words, so 'Doe^Jane' matches 'Jane Doe'."""
    return frozenset(value.replace("^", " ").replace(",", " ").casefold().split())


def is_own(user: UserRow, annotation: Row) -> bool:
    """The reviewer is the annotation's annotator (its rater id, its content creator)."""
    authors = {annotation.get("rater") or "", annotation.get("annotator_person") or ""}
    mine = {user.user_id, user.printed_name, *user.rater_ids}
    return any(_names(a) and _names(a) == _names(m) for a in authors for m in mine)


class ReviewService:
    """Signs decisions on annotations and verifies the signatures (owned by NodeContext)."""

    def __init__(self, index: Index, blobs: BlobStore, audit: AuditTrail,
                 states: AnnotationStates, settings: ReviewSettings) -> None:
        self.index = index
        self.blobs = blobs
        self.audit = audit
        self.states = states
        self.settings = settings
        self.users = UserDirectory(index, audit, settings.lock_after)

    def decide(self, annotation_id: int, decision: str, user_id: str, passphrase: str,
               meaning: str, actor: Actor, reason: str = "") -> Signed:
        """Sign ``decision`` ('approve' or 'reject') on one annotation, or raise
        :class:`ReviewRefused` with nothing recorded but the refusal."""
        after = DECISIONS[decision]
        context = {"annotation_id": annotation_id, "user_id": user_id, "decision": decision}
        try:
            if not meaning.strip():
                raise ReviewRefused("the meaning of the signature is required (--meaning)")
            if after is AnnotationState.REJECTED and not reason.strip():
                raise ReviewRefused("a rejection needs a reason (--reason)")
            with self.index.reader() as r:
                annotation = r.annotations.get(annotation_id)
            if annotation is None:
                raise ReviewRefused(f"unknown annotation {annotation_id}")
            before = annotation["state"]
            if after not in TRANSITIONS[AnnotationState(before)]:
                raise TransitionRefused(f"annotation {annotation_id} is {before}, it cannot"
                                        f" become {after}")
            unlocked = self.users.unlock(user_id, passphrase, actor)
            return self._sign(annotation, after, unlocked, meaning.strip(), reason.strip(),
                              actor)
        except UserRefused as exc:  # audited by the directory already
            raise ReviewRefused(str(exc)) from None
        except (ReviewRefused, TransitionRefused) as exc:
            self.audit.record("review.refused", actor, {**context, "refused": str(exc)},
                              outcome="minor-failure")
            raise ReviewRefused(str(exc)) from None

    def _sign(self, annotation: Row, after: AnnotationState, unlocked: Unlocked, meaning: str,
              reason: str, actor: Actor) -> Signed:
        user, annotation_id = unlocked.user, annotation["id"]
        if (after is AnnotationState.APPROVED and not self.settings.allow_self_approval
                and is_own(user, annotation)):
            raise ReviewRefused(f"user {user.user_id!r} annotated annotation {annotation_id}:"
                                " self-approval is not allowed")
        check_id = annotation["current_check_fk"]
        if check_id is None:
            raise ReviewRefused(f"annotation {annotation_id} has no check report to sign")
        with self.index.reader() as r:
            objects = object_list(r.annotations.current_objects(annotation_id))
            report = report_sha256(r, check_id)
        for obj in objects:  # what is signed is the bytes, not the name they are stored under
            if blob_sha256(self.blobs, obj["sha256"]) != obj["sha256"]:
                raise ReviewRefused(f"annotation {annotation_id}: the stored bytes of"
                                    f" {obj['sop_instance_uid']} are damaged or missing")
        manifest = Manifest(annotation_id, annotation["key"], str(after), meaning, reason,
                            user.user_id, user.id, user.printed_name, utc_now(), objects,
                            check_id, report)
        body, signature = manifest.sign(unlocked.key)
        manifest_sha = hashlib.sha256(body).hexdigest()
        with self.index.transaction() as tx:
            now = tx.annotations.get(annotation_id)
            if (now is None or now["revision"] != annotation["revision"]
                    or now["current_check_fk"] != check_id
                    or object_list(tx.annotations.current_objects(annotation_id)) != objects):
                raise TransitionRefused(f"annotation {annotation_id} changed while it was signed")
            signature_id = tx.signatures.insert(annotation_id, user.id, str(after), meaning,
                                                manifest.signed_at, body.decode(), signature)
            entry = self.states.move(tx, annotation_id, after, Actor(**{**actor.as_dict(),
                                                                        "user": user.user_id}),
                                     reason=reason, detail={
                                         "signature_id": signature_id, "meaning": meaning,
                                         "manifest_sha256": manifest_sha})
        self.audit.committed(entry, checkpoint=after is AnnotationState.APPROVED)
        return Signed(annotation_id, signature_id, str(after), manifest_sha)

    def verify(self, annotation_id: int | None = None) -> list[SignatureCheck]:
        """Check every stored signature (of one annotation when given)."""
        with self.index.reader() as r:
            if annotation_id is not None and r.annotations.get(annotation_id) is None:
                raise ReviewRefused(f"unknown annotation {annotation_id}")
            keys = {}
            for event in r.audit.of_action("user.added"):
                obj = json.loads(event.object)
                keys.setdefault(obj["user_row"], obj["key_sha256"])
            rows = r.signatures.list(annotation_id)
            newest = {row.annotation_id: row.id for row in r.signatures.list()}
            out = []
            for row in rows:
                user = r.users.by_row(row.user_fk)
                annotation = r.annotations.get(row.annotation_id)
                still = (annotation is not None and newest[row.annotation_id] == row.id
                         and annotation["state"] == row.decision)
                current = r.annotations.current_objects(row.annotation_id) if still else []
                found = problems(row, user, keys.get(row.user_fk), annotation, still, current,
                                 r, self.blobs)
                if (row.decision == AnnotationState.APPROVED and annotation is not None
                        and annotation["state"] != AnnotationState.APPROVED):
                    # approval is final in the state machine: nothing may move it on
                    found.append(f"approved, but the annotation is now {annotation['state']}")
                out.append(SignatureCheck(row.id, row.annotation_id,
                                          user.user_id if user else "?", row.decision, found))
            signed = {(row.annotation_id, row.decision) for row in r.signatures.list()}
            # A reading not chosen at an adjudication is rejected by the adjudicator's
            # decision (recorded with the adjudication and audited), not by a signature.
            signed |= {(reading, AnnotationState.REJECTED)
                       for item in r.agreement.adjudications("decided")
                       for reading in (item["annotation_a"], item["annotation_b"])
                       if reading != item["chosen_annotation"]}
            for state in (AnnotationState.APPROVED, AnnotationState.REJECTED):
                for unsigned in r.annotations.in_state(state):
                    if annotation_id in (None, unsigned) and (unsigned, state) not in signed:
                        out.append(SignatureCheck(0, unsigned, "?", str(state),
                                                  [f"{state} without a signature"]))
        return out
