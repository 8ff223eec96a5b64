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
import ssl
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
from node.dimse.sender import (
    _P_DATA_TF,
    _PDU_HEADER,
    _PDV_HEADER,
    _PDV_OVERHEAD,
    _UNLIMITED_PDU,
    BlobSource,
    Outgoing,
    Sent,
    StoreSender,
    frame,
    send_on_association,
)
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
_FLUSH_BYTES = 64 * 1024  # C-FIND responses gathered before one blocking write


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
        finally:
            send.flush()  # every match counted is sent before the final response
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
    """Sends pending C-FIND responses: the command set encoded once, framed here as
    P-DATA-TF PDUs and written to the socket in batches.

    Why not pynetdicom's DUL queue: every queued PDU is encoded again by the DUL
    thread and wakes it, and the DUL reads the socket only when its queue is
    empty, so the producer had to poll the queue to see a C-CANCEL; together
    about 0.2 ms per match. Here responses are framed into a buffer (one PDU per
    response: the command PDV, encoded once, and the identifier PDV) and written
    with a blocking ``sendall``: the socket's send buffer is the backpressure, and
    the DUL thread, with nothing to send, keeps reading the socket (C-CANCEL,
    A-ABORT) meanwhile. Writes come after 1, 2, 4, 8 ... responses, then every
    :data:`_FLUSH_BYTES`: the first matches leave at once (a short time to the
    first response, and an SCU that cancels after a few sees them in time to),
    the bulk of a large answer in few system calls.

    Over TLS the DUL's queue is kept: an SSL socket must not be read and written
    from two threads at once.
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
        self.command = bytes(encode(message.command_set, True, True))
        self.assoc = service.assoc
        # The SCU's maximum (we are the acceptor); 0 means no limit.
        self.fragment = (self.assoc.requestor.maximum_length or _UNLIMITED_PDU) - _PDV_OVERHEAD
        # Whole PDV item of the command (it always fits: a command set is ~100 bytes).
        self.command_pdv = _PDV_HEADER.pack(len(self.command) + 2, self.context_id, 0x03) \
            + self.command
        sock = compat.socket_of(self.assoc)
        self.sock = None if sock is None or isinstance(sock, ssl.SSLSocket) else sock
        self.buffer = bytearray()
        self.sent = 0
        self.next_flush = 1  # then 2, 4, 8 ... responses: the first ones leave at once

    def __call__(self, identifier: bytes) -> None:
        if self.sock is None:
            self._queue(identifier)
            return
        if len(identifier) + len(self.command_pdv) + _PDV_OVERHEAD <= self.fragment:
            self.buffer += _PDU_HEADER.pack(
                _P_DATA_TF, 0, len(self.command_pdv) + _PDV_OVERHEAD + len(identifier))
            self.buffer += self.command_pdv
            self.buffer += _PDV_HEADER.pack(len(identifier) + 2, self.context_id, 0x02)
            self.buffer += identifier
        else:  # larger than one PDU: fragments of the SCU's maximum
            self.buffer += frame(self.command, self.context_id, self.fragment, True, True)
            self.buffer += frame(identifier, self.context_id, self.fragment, False, True)
        self.sent += 1
        if self.sent >= self.next_flush or len(self.buffer) >= _FLUSH_BYTES:
            self.flush()
            self.next_flush = 2 * self.sent

    def flush(self) -> None:
        """Write what has gathered (blocking); an error means the association is gone."""
        if self.sock is None or not self.buffer:
            return
        while not compat.send_queue_empty(self.assoc) and self.assoc.is_established:
            time.sleep(_DRAIN_POLL)  # never interleave with a PDU the DUL is sending
        try:
            self.sock.sendall(self.buffer)
        except OSError:
            self.assoc.abort()
        finally:
            self.buffer.clear()

    def _queue(self, identifier: bytes) -> None:
        """pynetdicom's DUL sends (TLS); every :data:`_BATCH` responses the queue is left to
        drain and the DUL one idle turn to read what the SCU sent (a C-CANCEL)."""
        if len(identifier) + len(self.command_pdv) + _PDV_OVERHEAD > self.fragment:
            self.rsp.Identifier = BytesIO(identifier)  # larger than one PDU: pynetdicom fragments
            compat.send_message(self.assoc, self.rsp, self.context_id)
            return
        pdata = P_DATA()
        pdata.presentation_data_value_list = [
            [self.context_id, b"\x03" + self.command], [self.context_id, b"\x02" + identifier]]
        compat.send_pdata(self.assoc, pdata)
        self.sent += 1
        if self.sent % _BATCH == 0:
            while not compat.send_queue_empty(self.assoc) and self.assoc.is_established:
                time.sleep(_DRAIN_POLL)
            time.sleep(_DUL_TURN)
