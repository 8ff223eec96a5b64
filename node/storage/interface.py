"""The storage interface: an index with a unit of work, and a blob store addressed by hash.

Every service above this layer reads and writes through these protocols,
never through a database driver or a file path, so a second backend
(PostgreSQL, for several nodes on one index) implements them without touching
the services. The embedded backend is :mod:`node.storage.sqlite`; several
nodes share one :mod:`node.storage.postgresql` index.

The index:

* ``with index.transaction() as tx:`` is one unit of work. Everything written
  through ``tx.instances``, ``tx.series``, ``tx.annotations``,
  ``tx.quarantine``, ``tx.audit``, ``tx.reid``, ``tx.evidence`` and ``tx.outbox`` commits
  together or not at all; an exception rolls it back. Writers are serialised
  by the backend (a lock, an advisory lock): callers never coordinate.
* ``with index.reader() as r:`` reads a consistent view through the same
  repositories' read methods.
* ``index.matcher(retrieve_ae_title)`` runs C-FIND / C-MOVE / C-GET (and
  QIDO-RS) queries planned by :mod:`node.storage.query`.
* ``index.lease(name)`` is a role one node of the index holds at a time (the
  background work that must run once: :mod:`node.leases`).

Failures of the index itself (locked, full, corrupt, unreachable) raise
:class:`IndexUnavailable`, which the front ends answer as "out of resources".

The blob store keeps bytes under the SHA-256 of their content. Blobs go in
by ``put`` (a stream), ``writer()`` (write then commit) or ``put_file`` (a
finished local file the store may move into place), and come out by
``open(sha256)``. A store that keeps blobs as local files may also offer
:class:`LocalBlobFiles` (a file name for senders that stream by name): that
is an optional capability, checked with ``isinstance``, never the normal route.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol, runtime_checkable

from node.storage.query import Matcher
from node.storage.records import (
    AgreementStructureRow,
    AnnotationFindingRow,
    AuditRow,
    FindingRow,
    InstanceGeometry,
    InstanceRecord,
    QuarantineRow,
    RatingRow,
    Receipt,
    RoiRow,
    Row,
    SeriesFindingRow,
    SeriesRows,
    SeriesStateRow,
    SignatureRow,
    StoredRef,
    StructureRow,
    UserRow,
)


class IndexUnavailable(RuntimeError):
    """The index could not be read or written (locked, full, corrupt, unreachable)."""


# --- repositories: read side --------------------------------------------------


class InstanceReads(Protocol):
    def blob_of(self, sop_instance_uid: str) -> str | None:
        """The blob hash indexed for this SOP Instance UID, if any."""

    def stored(self, sop_instance_uid: str) -> StoredRef | None:
        """The indexed instance with this UID: its blob and series."""

    def holds_uid(self, uid: str) -> bool:
        """Is ``uid`` a stored study, series, instance or frame of reference?"""

    def patient_of_study(self, study_instance_uid: str) -> tuple[str, str] | None:
        """(PatientID, IssuerOfPatientID) a known study is stored under."""

    def series_members(self, series_instance_uid: str) -> list[tuple[int, str]]:
        """(row id, blob hash) of each instance of a series, in arrival order."""


class SeriesReads(Protocol):
    def rows(self, series_instance_uid: str) -> SeriesRows | None:
        """The series' state and the stored geometry of its instances."""

    def quiet(self, older_than: float) -> list[str]:
        """Series still receiving whose newest instance arrived before ``older_than``."""

    def state(self, series_instance_uid: str) -> SeriesStateRow | None:
        """The series' state and its latest check, without checking again."""


class AnnotationReads(Protocol):
    def get(self, annotation_id: int) -> Row | None: ...
    def list(self, state: str | None = None, series_uid: str | None = None) -> list[Row]: ...
    def in_state(self, state: str) -> list[int]: ...
    def by_key(self, key: str) -> Row | None:
        """The annotation filed under ``key`` (``seg|UID``, ``overlay|series|AE|person``)."""

    def waiting_on_series(self, series_uid: str) -> list[int]:
        """The ``pending`` annotations drawn on this series (to look at when it grows)."""

    def current_objects(self, annotation_id: int) -> list[Row]: ...
    def refused_objects(self, annotation_id: int) -> list[Row]: ...
    def object_with_blob(self, sha256: str) -> Row | None:
        """A current annotation object holding exactly these bytes (an identical resend)."""

    def current_rois(self, annotation_id: int) -> list[tuple[RoiRow, str]]:
        """Every plane of the set's current copies, with the hash of the copy it came from."""

    def structures(self, check_id: int) -> list[Row]: ...
    def findings(self, check_id: int) -> list[Row]: ...


