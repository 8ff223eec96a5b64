"""Every private pynetdicom name Lamina relies on, reached through this one module.

pynetdicom's public API covers an SCP that answers from event handlers and an
SCU that sends pydicom Datasets. Lamina goes past it in a few places, each for
a measured reason (see ``../shared/NOTES.md``): it runs its own C-FIND /
C-MOVE / C-GET loops, sends stored bytes without re-encoding them, and frames
its own C-STORE sub-association. Those places touch names pynetdicom may
rename in any release. They are all here, each with why it is needed, so an
upgrade has one module to read; ``pyproject.toml`` pins pynetdicom to the
tested minor version and ``tests/test_dimse_compat.py`` checks every name in
:data:`CONTRACT` (it fails naming the one that disappeared or changed kind).

The rest of :mod:`node.dimse` never writes a private pynetdicom name itself:
it subclasses the hook classes below and calls the accessors.
"""

from __future__ import annotations

import copy
import logging
import os
import queue
import select
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

from pynetdicom import _config, acse, evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import DIMSEPrimitive
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import (
    A_ABORT_RQ,
    A_ASSOCIATE_AC,
    A_ASSOCIATE_RQ,
    A_RELEASE_RP,
    A_RELEASE_RQ,
)
from pynetdicom.pdu_primitives import A_ABORT, A_ASSOCIATE, A_P_ABORT, P_DATA
from pynetdicom.presentation import PresentationContext
from pynetdicom.service_class import QueryRetrieveServiceClass
from pynetdicom.transport import AssociationSocket, RequestHandler

log = logging.getLogger("lamina.dimse")

# --- the contract (checked by tests/test_dimse_compat.py) --------------------------------

