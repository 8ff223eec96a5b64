"""The C-FIND service (and, later, QIDO-RS's): who may search, what matches, what is audited.

The matching itself is :mod:`node.storage.query` (run by the storage backend's
:class:`~node.storage.query.Matcher`); this module adds the rules
around it, so every front end applies them the same way:

* a peer searches only when its ``services`` include ``find``;
* only the index is searched, and the index holds only stored (de-identified)
  instances, never quarantine or conflicts;
* every search is audited once, when it ends, with who asked, the model and
  level, the names of the keys that constrained it, how many matches were sent
  and how it ended: never a key's value (a patient name typed into a query
  is PHI).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from pydicom.dataset import Dataset

from node import status
from node.audit.served import AuditQueue, report
from node.audit.trail import Actor
from node.config import Peer
from node.status import Outcome, Status
from node.storage.query import Match, Matcher, Model, Query, QueryError, hiding, parse

#: The series a peer must not see (an annotator blinded to another reader's annotation
#: while their study waits for its second reading): the context wires double reading here.
Blinding = Callable[[Peer], Sequence[str]]

log = logging.getLogger("lamina.search")


@dataclass
class Search:
    """One running search: iterate :meth:`results`, then :meth:`finish` it once."""

    engine: Matcher
    events: AuditQueue
    actor: Actor
    query: Query
    matches: int = 0
    _finished: bool = field(default=False, repr=False)

    @property
    def pending(self) -> Status:
        """0xFF01 when some keys were not supported, so the SCU knows they were not matched."""
        return status.PENDING_KEYS_UNSUPPORTED if self.query.unsupported else status.PENDING

    def results(self, limit: int | None = None, offset: int = 0) -> Iterator[Match]:
        """The matches, straight off the index; close the iterator when stopping early.

        ``limit`` / ``offset`` page through them (QIDO-RS) in the index's stable order."""
        for match in self.engine.matches(self.query, limit=limit, offset=offset):
            self.matches += 1
            yield match

    def finish(self, outcome: Outcome) -> None:
        """Audit how the search ended (complete, cancelled, failed); later calls do nothing."""
        if self._finished:
            return
        self._finished = True
        obj = {"model": self.query.model.value, "level": self.query.level.name,
               "keys": self.query.matching_keywords, "matches": self.matches,
               "status": f"0x{outcome.status.code:04X}"}
        report(self.events, log, "query.find", self.actor, obj, outcome.status.is_failure)


class SearchService:
    """Starts searches for peers; the one place find permission is decided."""

    def __init__(self, engine: Matcher, events: AuditQueue,
                 blinding: Blinding | None = None) -> None:
        self.engine = engine
        self.events = events
        self.blinding = blinding

    def start(self, peer: Peer | None, actor: Actor, identifier: Dataset | None,
              model: Model) -> Search | Outcome:
        """A search ready to run, or the refusal to answer (already audited).

        ``identifier`` is None when the request's identifier did not decode.
        """
        if peer is None or "find" not in peer.services:
            return self._refuse(actor, model, Outcome(
                status.NOT_AUTHORISED, "this peer may not query (find is not in its services)"))
        if identifier is None:
            return self._refuse(actor, model, Outcome(
                status.CANNOT_UNDERSTAND, "identifier cannot be decoded"))
        try:
            query = parse(identifier, model)
        except QueryError as exc:
            return self._refuse(actor, model, Outcome(exc.status, exc.reason))
        if self.blinding is not None:
            query = hiding(query, self.blinding(peer))
        return Search(self.engine, self.events, actor, query)

    def _refuse(self, actor: Actor, model: Model, outcome: Outcome) -> Outcome:
        report(self.events, log, "query.refused", actor,
               {"model": model.value, "status": f"0x{outcome.status.code:04X}",
                "reason": outcome.comment}, failed=True)
        return outcome

