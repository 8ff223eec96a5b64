"""The query/retrieve DIMSE loops: C-FIND responses and C-MOVE / C-GET sub-operations.

Why Lamina runs these loops instead of pynetdicom's Q/R service class:

* C-FIND: pynetdicom builds and encodes a pydicom Dataset for every match and
  encodes the same pending command set again for each; together about a
  millisecond of CPU per response. Here the pending command set is encoded
  once per request, the identifier goes straight to bytes
  (:mod:`node.dimse.identifier`), and both travel in one P-DATA PDU.
* C-MOVE / C-GET: pynetdicom only sends Datasets its handler yields,
  re-encoding every instance, and puts its own AE title in Move Originator AE
  Title. Here each blob is sent as stored when the peer takes its syntax, and
  re-encoded only when it does not (:mod:`node.dimse.sender`, the one outgoing
  C-STORE). C-MOVE opens its own storage association to the destination
  (about eight times faster than a pynetdicom association); C-GET sends back
  over the requesting association, a stored file read from disk in PDU-sized
  pieces.

Everything else (association handling, C-CANCEL bookkeeping, status
validation) stays pynetdicom's. :class:`QueryRetrieveAssociation` routes the
Q/R SOP classes of the associations our server accepts (and only those) to
:class:`QueryRetrieveLoops`. The bound EVT_C_FIND / EVT_C_MOVE / EVT_C_GET
handlers stay thin: they return the service's plan (a
:class:`~node.search.Search` or :class:`~node.retrieve.Retrieval`) or its
refusal, and the loops below run it, reading stored bytes from the blob store.
"""

from __future__ import annotations

import logging
import time
from contextlib import closing
from io import BytesIO
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.dimse_messages import C_FIND_RSP
from pynetdicom.dimse_primitives import C_FIND, C_GET, C_MOVE
from pynetdicom.dsutils import encode
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.presentation import PresentationContext

from node import status
from node.config import TlsSettings
from node.dimse import compat
from node.dimse.ae import QUERY_RETRIEVE_SOP_CLASSES
from node.dimse.identifier import encode_match
from node.dimse.sender import BlobSource, Outgoing, Sent, StoreSender, send_on_association
from node.dimse.tls import outgoing_context
from node.metrics import Metrics
from node.retrieve import Retrieval
from node.search import Search
from node.status import Outcome, shorten
from node.storage.interface import IndexUnavailable

log = logging.getLogger("lamina.qr")

#: Pending C-MOVE/C-GET responses are optional (PS3.4 C.4.2.3.1) and cost almost a
#: millisecond each in pynetdicom: one per interval keeps a progress bar moving.
_PROGRESS_INTERVAL = 0.1  # seconds
_BATCH = 64  # C-FIND responses queued before waiting for the DUL to send them
_DRAIN_POLL = 0.0002  # seconds between looks at the DUL's send queue
_DUL_TURN = 0.001  # one idle DUL loop (pynetdicom's run-loop delay): it reads the socket
_PDV_ITEM_HEADER = 5  # PS3.8 9.3.5.1: item length (4) and presentation context ID (1)


class QueryRetrieveAssociation(compat.AssociationHooks):
    """An association of our server: Q/R requests go to :class:`QueryRetrieveLoops`,
    everything else to pynetdicom's own dispatch.

    ``blobs`` and ``tls`` (the node's [tls] settings) are set when the server adopts
    the association.
    """

    blobs: BlobSource
    tls: TlsSettings = TlsSettings()

    def serve_request(self, msg: Any, context_id: int) -> None:
        context = compat.accepted_context(self, context_id)
        if (context is None or compat.is_releasing(self) or not msg.is_valid_request
                or not isinstance(msg, (C_FIND, C_MOVE, C_GET))
                or msg.AffectedSOPClassUID not in QUERY_RETRIEVE_SOP_CLASSES
                or msg.AffectedSOPClassUID in self.acceptor.accepted_common_extended):
            super().serve_request(msg, context_id)  # pynetdicom logs, ignores or aborts
            return
        try:
            with compat.serving(self):
                QueryRetrieveLoops(self, self.blobs).SCP(msg, context)
        except Exception:
            log.exception("query/retrieve request failed")
            self.abort()


