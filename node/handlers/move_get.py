"""C-MOVE and C-GET over DIMSE: sub-operations that send each blob as stored.

Why this module replaces the retrieve half of pynetdicom's Q/R service class:
in pynetdicom 3.0 a C-MOVE/C-GET handler must yield pydicom Datasets, which
the library re-encodes for every sub-operation (and it puts its own AE title,
not the requester's, in Move Originator AE Title). Lamina sends the stored
file itself: ``send_c_store(path)`` with ``STORE_SEND_CHUNKED_DATASET`` reads
it from disk in PDU-sized pieces, byte for byte as received and indexed.
:func:`install` routes the Q/R SOP classes to :class:`StoredRetrieveServiceClass`;
C-FIND keeps running pynetdicom's own loop over :mod:`node.handlers.find`.

The bound EVT_C_MOVE / EVT_C_GET handlers stay thin: they return the retrieve
service's :class:`~node.retrieve.Retrieval` (or its refusal), and the service
class below runs it: sub-operations on a new association to the destination
(C-MOVE, TCP_NODELAY set) or on the requesting association (C-GET, where the
SCU took the SCP role for storage), a pending response with the counts after
each one, C-CANCEL checked before each one.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

from pydicom.dataset import Dataset
from pynetdicom import AE, association, evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_GET, C_MOVE
from pynetdicom.dsutils import encode
from pynetdicom.presentation import PresentationContext
from pynetdicom.service_class import QueryRetrieveServiceClass

from node import status
from node.ae import associate
from node.context import NodeContext
from node.handlers.association import Sessions
from node.handlers.find import MODELS, decoded_identifier
from node.retrieve import Retrieval, RetrieveService
from node.status import Outcome, shorten
from node.storage.query import QueryEngine, StoredInstance

log = logging.getLogger("lamina.retrieve")

_MAX_CONTEXTS = 128  # PS3.8: presentation contexts per association


def make_retrieve_handlers(ctx: NodeContext, sessions: Sessions) -> list[tuple]:
    """EVT_C_MOVE and EVT_C_GET handlers bound to the node's retrieve service."""
    service = RetrieveService(ctx.settings, QueryEngine(ctx.index, ctx.settings.node.ae_title),
                              ctx.blobs, ctx.audit)

    def handle_move(event: evt.Event) -> Retrieval | Outcome:
        session = sessions.of(event.assoc)
        return service.start_move(session.peer, session.actor, decoded_identifier(event),
                                  MODELS[event.request.AffectedSOPClassUID],
                                  event.move_destination)

    def handle_get(event: evt.Event) -> Retrieval | Outcome:
        session = sessions.of(event.assoc)
        return service.start_get(session.peer, session.actor, decoded_identifier(event),
                                 MODELS[event.request.AffectedSOPClassUID])

    return [(evt.EVT_C_MOVE, handle_move), (evt.EVT_C_GET, handle_get)]


def install() -> None:
    """Route Q/R requests to :class:`StoredRetrieveServiceClass` (idempotent, process-wide)."""
    original = association.uid_to_service_class
    if getattr(original, "lamina_routes_retrieve", False):
        return

    def route(uid: str) -> type:
        found = original(uid)
        return StoredRetrieveServiceClass if found is QueryRetrieveServiceClass else found

    route.lamina_routes_retrieve = True  # type: ignore[attr-defined]
    association.uid_to_service_class = route