#: (where, name, kind, why). ``where`` is a dotted path from ``pynetdicom`` to a class
#: or module, or ``Association()`` for the attributes of an association instance
#: (``Association().dul`` is its DUL provider, ``Association().dimse`` its DIMSE one).
#: kind: "method" (callable on the class), "attribute" (present on an instance or
#: module, not callable) or "class" (a class).
CONTRACT: tuple[tuple[str, str, str, str], ...] = (
    # Routing the Q/R SOP classes to Lamina's loops on our own server only.
    ("association.Association", "_serve_request", "method",
     "per-request dispatch; overridden for the Q/R SOP classes, parent for the rest"),
    ("transport.RequestHandler", "_create_association", "method",
     "builds the acceptor Association (no factory hook, so we adopt the one it made);"
     " it deep-copies the server's contexts, which SharedContexts makes a no-op"),
    ("Association()", "_accepted_cx", "attribute",
     "accepted presentation contexts by ID, looked up as pynetdicom does per request"),
    ("acse", "negotiate_as_acceptor", "method",
     "the acceptor's presentation context negotiation, remembered per distinct request"
     " for our servers' SharedContexts (negotiate_shared)"),
    ("Association()", "_sent_release", "attribute",
     "requests arriving during release are ignored, as pynetdicom does"),
    ("Association()", "_is_paused", "attribute",
     "set while a service runs: send_c_store (C-GET) waits for it before sending"),
    ("Association()", "dimse", "attribute", "the DIMSE provider of the association"),
    ("association.Association", "_run_reactor", "method",
     "the acceptor's 1 ms polling loop, replaced by one that waits (AssociationHooks)"),
    ("Association().dul", "to_provider_queue", "attribute",
     "primitives to send: a waking queue wakes the DUL reactor (DulHooks)"),
    ("Association().dul", "event_queue", "attribute",
     "the state machine's events, drained by DulHooks's reactor"),
    ("dul.DULServiceProvider", "_process_recv_primitive", "method",
     "turns a queued primitive into its state machine event"),
    ("dul.DULServiceProvider", "_is_transport_event", "method",
     "reads a PDU when the socket is readable (or handles its close)"),
    ("Association().dul", "state_machine", "attribute", "runs each event"),
    ("Association().dul", "artim_timer", "attribute", "Evt18 when it expires"),
    ("Association().dul", "_idle_timer", "attribute", "restarted by each PDU"),
    ("Association().dul", "_kill_thread", "attribute", "set by kill_dul"),
    ("Association()", "_dul_ready", "attribute",
     "set by the DUL reactor once it runs: the association waits for it"),
    ("Association()", "_reactor_checkpoint", "attribute",
     "cleared while the association sends on its own (send_c_store): the loop waits"),
    ("Association()", "_kill", "attribute", "set by kill(): the reactor loop ends"),
    ("association.Association", "kill", "method",
     "replaced by one that joins the DUL thread instead of polling it every millisecond"),
    ("dul.DULServiceProvider", "kill_dul", "method",
     "sets the DUL's kill flag (and, in DulHooks, wakes its reactor)"),
    ("Association().dimse", "msg_queue", "attribute",
     "received DIMSE messages: replaced by a queue that wakes the reactor"),
    ("Association().dimse", "cancel_req", "attribute",
     "C-CANCEL requests received; cleared before and after each request"),
    ("Association().dimse", "send_msg", "method", "sends a response primitive"),
    ("Association()", "dul", "attribute", "the DUL provider of the association"),
    ("Association().dul", "send_pdu", "method",
     "queues one P-DATA PDU holding a C-FIND response's command and identifier"),
    ("Association().dul", "to_provider_queue", "attribute",
     "the DUL send queue: C-FIND waits for it to drain (backpressure, C-CANCEL)"),
    ("Association().dul", "socket", "attribute",
     "the association socket, to set TCP_NODELAY on outgoing connections"),
    ("Association()", "set_socket", "method",
     "how RequestHandler._create_association hands the association its socket"),
    ("dul.DULServiceProvider", "_read_pdu_data", "method",
     "reads a PDU as recv(6) then recv(length): the order the PDU guard relies on"),
    ("Association().dimse", "receive_primitive", "method",
     "runs outside the DUL's exception guard: a failed spool write killed the thread"),
    ("Association().dimse", "message", "attribute",
     "the DIMSE message being received, dropped after a failed spool write"),
    ("Association().dul", "to_user_queue", "attribute",
     "None put there ends an acceptor still waiting for its A-ASSOCIATE-RQ at once"),
    # The C-STORE receiver (node.dimse.receive) reads an established association's PDUs.
    ("dul.DULServiceProvider", "_decode_pdu", "method",
     "decodes a non-P-DATA PDU the receiver read into its state machine event"),
    ("Association().dul", "_recv_pdu", "attribute",
     "the decoded PDU the state machine's action takes (as pynetdicom's reader leaves it)"),
    ("Association().dul", "event_queue", "attribute",
     "Evt17 queued there ends an association whose connection we shut (AA-4)"),
    ("dimse_messages.C_STORE_RQ()", "_data_set_file", "attribute",
     "the spool file of a C-STORE being received, closed after a failed write"),
    # Lamina's Q/R loops replace these three methods of pynetdicom's service class.
    ("service_class.QueryRetrieveServiceClass", "_c_find_scp", "method",
     "C-FIND loop: pending command encoded once, identifiers straight to bytes"),
    ("service_class.QueryRetrieveServiceClass", "_move_scp", "method",
     "C-MOVE loop: stored bytes over Lamina's own sub-association"),
    ("service_class.QueryRetrieveServiceClass", "_get_scp", "method",
     "C-GET loop: stored files back over the requesting association"),
    ("service_class.QueryRetrieveServiceClass", "SCP", "method",
     "dispatches a Q/R request to the three methods above"),
    ("service_class.QueryRetrieveServiceClass", "is_cancelled", "method",
     "whether the SCU sent C-CANCEL for a message ID"),
    # PDUs of the sub-association Lamina drives itself (node.dimse.sender).
    ("pdu.A_ASSOCIATE_RQ", "from_primitive", "method", "encodes our association request"),
    ("pdu.A_ASSOCIATE_RQ", "encode", "method", "encodes our association request"),
    ("pdu.A_ASSOCIATE_AC", "decode", "method", "decodes the destination's answer"),
    ("pdu.A_ASSOCIATE_AC", "to_primitive", "method", "reads the accepted contexts"),
    ("pdu.A_RELEASE_RQ", "encode", "method", "releases the sub-association"),
    ("pdu.A_RELEASE_RP", "encode", "method", "answers a framed association's release"),
    ("pdu.A_ABORT_RQ", "from_primitive", "method", "aborts the sub-association"),
    ("pdu.A_ABORT_RQ", "encode", "method", "aborts the sub-association"),
    ("dimse_messages.C_FIND_RSP", "primitive_to_message", "method",
     "the pending C-FIND command set, encoded once per request"),
    # Process configuration (pynetdicom reads these module flags at run time).
    ("_config", "LOG_REQUEST_IDENTIFIERS", "attribute", "off: identifiers are patient data"),
    ("_config", "LOG_RESPONSE_IDENTIFIERS", "attribute", "off: identifiers are patient data"),
    ("_config", "STORE_RECV_CHUNKED_DATASET", "attribute",
     "received data sets are spooled to a file, never held whole in memory"),
    ("_config", "STORE_SEND_CHUNKED_DATASET", "attribute",
     "C-GET sends a stored file by path, read in PDU-sized pieces"),
    ("_config", "LOG_HANDLER_LEVEL", "attribute",
     "'none': no per-PDU/DIMSE debug handlers bound to each association (churn cost)"),
)