class QuarantineReads(Protocol):
    def list(self, include_released: bool = False) -> list[QuarantineRow]: ...
    def get(self, quarantine_id: int) -> QuarantineRow | None: ...
    def for_instance(self, sop_instance_uid: str) -> list[QuarantineRow]: ...
    def with_received(self, received_sha256: str, released: bool) -> QuarantineRow | None:
        """The entry (waiting, or released) kept for these exact received bytes."""


class AuditReads(Protocol):
    def last(self) -> tuple[int, str] | None:
        """(seq, hash) of the newest event."""

    def rows(self) -> Iterator[AuditRow]:
        """Every event in storage order (verify walks them)."""

    def of_action(self, prefix: str) -> list[AuditRow]:
        """Events whose action starts with ``prefix``, oldest first."""

    def after(self, seq: int, limit: int) -> list[AuditRow]:
        """Up to ``limit`` events after ``seq``, oldest first (the syslog stream's cursor)."""


class ReidReads(Protocol):
    """The encrypted re-identification map: rows found by a keyed lookup, payloads sealed."""

    def get(self, kind: str, lookup: bytes) -> tuple[str, bytes, bytes] | None:
        """(key id, nonce, sealed payload) of one entry."""

    def exists(self, kind: str, lookup: bytes) -> bool: ...
    def foreign_key_id(self, kind: str, key_id: str) -> str | None:
        """A key id other than ``key_id`` found among the entries, if any."""


class EvidenceReads(Protocol):
    def for_study(self, study_instance_uid: str) -> list[dict[str, Any]]:
        """The de-identification evidence of each instance of a study, by SOP Instance UID."""


class ReportReads(Protocol):
    """Counts and cross-checks for ``lamina status`` and ``lamina fsck``."""

    def counts(self) -> dict[str, int]:
        """Rows per table: patient, study, series, instance, quarantine, conflict, audit_event."""

    def quarantine_waiting(self) -> int: ...
    def series_states(self) -> dict[str, int]: ...
    def instance_rule_counts(self) -> list[tuple[str, int]]: ...
    def series_rule_counts(self) -> list[tuple[str, int]]: ...
    def instance_findings(self, sop_instance_uid: str) -> tuple[bool, list[FindingRow]]:
        """(is it stored, its recorded findings)."""

    def referenced_blobs(self) -> set[str]:
        """Blob-store hashes the index points at (instances, conflicts, annotations, SEGs
        made for forwarding)."""

    def quarantined_blobs(self) -> set[str]:
        """Hashes kept in the quarantine area."""

    def integrity(self) -> str:
        """The backend's own consistency check: ``ok`` or what is wrong."""


class UserReads(Protocol):
    def get(self, user_id: str) -> UserRow | None: ...
    def by_row(self, row_id: int) -> UserRow | None: ...
    def list(self) -> list[UserRow]: ...


class SignatureReads(Protocol):
    def list(self, annotation_id: int | None = None) -> list[SignatureRow]:
        """Signatures, oldest first (of one annotation when given)."""


class OutboxReads(Protocol):
    """The forwarding outbox (node.forward.queue): one row per (object, destination)."""

    def due(self, at: float, limit: int) -> list[Row]:
        """Rows to send at ``at`` (epoch seconds), by destination, with their annotation's
        state (``annotation_state``) and source series."""

    def next_due(self) -> float | None: ...
    def annotation_classes(self, annotation_id: int) -> set[str]:
        """Protocol classes of the structures of the annotation's current check."""

    def get(self, item_id: int) -> Row | None: ...
    def list(self, state: str | None = None, destination: str | None = None,
             annotation_id: int | None = None) -> list[Row]: ...
    def counts(self) -> dict[str, dict[str, int]]:
        """Rows by destination, then by state."""


