"""The framed acceptor: associations that only store and echo, served on one thread.

Why (issue 15, ``benchmarks/churn``): pynetdicom serves an association with two
threads (the association's and its DUL reactor's) that hand every primitive to each
other through queues, decodes the A-ASSOCIATE-RQ into objects item by item
(validating each UID twice), negotiates, and encodes the A-ASSOCIATE-AC the same way.
An associate / C-ECHO / release cycle cost the node about 3.4 ms of CPU, most of it
in those hand-overs and codecs; a modality's proposal of 128 storage contexts cost
24-28 ms (Orthanc: 8 ms). Modalities and PACS open an association per study, or per
image, so this is paid again and again.

Most associations only store (a modality, a PACS, an annotator pushing its work) or
echo. Such an association is served here, from the first PDU to the last, by one
thread that frames the PDUs itself:

* its A-ASSOCIATE-RQ is read under the same PDU bounds (:class:`~node.dimse.guard.
  PduBounds`) and decoded, negotiated and answered once per distinct request
  (:class:`Proposals`): the same peer sends the same bytes every time, and what is
  sent back depends on nothing else, so the A-ASSOCIATE-AC's bytes are kept;
* admission is the same as on pynetdicom's path (:class:`~node.dimse.handlers.
  association.Sessions`): the peer, its address and certificate, its user identity
  and the association limits decide, and a refusal is an A-ASSOCIATE-RJ with the same
  reason, logged and audited the same way;
* in data transfer the C-STORE receiver (:mod:`node.dimse.receive`) reads the
  P-DATA, as it does on pynetdicom's associations; an A-RELEASE-RQ is answered after
  the association's slots are freed, and then the requestor closes the connection
  (PS3.8 Sta13, within ``node.acse_timeout``) before the release is logged and audited;
  an A-ABORT ends it, and an association idle for ``node.network_timeout`` is aborted,
  as pynetdicom does.

Everything else goes to pynetdicom as before, the request's bytes handed to its
state machine as though its own reader had read them: a proposal with a query or
retrieve context (those services run on pynetdicom's association), extended
negotiation (asynchronous operations, SOP class extended or common extended
negotiation, a user identity asking for a server response), another application
context or protocol version, or a request that does not decode.

On such an association a message other than a C-STORE-RQ or a C-ECHO-RQ on an
accepted context (which pynetdicom would have left without an answer) aborts it:
the peer learns at once instead of waiting for its own timeout.
"""

from __future__ import annotations

import logging
import select
import socket
import threading
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass

from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_ASSOCIATE_RQ
from pynetdicom.pdu_items import (
    ImplementationClassUIDSubItem,
    ImplementationVersionNameSubItem,
    MaximumLengthSubItem,
    SCP_SCU_RoleSelectionSubItem,
    UserIdentitySubItemRQ,
)
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
    UserIdentityNegotiation,
)
from pynetdicom.presentation import PresentationContext
from pynetdicom.service_class import StorageServiceClass, VerificationServiceClass
from pynetdicom.sop_class import uid_to_service_class

from node import status
from node.config import NodeSettings
from node.dimse import compat
from node.dimse.guard import PduBounds, log_refused
from node.dimse.handlers.association import Request, Sessions
from node.dimse.handlers.store import StoreService
from node.dimse.receive import StoreReceiver
from node.dimse.sender import _A_ABORT, _APPLICATION_CONTEXT, _PDU_HEADER, recv_exactly

log = logging.getLogger("lamina.association")

A_RELEASE_RQ = 0x05
#: A-ABORT reasons (PS3.8 Table 9-26) from the service provider.
REASON_NOT_SPECIFIED, UNEXPECTED_PDU = 0x00, 0x02
#: The User Information sub-items a request served here may carry (PS3.7 Annex D.3.3):
#: any other is extended negotiation, which pynetdicom's acceptor answers.
_PLAIN_ITEMS = (MaximumLengthSubItem, ImplementationClassUIDSubItem,
                ImplementationVersionNameSubItem, SCP_SCU_RoleSelectionSubItem,
                UserIdentitySubItemRQ)
