"""The receiving side of C-STORE (and C-ECHO), framed directly on the association's socket.

Why Lamina reads an established association's PDUs itself (issue 15, measured
in ``benchmarks/ingest_stages`` and ``benchmarks/ingest``): pynetdicom reads a
PDU in 4 KB pieces, decodes it into objects that copy every fragment, hands
the finished message from its DUL thread to the association thread through two
queues, and encodes each C-STORE-RSP with pydicom: a few milliseconds of CPU
per 512 KB slice, as much as the store itself. The node's C-MOVE and C-FIND
already frame PDUs this way (:mod:`node.dimse.sender`, :mod:`node.dimse.qr_loops`).

What a :class:`StoreReceiver` does once the association is in data transfer (plain
TCP or TLS), in the thread that reads its socket: the DUL thread of a pynetdicom
association, or the one thread of a framed one (:mod:`node.dimse.framed`, which
serves storage and echo associations from their first PDU). What it does not serve
goes to its :class:`Link`: on a pynetdicom association as described here, on a
framed one as that module says.

* each PDU header is checked by the PDU guard (:mod:`node.dimse.guard`) before
  its body is read, with the same bounds and the same A-ABORT as before;
* a P-DATA-TF is read whole into one reused buffer and its PDVs parsed.
  Command fragments are gathered until the command set is complete. A
  C-STORE-RQ that pynetdicom would serve with its Storage service class (a
  valid request, an accepted context, a storage SOP class, no release under
  way) is received here: its data set fragments are written straight to its
  spool (:mod:`node.dimse.spool`: memory, or a file in the spool folder) behind
  the same file meta pynetdicom writes, the
  :class:`~node.dimse.handlers.store.StoreService` runs when the last one
  arrives, and the C-STORE-RSP goes out on the socket from this thread, the
  only one that writes to it (pynetdicom queues its own sends to it);
* a valid C-ECHO-RQ on an accepted Verification context is answered here,
  success, as the Verification service answers any admitted peer;
* every other message (C-FIND, C-MOVE, C-GET, the C-STORE-RSPs of a
  C-GET, anything malformed) is handed to pynetdicom's DIMSE provider, PDV by
  PDV, exactly as its state machine would; every other PDU (A-RELEASE-RQ,
  A-ABORT, ...) to pynetdicom's decoder and state machine. So releases,
  aborts, timeouts and the other services behave as they always did.

A failed spool write (a full disk) discards the rest of the data set and is
answered 0xA700 with the reason, as on pynetdicom's path; a connection that
ends mid-message leaves no spool file behind.
"""

from __future__ import annotations

import logging
import select
import socket
import struct
from collections.abc import Hashable
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION
from pynetdicom.presentation import PresentationContext
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.sop_class import uid_to_service_class

from node import status
from node.dimse import compat
from node.dimse.guard import P_DATA_TF
from node.dimse.handlers.store import StoreService
from node.dimse.sender import (
    _PDU_HEADER,
    _UNLIMITED_PDU,
    VERIFICATION,
    command_elements,
    echo_response,
    frame,
    recv_exactly,
    store_response,
)
from node.dimse.spool import DataSetSpool
from node.status import Outcome, shorten

log = logging.getLogger("lamina.receive")

_PDV_ITEM = struct.Struct(">I")
_UL = struct.Struct("<I")
_C_STORE_RQ = 0x0001
_C_ECHO_RQ = 0x0030
_NO_DATA_SET = 0x0101
#: Largest recv at a time: what a socket's receive buffer usually holds.
_RECV_CHUNK = 1 << 18


@dataclass
class _Incoming:
    """The C-STORE-RQ whose data set is being received."""

    context_id: int
    message_id: int
    sop_class_uid: str
    sop_instance_uid: str
    spool: DataSetSpool | None = None
    failure: str = ""  # why the spool write failed: the rest is read into nothing


