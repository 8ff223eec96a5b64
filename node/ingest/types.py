"""The ingest service's vocabulary: who sent an object, what came of it, and the hooks.

Capabilities that react to stored objects (annotations, series state, and
next the forwarding outbox) plug into :class:`~node.ingest.pipeline.IngestService`
as :class:`IngestHook` objects, so the pipeline never imports them:

1. ``classify(obj)`` runs before the store decision, on every received
   object: a hook that recognises an object as its own (a SEG, an overlay copy
   of a stored slice) returns a :class:`Claim`. At most one hook claims an object.
2. If the object is new, the pipeline asks the claim to ``admit()`` it: the
   checks whose result decides the answer (an annotation's references). A
   :class:`Refusal` sends it to quarantine with 0xA900, and the claim records
   and audits that refusal in the quarantine row's transaction (``refused(tx, ...)``).
3. ``on_stored(tx, obj)`` runs for every new object inside the index
   transaction that stores it: what a hook writes commits with the object or
   not at all.
4. ``after_commit(obj)`` runs after the answer, on a worker the node's context
   owns (never on the association thread): work whose result does not change
   the answer (3-D consistency checks) goes there. A hook asks for it by
   leaving a note in ``obj.notes`` during ``on_stored``; an object no hook left
   a note on has no after-commit work. Light work (a metadata sidecar) is
   appended to ``obj.right_after`` instead and runs on the storing thread once
   the transaction has committed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from node.audit.trail import Actor, AuditEntry
from node.status import Outcome

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

    from node.storage.interface import BlobRef, Reader, Transaction
    from node.storage.records import InstanceRecord, Receipt


@dataclass(frozen=True)
class Source:
    """Who sent an object: the association's peer (or an HTTP client), and what it may do."""

    calling_ae: str
    address: str
    association_id: str
    route: str = "clinical"
    #: The peer's ``services`` include ``store`` (checked by the ingest service, so every
    #: way in, C-STORE and STOW-RS, refuses the same way).
    may_store: bool = True
    #: The username of the association's DICOM user identity, when one was negotiated:
    #: the rater id of annotations it sends (issue 10). Never logged.
    user_identity: str = ""
    #: The user identity was verified against [identity] users: it is the audit actor.
    user_verified: bool = False

    @property
    def actor(self) -> Actor:
        return Actor(ae_title=self.calling_ae, address=self.address,
                     association_id=self.association_id,
                     user=self.user_identity if self.user_verified else "")


@dataclass(frozen=True)
class StoreResult:
    """An outcome plus what the log line and tests need to know about it."""

    outcome: Outcome
    action: str  # stored | resend | conflict | annotation | annotation-resend | quarantined
    #              | refused | failed
    sop_instance_uid: str = ""
    sha256: str = ""
    quarantine_id: int | None = None
    warnings: tuple[Any, ...] = ()  # validation findings recorded with a stored instance


@dataclass(frozen=True)
class Override:
    """A person's decision to let a quarantined object in despite its findings."""

    quarantine_id: int
    reason: str
    actor: Actor


class Ingest(Protocol):
    """What a quarantine release needs of the ingest service."""

    def ingest_bytes(self, data: bytes, source: Source,
                     override: Override | None = None) -> StoreResult: ...


@dataclass(frozen=True)
class Refusal:
    """Why a hook refuses an object: the check that failed and the reason, in plain words."""

    check: str
    reason: str


@dataclass(frozen=True)
class Incoming:
    """A received object after its route, promoted into the blob store, not yet indexed."""

    dataset: Dataset  # as it will be stored (de-identified on the clinical route)
    record: InstanceRecord
    blob: BlobRef
    receipt: Receipt
    source: Source


class Claim(Protocol):
    """A hook's hold on an object it takes in."""

    #: ``seg`` / ``overlay``: what the object is, for the answer's log line.
    kind: str
    #: Also indexed as an instance of its own series (a SEG) or not (an overlay copy,
    #: whose SOP Instance UID belongs to the stored slice it annotates).
    as_instance: bool

    def already_taken(self, reader: Reader) -> bool:
        """For objects not indexed as instances: were these exact bytes taken in before?"""

    def admit(self) -> Refusal | None:
        """The checks that decide the answer; a refusal, or None to store the object."""

    def refused(self, tx: Transaction, refusal: Refusal, quarantine_id: int) -> AuditEntry:
        """Record and audit the refusal (inside the quarantine row's transaction)."""


@dataclass
class Stored:
    """A new object the pipeline stored: what ``on_stored`` and ``after_commit`` see."""

    incoming: Incoming
    claim: Claim | None
    instance_id: int | None  # the index row, when it is indexed as an instance
    #: Set by hooks in ``on_stored`` for their own ``after_commit`` (e.g. the annotation
    #: id); ``after_commit`` runs only when some hook left a note.
    notes: dict[str, Any] = field(default_factory=dict)
    #: Light work (a metadata sidecar, under a millisecond) a hook asks for in
    #: ``on_stored``: run on the storing thread right after the commit, before the
    #: answer. Handed to the worker it would cost more than it does: the two threads
    #: then trade the GIL at every system call of either.
    right_after: list[Callable[[], None]] = field(default_factory=list)


class IngestHook(Protocol):
    def classify(self, obj: Incoming) -> Claim | None:
        """Claim the object when it is this hook's (cheap: a header and an index read)."""

    def on_stored(self, tx: Transaction, obj: Stored) -> AuditEntry | None:
        """Inside the transaction that stores a new object; the audit event it appended."""

    def after_commit(self, obj: Stored) -> None:
        """After the answer, on the context's worker (when some hook left a note)."""