class QueryRetrieveLoops(compat.QueryRetrieveHooks):
    """pynetdicom's Q/R service class with Lamina's C-FIND, C-MOVE and C-GET loops."""

    def __init__(self, assoc: Association, blobs: BlobSource) -> None:
        super().__init__(assoc)
        self.blobs = blobs

    # --- C-FIND ------------------------------------------------------------------

    def c_find(self, req: C_FIND, context: PresentationContext) -> None:
        rsp = C_FIND()
        rsp.MessageIDBeingRespondedTo = req.MessageID
        rsp.AffectedSOPClassUID = req.AffectedSOPClassUID
        search = self._plan(evt.EVT_C_FIND, req, context)
        if not isinstance(search, Search):
            self._send_final(rsp, context, search)
            return
        outcome = Outcome(status.UNABLE_TO_PROCESS, "association ended before the last match")
        started = time.perf_counter()
        try:
            outcome = self._stream(search, req, context)
        finally:
            # Answer first, then audit: the audit write is not the client's wait.
            if self.assoc.is_established:
                self._send_final(rsp, context, outcome)
            Metrics.get().query_seconds.labels("dimse", search.query.level.name.lower()).observe(
                time.perf_counter() - started)
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

    def c_move(self, req: C_MOVE, context: PresentationContext) -> None:
        self._retrieve(req, C_MOVE(), context, evt.EVT_C_MOVE)

    def c_get(self, req: C_GET, context: PresentationContext) -> None:
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
        """Every sub-operation in turn; the outcome the final response carries."""
        items = (Outgoing.stored(i, self.blobs) for i in plan.instances)
        first_msg_id = req.MessageID % 65535 + 1
        dest = plan.destination
        if dest is not None:
            sender = StoreSender(self.ae.ae_title, self.ae.maximum_pdu_size,
                                 self.ae.acse_timeout or 30, self.ae.dimse_timeout or 60)
            # Move Originator is the C-MOVE's requester (pynetdicom would put our own title).
            results = sender.send(items, dest.host, dest.port, dest.ae_title,
                                  (self.assoc.requestor.ae_title, req.MessageID), first_msg_id,
                                  outgoing_context(getattr(self.assoc, "tls", TlsSettings()),
                                                   dest.tls))
        else:
            results = send_on_association(self.assoc, items, first_msg_id)
        last_progress = time.monotonic()
        with closing(results):
            while plan.counts.remaining:
                if self.is_cancelled(req.MessageID):
                    return plan.outcome(cancelled=True)
                if not self.assoc.is_established:
                    return Outcome(status.UNABLE_TO_PROCESS, "association ended")
                sent = next(results, None)
                if sent is None:  # the sender yields one result per item: not expected
                    break
                if sent.association:
                    return self._association_failed(plan, sent)
                plan.counts.record(sent.status, sent.item.sop_instance_uid)
                if sent.status is None:
                    self._not_sent(plan, sent)
                now = time.monotonic()
                if now - last_progress >= _PROGRESS_INTERVAL:
                    self._send_progress(rsp, context, plan)
                    last_progress = now
        return plan.outcome()

    def _association_failed(self, plan: Retrieval, sent: Sent) -> Outcome:
        """The destination's association could not be opened or was lost: the rest fail."""
        unsent = plan.instances[len(plan.instances) - plan.counts.remaining:]
        plan.counts.fail_remaining([i.sop_instance_uid for i in unsent])
        if sent.association == "lost":
            return plan.outcome()
        log.warning("move destination unavailable", extra={"fields": {
            "destination": plan.destination.ae_title if plan.destination else "",
            "reason": sent.reason}})
        if plan.counts.completed or plan.counts.warning:
            return plan.outcome()
        return Outcome(status.SUBOPERATIONS_IMPOSSIBLE,
                       "the move destination did not accept the association")

    @staticmethod
    def _not_sent(plan: Retrieval, sent: Sent) -> None:
        """Log why a sub-operation failed without a status from the peer."""
        log.warning("sub-operation not sent", extra={"fields": {
            "retrieve": plan.kind, "sop_class_uid": sent.item.sop_class_uid,
            "sop_instance_uid": sent.item.sop_instance_uid, "sha256": sent.item.label,
            "transfer_syntax": sent.item.transfer_syntax_uid, "reason": sent.reason}})

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
        compat.send_message(self.assoc, rsp, context.context_id)

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
        compat.send_message(self.assoc, rsp, context.context_id)


class _PendingFind:
    """Sends pending C-FIND responses: the command set encoded once, one PDU per match.

    Backpressure: pynetdicom's DUL thread reads the socket only when it has
    nothing left to send, so a producer faster than the network would queue
    the whole result set in memory and never see the SCU's C-CANCEL. After
    every :data:`_BATCH` responses the producer waits for the queue to drain
    and leaves the DUL one idle turn to read what the SCU sent.
    """

    def __init__(self, service: QueryRetrieveLoops, req: C_FIND,
                 context: PresentationContext, code: int) -> None:
        self.context_id = context.context_id
        self.rsp = C_FIND()
        self.rsp.MessageIDBeingRespondedTo = req.MessageID
        self.rsp.AffectedSOPClassUID = req.AffectedSOPClassUID
        self.rsp.Status = code
        self.rsp.Identifier = BytesIO(b"\0\0")  # marks "a data set follows" in the command
        message = C_FIND_RSP()
        message.primitive_to_message(self.rsp)
        self.command = b"\x03" + bytes(encode(message.command_set, True, True))
        self.assoc = service.assoc
        self.max_pdu = self.assoc.requestor.maximum_length  # the SCU's (we are the acceptor)
        self.sent = 0

    def __call__(self, identifier: bytes) -> None:
        # Both PDVs (each with its message control header byte) in one PDU.
        size = 2 * _PDV_ITEM_HEADER + len(self.command) + 1 + len(identifier)
        if self.max_pdu and size > self.max_pdu:
            # Larger than one PDU: let pynetdicom fragment it.
            self.rsp.Identifier = BytesIO(identifier)
            compat.send_message(self.assoc, self.rsp, self.context_id)
            return
        pdata = P_DATA()
        pdata.presentation_data_value_list = [
            [self.context_id, self.command], [self.context_id, b"\x02" + identifier]]
        compat.send_pdata(self.assoc, pdata)
        self.sent += 1
        if self.sent % _BATCH == 0:
            while not compat.send_queue_empty(self.assoc) and self.assoc.is_established:
                time.sleep(_DRAIN_POLL)
            time.sleep(_DUL_TURN)