class Link(Protocol):
    """The association a :class:`StoreReceiver` reads for: pynetdicom's
    (:class:`~node.dimse.compat.PynetdicomLink`) or a framed one
    (:class:`~node.dimse.framed.FramedAssociation`), which serves everything else."""

    #: What the association's session is kept under (:class:`~node.dimse.handlers.
    #: association.Sessions`).
    key: Hashable
    #: The peer's address, for logs.
    address: str
    #: The longest PDU the peer receives (0: no limit).
    peer_max_pdu: int
    #: SOP classes accepted through SOP Class Common Extended Negotiation.
    common_extended: set[str] | dict[str, str]

    def in_data_transfer(self) -> bool:
        """Established, no release or abort begun, the connection open."""

    def accepted_context(self, context_id: int) -> PresentationContext | None:
        """The accepted presentation context with this ID (None: none)."""

    def releasing(self) -> bool:
        """We asked for the release: requests arriving now are ignored."""

    def admit_header(self, header: bytes | bytearray) -> bool:
        """Check a PDU header before its body is read (:mod:`node.dimse.guard`); False:
        refused, the peer has had its A-ABORT."""

    def other_message_open(self) -> bool:
        """A message handed over with :meth:`give_pdvs` is not complete yet."""

    def give_pdvs(self, pdvs: list[tuple[int, bytes]]) -> None:
        """Presentation data values of a message the receiver does not serve."""

    def give_pdu(self, data: bytes) -> None:
        """A whole PDU other than P-DATA-TF (a release, an abort, ...)."""

    def connection_ended(self) -> None:
        """The connection closed or failed under the receiver."""

    def invalid_pdu(self) -> None:
        """A PDU that breaks PS3.8: the association is aborted."""


