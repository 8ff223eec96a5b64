"""The process's event metrics (prometheus-client), counted where the events happen.

DIMSE handlers, the query/retrieve loops and the HTTP app all count into the
one :class:`Metrics` of their process. Under ``lamina serve`` every worker
process writes them to ``PROMETHEUS_MULTIPROC_DIR`` (set by the supervisor
before any worker starts) and :mod:`node.web.metrics` sums them over all
processes at scrape time. Base units: seconds and bytes.
"""

from __future__ import annotations

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    """Created once per process: prometheus-client refuses a metric registered twice."""

    _made: Metrics | None = None

    def __init__(self) -> None:
        # Imported here, not at the top: prometheus-client picks its multiprocess mode when
        # first imported, and the DIMSE handlers import this module before ``lamina serve``
        # has set PROMETHEUS_MULTIPROC_DIR (node.serve._metrics_folder).
        from prometheus_client import Counter, Histogram

        self.requests = Counter("lamina_http_requests", "HTTP requests answered",
                                ["method", "route", "status"])
        self.request_seconds = Histogram("lamina_http_request_duration_seconds",
                                         "HTTP request latency", ["route"],
                                         buckets=LATENCY_BUCKETS)
        self.query_seconds = Histogram("lamina_query_duration_seconds",
                                       "Query latency (QIDO-RS, C-FIND), answer sent",
                                       ["protocol", "level"], buckets=LATENCY_BUCKETS)
        self.ingest_seconds = Histogram("lamina_ingest_duration_seconds",
                                        "Ingest latency of one instance (C-STORE, STOW-RS)",
                                        ["protocol"], buckets=LATENCY_BUCKETS)
        self.stored = Counter("lamina_stow_instances", "STOW-RS instances by DIMSE status",
                              ["status"])
        self.cstore = Counter("lamina_cstore_instances",
                              "C-STORE instances by the DIMSE status answered "
                              "(0x0000 received, 0xB000 warning, others refused)", ["status"])
        self.cstore_bytes = Counter("lamina_cstore_received_bytes",
                                    "C-STORE dataset bytes received")
        self.received_bytes = Counter("lamina_http_received_bytes",
                                      "STOW-RS request body bytes received")
        self.sent_bytes = Counter("lamina_http_sent_bytes", "WADO-RS bytes sent")

    @classmethod
    def get(cls) -> Metrics:
        if cls._made is None:
            cls._made = Metrics()
        return cls._made