# --- process configuration -------------------------------------------------------------


def configure_process() -> None:
    """pynetdicom's process-wide flags as the node needs them (idempotent).

    Identifier logging off (patient data); received data sets spooled to a
    file (``event.dataset_path``); files sent by path read in pieces.
    """
    _config.LOG_REQUEST_IDENTIFIERS = False
    _config.LOG_RESPONSE_IDENTIFIERS = False
    _config.STORE_RECV_CHUNKED_DATASET = True
    _config.STORE_SEND_CHUNKED_DATASET = True
    # The "standard" level binds four debug-logging handlers to every association, run
    # on every PDU and DIMSE message even though pynetdicom's logger is at WARNING.
    _config.LOG_HANDLER_LEVEL = "none"
    # Only our servers' SharedContexts are remembered; every other acceptor negotiates
    # as before (negotiate_shared hands it to pynetdicom's own function).
    acse.negotiate_as_acceptor = negotiate_shared


def configure_scu() -> None:
    """The flags an SCU process (``lamina echo | find | move``) needs: no identifiers in logs."""
    _config.LOG_REQUEST_IDENTIFIERS = False
    _config.LOG_RESPONSE_IDENTIFIERS = False


# --- hooks: subclass these, override the public-named method ----------------------------


class SharedContexts(list):
    """The acceptor's supported presentation contexts, shared by every association.

    ``RequestHandler._create_association`` gives each association a ``deepcopy`` of
    the server's contexts: with every storage SOP class and 13 transfer syntaxes
    that is thousands of objects, a large part of an association's set-up CPU.
    Negotiation only reads them (``presentation.negotiate_as_acceptor`` builds new
    result contexts), so one list serves every association: copying returns it.

    It also keeps the outcome of each distinct negotiation (:func:`negotiate_shared`):
    a peer proposing a hundred storage contexts cost ~1.4 ms of negotiation per
    association, and a peer proposes the same ones every time.
    """

    def __init__(self, contexts: Any = ()) -> None:
        super().__init__(contexts)
        #: (requested contexts, requested roles) -> pynetdicom's (results, role items)
        self.negotiated: dict[tuple, tuple[list[PresentationContext], list]] = {}

    def __deepcopy__(self, memo: dict) -> SharedContexts:
        return self


#: Distinct negotiations kept per server (requests are the peer's to choose).
NEGOTIATIONS_KEPT = 256
_pynetdicom_negotiate = acse.negotiate_as_acceptor


def negotiate_shared(rq_contexts: list[PresentationContext], ac_contexts: Any,
                     roles: dict | None = None) -> tuple[list[PresentationContext], list]:
    """``presentation.negotiate_as_acceptor`` (pynetdicom's, unchanged for any other
    acceptor), remembered per distinct request for a server's :class:`SharedContexts`.

    Its result depends on nothing but the requested contexts (ID, abstract syntax,
    transfer syntaxes), the requested roles and the supported contexts, which a
    SharedContexts never changes. Each association gets its own copy of the result
    contexts; the role items are only encoded into the A-ASSOCIATE-AC.
    """
    if not isinstance(ac_contexts, SharedContexts):
        return _pynetdicom_negotiate(rq_contexts, ac_contexts, roles)
    key = (tuple((cx.context_id, cx.abstract_syntax, tuple(cx.transfer_syntax))
                 for cx in rq_contexts),
           tuple(sorted((roles or {}).items())))
    known = ac_contexts.negotiated.get(key)
    if known is None:
        known = _pynetdicom_negotiate(rq_contexts, ac_contexts, roles)
        if len(ac_contexts.negotiated) < NEGOTIATIONS_KEPT:
            ac_contexts.negotiated[key] = known
    results, role_items = known
    return [copy.copy(cx) for cx in results], list(role_items)



class _WakingQueue(queue.Queue):
    """A queue that sets ``wake`` after each put: the acceptor reactor waits on it."""

    def __init__(self, wake: threading.Event) -> None:
        super().__init__()
        self.wake = wake

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self.wake.set()


#: Longest an idle acceptor reactor sleeps before it looks at its timers and its DUL.
IDLE_WAIT = 0.05


