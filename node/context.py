"""NodeContext: builds, owns and wires the node's parts. The one place state lives.

Handlers, CLI commands and (later) the HTTP app receive a context and call its
services; none of them opens files or databases on its own.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from node.annotations.grid import HeaderGridSource
from node.annotations.service import AnnotationService
from node.anonymize.anonymizer import Deidentifier
from node.anonymize.keys import ProjectKey, load_project_key
from node.audit.trail import AuditTrail, HeadCheckpoint
from node.checks.protocol import Protocol, load_protocol
from node.checks.series import SeriesChecker
from node.config import Settings
from node.ingest.iod import IODTables
from node.ingest.pipeline import IngestService
from node.ingest.quarantine import QuarantineArea, QuarantineService
from node.ingest.routes import Router
from node.ingest.validate import Validator
from node.retrieve import RetrieveService
from node.search import SearchService
from node.storage.blobs import BlobStore
from node.storage.index import Index
from node.storage.query import Matcher
from node.storage.sealed import Sealer
from node.storage.sqlite.matcher import SqliteMatcher


@dataclass
class NodeContext:
    settings: Settings
    index: Index
    blobs: BlobStore
    audit: AuditTrail
    series: SeriesChecker
    annotations: AnnotationService
    key: ProjectKey | None
    _ingest: IngestService | None
    _quarantine: QuarantineService | None

    @classmethod
    def open(cls, settings: Settings, *, migrate: bool = True,
             with_key: bool = False) -> NodeContext:
        """Open (and create on first use) the data folder, index and audit trail.

        ``with_key`` loads the project key and builds the services that need it
        (ingest de-identifies, quarantine seals and unseals); without it (status,
        fsck, audit verify, check) nothing can be received.
        Raises ``ProjectKeyError`` with how to make a key when there is none.
        """
        data = settings.storage.data
        data.mkdir(parents=True, exist_ok=True)
        index = Index(settings.index_path, settings.index.busy_timeout_ms)
        if migrate:
            index.migrate()
        blobs = BlobStore(data / "blobs", data / "spool", settings.storage.min_free_mb << 20)
        audit = AuditTrail(index, HeadCheckpoint(data / "audit" / "head.json",
                                                 settings.audit.signing_key))
        series = SeriesChecker(index, audit, settings.validation, settings.node.ae_title)
        protocol = (load_protocol(settings.annotations.protocol)
                    if settings.annotations.protocol else Protocol())
        annotations = AnnotationService(index, blobs, audit, HeaderGridSource(index, blobs),
                                        protocol, settings.annotations.settle_seconds)
        key, ingest, quarantine = None, None, None
        if with_key:
            key = load_project_key(settings.deidentify.key_file, data_dir=data)
            area = QuarantineArea(BlobStore(data / "quarantine", data / "spool"), blobs, index,
                                  audit, Sealer(key))
            validator = None
            if settings.validation.enabled:
                validator = Validator(settings.validation, IODTables.load())
            router = Router(Deidentifier(settings.deidentify, key), key, index,
                            Deidentifier(replace(settings.deidentify, clean_graphics=True), key))
            ingest = IngestService(blobs, index, audit, area, router, validator, annotations)
            quarantine = QuarantineService(area)
        return cls(settings, index, blobs, audit, series, annotations, key, ingest, quarantine)

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
    def matcher(self) -> Matcher:
        """The storage backend's query matcher, shared by search and retrieve."""
        return SqliteMatcher(self.index, self.settings.node.ae_title)

    @property
    def search(self) -> SearchService:
        """C-FIND (and later QIDO-RS): who may search, what matches, what is audited."""
        return SearchService(self.matcher, self.audit)

    @property
    def retrieve(self) -> RetrieveService:
        """C-MOVE / C-GET (and later WADO-RS): who may retrieve what, to where."""
        return RetrieveService(self.settings, self.matcher, self.blobs, self.audit)

    @property
    def run_dir(self) -> Path:
        """Per-node runtime files (association slot locks)."""
        path = self.settings.storage.data / "run"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def close(self) -> None:
        self.annotations.close()
        self.audit.close()
        self.index.close()