#: Distinct requests remembered per server (each at most node.max_associate_kb).
PROPOSALS_KEPT = 256
_RELEASE_RP = compat.encode_release_rp()


@dataclass(frozen=True)
class Proposal:
    """A distinct A-ASSOCIATE-RQ that this module serves, and our answer to it."""

    calling_ae: str
    called_ae: str
    #: The request's User Identity Negotiation primitive, or None.
    user_identity: UserIdentityNegotiation | None
    #: The longest PDU the requestor receives (0: no limit).
    peer_max_pdu: int
    #: Accepted presentation contexts by ID (shared: only read).
    accepted: dict[int, PresentationContext]
    #: The A-ASSOCIATE-AC, encoded.
    accept: bytes


class Proposals:
    """Decodes, judges and answers each distinct A-ASSOCIATE-RQ once (see the module
    docstring); :meth:`of` returns None for a request that pynetdicom must serve."""

    def __init__(self, contexts: compat.SharedContexts, max_pdu: int,
                 implementation_uid: str, implementation_version: str) -> None:
        self.contexts = contexts
        self.max_pdu = max_pdu
        self.implementation_uid = implementation_uid
        self.implementation_version = implementation_version
        self._known: dict[bytes, Proposal | None] = {}
        self._lock = threading.Lock()

    def of(self, request: bytes) -> Proposal | None:
        with self._lock:
            if request in self._known:
                return self._known[request]
        try:
            proposal = self._judge(request)
        except Exception:  # undecodable or odd: pynetdicom answers it (an A-ABORT)
            proposal = None
        if proposal is not None and not _keepable(proposal.user_identity):
            return proposal
        with self._lock:
            if len(self._known) < PROPOSALS_KEPT:
                self._known[request] = proposal
        return proposal

    def _judge(self, request: bytes) -> Proposal | None:
        pdu = A_ASSOCIATE_RQ()
        pdu.decode(request)
        info_item = pdu.user_information
        if pdu.protocol_version != 0x0001 or info_item is None or not all(
                isinstance(item, _PLAIN_ITEMS) for item in info_item.user_data):
            return None
        rq = pdu.to_primitive()
        if str(rq.application_context_name) != _APPLICATION_CONTEXT:
            return None
        info = rq.user_information
        identity = next((i for i in info if isinstance(i, UserIdentityNegotiation)), None)
        if identity is not None and identity.positive_response_requested:
            return None
        roles = {str(i.sop_class_uid): (i.scu_role, i.scp_role)
                 for i in info if isinstance(i, SCP_SCU_RoleSelectionNegotiation)}
        results, role_items = compat.negotiate_shared(
            rq.presentation_context_definition_list, self.contexts, roles)
        accepted = {int(cx.context_id): cx for cx in results if cx.result == 0x00}
        if not all(uid_to_service_class(str(cx.abstract_syntax))
                   in (StorageServiceClass, VerificationServiceClass)
                   for cx in accepted.values()):
            return None  # a query/retrieve context: pynetdicom's association serves it
        peer_max = next((int(i.maximum_length_received or 0) for i in info
                         if isinstance(i, MaximumLengthNotification)), 0)
        return Proposal(str(rq.calling_ae_title), str(rq.called_ae_title), identity, peer_max,
                        accepted, self._accept(rq, results, role_items))

    def _accept(self, rq: A_ASSOCIATE, results: list[PresentationContext],
                role_items: list) -> bytes:
        """The A-ASSOCIATE-AC pynetdicom's acceptor would send (``ACSE.send_accept``)."""
        primitive = A_ASSOCIATE()
        primitive.application_context_name = _APPLICATION_CONTEXT
        primitive.calling_ae_title = rq.calling_ae_title
        primitive.called_ae_title = rq.called_ae_title
        primitive.result = 0x00
        primitive.result_source = 0x01
        primitive.presentation_context_definition_results_list = (
            [cx for cx in results if cx.result == 0x00]
            + [cx for cx in results if cx.result != 0x00])
        length = MaximumLengthNotification()
        length.maximum_length_received = self.max_pdu
        uid = ImplementationClassUIDNotification()
        uid.implementation_class_uid = self.implementation_uid
        info: list = [length, uid]
        if self.implementation_version:
            version = ImplementationVersionNameNotification()
            version.implementation_version_name = self.implementation_version
            info.append(version)
        primitive.user_information = info + list(role_items)
        pdu = A_ASSOCIATE_AC()
        pdu.from_primitive(primitive)
        return bytes(pdu.encode())


