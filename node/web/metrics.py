"""``/metrics`` in the Prometheus text format (prometheus-client), base units throughout.

Two kinds of figures:

* events counted where they happen (:class:`node.metrics.Metrics`: HTTP
  requests and their latency, QIDO-RS and C-FIND latency, C-STORE and STOW-RS
  instances by status, ingest latency, bytes in and out). Under ``lamina
  serve`` every worker process writes them to ``PROMETHEUS_MULTIPROC_DIR``
  (set by the supervisor before any worker starts), and a scrape of any worker
  sums them over all;
* state read from the index, the disk and the association slots at scrape time
  (instances stored, conflicts kept, quarantine waiting, free disk, associations
  open, forwarding queue depth by destination and state): the same in every
  process,
  and counting C-STORE and STOW-RS alike because both end in the index.
"""

from __future__ import annotations

import os

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector

from node.context import NodeContext
from node.policy import SlotLimiter


class IndexCollector:
    """State read at scrape time from the index and the data disk."""

    def __init__(self, ctx: NodeContext) -> None:
        self.ctx = ctx

    def collect(self):
        with self.ctx.index.reader() as reader:
            counts = reader.reports.counts()
            waiting = reader.reports.quarantine_waiting()
            queue = reader.outbox.counts()
        for name, key, text in (("lamina_instances_stored", "instance", "Instances indexed"),
                                ("lamina_conflicts_kept", "conflict",
                                 "Resends kept as conflicts"),
                                ("lamina_studies_stored", "study", "Studies indexed")):
            yield GaugeMetricFamily(name, text, value=counts.get(key, 0))
        yield GaugeMetricFamily("lamina_quarantine_waiting",
                                "Quarantined objects not released", value=waiting)
        yield GaugeMetricFamily("lamina_disk_free_bytes", "Free bytes on the data disk",
                                value=self.ctx.blobs.free_bytes())
        depth = GaugeMetricFamily("lamina_forward_queue_items",
                                  "Forwarding outbox items by destination and state",
                                  labels=["destination", "state"])
        for destination, states in sorted(queue.items()):
            for state, n in sorted(states.items()):
                depth.add_metric([destination, state], n)
        yield depth
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
