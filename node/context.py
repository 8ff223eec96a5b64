"""NodeContext: builds, owns and wires the node's parts. The one place state lives.

Front ends (the DIMSE server, the CLI, and next the HTTP app) receive a
context and call its services; none of them opens files or databases, or
starts threads, on its own. Background work is owned here and started and
stopped in order:

* ``start()``: the audit writer (query/retrieve events), the after-commit
  worker (annotation checks after the answer), the overlay settle worker;
  with ``supervisor=True`` (one per node: the process that owns the data
  folder) also the recovery of annotations a crash left unchecked, the
  series sweeper, the forward worker (node.forward.worker) and, when configured,
  the syslog stream of the audit trail: these on one node of the index at a
  time, the one holding the ``background`` lease (node/leases.py).
* ``stop()``: the same in reverse, each draining what it holds, then the
  audit head and the index.

A context that is never started (a command-line tool) runs after-commit
work inline and flushes the rest at ``stop()``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from node.annotations.grid import HeaderGridSource
from node.annotations.reading import DoubleReading
from node.annotations.service import AnnotationService
from node.annotations.states import AnnotationStates
from node.anonymize.anonymizer import Deidentifier
from node.anonymize.keys import ProjectKey, load_project_key
from node.audit.served import AuditQueue
from node.audit.syslog import SyslogStream
from node.audit.trail import Actor, AuditTrail, ExternalCheckpoints, HeadCheckpoint
from node.checks.protocol import Protocol, load_protocol
from node.checks.series import SeriesChecker
from node.config import ConfigError, Settings
from node.forward.queue import Outbox
from node.forward.worker import ForwardWorker
from node.ingest.iod import IODTables
from node.ingest.pipeline import IngestService
from node.ingest.quarantine import QuarantineArea, QuarantineService
from node.ingest.routes import Router
from node.ingest.validate import ReadLimits, Validator
from node.leases import LeasedWork
from node.metadata import MetadataSidecars
from node.retrieve import RetrieveService
from node.review.service import ReviewService
from node.search import SearchService
from node.storage.backend import open_index
from node.storage.blobs import LocalBlobStore
from node.storage.interface import Index, IndexUnavailable
from node.storage.sealed import Sealer
from node.worker import Worker


class DataFolderMissing(IndexUnavailable):
    """A read-only tool was pointed at a data folder that has no index: nothing is created."""


@dataclass
class NodeContext:
    settings: Settings
    index: Index
    blobs: LocalBlobStore
    #: Refused bytes, kept apart from the blobs that retrievals serve.
    quarantined: LocalBlobStore
    audit: AuditTrail
    events: AuditQueue
    series: SeriesChecker
    annotations: AnnotationService
    #: The one annotation state machine; review and forwarding listen to it.
    states: AnnotationStates
    #: Approve / reject with an electronic signature, users, verify (issue 10 §4).
    review: ReviewService
    #: Raters, double-read choice, agreement between readings, adjudication.
    reading: DoubleReading
    search: SearchService
    retrieve: RetrieveService
    worker: Worker
    key: ProjectKey | None
    #: Approved results queued for forwarding (a listener on ``states``), and their sender.
    outbox: Outbox
    forwarder: ForwardWorker
    _ingest: IngestService | None
    _quarantine: QuarantineService | None
    #: The audit trail streamed to a syslog collector (supervisor only), when configured.
    syslog: SyslogStream | None = None
    #: The supervisor's work done once across the nodes of the index (started by ``start``).
    background: LeasedWork | None = None
    _started: list[str] = field(default_factory=list)

    @classmethod
    def open(cls, settings: Settings, *, migrate: bool = True, with_key: bool = False,
             must_exist: bool = False) -> NodeContext:
        """Open (and, unless ``must_exist``, create on first use) the data folder, index
        and audit trail.

        ``with_key`` loads the project key and builds the services that need it
        (ingest de-identifies, quarantine seals and unseals); without it (status,
        fsck, audit verify, check) nothing can be received.
        Raises ``ProjectKeyError`` with how to make a key when there is none, and
        :class:`DataFolderMissing` when ``must_exist`` and there is no index.
        """
        data = settings.storage.data
        sqlite = settings.index.backend == "sqlite"
        if must_exist and sqlite and not settings.index_path.is_file():
            raise DataFolderMissing(f"no Lamina data in {data} (no index at "
                                    f"{settings.index_path}): check --data or the config")
        if must_exist:  # nothing is created for a tool pointed at the wrong folder
            index = open_index(settings.index.backend, settings.index_path,
                               settings.index.busy_timeout_ms, must_exist=True,
                               dsn=settings.index.dsn)
        else:
            data.mkdir(parents=True, exist_ok=True)
            index = open_index(settings.index.backend, settings.index_path,
                               settings.index.busy_timeout_ms, dsn=settings.index.dsn)
        try:
            return cls._wire(settings, index, migrate=migrate, with_key=with_key,
                             must_exist=must_exist)
        except BaseException:  # no key, a bad protocol: nothing is left open
            index.close()
            raise

    @classmethod
    def _wire(cls, settings: Settings, index: Index, *, migrate: bool, with_key: bool,
              must_exist: bool) -> NodeContext:
        """Build every part on an open index (see :meth:`open`)."""
        data = settings.storage.data
        if migrate:
            index.migrate()
        shared, spool = settings.blob_root, settings.spool_dir
        blobs = LocalBlobStore(shared / "blobs", spool, settings.storage.min_free_mb << 20)
        quarantined = LocalBlobStore(shared / "quarantine", spool)
        # A tool on an existing node makes no signing key up front (status, verify).
        external = (ExternalCheckpoints(settings.audit.checkpoint_path,
                                        settings.audit.checkpoint_interval)
                    if settings.audit.checkpoint_path else None)
        audit = AuditTrail(index, HeadCheckpoint(data / "audit" / "head.json",
                                                 settings.audit.signing_key,
                                                 create_key=not must_exist, external=external),
                           settings.node.id)
        events = AuditQueue(audit)
        series = SeriesChecker(index, audit, settings.validation, settings.node.ae_title)
        protocol = (load_protocol(settings.annotations.protocol)
                    if settings.annotations.protocol else Protocol())
        states = AnnotationStates(audit)
        annotations = AnnotationService(index, blobs, audit, HeaderGridSource(index, blobs),
                                        protocol, states, settings.annotations.settle_seconds,
                                        settings.annotations.pending_seconds)
        # A node being served refuses a forward rule naming a class its protocol lacks;
        # tools on an existing node (must_exist) open it whatever the rules say, to report.
        if not must_exist and protocol.classes:
            try:
                settings.forward.check({p.name: True for p in settings.peers},
                                       [c.key for c in protocol.classes])
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
        key = load_project_key(settings.deidentify.key_file, data_dir=data) if with_key else None
        reading = DoubleReading(index, audit, states, protocol, annotations.spacing_and_masks,
                                key, settings.annotations.double_read_fraction)
        annotations.after_check.append(reading.checked)
        matcher = index.matcher(settings.node.ae_title)
        search = SearchService(matcher, events, reading.blinded_series)
        retrieve = RetrieveService(settings, matcher, events, reading.blinded_series)
        worker = Worker("after-commit")
        ingest, quarantine = None, None
        if key is not None:
            area = QuarantineArea(quarantined, blobs, index, audit, Sealer(key.map_key))
            validator = None
            if settings.validation.enabled:
                validator = Validator(settings.validation, IODTables.load())
            sidecars = ((MetadataSidecars(blobs),)
                        if settings.http.enabled and settings.http.prepare_metadata else ())
            router = Router(Deidentifier(settings.deidentify, key), key, index,
                            Deidentifier(replace(settings.deidentify, clean_graphics=True), key,
                                         keep_annotation_text=True))
            ingest = IngestService(blobs, index, audit, area, router, blobs.spool_dir,
                                   validator, hooks=(annotations, series, reading, *sidecars),
                                   defer=worker.submit,
                                   limits=ReadLimits(settings.node.max_inflated_mb << 20,
                                                     settings.node.max_element_mb << 20,
                                                     settings.node.max_depth))
            quarantine = QuarantineService(area)
        review = ReviewService(index, blobs, audit, states, settings.review)
        syslog = (SyslogStream(index, audit.checkpoint, settings.audit, settings.node.ae_title,
                               data / "audit" / "syslog.cursor")
                  if settings.audit.syslog else None)
        outbox = Outbox(index, audit, settings.forward)
        states.listen(outbox)
        forwarder = ForwardWorker(settings, index, blobs, audit, key, annotations.as_seg)
        return cls(settings, index, blobs, quarantined, audit, events, series, annotations,
                   states, review, reading, search, retrieve, worker, key, outbox, forwarder,
                   ingest, quarantine, syslog)

    @property
    def ingest(self) -> IngestService:
        if self._ingest is None:
            raise RuntimeError("the project key was not loaded: nothing can be ingested")
        return self._ingest

    @property
    def quarantine(self) -> QuarantineService:
        if self._quarantine is None:
            raise RuntimeError("the project key was not loaded: quarantine is sealed")
        return self._quarantine

    @property
    def run_dir(self) -> Path:
        """Per-node runtime files (association slot locks, the node lock)."""
        path = self.settings.storage.data / "run"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def start(self, *, supervisor: bool = False) -> None:
        """Start the background work (see the module docstring); idempotent."""
        if self._started:
            return
        self.events.start()
        self.worker.start()
        self.annotations.start()
        self._started += ["events", "worker", "annotations"]
        if supervisor:
            # Once across the nodes of the index: where the lease is held (node/leases.py).
            self.background = LeasedWork(self.index.lease("background"), self._start_background,
                                         self._stop_background, "background")
            self.background.start()
            self._started.append("background")

    def _start_background(self) -> None:
        """The work one node of the index does for all: recovery, sweeps, forwarding."""
        actor = Actor(ae_title=self.settings.node.ae_title, user=f"pid:{os.getpid()}")
        # Annotations a crash left between their store and their check.
        self.annotations.check_received(actor)
        self.series.start()
        if self.syslog is not None:
            self.syslog.start()
        # Approved results not yet delivered, queued before a restart included.
        self.forwarder.start()

    def _stop_background(self) -> None:
        self.forwarder.stop()
        if self.syslog is not None:
            self.syslog.stop()
        self.series.stop()

    def drain(self, timeout: float = 30.0) -> None:
        """Wait for after-commit work and queued audit events (tests, before a report)."""
        self.worker.drain(timeout)
        self.events.flush(timeout)

    def stop(self) -> None:
        """Stop the background work in reverse order, each draining what it holds."""
        if "background" in self._started:
            self.background.stop()
        self.worker.stop()
        self.annotations.stop()
        self.events.stop()
        self._started.clear()

    def close(self) -> None:
        """Stop, write the audit head, close the index."""
        self.stop()
        self.audit.close()
        self.index.close()
