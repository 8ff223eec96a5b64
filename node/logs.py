"""Structured logs: one JSON object per line, no patient data.

Callers pass structured fields with ``extra={"fields": {...}}``; only UIDs,
hashes, AE titles, addresses and counts go there (never names or IDs).
pynetdicom's own logger is kept at WARNING: its INFO lines describe every
PDU, and identifier logging is switched off in :mod:`node.dimse.ae`.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from datetime import UTC, datetime


class JsonFormatter(logging.Formatter):
    def __init__(self, node_id: str = "") -> None:
        """``node_id``: this node among several on one index (``node.id``), on every line."""
        super().__init__()
        self.node = {"node": node_id} if node_id else {}

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            **self.node,
            "pid": os.getpid(),
            "msg": record.getMessage(),
            **getattr(record, "fields", {}),
        }
        if record.exc_info:
            line["error"] = self.formatException(record.exc_info).splitlines()[-1]
        return json.dumps(line, default=str)


def quiet_pydicom() -> None:
    """pydicom's validation warnings quote element values (patient data): off."""
    from pydicom import config

    config.settings.reading_validation_mode = config.IGNORE
    config.settings.writing_validation_mode = config.IGNORE


def setup_logging(level: str, node_id: str = "") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(node_id))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