class StoreReceiver:
    """Reads the PDUs of one established association (see the module docstring)."""

    def __init__(self, link: Link, sock: socket.socket, store: StoreService) -> None:
        self.link = link
        self.store = store
        self.sock = sock
        #: P-DATA bodies are read into this, grown to the longest PDU the peer has sent
        #: (never beyond the maximum we advertised: the guard refuses longer ones).
        self.buffer = bytearray()
        self.command = bytearray()
        self.incoming: _Incoming | None = None
        #: The association's memory spool between two data sets: rewound, its pages kept
        #: for the next one (:mod:`node.dimse.spool`).
        self.spare: DataSetSpool | None = None
        self.header = bytearray(6)

    # --- called by the DUL reactor ------------------------------------------------------

    def reads(self) -> bool:
        """Whether this receiver is the one reader of the socket now: in data transfer,
        with the connection open. Otherwise pynetdicom's own reader is (association
        set-up, release, abort). Asked before looking at the socket, so that a PDU
        arriving between two looks is never taken by the other reader."""
        return self.link.in_data_transfer() and self.sock.fileno() >= 0

    def take_pdu(self, readable: bool = False) -> bool:
        """Read and act on one PDU if the socket is readable (while :meth:`reads`);
        False: nothing had arrived. ``readable``: the reactor's wait has just seen it so."""
        if not (readable or compat.buffered(self.sock)
                or select.select([self.sock], [], [], 0)[0]):
            return False
        try:
            if not self._read_into(memoryview(self.header)):
                return True
            if not self.link.admit_header(self.header):
                self._end()
                return True
            kind, _, length = _PDU_HEADER.unpack(self.header)
            if kind != P_DATA_TF:
                self.link.give_pdu(bytes(self.header) + recv_exactly(self.sock, length))
                return True
            if len(self.buffer) < length:
                self.buffer = bytearray(length)
            body_view = memoryview(self.buffer)[:length]
            if self._read_into(body_view):
                self._p_data(body_view)
        except OSError as exc:  # the connection failed under us: end as pynetdicom does
            log.info("connection lost", extra={"fields": {"reason": exc.strerror or str(exc)}})
            self._end()
        return True

    def close(self) -> None:
        """The DUL reactor has ended: drop a half-received data set and the spare spool."""
        self._drop_incoming()
        spare, self.spare = self.spare, None
        _discard(spare)

    # --- P-DATA -------------------------------------------------------------------------

    def _p_data(self, body: memoryview) -> None:
        """Act on each PDV of a P-DATA-TF body (PS3.8 9.3.5), in order."""
        pdvs = _pdvs(body)
        if pdvs is None:
            self._invalid("a PDV item runs outside its PDU")
            return
        for context_id, value in pdvs:  # value: message control header, then the fragment
            control = value[0]
            if self.incoming is not None:
                if control & 1:
                    self._invalid("a command before the last fragment of a data set")
                    return
                self._write(value[1:])
                if control & 2:
                    self._stored()
            elif self.link.other_message_open():
                self.link.give_pdvs([(context_id, bytes(value))])
            elif control & 1:
                self.command += value[1:]
                if control & 2:
                    self._command(context_id)
            else:  # a data set with no command before it: pynetdicom's to judge
                if self.command:
                    self.link.give_pdvs([(context_id, b"\x01" + bytes(self.command))])
                    self.command.clear()
                self.link.give_pdvs([(context_id, bytes(value))])

    def _command(self, context_id: int) -> None:
        """A complete command set: start receiving a C-STORE-RQ, or hand any other
        message to pynetdicom."""
        command, self.command = bytes(self.command), bytearray()
        found = command_elements(command)
        if found is not None and self._echo(found, context_id):
            return
        incoming = self._store_request(found, context_id) if found is not None else None
        if incoming is None:
            self.link.give_pdvs([(context_id, b"\x03" + command)])
            return
        try:
            self.incoming = incoming
            incoming.spool, self.spare = self.spare or self.store.spool(self.link.key), None
            context = self.link.accepted_context(context_id)
            self._write(memoryview(file_preamble(incoming.sop_class_uid, incoming.sop_instance_uid,
                                                 str(context.transfer_syntax[0]))))
        except OSError as exc:
            self._spool_failed(exc)

    def _echo(self, found: dict[int, bytes], context_id: int) -> bool:
        """Answer a valid C-ECHO-RQ on an accepted Verification context (success, as
        Verification answers any admitted peer); False for anything else.

        pynetdicom would decode the command with pydicom, pass it to the association
        thread and encode the answer with pydicom: most of the CPU of an echo.
        """
        if (_us(found.get(0x0100)) != _C_ECHO_RQ or _uid(found.get(0x0002)) != VERIFICATION
                or _us(found.get(0x0800)) != _NO_DATA_SET):
            return False
        message_id = _us(found.get(0x0110))
        context = self.link.accepted_context(context_id)
        if message_id is None or context is None or self.link.releasing():
            return False
        if context.abstract_syntax != VERIFICATION:
            return False
        self._send_command(echo_response(message_id), context_id)
        return True

    def _store_request(self, found: dict[int, bytes], context_id: int) -> _Incoming | None:
        """The C-STORE-RQ this command set starts, if it is one pynetdicom would hand to
        its Storage service class; None for anything else (pynetdicom decides)."""
        if _us(found.get(0x0100)) != _C_STORE_RQ:
            return None
        message_id, priority = _us(found.get(0x0110)), _us(found.get(0x0700))
        data_set = _us(found.get(0x0800))
        sop_class = _uid(found.get(0x0002))
        sop_instance = _uid(found.get(0x1000))
        if (message_id is None or priority is None or data_set in (None, _NO_DATA_SET)
                or not sop_class or not sop_instance):
            return None  # not a valid request: pynetdicom's warning and silence
        context = self.link.accepted_context(context_id)
        if (context is None or self.link.releasing()
                or sop_class in self.link.common_extended
                or uid_to_service_class(sop_class) is not StorageServiceClass):
            return None
        return _Incoming(context_id, message_id, sop_class, sop_instance)

    # --- the data set -------------------------------------------------------------------

    def _write(self, data: memoryview) -> None:
        incoming = self.incoming
        assert incoming is not None
        if incoming.failure or incoming.spool is None:
            return
        try:
            incoming.spool.write(data)
        except OSError as exc:
            self._spool_failed(exc)

    def _spool_failed(self, exc: OSError) -> None:
        """Discard the data set's spool file; the rest is read into nothing and the
        sender is answered 0xA700 with the reason."""
        incoming = self.incoming
        assert incoming is not None
        incoming.failure = exc.strerror or type(exc).__name__
        log.error("receive failed", extra={"fields": {
            "address": self.link.address, "reason": incoming.failure}})
        self._remove_spool(incoming)

    def _stored(self) -> None:
        """The last fragment is in: store, answer, rewind or remove the spool."""
        incoming, self.incoming = self.incoming, None
        assert incoming is not None
        try:
            path, hashed = Path(), None
            if incoming.spool is not None:
                incoming.spool.complete()
                path, hashed = Path(incoming.spool.path), incoming.spool.hashed()
            outcome = self.store.receive(self.link.key, path, incoming.failure, hashed)
        except Exception:  # answered as pynetdicom answers a failed handler, never silence
            log.exception("C-STORE failed")
            outcome = Outcome(status.UNABLE_TO_PROCESS, "internal error while storing")
        finally:
            self._keep_spool(incoming)
        comment = shorten(outcome.comment) if outcome.comment else ""
        self._send_command(store_response(incoming.sop_class_uid, incoming.sop_instance_uid,
                                          incoming.message_id, outcome.status.code, comment),
                           incoming.context_id)

    def _send_command(self, command: bytes, context_id: int) -> None:
        """A response command set, in as many PDUs as the peer's maximum length needs."""
        peer_max = self.link.peer_max_pdu or _UNLIMITED_PDU
        self.sock.sendall(frame(command, context_id, max(peer_max - 6, 1),
                                is_command=True, last=True))

    def _drop_incoming(self) -> None:
        incoming, self.incoming = self.incoming, None
        if incoming is not None:
            self._remove_spool(incoming)

    def _keep_spool(self, incoming: _Incoming) -> None:
        """A memory spool is rewound and kept for the association's next data set; a
        spool file is removed."""
        spool = incoming.spool
        if spool is not None and spool.rewind():
            incoming.spool, self.spare = None, spool
        else:
            self._remove_spool(incoming)

    @staticmethod
    def _remove_spool(incoming: _Incoming) -> None:
        spool, incoming.spool = incoming.spool, None
        _discard(spool)

    # --- the socket ---------------------------------------------------------------------

    def _read_into(self, view: memoryview) -> bool:
        """Fill ``view`` from the socket; False (and the association ended) if it closes."""
        while view:
            got = self.sock.recv_into(view, min(len(view), _RECV_CHUNK))
            if not got:
                self._end()
                return False
            view = view[got:]
        return True

    def _end(self) -> None:
        """The connection is gone or refused: the association ends (pynetdicom: Evt17)."""
        self._drop_incoming()
        self.link.connection_ended()

    def _invalid(self, why: str) -> None:
        """A P-DATA-TF that breaks PS3.8: the association is aborted (pynetdicom: Evt19)."""
        log.warning("invalid P-DATA-TF, aborting the association", extra={"fields": {
            "address": self.link.address, "reason": why}})
        self._drop_incoming()
        self.link.invalid_pdu()