class AssociationHooks(Association):
    """An Association whose per-request dispatch calls :meth:`serve_request`, and whose
    acceptor reactor waits for work instead of polling.

    pynetdicom picks the service class for a request inside
    ``Association._serve_request`` from a module-level table; overriding the
    method on our own associations is the only way to route some SOP classes
    elsewhere without changing that table for the whole process.

    pynetdicom's ``_run_reactor`` wakes every millisecond to look for a DIMSE message,
    a release or an abort: a thread per association burning CPU while idle. Every
    one of those arrives through the DIMSE message queue or the DUL's to-user queue,
    so :func:`wake_on_arrival` makes both set an event, and :meth:`_run_reactor`
    (pynetdicom 3.0's loop with its sleep replaced by a wait on that event) sleeps
    until something arrives, or :data:`IDLE_WAIT` for the timers and a dead DUL.
    """

    def run(self) -> None:  # Thread.run: the association's thread
        try:
            super().run()
        finally:
            ended = getattr(self, "lamina_ended", None)
            if ended is not None:
                ended()

    def _serve_request(self, msg: Any, context_id: int) -> None:
        self.serve_request(msg, context_id)

    def _run_reactor(self) -> None:
        wake: threading.Event | None = getattr(self, "lamina_wake", None)
        if wake is None:
            super()._run_reactor()
            return
        while not self._kill:
            # Paused while it waits (it consumes nothing): a thread that pauses the reactor
            # to send on its own (release, send_c_*) need not wait for the wait to end.
            self._is_paused = True
            wake.wait(IDLE_WAIT)
            wake.clear()  # anything put before this is seen by the checks below
            self._reactor_checkpoint.wait()
            self._is_paused = False
            context_id, msg = self.dimse.get_msg(block=False)
            if msg:
                self._serve_request(msg, int(context_id))
                wake.set()  # another message may be queued behind this one
            if self.is_established and self.acse.is_release_requested():
                # EVT_RELEASED before the A-RELEASE-RP goes out (pynetdicom: after), so
                # the association's slot is free by the time the peer hears the release
                # and opens its next association.
                self.is_released = True
                self.is_established = False
                evt.trigger(self, evt.EVT_RELEASED, {})
                self.acse.send_release(is_response=True)
                self.kill()
                return
            if self.acse.is_aborted():
                self.dul.receive_pdu(wait=False)  # EVT_ACSE_RECV fires for subscribers
                self.is_aborted = True
                self.is_established = False
                evt.trigger(self, evt.EVT_ABORTED, {})
                self.kill()
                return
            if not self.dul.is_alive():
                self.kill()
                return
            if self.dul.idle_timer_expired():
                if self.network_timeout_response == "A-RELEASE":
                    self._is_paused = True
                    self._reactor_checkpoint.wait()
                    self.release()
                    self._is_paused = False
                else:
                    self.abort()
                self.kill()
                return

    def serve_request(self, msg: Any, context_id: int) -> None:
        """Default: pynetdicom's own dispatch."""
        super()._serve_request(msg, context_id)

    def kill(self) -> None:
        """pynetdicom's ``kill`` without its busy wait for the DUL thread to end.

        pynetdicom waits for the DUL to reach Sta1 (everything sent, the connection
        closed), then ``stop_dul`` sets the DUL's kill flag and polls every millisecond
        until the thread is gone; our DUL reactor sleeps up to :data:`IDLE_WAIT` on a
        closed socket, so that was ~25 wake-ups (each taking the GIL) per association.
        Here ``kill_dul`` wakes the reactor (DulHooks) and the thread is joined.
        """
        self._reactor_checkpoint.set()
        self._kill = True
        self.is_established = False
        self._is_paused = True
        dul = self.dul
        while dul.is_alive() and dul.state_machine.current_state != "Sta1":
            time.sleep(0.01)  # pynetdicom's own period: the RP or RJ is still being sent
        dul.kill_dul()
        if dul.is_alive() and dul is not threading.current_thread():
            dul.join()


class _FdWakingQueue(queue.Queue):
    """A queue whose puts wake a DUL reactor blocked in select() (an eventfd)."""

    def __init__(self) -> None:
        super().__init__()
        self.wake_lock = threading.Lock()
        self.wake_fd: int | None = None

    def open_wake(self) -> int:
        with self.wake_lock:
            self.wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            return self.wake_fd

    def close_wake(self) -> None:
        with self.wake_lock:  # never write to a number the kernel may have given to another file
            if self.wake_fd is not None:
                os.close(self.wake_fd)
                self.wake_fd = None

    def wake(self) -> None:
        with self.wake_lock:
            if self.wake_fd is not None:
                os.eventfd_write(self.wake_fd, 1)

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self.wake()


