"""NodeContext: builds, owns and wires the node's parts. The one place state lives.

Handlers, CLI commands and (later) the HTTP app receive a context and call its
services; none of them opens files or databases on its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from node.annotations.grid import HeaderGridSource
from node.annotations.service import AnnotationService
from node.audit.trail import AuditTrail, HeadCheckpoint
from node.checks.protocol import Protocol, load_protocol
from node.config import Settings
from node.ingest.pipeline import IngestService
from node.storage.blobs import BlobStore
from node.storage.index import Index


@dataclass
class NodeContext:
    settings: Settings
    index: Index
    blobs: BlobStore
    audit: AuditTrail
    ingest: IngestService
    annotations: AnnotationService

    @classmethod
    def open(cls, settings: Settings, migrate: bool = True) -> NodeContext:
        """Open (and create on first use) the data folder, index and audit trail."""
        data = settings.storage.data
        data.mkdir(parents=True, exist_ok=True)
        index = Index(settings.index_path, settings.index.busy_timeout_ms)
        if migrate:
            index.migrate()
        blobs = BlobStore(data / "blobs", data / "spool", settings.storage.min_free_mb << 20)
        audit = AuditTrail(index, HeadCheckpoint(data / "audit" / "head.json",
                                                 settings.audit.signing_key))
        protocol = (load_protocol(settings.annotations.protocol)
                    if settings.annotations.protocol else Protocol())
        annotations = AnnotationService(index, blobs, audit, HeaderGridSource(index, blobs),
                                        protocol, settings.annotations.settle_seconds)
        return cls(settings, index, blobs, audit, IngestService(blobs, index, audit, annotations),
                   annotations)

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
