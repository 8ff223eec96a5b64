"""``/metrics`` in the Prometheus text format (prometheus-client), base units throughout.

Two kinds of figures:

* events counted where they happen (HTTP requests and their latency, QIDO
  query latency, STOW-RS instances by status, ingest latency, bytes in and
  out). Under ``lamina serve`` every worker process writes them to
  ``PROMETHEUS_MULTIPROC_DIR`` (set by the supervisor before any worker
  starts), and a scrape of any worker sums them over all;
* state read from the index, the disk and the association slots at scrape time
  (instances stored, conflicts kept, quarantine waiting, free disk, associations
  open): the same in every process,
  and counting C-STORE and STOW-RS alike because both end in the index.
"""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector

from node.context import NodeContext
from node.policy import SlotLimiter

_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    """The process's event metrics (created once per process: prometheus-client keeps them)."""

    _made: Metrics | None = None

    def __init__(self) -> None:
        self.requests = Counter("lamina_http_requests", "HTTP requests answered",
                                ["method", "route", "status"])
        self.request_seconds = Histogram("lamina_http_request_duration_seconds",
                                         "HTTP request latency", ["route"], buckets=_LATENCY)
        self.query_seconds = Histogram("lamina_query_duration_seconds",
                                       "QIDO-RS query latency", ["level"], buckets=_LATENCY)
        self.ingest_seconds = Histogram("lamina_ingest_duration_seconds",
                                        "Ingest latency of one STOW-RS instance",
                                        buckets=_LATENCY)
        self.stored = Counter("lamina_stow_instances", "STOW-RS instances by DIMSE status",
                              ["status"])
        self.received_bytes = Counter("lamina_http_received_bytes",
                                      "STOW-RS request body bytes received")
        self.sent_bytes = Counter("lamina_http_sent_bytes", "WADO-RS bytes sent")

    @classmethod
    def get(cls) -> Metrics:
        if cls._made is None:
            cls._made = Metrics()
        return cls._made


class IndexCollector:
    """State read at scrape time from the index and the data disk."""

    def __init__(self, ctx: NodeContext) -> None:
        self.ctx = ctx

    def collect(self):
        with self.ctx.index.reader() as reader:
            counts = reader.reports.counts()
            waiting = reader.reports.quarantine_waiting()
        for name, key, text in (("lamina_instances_stored", "instance", "Instances indexed"),
                                ("lamina_conflicts_kept", "conflict",
                                 "Resends kept as conflicts"),
                                ("lamina_studies_stored", "study", "Studies indexed")):
            yield GaugeMetricFamily(name, text, value=counts.get(key, 0))
        yield GaugeMetricFamily("lamina_quarantine_waiting",
                                "Quarantined objects not released", value=waiting)
        yield GaugeMetricFamily("lamina_disk_free_bytes", "Free bytes on the data disk",
                                value=self.ctx.blobs.free_bytes())
        held = SlotLimiter(self.ctx.run_dir, self.ctx.settings.node.max_associations).held()
        if held is not None:
            yield GaugeMetricFamily("lamina_associations_open",
                                    "DICOM associations open across the worker processes",
                                    value=held)


def exposition(ctx: NodeContext) -> tuple[bytes, str]:
    """The scrape body and its content type."""
    state = CollectorRegistry()
    state.register(IndexCollector(ctx))
    multiprocess = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if multiprocess:
        events = CollectorRegistry()
        MultiProcessCollector(events, path=multiprocess)
    else:
        events = REGISTRY
    return generate_latest(events) + generate_latest(state), CONTENT_TYPE_LATEST
