"""The query/retrieve DIMSE loops: C-FIND responses and C-MOVE / C-GET sub-operations.

Why Lamina runs these loops instead of pynetdicom's Q/R service class:

* C-FIND: pynetdicom builds and encodes a pydicom Dataset for every match and
  encodes the same pending command set again for each; together about a
  millisecond of CPU per response. Here the pending command set is encoded
  once per request, the identifier goes straight to bytes
  (:mod:`node.dimse.identifier`), and both travel in one P-DATA PDU.
* C-MOVE / C-GET: pynetdicom only sends Datasets its handler yields,
  re-encoding every instance, and puts its own AE title in Move Originator AE
  Title. Here each blob is sent as stored. C-MOVE opens its own storage
  association to the destination (:mod:`node.dimse.sender`, about
  eight times faster than a pynetdicom association); C-GET sends back over the
  requesting association with ``send_c_store(path)`` and
  ``STORE_SEND_CHUNKED_DATASET``, which reads the file in PDU-sized pieces.

Everything else (association handling, C-CANCEL bookkeeping, status
validation) stays pynetdicom's. :func:`install` routes the Q/R SOP classes to
:class:`LaminaQueryRetrieveServiceClass`. The bound EVT_C_FIND / EVT_C_MOVE /
EVT_C_GET handlers stay thin: they return the service's plan (a
:class:`~node.search.Search` or :class:`~node.retrieve.Retrieval`) or its
refusal, and the loops below run it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import closing
from io import BytesIO
from pathlib import Path

from pydicom.dataset import Dataset
from pynetdicom import association, evt
from pynetdicom.association import Association
from pynetdicom.dimse_messages import C_FIND_RSP
from pynetdicom.dimse_primitives import C_FIND, C_GET, C_MOVE
from pynetdicom.dsutils import encode
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.presentation import PresentationContext
from pynetdicom.service_class import QueryRetrieveServiceClass

from node import status
from node.dimse.ae import context_batches
from node.dimse.identifier import encode_match
from node.dimse.sender import AssociationFailed, NoContext, StoreAssociation
from node.retrieve import Retrieval
from node.search import Search
from node.status import Outcome, shorten
from node.storage.index import IndexUnavailable
from node.storage.query import StoredInstance

log = logging.getLogger("lamina.qr")

#: Pending C-MOVE/C-GET responses are optional (PS3.4 C.4.2.3.1) and cost almost a
#: millisecond each in pynetdicom: one per interval keeps a progress bar moving.
_PROGRESS_INTERVAL = 0.1  # seconds
_BATCH = 64  # C-FIND responses queued before waiting for the DUL to send them
_DRAIN_POLL = 0.0002  # seconds between looks at the DUL's send queue
_DUL_TURN = 0.001  # one idle DUL loop (pynetdicom's run-loop delay): it reads the socket
_PDV_ITEM_HEADER = 5  # PS3.8 9.3.5.1: item length (4) and presentation context ID (1)


def install() -> None:
    """Route Q/R requests to :class:`LaminaQueryRetrieveServiceClass` (idempotent, per process)."""
    original = association.uid_to_service_class
    if getattr(original, "lamina_routes_qr", False):
        return

    def route(uid: str) -> type:
        found = original(uid)
        return LaminaQueryRetrieveServiceClass if found is QueryRetrieveServiceClass else found

    route.lamina_routes_qr = True  # type: ignore[attr-defined]
    association.uid_to_service_class = route


class LaminaQueryRetrieveServiceClass(QueryRetrieveServiceClass):
    """pynetdicom's Q/R service class with Lamina's C-FIND, C-MOVE and C-GET loops."""

    # --- C-FIND ------------------------------------------------------------------

    def _c_find_scp(self, req: C_FIND, context: PresentationContext) -> None:
        rsp = C_FIND()
        rsp.MessageIDBeingRespondedTo = req.MessageID
        rsp.AffectedSOPClassUID = req.AffectedSOPClassUID
        search = self._plan(evt.EVT_C_FIND, req, context)
        if not isinstance(search, Search):
            self._send_final(rsp, context, search)
            return
        outcome = Outcome(status.UNABLE_TO_PROCESS, "association ended before the last match")
        try:
            outcome = self._stream(search, req, context)
        finally:
            # Answer first, then audit: the audit write is not the client's wait.
            if self.assoc.is_established:
                self._send_final(rsp, context, outcome)
            search.finish(outcome)

    def _stream(self, search: Search, req: C_FIND, context: PresentationContext) -> Outcome:
        """A pending response per match until the last, a C-CANCEL or a failure."""
        implicit = context.transfer_syntax[0].is_implicit_VR
        send = _PendingFind(self, req, context, search.pending.code)
        try:
            with closing(search.results()) as results:
                for match in results:
                    if self.is_cancelled(req.MessageID):
                        return Outcome(status.CANCELLED)
                    if not self.assoc.is_established:
                        break
                    send(encode_match(match, implicit))
        except IndexUnavailable:
            return Outcome(status.OUT_OF_RESOURCES, "index unavailable")
        except Exception:
            log.exception("query failed")
            return Outcome(status.UNABLE_TO_PROCESS, "the node failed while answering")
        if not self.assoc.is_established:
            return Outcome(status.UNABLE_TO_PROCESS, "association ended before the last match")
        return Outcome(status.SUCCESS)

    # --- C-MOVE and C-GET ----------------------------------------------------------

    def _move_scp(self, req: C_MOVE, context: PresentationContext) -> None:
        self._retrieve(req, C_MOVE(), context, evt.EVT_C_MOVE)

    def _get_scp(self, req: C_GET, context: PresentationContext) -> None:
        self._retrieve(req, C_GET(), context, evt.EVT_C_GET)

    def _retrieve(self, req: C_MOVE | C_GET, rsp: C_MOVE | C_GET,
                  context: PresentationContext, event: evt.InterventionEvent) -> None:
        rsp.MessageIDBeingRespondedTo = req.MessageID
        rsp.AffectedSOPClassUID = req.AffectedSOPClassUID
        plan = self._plan(event, req, context)
        if not isinstance(plan, Retrieval):
            self._send_final(rsp, context, plan)
            return
        outcome = Outcome(status.UNABLE_TO_PROCESS, "association ended during the retrieve")
        try:
            outcome = self._run(plan, req, rsp, context)
        except Exception:
            log.exception("retrieve failed")
            outcome = Outcome(status.UNABLE_TO_PROCESS, "the node failed during the retrieve")
        finally:
            if self.assoc.is_established:
                self._send_final(rsp, context, outcome, plan)
            plan.finish(outcome)

    def _run(self, plan: Retrieval, req: C_MOVE | C_GET, rsp: C_MOVE | C_GET,
             context: PresentationContext) -> Outcome:
        """Every sub-operation, batch by batch; the outcome the final response carries."""
        items = list(zip(plan.instances, plan.paths, strict=False))

        def fail_the_rest() -> None:
            unsent = items[len(items) - plan.counts.remaining:]
            plan.counts.fail_remaining([i.sop_instance_uid for i, _ in unsent])

        move = plan.destination is not None
        batches = self._destination_batches(plan, items) if move else \
            iter([(_GetSender(self.assoc), items)])
        n, last_progress = 0, time.monotonic()
        for sender, batch in batches:
            if isinstance(sender, AssociationFailed):
                log.warning("move destination unavailable", extra={"fields": {
                    "destination": plan.destination.ae_title if plan.destination else "",
                    "reason": str(sender)}})
                fail_the_rest()
                if plan.counts.completed or plan.counts.warning:
                    return plan.outcome()
                return Outcome(status.SUBOPERATIONS_IMPOSSIBLE,
                               "the move destination did not accept the association")
            try:
                for k, (instance, path) in enumerate(batch):
                    if self.is_cancelled(req.MessageID):
                        return plan.outcome(cancelled=True)
                    if not self.assoc.is_established:
                        return Outcome(status.UNABLE_TO_PROCESS, "association ended")
                    if not sender.is_established:
                        fail_the_rest()
                        return plan.outcome()
                    n += 1
                    code = self._store(sender, instance, path, (req.MessageID + n) % 65536 or 1,
                                       req.MessageID if move else None,
                                       batch[k + 1] if k + 1 < len(batch) else None)
                    plan.counts.record(code, instance.sop_instance_uid)
                    now = time.monotonic()
                    if now - last_progress >= _PROGRESS_INTERVAL:
                        self._send_progress(rsp, context, plan)
                        last_progress = now
            finally:
                sender.release()
        return plan.outcome()

    def _destination_batches(self, plan: Retrieval, items: list
                             ) -> Iterator[tuple[StoreAssociation | AssociationFailed, list]]:
        """One association per batch of at most 128 presentation contexts (or why not)."""
        dest = plan.destination
        assert dest is not None
        for batch in context_batches(items, lambda i: (i[0].sop_class_uid,
                                                         i[0].transfer_syntax_uid)):
            contexts = list(dict.fromkeys(
                (i.sop_class_uid, i.transfer_syntax_uid) for i, _ in batch))
            try:
                yield StoreAssociation.open(
                    self.ae.ae_title, dest.host, dest.port, dest.ae_title, contexts,
                    self.ae.maximum_pdu_size, self.ae.acse_timeout or 30,
                    self.ae.dimse_timeout or 60), batch
            except AssociationFailed as exc:
                yield exc, batch

    def _store(self, sender: StoreAssociation | _GetSender, instance: StoredInstance,
               path: Path, msg_id: int, originator_id: int | None,
               upcoming: tuple[StoredInstance, Path] | None) -> int | None:
        """One C-STORE sub-operation; its response status, or None when none came back."""
        try:
            # Move Originator is the C-MOVE's requester (pynetdicom would put our own title).
            return sender.send(instance, path, msg_id,
                               None if originator_id is None else self.assoc.requestor.ae_title,
                               originator_id, upcoming)
        except (NoContext, ValueError, AttributeError, OSError, RuntimeError) as exc:
            # No accepted context for the stored syntax, a missing blob, a lost association.
            log.warning("sub-operation not sent", extra={"fields": {
                "sop_instance_uid": instance.sop_instance_uid, "sha256": instance.blob_sha256,
                "reason": type(exc).__name__}})
            return None

    def _send_progress(self, rsp: C_MOVE | C_GET, context: PresentationContext,
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

    # --- shared ------------------------------------------------------------------

    def _plan(self, event: evt.InterventionEvent, req: C_FIND | C_MOVE | C_GET,
              context: PresentationContext) -> Search | Retrieval | Outcome:
        """Ask the bound handler for the service's plan or refusal."""
        try:
            plan = evt.trigger(self.assoc, event, {
                "request": req, "context": context.as_tuple,
                "_is_cancelled": self.is_cancelled})
        except Exception:
            log.exception("query/retrieve handler failed")
            return Outcome(status.UNABLE_TO_PROCESS, "the node failed to plan the request")
        if plan is None:
            return Outcome(status.UNABLE_TO_PROCESS, "this service is not enabled")
        return plan

    def _send_final(self, rsp: C_FIND | C_MOVE | C_GET, context: PresentationContext,
                    outcome: Outcome, plan: Retrieval | None = None) -> None:
        """The last response: status and comment; for retrieves the counts and failed UIDs."""
        rsp.Identifier = None
        rsp.Status = outcome.status.code
        rsp.ErrorComment = shorten(outcome.comment) if outcome.comment else None
        if isinstance(rsp, (C_MOVE, C_GET)):
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
                                                    syntax.is_little_endian,
                                                    syntax.is_deflated))
        self.dimse.send_msg(rsp, context.context_id)