class StoredRetrieveServiceClass(QueryRetrieveServiceClass):
    """pynetdicom's Q/R service class with C-MOVE and C-GET sending stored files."""

    def _move_scp(self, req: C_MOVE, context: PresentationContext) -> None:
        self._retrieve(req, C_MOVE(), context, evt.EVT_C_MOVE)

    def _get_scp(self, req: C_GET, context: PresentationContext) -> None:
        self._retrieve(req, C_GET(), context, evt.EVT_C_GET)

    def _retrieve(self, req: C_MOVE | C_GET, rsp: C_MOVE | C_GET,
                  context: PresentationContext, event: evt.InterventionEvent) -> None:
        rsp.MessageID = req.MessageID
        rsp.MessageIDBeingRespondedTo = req.MessageID
        rsp.AffectedSOPClassUID = req.AffectedSOPClassUID
        try:
            plan = evt.trigger(self.assoc, event, {
                "request": req, "context": context.as_tuple,
                "_is_cancelled": self.is_cancelled})
        except Exception:
            log.exception("retrieve handler failed")
            plan = Outcome(status.UNABLE_TO_PROCESS, "the node failed to plan the retrieve")
        if not isinstance(plan, Retrieval):
            refusal = plan if isinstance(plan, Outcome) else Outcome(
                status.UNABLE_TO_PROCESS, "no retrieve handler is bound")
            self._final(rsp, context, refusal, None)
            return
        outcome = Outcome(status.UNABLE_TO_PROCESS, "association ended during the retrieve")
        try:
            outcome = self._run(plan, req, rsp, context)
            if self.assoc.is_established:
                self._final(rsp, context, outcome, plan)
        except Exception:
            log.exception("retrieve failed")
            outcome = Outcome(status.UNABLE_TO_PROCESS, "the node failed during the retrieve")
            if self.assoc.is_established:
                self._final(rsp, context, outcome, plan)
        finally:
            plan.finish(outcome)

    def _run(self, plan: Retrieval, req: C_MOVE | C_GET, rsp: C_MOVE | C_GET,
             context: PresentationContext) -> Outcome:
        """Every sub-operation, batch by batch; the outcome the final response carries."""
        items = list(zip(plan.instances, plan.paths))

        def fail_the_rest() -> None:
            unsent = items[len(items) - plan.counts.remaining:]
            plan.counts.fail_remaining([i.sop_instance_uid for i, _ in unsent])

        if plan.destination is None:  # C-GET: back over the requesting association
            batches: Iterator[tuple[Association | None, list]] = iter([(self.assoc, items)])
        else:
            batches = self._destination_batches(plan, items)
        n = 0
        for store_assoc, batch in batches:
            if store_assoc is None:
                fail_the_rest()
                if plan.counts.completed or plan.counts.warning:
                    return plan.outcome()
                return Outcome(status.SUBOPERATIONS_IMPOSSIBLE,
                               "the move destination did not accept the association")
            try:
                for instance, path in batch:
                    if self.is_cancelled(req.MessageID):
                        return plan.outcome(cancelled=True)
                    if not self.assoc.is_established:
                        return Outcome(status.UNABLE_TO_PROCESS, "association ended")
                    if not store_assoc.is_established:
                        fail_the_rest()
                        return plan.outcome()
                    n += 1
                    code = self._store(store_assoc, instance, path, req, n, plan)
                    plan.counts.record(code, instance.sop_instance_uid)
                    self._pending(rsp, context, plan)
            finally:
                if store_assoc is not self.assoc and store_assoc.is_established:
                    store_assoc.release()
        return plan.outcome()

    def _destination_batches(self, plan: Retrieval,
                             items: list) -> Iterator[tuple[Association | None, list]]:
        """One association per batch of at most 128 (SOP class, transfer syntax) contexts."""
        dest = plan.destination
        assert dest is not None
        for batch in _context_batches(items):
            ae = AE(ae_title=self.ae.ae_title)
            ae.maximum_pdu_size = self.ae.maximum_pdu_size
            ae.acse_timeout = self.ae.acse_timeout
            ae.dimse_timeout = self.ae.dimse_timeout
            ae.network_timeout = self.ae.network_timeout
            for sop_class, syntax in dict.fromkeys(
                    (i.sop_class_uid, i.transfer_syntax_uid) for i, _ in batch):
                ae.add_requested_context(sop_class, [syntax])  # as stored: never transcoded
            store_assoc = associate(ae, dest.host, dest.port, dest.ae_title)
            yield (store_assoc if store_assoc.is_established else None), batch

    def _store(self, store_assoc: Association, instance: StoredInstance, path: Path,
               req: C_MOVE | C_GET, n: int, plan: Retrieval) -> int | None:
        """One C-STORE sub-operation; its response status, or None when none came back."""
        move = plan.destination is not None
        try:
            result = store_assoc.send_c_store(
                path, msg_id=(req.MessageID + n) % 65536 or 1,
                originator_aet=self.assoc.requestor.ae_title if move else None,
                originator_id=req.MessageID if move else None)
        except (ValueError, AttributeError, OSError, RuntimeError) as exc:
            # No accepted context for the stored syntax, a missing blob, a lost association.
            log.warning("sub-operation not sent", extra={"fields": {
                "sop_instance_uid": instance.sop_instance_uid, "sha256": instance.blob_sha256,
                "reason": type(exc).__name__}})
            return None
        return int(result.Status) if "Status" in result else None

    def _pending(self, rsp: C_MOVE | C_GET, context: PresentationContext,
                 plan: Retrieval) -> None:
        c = plan.counts
        rsp.Status = status.PENDING.code
        rsp.ErrorComment = None
        rsp.Identifier = None
        rsp.NumberOfRemainingSuboperations = c.remaining
        rsp.NumberOfCompletedSuboperations = c.completed
        rsp.NumberOfFailedSuboperations = c.failed
        rsp.NumberOfWarningSuboperations = c.warning
        self.dimse.send_msg(rsp, context.context_id)

    def _final(self, rsp: C_MOVE | C_GET, context: PresentationContext, outcome: Outcome,
               plan: Retrieval | None) -> None:
        """The last response: status, counts (remaining only when cancelled), failed UIDs."""
        rsp.Identifier = None
        rsp.Status = outcome.status.code
        rsp.ErrorComment = shorten(outcome.comment) if outcome.comment else None
        rsp.NumberOfRemainingSuboperations = None
        if plan is not None:
            c = plan.counts
            if outcome.status is status.CANCELLED:
                rsp.NumberOfRemainingSuboperations = c.remaining
            rsp.NumberOfCompletedSuboperations = c.completed
            rsp.NumberOfFailedSuboperations = c.failed
            rsp.NumberOfWarningSuboperations = c.warning
            if c.failed_uids:
                ds = Dataset()
                ds.FailedSOPInstanceUIDList = c.failed_uids
                syntax = context.transfer_syntax[0]
                rsp.Identifier = BytesIO(encode(ds, syntax.is_implicit_VR,
                                                syntax.is_little_endian, syntax.is_deflated))
        self.dimse.send_msg(rsp, context.context_id)


def _context_batches(items: list[tuple[StoredInstance, Path]]) -> Iterator[list]:
    """Split items so that no batch needs more than 128 presentation contexts."""
    batch: list = []
    contexts: set[tuple[str, str]] = set()
    for item in items:
        key = (item[0].sop_class_uid, item[0].transfer_syntax_uid)
        if key not in contexts and len(contexts) >= _MAX_CONTEXTS:
            yield batch
            batch, contexts = [], set()
        contexts.add(key)
        batch.append(item)
    if batch:
        yield batch