class AgreementReads(Protocol):
    """Agreement between raters, double reading, ratings and adjudication (issue 10)."""

    def readings(self, series_uid: str) -> list[Row]:
        """The series' annotations with a current check (checked or further on), oldest first."""

    def study_of_series(self, series_uid: str) -> str | None: ...
    def study_of_instance(self, sop_instance_uid: str) -> str | None: ...
    def study_known(self, study_uid: str) -> bool: ...
    def raters_of_study(self, study_uid: str) -> list[str]: ...
    def get(self, agreement_id: int) -> Row | None: ...
    def comparisons(self) -> list[Row]: ...
    def structures(self, agreement_id: int | None = None) -> list[Row]: ...
    def rated(self, question: str, item: str, rater: str) -> bool: ...
    def ratings(self) -> list[Row]: ...
    def double_reads(self, state: str | None = None) -> list[Row]: ...
    def finding_counts(self) -> list[Row]:
        """Current checks' findings by rater and check name (the QA report)."""

    def readings_by_rater(self) -> list[Row]:
        """Annotations per rater and state (the QA report)."""

    def blinded_series(self, ae_title: str) -> list[str]:
        """Annotation series an annotator peer must not see while their study waits for
        its second reading (made by another peer)."""

    def adjudications(self, state: str | None = None) -> list[Row]: ...
    def adjudication(self, adjudication_id: int) -> Row | None: ...


class Reader(Protocol):
    """A consistent read view of the index."""

    instances: InstanceReads
    series: SeriesReads
    annotations: AnnotationReads
    quarantine: QuarantineReads
    audit: AuditReads
    reid: ReidReads
    evidence: EvidenceReads
    reports: ReportReads
    users: UserReads
    signatures: SignatureReads
    outbox: OutboxReads
    agreement: AgreementReads


# --- repositories: write side -------------------------------------------------


class Instances(InstanceReads, Protocol):
    def insert(self, rec: InstanceRecord, receipt: Receipt) -> int:
        """A new instance with its patient/study/series rows as needed; its row id."""

    def insert_conflict(self, rec: InstanceRecord, receipt: Receipt, stored_sha256: str) -> int:
        """Other bytes under a known SOP Instance UID; idempotent per bytes. Its id."""

    def bulk_insert(self, items: Iterable[tuple[InstanceRecord, Receipt]]) -> int:
        """Many new instances at once (benchmarks, large test sets); how many were new."""

    def insert_geometry(self, instance_id: int, geometry: InstanceGeometry) -> None: ...
    def insert_findings(self, instance_id: int, findings: Iterable[FindingRow],
                        now: str) -> None: ...


class Series(SeriesReads, Protocol):
    def mark_receiving(self, series_instance_uid: str, now: float, resolution: float = 0.0
                       ) -> None:
        """A new instance arrived: the series is receiving and its quiet period restarts.
        A receiving series' time is only moved when it is more than ``resolution`` seconds
        old, so the slices of a series arriving together do not rewrite its row each."""

    def insert_check(self, series_fk: int, trigger: str, state: str, instances: int,
                     geometry: dict[str, Any] | None, findings: Iterable[SeriesFindingRow],
                     last_received: float | None, now: str) -> int:
        """Record one check with its findings and point the series state at it."""


class Annotations(AnnotationReads, Protocol):
    def upsert(self, kind: str, key: str, series_uid: str, annotator_ae: str,
               annotator_address: str, annotator_person: str, now: str, *,
               accepted: bool) -> tuple[int, int]:
        """(id, revision) of the annotation, created on first sight (``received``, or
        ``refused`` when its first object is refused); an accepted object bumps the
        revision of an existing one. Never changes an existing annotation's state:
        the state machine (node/annotations/states.py) does."""

    def insert_object(self, annotation_id: int, sop_instance_uid: str, sop_class_uid: str,
                      receipt: Receipt, *, slice_index: int | None = None,
                      refusal: tuple[str, str] | None = None,
                      quarantine_id: int | None = None) -> int: ...
    def insert_rois(self, object_id: int, rois: Iterable[RoiRow]) -> None: ...
    def place_object(self, object_id: int, slice_index: int, rois: Iterable[RoiRow]) -> None:
        """An overlay copy that came before its slice, checked now: on its slice, with its
        planes; of two current copies of one slice the newer stays current."""

    def refuse_object(self, object_id: int, check: str, reason: str) -> None: ...

    def refuse_objects(self, annotation_id: int, check: str, reason: str) -> int:
        """Mark the annotation's current objects refused with why (a pending annotation
        whose images never came); returns how many."""

    def set_state(self, annotation_id: int, before: str, after: str, now: str,
                  reason: str = "") -> bool:
        """Compare-and-set of the state (with why, and since ``now``); False when it was
        no longer ``before``. Only node/annotations/states.py calls this."""

    def record_check(self, annotation_id: int, revision: int, protocol_name: str,
                     protocol_sha256: str, structures: list[StructureRow],
                     findings: list[AnnotationFindingRow], now: str) -> int | None:
        """Store one check run and make it current (the state is the caller's move);
        None when a newer object arrived."""


