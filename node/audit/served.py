"""One log line and one audit event per query or retrieve served from the index.

Shared by the search and retrieve services so both write the same shape. The
event is written after the responses have gone out (only then is the match
count known); an index that cannot take it is logged as an error rather than
turned into a failure status for a request that has already been answered.
"""

from __future__ import annotations

import logging
from typing import Any

from node.audit.trail import Actor, AuditTrail
from node.storage.index import IndexUnavailable


def report(audit: AuditTrail, log: logging.Logger, action: str, actor: Actor,
           obj: dict[str, Any], failed: bool) -> None:
    """Log and audit ``obj`` (counts, names of keys, AE titles: never identifier values)."""
    # "level" is the log line's own severity field: the query level goes out as query_level.
    fields = {"association": actor.association_id, "calling_ae": actor.ae_title,
              **{("query_level" if k == "level" else k): v for k, v in obj.items()}}
    log.log(logging.WARNING if failed else logging.INFO, action, extra={"fields": fields})
    try:
        audit.record(action, actor, obj, "minor-failure" if failed else "success")
    except (IndexUnavailable, OSError):
        log.error("audit write failed", extra={"fields": {"action": action}})