class DulHooks(DULServiceProvider):
    """pynetdicom's DUL reactor (the thread that reads the socket and sends what the
    association queues) without its 1 ms polling: it sleeps in ``select`` on the socket
    and an eventfd that a queued primitive or :meth:`kill_dul` writes, so an idle or
    waiting association costs nothing and a PDU is read the moment it arrives.

    The steps of each turn are pynetdicom 3.0's: expired ARTIM timer first, then one
    queued primitive to send or one PDU to read, then one state machine event. Only
    the wait differs. Over TLS, decrypted bytes can wait in the SSL object while the
    descriptor is not readable: the wait ends at once while :func:`buffered` says so.
    """

    #: Reads the PDUs of an established association instead of pynetdicom's reader
    #: (:class:`node.dimse.receive.StoreReceiver`), set by :func:`install_receiver`.
    receiver: Any = None

    def run(self) -> None:  # Thread.run: the reactor of this thread
        wakes: _FdWakingQueue = self.to_provider_queue
        wake_fd = wakes.open_wake()
        try:
            self.serve_pdus(wake_fd)
        finally:
            wakes.close_wake()
            if self.receiver is not None:
                self.receiver.close()

    def kill_dul(self) -> None:
        super().kill_dul()
        self.to_provider_queue.wake()

    def serve_pdus(self, wake_fd: int) -> None:
        self._idle_timer.start()
        self.assoc._dul_ready.set()
        sock = self.socket.socket  # the raw TCP socket under pynetdicom's AssociationSocket
        #: The wait just before this turn saw the socket readable: the receiver need not
        #: ask select again (one system call per PDU instead of two).
        readable = False
        while not self._kill_thread:
            if self.artim_timer.expired:
                self.event_queue.put("Evt18")
            seen, readable = readable, False
            try:
                if self._process_recv_primitive():
                    pass
                elif self.receiver is not None and self.receiver.reads():
                    if self.receiver.take_pdu(seen):
                        self._idle_timer.restart()
                elif self._is_transport_event():
                    self._idle_timer.restart()
            except Exception:
                # pynetdicom's own answer to a broken reactor: A-ABORT, both reactors end
                log.exception("DUL reactor failed, aborting the association")
                with suppress(OSError):
                    self.socket.send(encode_provider_abort(0x00))
                self.assoc.is_aborted = True
                self.assoc.is_established = False
                self.assoc._kill = True
                self._kill_thread = True
                return
            try:
                event = self.event_queue.get(block=False)
            except queue.Empty:
                readable = self.wait_for_work(sock, wake_fd)
                continue
            self.state_machine.do_action(event)

    def wait_for_work(self, sock: socket.socket | None, wake_fd: int) -> bool:
        """Until the socket is readable, something is queued to send, or
        :data:`IDLE_WAIT` runs out (the ARTIM timer, 30 s or more, is then looked at).
        True when the wait saw the socket readable."""
        if self.to_provider_queue.qsize() or buffered(sock):
            return False
        # a closed socket (the association is ending) leaves the eventfd: kill_dul wakes it
        watched = [wake_fd] if sock is None or sock.fileno() < 0 else [sock, wake_fd]
        readable, _, _ = select.select(watched, [], [], IDLE_WAIT)
        if wake_fd in readable:
            with suppress(BlockingIOError):
                os.eventfd_read(wake_fd)
        return sock is not None and sock in readable


def buffered(sock: socket.socket | None) -> bool:
    """Decrypted bytes wait in a TLS socket's SSL object (``select`` does not see them)."""
    return isinstance(sock, ssl.SSLSocket) and sock.pending() > 0


def reactor_without_polling(assoc: Association) -> None:
    """Before the association starts: its DUL runs :class:`DulHooks`'s reactor (the
    thread is not started yet, so its class and its send queue can still change)."""
    dul = assoc.dul
    dul.to_provider_queue = _FdWakingQueue()
    dul.__class__ = DulHooks


def install_receiver(assoc: Association, receiver: Any) -> bool:
    """Before the association starts: ``receiver`` reads its PDUs once it is established
    (only under :class:`DulHooks`; False: pynetdicom reads everything)."""
    if not isinstance(assoc.dul, DulHooks):
        return False
    assoc.dul.receiver = receiver
    return True


# --- what the receiver needs of pynetdicom's DUL and DIMSE providers -------------------