@dataclass(frozen=True)
class NewQuarantine:
    """A refused object's quarantine row before it has an id."""

    sha256: str
    size: int
    reason: str
    status_code: int
    calling_ae: str
    address: str
    association_id: str
    received_at: str
    area: str
    transfer_syntax_uid: str
    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    findings: list[dict[str, str]]
    sealed: bool
    route: str
    #: SHA-256 of the bytes as received (the sealed blob's hash differs on every seal).
    received_sha256: str = ""


class Quarantine(QuarantineReads, Protocol):
    def insert(self, entry: NewQuarantine) -> int: ...
    def seen_again(self, quarantine_id: int, now: str) -> int:
        """Count one more identical send of a waiting entry; returns the new count."""
    def mark_released(self, quarantine_id: int, released_at: str, released_by: str,
                      reason: str) -> None: ...


class Audit(AuditReads, Protocol):
    def insert(self, row: AuditRow) -> None: ...


class Reid(ReidReads, Protocol):
    def insert(self, kind: str, rows: list[tuple[bytes, str, bytes, bytes]]) -> int:
        """(lookup, key id, nonce, payload) rows; present lookups are left alone. How many new."""


class Evidence(EvidenceReads, Protocol):
    def put(self, sop_instance_uid: str, study_instance_uid: str, route: str,
            evidence: str) -> None:
        """Record an instance's evidence, its JSON text (``DeidEvidence.as_json``)."""


class Users(UserReads, Protocol):
    def insert(self, user_id: str, printed_name: str, rater_ids: list[str],
               public_key: bytes, private_key: bytes, now: str) -> int:
        """A new user; raises KeyError when ``user_id`` was ever used (ids are never reused)."""

    def disable(self, user_id: str, now: str) -> bool:
        """False when the user is unknown or already disabled."""

    def record_failure(self, user_id: str, lock_after: int, now: str) -> tuple[int, bool]:
        """Count one wrong passphrase; (failures so far, locked now by this one)."""

    def reset_failures(self, user_id: str) -> None: ...
    def clear_lock(self, user_id: str) -> bool:
        """Unlock a locked user (and reset the count); False when the user was not locked."""


class Signatures(SignatureReads, Protocol):
    def insert(self, annotation_id: int, user_fk: int, decision: str, meaning: str,
               signed_at: str, manifest: str, signature: bytes) -> int: ...


class Outbox(OutboxReads, Protocol):
    def enqueue_annotation(self, annotation_id: int, rule: str, destination: str, mode: str,
                           now: str, at: float) -> int:
        """Queue the annotation's current objects; idempotent per (SOP Instance UID,
        destination). How many rows were new."""

    def enqueue_series(self, annotation_id: int, series_uid: str, rule: str, destination: str,
                       mode: str, now: str, at: float) -> int:
        """Queue every stored instance of a series, idempotently; how many rows were new."""

    def enqueue_to_build(self, annotation_id: int, placeholder_uid: str, sop_class_uid: str,
                         rule: str, destination: str, mode: str, now: str, at: float) -> int:
        """Queue an object made at its first send (an overlay annotation's SEG)."""

    def set_object(self, item_id: int, sop_instance_uid: str, sop_class_uid: str,
                   blob_sha256: str, transfer_syntax_uid: str, now: str) -> None:
        """Record the object made for a row queued by ``enqueue_to_build``."""

    def mark_sent(self, item_id: int, status: int, warning: str | None, now: str) -> bool: ...
    def mark_failed(self, item_id: int, status: int | None, error: str, next_at: float,
                    max_attempts: int, now: str) -> str | None:
        """``failed`` or, at ``max_attempts``, ``dead``; None when the row was not pending."""

    def refuse(self, item_id: int, reason: str, now: str) -> bool: ...
    def retry(self, item_id: int, at: float, now: str) -> bool: ...
    def cancel(self, item_id: int, now: str) -> bool: ...