def _keepable(identity: UserIdentityNegotiation | None) -> bool:
    """Whether a request may be remembered: not when its user identity carries a secret
    (a passcode, a Kerberos ticket, a SAML assertion or a JWT), which would then stay
    in memory for the life of the process. Such a request is judged every time; every
    request's identity is verified every time either way."""
    return identity is None or identity.user_identity_type == 1


def rejection_pdu(rejection: status.Rejection) -> bytes:
    primitive = A_ASSOCIATE()
    primitive.result = rejection.result
    primitive.result_source = rejection.source
    primitive.diagnostic = rejection.diagnostic
    pdu = A_ASSOCIATE_RJ()
    pdu.from_primitive(primitive)
    return bytes(pdu.encode())


@dataclass
class Acceptor:
    """What every framed association of one server shares."""

    sessions: Sessions
    store: StoreService
    limits: NodeSettings
    proposals: Proposals
    #: The framed associations alive (the server aborts them when it stops).
    alive: set[FramedAssociation]


#: Serves a connection whose request pynetdicom must answer: the socket, the request's
#: bytes and the bounds its PDUs have been counted under so far.
Fallback = Callable[[socket.socket, bytes, PduBounds], None]


class FramedAssociation(threading.Thread):
    """One connection, from its A-ASSOCIATE-RQ to its end (see the module docstring);
    the C-STORE receiver's link to it (:class:`node.dimse.receive.Link`)."""

    def __init__(self, acceptor: Acceptor, sock: socket.socket, address: str,
                 fallback: Fallback, ended: Callable[[], None]) -> None:
        super().__init__(name="FramedAssociation", daemon=True)
        self.acceptor = acceptor
        self.fallback = fallback
        #: Called once this thread is done with the connection (the server's open count).
        self.ended = ended
        self.sock = sock
        self.address = address
        self.key = self
        self.bounds = PduBounds(acceptor.limits)
        self.proposal: Proposal | None = None
        self.established = False
        self.open = True
        self.common_extended: dict[str, str] = {}
        self.receiver = StoreReceiver(self, sock, acceptor.store)

    @property
    def peer_max_pdu(self) -> int:
        return self.proposal.peer_max_pdu if self.proposal else 0

    def start(self) -> None:
        self.acceptor.alive.add(self)  # before it runs: a stopping server finds it
        super().start()

    def run(self) -> None:
        handed_over = False
        try:
            request = self._read_request()
            if request is None:
                return
            self.proposal = self.acceptor.proposals.of(request)
            if self.proposal is None:
                self.fallback(self.sock, request, self.bounds)
                handed_over = True
                return
            if self._admitted(self.proposal):
                self.sock.sendall(self.proposal.accept)
                self.established = True
                self.acceptor.sessions.accepted(self)
                self._serve()
        except OSError as exc:
            log.info("connection lost", extra={"fields": {
                "address": self.address, "reason": exc.strerror or str(exc)}})
        except Exception:
            log.exception("framed association failed, aborting it")
            self.abort(REASON_NOT_SPECIFIED)
        finally:
            self.acceptor.alive.discard(self)
            if not handed_over:
                self.receiver.close()
                self.acceptor.sessions.closed(self)
                with suppress(OSError):
                    self.sock.close()
                self.ended()

    def _read_request(self) -> bytes | None:
        """The A-ASSOCIATE-RQ within the ACSE timeout, under the PDU bounds; None when the
        connection ended or was refused."""
        previous = self.sock.gettimeout()
        self.sock.settimeout(self.acceptor.limits.acse_timeout)
        try:
            header = recv_exactly(self.sock, 6)
            if not self.admit_header(header):
                return None
            request = header + recv_exactly(self.sock, _PDU_HEADER.unpack(header)[2])
        except OSError:
            return None  # silent or gone before its request: closed, as pynetdicom does
        self.sock.settimeout(previous)
        return request

    def _admitted(self, proposal: Proposal) -> bool:
        """Admission as on pynetdicom's path; False once the A-ASSOCIATE-RJ is sent."""
        sessions = self.acceptor.sessions
        identity = proposal.user_identity
        rejection = sessions.admit(self, Request(
            proposal.calling_ae, proposal.called_ae, self.address, identity, self.sock))
        if rejection is None and identity is not None and not sessions.verify_user(
                self, identity.user_identity_type, bytes(identity.primary_field or b""),
                bytes(identity.secondary_field or b"")):
            rejection = status.USER_IDENTITY_NOT_VERIFIED
        if rejection is None:
            return True
        with suppress(OSError):
            self.sock.sendall(rejection_pdu(rejection))
        return False

    def _serve(self) -> None:
        """Data transfer until the association ends: the receiver reads each PDU."""
        self.sock.settimeout(self.acceptor.limits.network_timeout)
        idle = self.acceptor.limits.network_timeout
        while self.open:
            if not compat.buffered(self.sock):
                readable, _, _ = select.select([self.sock], [], [], idle)
                if not readable:
                    log.info("association idle past node.network_timeout, aborting it",
                             extra={"fields": {"address": self.address}})
                    self.abort(REASON_NOT_SPECIFIED)
                    return
            self.receiver.take_pdu(True)

    def abort(self, reason: int) -> None:
        """Send an A-ABORT (service provider) and end the association."""
        self.open = self.established = False
        with suppress(OSError):
            self.sock.sendall(compat.encode_provider_abort(reason))
        with suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    # --- the receiver's link ------------------------------------------------------------

    def in_data_transfer(self) -> bool:
        return self.established and self.open

    def accepted_context(self, context_id: int) -> PresentationContext | None:
        return self.proposal.accepted.get(context_id) if self.proposal else None

    def releasing(self) -> bool:
        return False  # an acceptor never asks for the release

    def admit_header(self, header: bytes | bytearray) -> bool:
        reason = self.bounds.take(header)
        if reason is None:
            return True
        log_refused(self.address, self.bounds.refused)
        self.abort(reason)
        return False

    def other_message_open(self) -> bool:
        return False

    def give_pdvs(self, pdvs: list[tuple[int, bytes]]) -> None:
        """A message this association does not serve (pynetdicom would have left it
        unanswered): aborted, so the peer learns at once."""
        log.warning("message not served on a storage association, aborting it",
                    extra={"fields": {"address": self.address}})
        self.abort(REASON_NOT_SPECIFIED)

    def give_pdu(self, data: bytes) -> None:
        kind = data[0]
        if kind == A_RELEASE_RQ:
            sessions = self.acceptor.sessions
            sessions.free_slots(self)
            self.open = self.established = False
            try:
                self.sock.sendall(_RELEASE_RP)
                self._await_close()
            finally:  # recorded as released even if the answer could not be sent
                sessions.record_release(self)
        elif kind == _A_ABORT:
            self.open = self.established = False
        else:  # an A-ASSOCIATE-RQ/AC/RJ or A-RELEASE-RP in data transfer
            log.warning("unexpected PDU, aborting the association", extra={"fields": {
                "address": self.address, "reason": f"PDU type 0x{kind:02X}"}})
            self.abort(UNEXPECTED_PDU)

    def _await_close(self) -> None:
        """After the A-RELEASE-RP: wait for the requestor to close the connection (PS3.8
        Sta13), reading and ignoring whatever comes, for the ACSE timeout at most in all
        (as pynetdicom's ARTIM timer: a peer that keeps sending does not keep it open)."""
        deadline = time.monotonic() + self.acceptor.limits.acse_timeout
        with suppress(OSError):
            while (left := deadline - time.monotonic()) > 0:
                self.sock.settimeout(left)
                if not self.sock.recv(4096):
                    return

    def connection_ended(self) -> None:
        self.open = self.established = False

    def invalid_pdu(self) -> None:
        self.abort(REASON_NOT_SPECIFIED)

