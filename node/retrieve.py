"""The C-MOVE / C-GET service: who may retrieve what, to where, and which stored files go.

The DIMSE mechanics (sub-associations, pending responses, C-CANCEL) live in
:mod:`node.dimse.qr_loops`; this module decides everything that does not
depend on the wire, so a later WADO-RS can share it:

* a peer retrieves only when its ``services`` include ``move`` or ``get``;
* a C-MOVE destination is a configured peer with that AE title (unknown →
  0xA801) and must be listed in the requesting peer's ``move_destinations``
  (else refused, 0x0124): naming an AE title must not be enough to make the
  node send images to it;
* the instances are chosen by the unique keys of the identifier only, through
  the same matching engine as C-FIND; the plan names them by what the index
  holds (:class:`~node.storage.query.StoredInstance`, with the blob's hash),
  and the front end reads their bytes from the blob store;
* every retrieve is audited once when it ends: who, model, level, destination
  AE, how many instances matched, completed, failed and warned — no UIDs or
  other identifier values.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from pydicom.dataset import Dataset

from node import status
from node.audit.served import AuditQueue, report
from node.audit.trail import Actor
from node.config import Peer, Settings
from node.search import Blinding
from node.status import Outcome
from node.storage.interface import IndexUnavailable
from node.storage.query import Matcher, Model, Query, QueryError, StoredInstance, hiding, parse

log = logging.getLogger("lamina.retrieve")

#: Sub-operation counters are US in the C-MOVE/C-GET responses.
MAX_SUBOPERATIONS = 65535


@dataclass
class Counts:
    """Sub-operation tallies, as the pending and final responses report them."""

    remaining: int
    completed: int = 0
    failed: int = 0
    warning: int = 0
    failed_uids: list[str] = field(default_factory=list)

    def record(self, store_status: int | None, sop_instance_uid: str) -> None:
        """Count one C-STORE sub-operation by its response status (None: no response)."""
        self.remaining -= 1
        if store_status == 0x0000:
            self.completed += 1
        elif store_status is not None and (0xB000 <= store_status <= 0xBFFF
                                           or store_status in (0x0001, 0x0107, 0x0116)):
            self.warning += 1
        else:
            self.failed += 1
            self.failed_uids.append(sop_instance_uid)

    def fail_remaining(self, uids: list[str]) -> None:
        """The rest could not be attempted (destination refused, association lost)."""
        self.failed += len(uids)
        self.failed_uids.extend(uids)
        self.remaining -= len(uids)


@dataclass
class Retrieval:
    """A permitted retrieve: the instances to send, where to, and its audit on completion."""

    kind: str  # "move" | "get"
    query: Query
    instances: list[StoredInstance]
    destination: Peer | None
    events: AuditQueue
    actor: Actor
    counts: Counts = field(init=False)
    _finished: bool = field(default=False, repr=False)

    def __post_init__(self) -> None:
        self.counts = Counts(len(self.instances))

    def outcome(self, cancelled: bool = False) -> Outcome:
        """The final status the counts call for (PS3.4 C.4.2.1.5 / C.4.3.1.4)."""
        c = self.counts
        if cancelled:
            return Outcome(status.CANCELLED)
        if not c.failed and not c.warning:
            return Outcome(status.SUCCESS)
        if not c.completed and not c.warning:
            return Outcome(status.SUBOPERATIONS_IMPOSSIBLE,
                           f"all {c.failed} sub-operations failed")
        return Outcome(status.SUBOPERATIONS_FAILED,
                       f"{c.failed} failed, {c.warning} with warnings")

    def finish(self, outcome: Outcome) -> None:
        """Audit the end of the retrieve once (later calls do nothing)."""
        if self._finished:
            return
        self._finished = True
        c = self.counts
        obj = {"model": self.query.model.value, "level": self.query.level.name,
               "matches": len(self.instances), "completed": c.completed, "failed": c.failed,
               "warning": c.warning, "status": f"0x{outcome.status.code:04X}"}
        if self.destination is not None:
            obj["destination"] = self.destination.ae_title
        report(self.events, log, f"retrieve.{self.kind}", self.actor, obj,
               not outcome.status.is_success)


class RetrieveService:
    """Plans C-MOVE and C-GET requests for peers; the one place retrieve permission is decided."""

    def __init__(self, settings: Settings, engine: Matcher, events: AuditQueue,
                 blinding: Blinding | None = None) -> None:
        self.settings = settings
        self.engine = engine
        self.events = events
        self.blinding = blinding

    def start_move(self, peer: Peer | None, actor: Actor, identifier: Dataset | None,
                   model: Model, destination_ae: str) -> Retrieval | Outcome:
        """A retrieval to run towards ``destination_ae``, or the refusal (already audited)."""
        if peer is None or "move" not in peer.services:
            return self._refuse("move", actor, model, Outcome(
                status.NOT_AUTHORISED, "this peer may not move (move is not in its services)"))
        destination = self.destination(peer, destination_ae)
        if isinstance(destination, Outcome):
            return self._refuse("move", actor, model, destination)
        return self._plan("move", peer, actor, identifier, model, destination)

    def start_get(self, peer: Peer | None, actor: Actor, identifier: Dataset | None,
                  model: Model) -> Retrieval | Outcome:
        """A retrieval to send back on the requesting association, or the refusal."""
        if peer is None or "get" not in peer.services:
            return self._refuse("get", actor, model, Outcome(
                status.NOT_AUTHORISED, "this peer may not get (get is not in its services)"))
        return self._plan("get", peer, actor, identifier, model, None)

    def destination(self, requester: Peer, ae_title: str) -> Peer | Outcome:
        """The configured peer a C-MOVE names, if the requester may send to it."""
        title = ae_title.strip()
        candidates = self.settings.peers_with_ae(title)
        if not candidates:
            return Outcome(status.MOVE_DESTINATION_UNKNOWN,
                           f"no configured peer has AE title {title[:16]}")
        allowed = [p for p in candidates if p.name in requester.move_destinations]
        if not allowed:
            return Outcome(status.NOT_AUTHORISED, f"this peer may not move to {title[:16]}")
        return allowed[0]

    def _plan(self, kind: str, peer: Peer, actor: Actor, identifier: Dataset | None,
              model: Model, destination: Peer | None) -> Retrieval | Outcome:
        if identifier is None:
            return self._refuse(kind, actor, model, Outcome(
                status.CANNOT_UNDERSTAND, "identifier cannot be decoded"))
        try:
            query = parse(identifier, model, retrieve=True)
            if self.blinding is not None:
                query = hiding(query, self.blinding(peer), retrieve=True)
            instances = []
            for instance in self.engine.instances(query):
                instances.append(instance)
                if len(instances) > MAX_SUBOPERATIONS:
                    return self._refuse(kind, actor, model, Outcome(
                        status.TOO_MANY_MATCHES,
                        f"more than {MAX_SUBOPERATIONS} instances; retrieve by study or series"))
        except QueryError as exc:
            return self._refuse(kind, actor, model, Outcome(exc.status, exc.reason))
        except IndexUnavailable:
            return self._refuse(kind, actor, model, Outcome(
                status.OUT_OF_RESOURCES, "index unavailable"))
        return Retrieval(kind, query, instances, destination, self.events, actor)

    def _refuse(self, kind: str, actor: Actor, model: Model, outcome: Outcome) -> Outcome:
        report(self.events, log, f"retrieve.{kind}.refused", actor,
               {"model": model.value, "status": f"0x{outcome.status.code:04X}",
                "reason": outcome.comment}, failed=True)
        return outcome