class Agreements(AgreementReads, Protocol):
    def set_rater(self, annotation_id: int, rater: str) -> None: ...
    def record(self, series_uid: str, study_uid: str, pair: tuple[Row, Row],
               protocol_sha256: str, reasons: list[str],
               structures: Iterable[AgreementStructureRow], now: str) -> int:
        """Store or replace the comparison of two readings (rows of :meth:`readings`)."""

    def insert_ratings(self, rows: Iterable[RatingRow], now: str) -> int: ...
    def choose(self, study_uid: str, now: str) -> bool: ...
    def complete(self, study_uid: str, now: str) -> bool: ...
    def open_adjudication(self, agreement_id: int, now: str) -> int: ...
    def decide(self, adjudication_id: int, decision: str, chosen: int | None, by: str,
               now: str) -> bool: ...


class Transaction(Reader, Protocol):
    """One unit of work: commits on leaving the ``with`` block, rolls back on an exception."""

    instances: Instances
    series: Series
    annotations: Annotations
    quarantine: Quarantine
    audit: Audit
    reid: Reid
    evidence: Evidence
    users: Users
    signatures: Signatures
    outbox: Outbox
    agreement: Agreements


class Lease(Protocol):
    """A named role that one node at a time holds (the background workers that must run
    exactly once across the nodes of one index). Held until released or until its holder
    dies; then the next node that asks gets it."""

    def held(self) -> bool:
        """Take the lease if it is free; True while this process holds it. Called again and
        again: a lease lost (the index went away) is taken again when it is free."""

    def release(self) -> None: ...


class Index(Protocol):
    def lease(self, name: str) -> Lease: ...
    def transaction(self) -> AbstractContextManager[Transaction]: ...
    def reader(self) -> AbstractContextManager[Reader]: ...
    def matcher(self, retrieve_ae_title: str) -> Matcher: ...
    def migrate(self) -> int:
        """Bring the schema to the newest version; the version reached."""

    def schema_version(self) -> int: ...
    def close(self) -> None: ...


# --- blobs --------------------------------------------------------------------


class OutOfSpace(OSError):
    """Free space for blobs is below the configured minimum."""


@dataclass(frozen=True)
class BlobRef:
    """A blob that is durable in the store."""

    sha256: str
    size: int
    created: bool  # False when identical bytes were already stored


class BlobWriter(Protocol):
    """A blob being written: write its bytes, then leave the ``with`` block to commit."""

    def write(self, data: bytes) -> int: ...


class BlobStore(Protocol):
    def writer(self) -> AbstractContextManager[BlobWriter]:
        """Write a blob; on leaving the block it is durable and ``.ref`` says under what hash."""

    def put(self, stream: BinaryIO) -> BlobRef: ...
    def put_bytes(self, data: bytes) -> BlobRef: ...
    def put_file(self, path: Path, hashed: tuple[str, int] | None = None) -> BlobRef:
        """Store a finished local file; a local store moves it into place (do not reuse it).
        ``hashed``: its SHA-256 and size, when whoever wrote it took them."""

    def expect_file(self, path: Path) -> None:
        """A finished local file that :meth:`put_file` will probably be given soon: a local
        store may start writing it to disk now (advice only; nothing is promised)."""

    def open(self, sha256: str) -> BinaryIO:
        """The blob's bytes; FileNotFoundError when it is not stored."""

    def read(self, sha256: str) -> bytes: ...
    def exists(self, sha256: str) -> bool: ...
    def size(self, sha256: str) -> int: ...
    def delete(self, sha256: str) -> None: ...
    def verify(self, sha256: str) -> bool:
        """True when the blob exists and its bytes still hash to its name."""

    def iter_hashes(self) -> Iterator[str]:
        """Every stored blob's hash (never a sidecar's name)."""

    def read_sidecar(self, sha256: str) -> bytes | None:
        """The derived bytes kept beside a blob (its metadata JSON), or None when none are."""

    def put_sidecar(self, sha256: str, data: bytes) -> None:
        """Keep derived bytes beside a blob, atomically (temp + rename; not fsync'd:
        derived bytes are worked out again when lost)."""

    def copy_from(self, other: BlobStore, sha256: str) -> None:
        """Keep ``other``'s blob here too (a local store links it: nothing is copied)."""

    def ensure_space(self) -> None:
        """Raise OutOfSpace when free space is below the store's minimum."""

    def free_bytes(self) -> int: ...
    def disk_used(self) -> int: ...


@runtime_checkable
class LocalBlobFiles(Protocol):
    """Optional capability: blobs are local files, for senders that stream a file by name."""

    def local_path(self, sha256: str) -> Path: ...