class _GetSender:
    """C-GET sub-operations: pynetdicom's C-STORE back over the requesting association,
    reading the stored file from disk (STORE_SEND_CHUNKED_DATASET)."""

    def __init__(self, assoc: Association) -> None:
        self.assoc = assoc

    @property
    def is_established(self) -> bool:
        return self.assoc.is_established

    def send(self, instance: StoredInstance, path: Path, msg_id: int, _originator_aet: None,
             _originator_id: None, _upcoming: object) -> int | None:
        result = self.assoc.send_c_store(path, msg_id=msg_id)
        return int(result.Status) if "Status" in result else None

    def release(self) -> None:
        """The requesting association stays open: the SCU releases it."""


class _PendingFind:
    """Sends pending C-FIND responses: the command set encoded once, one PDU per match.

    Backpressure: pynetdicom's DUL thread reads the socket only when it has
    nothing left to send, so a producer faster than the network would queue
    the whole result set in memory and never see the SCU's C-CANCEL. After
    every :data:`_BATCH` responses the producer waits for the queue to drain
    and leaves the DUL one idle turn to read what the SCU sent.
    """

    def __init__(self, service: LaminaQueryRetrieveServiceClass, req: C_FIND,
                 context: PresentationContext, code: int) -> None:
        self.service = service
        self.context_id = context.context_id
        self.rsp = C_FIND()
        self.rsp.MessageIDBeingRespondedTo = req.MessageID
        self.rsp.AffectedSOPClassUID = req.AffectedSOPClassUID
        self.rsp.Status = code
        self.rsp.Identifier = BytesIO(b"\0\0")  # marks "a data set follows" in the command
        message = C_FIND_RSP()
        message.primitive_to_message(self.rsp)
        self.command = b"\x03" + bytes(encode(message.command_set, True, True))
        self.max_pdu = service.dimse.maximum_pdu_size
        self.sent = 0

    def __call__(self, identifier: bytes) -> None:
        # Both PDVs (each with its message control header byte) in one PDU.
        size = 2 * _PDV_ITEM_HEADER + len(self.command) + 1 + len(identifier)
        if self.max_pdu and size > self.max_pdu:
            # Larger than one PDU: let pynetdicom fragment it.
            self.rsp.Identifier = BytesIO(identifier)
            self.service.dimse.send_msg(self.rsp, self.context_id)
            return
        pdata = P_DATA()
        pdata.presentation_data_value_list = [
            [self.context_id, self.command], [self.context_id, b"\x02" + identifier]]
        dul = self.service.assoc.dul
        dul.send_pdu(pdata)
        self.sent += 1
        if self.sent % _BATCH == 0:
            while not dul.to_provider_queue.empty() and self.service.assoc.is_established:
                time.sleep(_DRAIN_POLL)
            time.sleep(_DUL_TURN)