def _discard(spool: DataSetSpool | None) -> None:
    """Remove a spool, whatever is left of it (a disk error leaves nothing to keep)."""
    if spool is not None:
        with suppress(OSError):
            spool.remove()


def file_preamble(sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str) -> bytes:
    """The preamble, "DICM" and File Meta Information (PS3.10 7.1) that pynetdicom writes
    ahead of a spooled data set, byte for byte.

    Encoded here because pydicom's ``create_file_meta`` + ``write_file_meta_info`` cost
    about 0.6 ms per instance (a FileMetaDataset built and validated element by element)
    for seven fixed elements; ``tests/test_dimse_receive.py`` checks the bytes against
    pydicom's.
    """
    elements = b"".join((
        _explicit(0x0001, b"OB", b"\x00\x01"),
        _explicit(0x0002, b"UI", _padded(sop_class_uid, b"\0")),
        _explicit(0x0003, b"UI", _padded(sop_instance_uid, b"\0")),
        _explicit(0x0010, b"UI", _padded(transfer_syntax, b"\0")),
        _explicit(0x0012, b"UI", _padded(PYNETDICOM_IMPLEMENTATION_UID, b"\0")),
        _explicit(0x0013, b"SH", _padded(PYNETDICOM_IMPLEMENTATION_VERSION, b" ")),
    ))
    return b"\0" * 128 + b"DICM" + _explicit(0x0000, b"UL", _UL.pack(len(elements))) + elements


def _explicit(element: int, vr: bytes, value: bytes) -> bytes:
    """A group 0002 element in explicit VR little endian (OB: 4-byte length form)."""
    if vr == b"OB":
        return struct.pack("<HH", 0x0002, element) + vr + b"\0\0" + _UL.pack(len(value)) + value
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value


def _padded(text: str, pad: bytes) -> bytes:
    value = text.encode("ascii")
    return value + pad * (len(value) % 2)


def _pdvs(body: memoryview) -> list[tuple[int, memoryview]] | None:
    """(presentation context ID, control header + fragment) of each PDV item, or None
    if an item's length runs outside the PDU or leaves no control header."""
    items = []
    at, end = 0, len(body)
    while at < end:
        if at + 6 > end:
            return None
        (length,) = _PDV_ITEM.unpack_from(body, at)
        if length < 2 or at + 4 + length > end:
            return None
        items.append((body[at + 4], body[at + 5:at + 4 + length]))
        at += 4 + length
    return items


def _us(value: bytes | None) -> int | None:
    return int.from_bytes(value, "little") if value is not None and len(value) == 2 else None


def _uid(value: bytes | None) -> str:
    return bytes(value).decode("ascii", "replace").rstrip("\0 ") if value else ""
