"""The one error type routes raise: an HTTP status and the reason, in plain words.

Every refusal is a 4xx (or 503) with a JSON body ``{"status": ..., "reason": ...}``:
reasons come from the services or name the parameter at fault, never a value
the client sent (a patient name typed into a query is PHI).
"""

from __future__ import annotations

from node.status import Outcome


class WebError(Exception):
    """Answer ``status`` with ``reason`` (and optional extra headers)."""

    def __init__(self, status: int, reason: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.headers = headers or {}

    @classmethod
    def of(cls, outcome: Outcome) -> WebError:
        """The HTTP twin of a service's refusal (see :mod:`node.status`)."""
        return cls(outcome.status.http, outcome.comment or outcome.status.name)