class PynetdicomLink:
    """A pynetdicom association as the C-STORE receiver sees it (its ``Link``,
    :mod:`node.dimse.receive`): what the receiver does not serve goes to pynetdicom's
    DIMSE provider and state machine, as its own reader would hand it over."""

    def __init__(self, assoc: Association, guard: Any) -> None:
        self.assoc = assoc
        self.key = assoc
        self.guard = guard

    @property
    def address(self) -> str:
        return str(self.assoc.requestor.address)

    @property
    def peer_max_pdu(self) -> int:
        return int(self.assoc.requestor.maximum_length or 0)

    @property
    def common_extended(self) -> Any:
        return self.assoc.acceptor.accepted_common_extended

    def in_data_transfer(self) -> bool:
        return in_data_transfer(self.assoc)

    def accepted_context(self, context_id: int) -> PresentationContext | None:
        return accepted_context(self.assoc, context_id)

    def releasing(self) -> bool:
        return is_releasing(self.assoc)

    def admit_header(self, header: bytes | bytearray) -> bool:
        return bool(self.guard.admit(header))

    def other_message_open(self) -> bool:
        return pynetdicom_receiving(self.assoc)

    def give_pdvs(self, pdvs: list[tuple[int, bytes]]) -> None:
        give_pdvs(self.assoc, pdvs)

    def give_pdu(self, data: bytes) -> None:
        give_pdu(self.assoc, data)

    def connection_ended(self) -> None:
        connection_ended(self.assoc)

    def invalid_pdu(self) -> None:
        invalid_pdu(self.assoc)



def in_data_transfer(assoc: Association) -> bool:
    """The association is established and no release or abort has begun (PS3.8 Sta6)."""
    return assoc.dul.state_machine.current_state == "Sta6"


def pynetdicom_receiving(assoc: Association) -> bool:
    """pynetdicom's DIMSE provider holds a message it has not finished receiving."""
    return assoc.dimse.message is not None


def give_pdvs(assoc: Association, pdvs: list[tuple[int, bytes]]) -> None:
    """Presentation data values for pynetdicom's DIMSE provider, as its state machine
    hands them over in data transfer (DT-2). Its receive_primitive is wrapped by
    :class:`DimseHooks`, so a failed spool write is handled as on pynetdicom's path."""
    primitive = P_DATA()
    primitive.presentation_data_value_list = [[context_id, value] for context_id, value in pdvs]
    assoc.dimse.receive_primitive(primitive)


def give_pdu(assoc: Association, data: bytes) -> None:
    """A whole PDU (not P-DATA) for pynetdicom's state machine, as its own reader does:
    decoded into its event, or Evt19 (invalid PDU: A-ABORT) when it does not decode."""
    dul = assoc.dul
    try:
        pdu, event = dul._decode_pdu(bytearray(data))
    except Exception:
        log.warning("undecodable PDU received, aborting the association")
        dul.event_queue.put("Evt19")
        return
    dul.event_queue.put(event)
    dul._recv_pdu.put(pdu)


def connection_ended(assoc: Association) -> None:
    """The connection closed or failed under the receiver (Evt17: pynetdicom ends the
    association as an abort)."""
    assoc.dul.event_queue.put("Evt17")


def invalid_pdu(assoc: Association) -> None:
    """A PDU that does not parse (Evt19: pynetdicom sends A-ABORT and ends)."""
    assoc.dul.event_queue.put("Evt19")


def wake_on_arrival(assoc: Association) -> None:
    """Before the association starts: its DIMSE message queue and DUL to-user queue wake
    its reactor (see :class:`AssociationHooks`). Both are still empty here."""
    wake = threading.Event()
    assoc.dimse.msg_queue = _WakingQueue(wake)
    assoc.dul.to_user_queue = _WakingQueue(wake)
    assoc.lamina_wake = wake


def adopt(assoc: Association, cls: type[AssociationHooks]) -> None:
    """Make an association pynetdicom has just built an instance of ``cls``.

    ``RequestHandler._create_association`` constructs ``Association`` itself
    (there is no class or factory to pass in), and configures it in ways we
    must not duplicate. ``cls`` adds methods only (no state of its own in
    ``__init__``), so switching the class of the fresh, not yet started object
    is safe.
    """
    if not issubclass(cls, type(assoc)):
        raise TypeError(f"{cls.__name__} does not extend {type(assoc).__name__}")
    assoc.__class__ = cls


class RequestHandlerHooks(RequestHandler):
    """A request handler whose new associations pass through :meth:`created`.

    A server with an ``association_ended()`` method hears each association's thread
    end (:meth:`AssociationHooks.run`): no thread of its own need wait for it.
    """

    def _create_association(self) -> Association:
        assoc = self.created(super()._create_association())
        assoc.lamina_ended = getattr(self.server, "association_ended", None)
        return assoc

    def created(self, assoc: Association) -> Association:
        """Default: the association as pynetdicom built it."""
        return assoc


class QueryRetrieveHooks(QueryRetrieveServiceClass):
    """pynetdicom's Q/R service class with its C-FIND, C-MOVE and C-GET loops replaced.

    ``SCP`` (pynetdicom's) checks the context and sets the statuses, then calls
    ``_c_find_scp`` / ``_move_scp`` / ``_get_scp``; these call :meth:`c_find`,
    :meth:`c_move` and :meth:`c_get`.
    """

    def _c_find_scp(self, req: Any, context: PresentationContext) -> None:
        self.c_find(req, context)

    def _move_scp(self, req: Any, context: PresentationContext) -> None:
        self.c_move(req, context)

    def _get_scp(self, req: Any, context: PresentationContext) -> None:
        self.c_get(req, context)

    def c_find(self, req: Any, context: PresentationContext) -> None:
        raise NotImplementedError

    def c_move(self, req: Any, context: PresentationContext) -> None:
        raise NotImplementedError

    def c_get(self, req: Any, context: PresentationContext) -> None:
        raise NotImplementedError


# --- accessors ---------------------------------------------------------------------------


def accepted_context(assoc: Association, context_id: int) -> PresentationContext | None:
    """The accepted presentation context with this ID (None: rejected or unknown)."""
    return assoc._accepted_cx.get(context_id)


def is_releasing(assoc: Association) -> bool:
    """We sent A-RELEASE-RQ: requests arriving now are ignored."""
    return bool(assoc._sent_release)


@contextmanager
def serving(assoc: Association) -> Iterator[None]:
    """What pynetdicom does around a service class's ``SCP`` call.

    Earlier C-CANCELs are forgotten, and the association is marked paused
    (``send_c_store`` on it, as C-GET does, waits for that mark). On an
    exception the marks stay: the caller aborts the association.
    """
    assoc.dimse.cancel_req = {}
    assoc._is_paused = True
    yield
    assoc._is_paused = False
    assoc.dimse.cancel_req = {}


def send_message(assoc: Association, primitive: DIMSEPrimitive, context_id: int) -> None:
    """Send a DIMSE response (pynetdicom encodes and fragments it)."""
    assoc.dimse.send_msg(primitive, context_id)


def send_pdata(assoc: Association, pdata: P_DATA) -> None:
    """Queue one P-DATA PDU as it is (its values already encoded)."""
    assoc.dul.send_pdu(pdata)


def send_queue_empty(assoc: Association) -> bool:
    """Whether the DUL has sent everything queued (it reads the socket only then)."""
    return assoc.dul.to_provider_queue.empty()


def socket_of(assoc: Association) -> Any:
    """The association's TCP socket, or None before it connects."""
    wrapped = assoc.dul.socket
    return wrapped.socket if wrapped is not None else None


# --- guarding the receive path ------------------------------------------------------------


class SocketHooks(AssociationSocket):
    """An association socket whose reads pass through :meth:`read`.

    pynetdicom's DUL reads each PDU as ``recv(6)`` (type and length) then
    ``recv(length)`` into one buffer, with no bound on the length and no check
    of the type before the body is read. A subclass of the socket is the one
    place that sees the header before the body is read.
    """

    def recv(self, nr_bytes: int) -> bytearray:
        return self.read(nr_bytes)

    def read(self, nr_bytes: int) -> bytearray:
        return super().recv(nr_bytes)


def adopt_socket(assoc: Association, cls: type[SocketHooks]) -> Any:
    """Make the socket pynetdicom gave a new acceptor association an instance of ``cls``.

    Like :func:`adopt`: ``cls`` adds methods only; the socket is not yet read.
    """
    sock = assoc.dul.socket
    if sock is not None:
        sock.__class__ = cls
    return sock


def abort_connection(sock: AssociationSocket | None, reason: int) -> None:
    """Send an A-ABORT (service provider, ``reason``) and shut the connection both ways.

    The descriptor stays open for pynetdicom to close; the peer sees the end at once,
    and a peer blocked sending to us gets an error instead of waiting for its timeout.
    """
    if sock is None:
        return
    with suppress(Exception):  # the abort is a courtesy (the peer may be gone)
        sock.send(encode_provider_abort(reason))
    raw = sock.socket
    if raw is not None:
        with suppress(OSError):
            raw.shutdown(socket.SHUT_WR)


def end_before_association(assoc: Association) -> None:
    """End an acceptor that is still waiting for its A-ASSOCIATE-RQ now, not after the
    ACSE timeout: its thread takes None as "timed out", closes and returns (otherwise
    each refused connection would hold a thread and a pynetdicom association slot)."""
    assoc.dul.to_user_queue.put(None)


def encode_provider_abort(reason: int) -> bytes:
    """An A-ABORT PDU from the service provider (source 2) with a PS3.8 9.3.8 reason."""
    primitive = A_P_ABORT()
    primitive.provider_reason = reason
    pdu = A_ABORT_RQ()
    pdu.from_primitive(primitive)
    return pdu.encode()


class _Discard:
    """Stands in for a C-STORE's spool file after a write to it failed: the rest of the
    data set is read off the wire and dropped, so the message completes and gets an
    answer (0xA700) instead of the association being torn down."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.file = self

    def write(self, data: bytes) -> int:
        return len(data)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class DimseHooks:
    """Wraps an association's DIMSE ``receive_primitive`` (runs in the DUL thread).

    pynetdicom calls it from its state machine outside the DUL's own exception
    guard: an ``OSError`` while spooling a data set (a full disk) ended the DUL
    thread, so the sender got no answer, the association never closed and its
    slot was never released. Here a failed spool write of a C-STORE data set
    discards the rest of that data set and marks the association (see
    :func:`receive_failure`): the C-STORE handler answers 0xA700. Any other
    failure aborts the association at once.
    """

    def __init__(self, assoc: Association, on_error: Any) -> None:
        self.assoc = assoc
        self.dimse = assoc.dimse
        self.inner = assoc.dimse.receive_primitive
        self.on_error = on_error
        assoc.dimse.receive_primitive = self

    def __call__(self, primitive: P_DATA) -> None:
        try:
            self.inner(primitive)
        except Exception as exc:  # any failure must end in an answer or a clean abort
            self.on_error(exc)
            if isinstance(exc, OSError) and self.discard_rest(primitive, exc):
                return
            self.drop_message()
            # A-ABORT and the connection shut now: the state machine's own abort would
            # wait for a peer still sending (its send blocks once we stop reading).
            # Evt17 ("transport closed") then ends the association in pynetdicom's order.
            abort_connection(self.assoc.dul.socket, 0)
            self.assoc.dul.event_queue.put("Evt17")

    def discard_rest(self, primitive: P_DATA, exc: OSError) -> bool:
        """After a failed write to a C-STORE's spool file: drop that file, read the rest
        of the data set into nothing, and mark the association. False when the failure
        was elsewhere (the primitive carries a command fragment, or no spool file)."""
        message = self.dimse.message
        spool = getattr(message, "_data_set_file", None)
        if spool is None or isinstance(spool, _Discard) or any(
                data[0] & 1 for _, data in primitive.presentation_data_value_list):
            return False
        close_and_remove(spool)
        message._data_set_file = _Discard(spool.name)
        self.assoc.lamina_receive_failure = exc.strerror or type(exc).__name__
        try:
            self.inner(primitive)  # its data set fragments again, into nothing
        except Exception:
            return False
        return True

    def drop_message(self) -> None:
        """Forget the half-received message, closing (and removing) its spool file."""
        message, self.dimse.message = self.dimse.message, None
        spool = getattr(message, "_data_set_file", None)
        if spool is not None:
            close_and_remove(spool)


def close_and_remove(spool: Any) -> None:
    with suppress(OSError):
        spool.close()
    with suppress(OSError):
        os.unlink(spool.name)


def receive_failure(assoc: Association) -> str:
    """Why the data set of the C-STORE just received could not be spooled ('' if it was);
    reading it clears it (one answer per failed message)."""
    reason = getattr(assoc, "lamina_receive_failure", "")
    assoc.lamina_receive_failure = ""
    return reason


# --- PDUs of the sub-association we drive ourselves --------------------------------------


def encode_associate_rq(request: A_ASSOCIATE) -> bytes:
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(request)
    return pdu.encode()


def decode_associate_ac(data: bytes) -> A_ASSOCIATE:
    pdu = A_ASSOCIATE_AC()
    pdu.decode(data)
    return pdu.to_primitive()


def encode_release_rq() -> bytes:
    return A_RELEASE_RQ().encode()


def encode_release_rp() -> bytes:
    return A_RELEASE_RP().encode()


def encode_abort_rq(source: int = 0x00) -> bytes:
    primitive = A_ABORT()
    primitive.abort_source = source
    pdu = A_ABORT_RQ()
    pdu.from_primitive(primitive)
    return pdu.encode()
