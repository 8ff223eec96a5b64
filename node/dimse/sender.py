"""The one outgoing C-STORE: C-MOVE and C-GET sub-operations, ``lamina send`` (and forwarding).

What to send is a list of :class:`Outgoing`: SOP class, SOP instance, the
transfer syntax the instance is stored in and a way to read the stored DICOM
file (``open()``; ``local_path()`` where the store is a local folder). There are
two ways out, and both decide the same way per instance
(:mod:`node.dimse.transcode`): the stored syntax when the peer accepted it
(the stored bytes go out as they are, never decoded), else an accepted
uncompressed syntax the instance is re-encoded into, else the sub-operation
fails with a reason naming the SOP class and the syntaxes offered and accepted.
Each yields one :class:`Sent` per item, in order.

* :class:`StoreSender` requests its own associations to a peer (C-MOVE,
  ``lamina send``), proposing per SOP class the stored syntaxes and the two
  uncompressed ones, each as its own presentation context so that the answer
  says exactly which the peer takes; at most 128 contexts per association.
* :func:`send_on_association` sends back over a C-GET requester's association:
  the storage contexts that requester proposed and we accepted decide.

Why :class:`StoreSender` does not use a pynetdicom Association: every PDU it
sends or receives passes its DUL thread (which polls the socket every
millisecond), its state machine and pydicom's encoder, about 0.3 ms of Python
per PDU and a millisecond per command set. DCMTK's storescp accepts 16 KB PDUs
by default, so a 512 KB CT slice is 32 PDUs; a 300-slice C-MOVE moved ~110
instances/s that way, where dcmqrscp and Orthanc move ~650. This association
is simple enough to drive directly: one requester, one operation at a time,
nothing else on the wire. pynetdicom's PDU classes still encode the
A-ASSOCIATE-RQ and decode the answer (:mod:`node.dimse.compat`); this module
frames P-DATA (PS3.8 9.3.5, E.2), writes the C-STORE-RQ command set (PS3.7
9.3.1.1) and reads the C-STORE-RSP's status, with blocking socket calls under
the configured timeouts. Tests compare its bytes with pynetdicom's and run it
against pynetdicom and DCMTK storage SCPs. Received PDUs are bounded by the
maximum length we announced.
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
import struct
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from functools import partial
from itertools import count
from pathlib import Path
from typing import BinaryIO, Protocol, Self

from pydicom.filereader import read_dataset, read_preamble
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION
from pynetdicom.association import Association
from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.presentation import PresentationContext

from node.dimse import compat
from node.dimse.ae import (
    connect_failure,
    context_batches,
    rejection_text,
    set_nodelay,
    silent_peer,
)
from node.dimse.transcode import TranscodeError, choose, file_bytes, offered, transcode, why_not
from node.storage.interface import LocalBlobFiles
from node.storage.query import StoredInstance

log = logging.getLogger("lamina.sender")

_APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"  # DICOM Application Context Name
_ELEMENT = struct.Struct("<HHI")  # implicit VR little endian: group, element, length
_US = struct.Struct("<H")
_UL = struct.Struct("<I")
_PDU_HEADER = struct.Struct(">BBI")  # PDU type, reserved, PDU length
_PDV_HEADER = struct.Struct(">IBB")  # item length, presentation context ID, control header
_PDV_OVERHEAD = 6  # item length (4) + context ID (1) + control header (1)
_META_START = 132  # 128-byte preamble + "DICM"
_READ_BLOCK = 8 << 20  # bytes read and framed at a time: bounds memory for huge objects
_UNLIMITED_PDU = 1 << 20  # fragment size when the peer sets no maximum
_MAX_NEGOTIATION_PDU = 1 << 16  # an A-ASSOCIATE-AC is a few hundred bytes
_C_STORE_RSP = 0x8001
_C_ECHO_RSP = 0x8030
VERIFICATION = "1.2.840.10008.1.1"  # the Verification SOP class
# PDU types (PS3.8 9.3.1)
_A_ASSOCIATE_AC, _A_ASSOCIATE_RJ, _P_DATA_TF, _A_RELEASE_RP, _A_ABORT = 0x02, 0x03, 0x04, 0x06, 0x07


# --- what to send, and what became of it -------------------------------------------------


class BlobSource(Protocol):
    """The blob store as the sender sees it: bytes by hash (``local_path`` is optional)."""

    def open(self, sha256: str) -> BinaryIO: ...


def _no_path() -> Path | None:
    return None


@dataclass(frozen=True)
class Outgoing:
    """One instance to C-STORE: what it is, how it is stored, how to read the stored file."""

    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str  # the syntax the stored file is in
    open: Callable[[], BinaryIO]  # the stored DICOM file (preamble, meta, data set)
    local_path: Callable[[], Path | None] = _no_path  # its file, when the store is local
    label: str = ""  # what logs call it: a blob hash or a path, never patient data

    @classmethod
    def stored(cls, instance: StoredInstance, blobs: BlobSource) -> Outgoing:
        """An instance of the blob store (its file used when the store offers the
        optional :class:`~node.storage.interface.LocalBlobFiles` capability)."""
        sha = instance.blob_sha256
        local = partial(blobs.local_path, sha) if isinstance(blobs, LocalBlobFiles) else _no_path
        return cls(instance.sop_class_uid, instance.sop_instance_uid,
                   instance.transfer_syntax_uid, partial(blobs.open, sha), local, sha)

    @classmethod
    def file(cls, path: Path, sop_class_uid: str, sop_instance_uid: str,
             transfer_syntax_uid: str) -> Outgoing:
        """A DICOM file on disk (``lamina send``)."""
        return cls(sop_class_uid, sop_instance_uid, transfer_syntax_uid,
                   partial(open, path, "rb"), lambda: path, str(path))


@dataclass(frozen=True)
class Sent:
    """What became of one :class:`Outgoing`."""

    item: Outgoing
    status: int | None  # the peer's C-STORE status; None: not sent, or no response
    comment: str = ""  # the peer's ErrorComment, if any
    reason: str = ""  # why it was not sent or got no response (our words)
    syntax: str | None = None  # the transfer syntax it travelled in
    transcoded: bool = False
    #: "" when the association was usable; "refused" when it could not be opened,
    #: "lost" when it ended before this item (nothing of the item was sent).
    association: str = ""


class AssociationFailed(ConnectionError):
    """The destination could not be reached, rejected the association or broke it off."""


class NoContext(LookupError):
    """The peer accepted no presentation context for the SOP class and syntax."""


# --- sending to a peer over our own associations ----------------------------------------


@dataclass
class StoreSender:
    """C-STORE to a peer over associations we request and drive ourselves."""

    calling_ae: str
    max_pdu: int
    acse_timeout: float = 30
    dimse_timeout: float = 60

    def send(self, items: Iterable[Outgoing], host: str, port: int, called_ae: str,
             originator: tuple[str, int] | None = None,
             first_msg_id: int = 1, tls: ssl.SSLContext | None = None) -> Iterator[Sent]:
        """Send every item, one association per batch of at most 128 contexts.

        ``originator`` (AE title, message ID) fills the Move Originator fields
        of a C-MOVE's sub-operations. An association that cannot be opened
        fails its batch (``association="refused"``); one lost mid-batch fails
        the rest of the batch (``"lost"``); the next batch tries again. Close
        the iterator to stop early: the open association is released. With ``tls``
        (node.dimse.tls.outgoing_context) each association speaks DICOM TLS.
        """
        msg_ids = _message_ids(first_msg_id)
        for batch in context_batches(items, _contexts_of):
            contexts = list(dict.fromkeys(cx for item in batch for cx in _contexts_of(item)))
            try:
                assoc = StoreAssociation.open(self.calling_ae, host, port, called_ae, contexts,
                                              self.max_pdu, self.acse_timeout,
                                              self.dimse_timeout, tls)
            except AssociationFailed as exc:
                for item in batch:
                    yield Sent(item, None, reason=str(exc), association="refused")
                continue
            try:
                yield from self._batch(assoc, batch, originator, msg_ids)
            finally:
                assoc.release()

    def _batch(self, assoc: StoreAssociation, batch: list[Outgoing],
               originator: tuple[str, int] | None, msg_ids: Iterator[int]) -> Iterator[Sent]:
        ready: _Payload | str | None = None
        try:
            for k, item in enumerate(batch):
                payload, ready = ready, None
                if not assoc.is_established:
                    if isinstance(payload, _Payload):
                        payload.close()
                    yield Sent(item, None, reason="the association ended", association="lost")
                    continue
                if payload is None:
                    payload = _prepare(assoc, item, eager=False)
                if isinstance(payload, str):
                    yield Sent(item, None, reason=payload)
                    continue
                msg_id = next(msg_ids)
                response: StoreResponse | None = None
                try:
                    assoc.store(payload, item.sop_class_uid, item.sop_instance_uid, msg_id,
                                *(originator or (None, None)))
                    if k + 1 < len(batch):  # read (and re-encode) the next while the peer stores
                        ready = _prepare(assoc, batch[k + 1], eager=True)
                    response = assoc.response(msg_id)
                except OSError as exc:  # the socket: timeout, reset, broken pipe
                    log.debug("sub-association failed", extra={"fields": {"error": str(exc)}})
                    assoc.abort()
                finally:
                    payload.close()
                if response is None:
                    yield Sent(item, None, reason="no response: the association ended",
                               syntax=payload.syntax, transcoded=payload.transcoded)
                else:
                    yield Sent(item, response.status, response.comment, syntax=payload.syntax,
                               transcoded=payload.transcoded)
        finally:
            if isinstance(ready, _Payload):
                ready.close()


def _contexts_of(item: Outgoing) -> list[tuple[str, str]]:
    return [(item.sop_class_uid, syntax) for syntax in offered(item.transfer_syntax_uid)]


def _message_ids(first: int) -> Iterator[int]:
    """Message IDs from ``first`` on, in 1..65535 (US), wrapping around."""
    return ((first - 1 + n) % 65535 + 1 for n in count())


@dataclass
class _Payload:
    """An instance ready to go: its context and its data set, framed or as a stream."""

    context_id: int
    syntax: str
    transcoded: bool
    framed: bytes | None = None
    stream: BinaryIO | None = None  # positioned at the data set

    def close(self) -> None:
        if self.stream is not None:
            self.stream.close()
            self.stream = None


def _prepare(assoc: StoreAssociation, item: Outgoing, eager: bool) -> _Payload | str:
    """The item's payload in the syntax the peer takes, or why it cannot be sent.

    ``eager``: read a stored data set of at most one read block now (framed),
    so it is ready while the peer stores the previous instance.
    """
    accepted = assoc.accepted_syntaxes(item.sop_class_uid)
    syntax = choose(item.transfer_syntax_uid, accepted)
    if syntax is None:
        return why_not(item.sop_class_uid, item.transfer_syntax_uid, accepted,
                       offered(item.transfer_syntax_uid), "the destination")
    context_id = assoc.contexts[(item.sop_class_uid, syntax)]
    try:
        stream = item.open()
    except OSError as exc:
        return f"cannot read the stored instance: {exc.strerror or exc}"
    try:
        if syntax != item.transfer_syntax_uid:
            with stream:
                data = transcode(stream, syntax)
            return _Payload(context_id, syntax, True, framed=assoc.frame_data(context_id, data))
        offset = dataset_offset(stream)
        size = stream.seek(0, os.SEEK_END) - offset
        stream.seek(offset)
        if eager and size <= _READ_BLOCK:
            with stream:
                return _Payload(context_id, syntax, False,
                                framed=assoc.frame_data(context_id, stream.read()))
        return _Payload(context_id, syntax, False, stream=stream)
    except TranscodeError as exc:
        return str(exc)
    except Exception as exc:  # a damaged stored file: this sub-operation fails, not the retrieve
        stream.close()
        return f"cannot read the stored instance: {type(exc).__name__}: {exc}"


# --- sending back over a C-GET requester's association ----------------------------------


def send_on_association(assoc: Association, items: Iterable[Outgoing],
                        first_msg_id: int = 1) -> Iterator[Sent]:
    """C-STORE every item over ``assoc`` (we are the storage SCU on it: C-GET).

    The storage contexts the requester proposed, with itself as SCP, and we
    accepted decide the syntax. A stored file in the chosen syntax goes as it
    is, read from disk in pieces by pynetdicom; otherwise a file in the chosen
    syntax is written to the temp folder first. The association stays open.
    """
    accepted: dict[str, list[str]] = {}
    for cx in assoc.accepted_contexts:
        if cx.as_scu:
            accepted.setdefault(str(cx.abstract_syntax), []).append(str(cx.transfer_syntax[0]))
    msg_ids = _message_ids(first_msg_id)
    for item in items:
        if not assoc.is_established:
            yield Sent(item, None, reason="the association ended", association="lost")
            continue
        syntaxes = accepted.get(item.sop_class_uid, [])
        syntax = choose(item.transfer_syntax_uid, syntaxes)
        if syntax is None:
            yield Sent(item, None, reason=why_not(item.sop_class_uid, item.transfer_syntax_uid,
                                                  syntaxes, who="the C-GET requester"))
            continue
        transcoded = syntax != item.transfer_syntax_uid
        try:
            with _file_in(item, syntax) as path:
                response = assoc.send_c_store(path, msg_id=next(msg_ids))
        except TranscodeError as exc:
            yield Sent(item, None, reason=str(exc))
            continue
        except Exception as exc:
            # A missing or damaged blob, no context after all, the association went away.
            yield Sent(item, None, reason=f"{type(exc).__name__}: {exc}", syntax=syntax,
                       transcoded=transcoded)
            continue
        code = int(response.Status) if "Status" in response else None
        yield Sent(item, code, str(response.get("ErrorComment", "")),
                   "" if code is not None else "no response: the association ended",
                   syntax, transcoded)


@contextmanager
def _file_in(item: Outgoing, syntax: str) -> Iterator[Path]:
    """A DICOM file of the item in ``syntax``: the stored file itself when it is local and
    already in that syntax, else a temporary copy (re-encoded when needed)."""
    local = item.local_path() if syntax == item.transfer_syntax_uid else None
    if local is not None:
        yield local
        return
    with item.open() as stored:
        if syntax == item.transfer_syntax_uid:
            offset = dataset_offset(stored)
            stored.seek(offset)
            data = stored.read()
        else:
            data = transcode(stored, syntax)
    fd, name = tempfile.mkstemp(suffix=".dcm", prefix="lamina-send-")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(file_bytes(item.sop_class_uid, item.sop_instance_uid, syntax, data))
        yield Path(name)
    finally:
        with suppress(OSError):
            os.unlink(name)


# --- the wire ------------------------------------------------------------------------------


def store_command(sop_class_uid: str, sop_instance_uid: str, msg_id: int,
                  originator_aet: str | None = None, originator_id: int | None = None) -> bytes:
    """A C-STORE-RQ command set, implicit VR little endian (PS3.7 9.3.1.1, E.1)."""
    elements = [
        (0x0002, _ui(sop_class_uid)),
        (0x0100, _US.pack(0x0001)),  # CommandField: C-STORE-RQ
        (0x0110, _US.pack(msg_id)),
        (0x0700, _US.pack(0x0002)),  # Priority: low, pynetdicom's default for sub-operations
        (0x0800, _US.pack(0x0001)),  # CommandDataSetType: a data set follows
        (0x1000, _ui(sop_instance_uid)),
    ]
    if originator_aet:
        title = originator_aet.strip().encode("ascii")
        elements.append((0x1030, title + b" " * (len(title) % 2)))
    if originator_id is not None:
        elements.append((0x1031, _US.pack(originator_id)))
    return _command_set(elements)


def store_response(sop_class_uid: str, sop_instance_uid: str, msg_id: int, status: int,
                   comment: str = "") -> bytes:
    """A C-STORE-RSP command set (PS3.7 9.3.1.2), elements in pynetdicom's order.

    ``comment`` (ErrorComment, LO) is sent with a status other than success only,
    already fitted to 64 characters by the caller.
    """
    return _response(_C_STORE_RSP, sop_class_uid, msg_id, status, comment, sop_instance_uid)


def echo_response(msg_id: int, status: int = 0x0000) -> bytes:
    """A C-ECHO-RSP command set (PS3.7 9.3.5.2) for the Verification SOP class."""
    return _response(_C_ECHO_RSP, VERIFICATION, msg_id, status)


def _response(command_field: int, sop_class_uid: str, msg_id: int, status: int,
              comment: str = "", sop_instance_uid: str = "") -> bytes:
    elements = [
        (0x0002, _ui(sop_class_uid)),
        (0x0100, _US.pack(command_field)),
        (0x0120, _US.pack(msg_id)),
        (0x0800, _US.pack(0x0101)),  # CommandDataSetType: no data set
        (0x0900, _US.pack(status)),
    ]
    if comment and status != 0x0000:
        text = comment.encode("ascii", "replace")
        elements.append((0x0902, text + b" " * (len(text) % 2)))
    if sop_instance_uid:
        elements.append((0x1000, _ui(sop_instance_uid)))
    return _command_set(elements)


def _command_set(elements: list[tuple[int, bytes]]) -> bytes:
    """Group 0000 elements (in tag order) behind their group length."""
    body = b"".join(_ELEMENT.pack(0x0000, element, len(value)) + value
                    for element, value in elements)
    return _ELEMENT.pack(0x0000, 0x0000, 4) + _UL.pack(len(body)) + body


def _ui(uid: str) -> bytes:
    value = uid.encode("ascii")
    return value + b"\0" * (len(value) % 2)


def command_elements(command: bytes | bytearray) -> dict[int, bytes] | None:
    """The elements of a command set (group 0000, implicit VR), or None if malformed."""
    found: dict[int, bytes] = {}
    at = 0
    while at + 8 <= len(command):
        group, element, length = _ELEMENT.unpack_from(command, at)
        at += 8
        if group != 0x0000 or at + length > len(command):
            return None
        found[element] = command[at:at + length]
        at += length
    return found


def response_status(command: bytes) -> tuple[int, int] | None:
    """(Status, MessageIDBeingRespondedTo) of a C-STORE-RSP command set, or None if it is not one."""
    found = command_elements(command)
    if found is None:
        return None
    values = {e: _US.unpack(v)[0] for e, v in found.items()
              if e in (0x0100, 0x0120, 0x0900) and len(v) == 2}
    if values.get(0x0100) != _C_STORE_RSP or 0x0900 not in values or 0x0120 not in values:
        return None
    return values[0x0900], values[0x0120]


def error_comment(command: bytes) -> str:
    """The ErrorComment (0000,0902) of a response command set, or ''."""
    value = (command_elements(command) or {}).get(0x0902, b"")
    return value.decode("ascii", "replace").rstrip(" \0")


@dataclass(frozen=True)
class StoreResponse:
    status: int
    comment: str = ""


def dataset_offset(source: BinaryIO | Path) -> int:
    """Where the data set starts in a stored file: after the preamble and the file meta.

    The meta's group length (0002,0000), which PS3.10 requires first, gives it
    without parsing the meta; files without one are measured by pydicom.
    A stream is read from its start and left at an unspecified position.
    """
    if isinstance(source, Path):
        with open(source, "rb") as f:
            return dataset_offset(f)
    source.seek(0)
    head = source.read(_META_START + 12)
    if head[128:132] == b"DICM" and head[_META_START:_META_START + 6] == b"\x02\0\0\0UL":
        return _META_START + 12 + _UL.unpack_from(head, _META_START + 8)[0]
    source.seek(0)
    read_preamble(source, False)
    read_dataset(source, is_implicit_VR=False, is_little_endian=True,
                 stop_when=lambda tag, vr, length: tag.group != 0x0002)
    return source.tell()


def frame(data: bytes | memoryview, context_id: int, fragment: int, is_command: bool,
          last: bool) -> bytes:
    """P-DATA-TF PDUs carrying ``data`` in fragments of at most ``fragment`` bytes.

    Message control header (PS3.8 E.2): bit 0 set for a command, bit 1 on the
    message's last fragment (``last`` says whether ``data`` ends the message).
    """
    parts = []
    view = memoryview(data)
    for start in range(0, max(len(view), 1), fragment):
        chunk = view[start:start + fragment]
        final = last and start + fragment >= len(view)
        header = (0x01 if is_command else 0x00) | (0x02 if final else 0x00)
        parts += [_PDU_HEADER.pack(_P_DATA_TF, 0, len(chunk) + _PDV_OVERHEAD),
                  _PDV_HEADER.pack(len(chunk) + 2, context_id, header), chunk]
    return b"".join(parts)


@dataclass
class StoreAssociation:
    """A storage association we request and drive ourselves, for C-STORE only."""

    sock: socket.socket
    contexts: dict[tuple[str, str], int]  # (SOP class, transfer syntax) → accepted context ID
    peer_max_pdu: int
    max_pdu: int
    is_established: bool = field(default=True, init=False)

    @property
    def fragment(self) -> int:
        return (self.peer_max_pdu or _UNLIMITED_PDU) - _PDV_OVERHEAD

    @classmethod
    def open(cls, calling_ae: str, host: str, port: int, called_ae: str,
             contexts: list[tuple[str, str]], max_pdu: int, acse_timeout: float,
             dimse_timeout: float, tls: ssl.SSLContext | None = None) -> Self:
        """Connect (TCP_NODELAY), negotiate, and return the association.

        ``contexts`` are (SOP class, transfer syntax) pairs, at most 128, each
        proposed as its own presentation context; the ones the peer rejects are
        simply absent afterwards. Connecting and negotiating wait at most
        ``acse_timeout``, each later read or write ``dimse_timeout``. Raises
        AssociationFailed.
        """
        request = A_ASSOCIATE()
        request.application_context_name = _APPLICATION_CONTEXT
        request.calling_ae_title = calling_ae
        request.called_ae_title = called_ae
        request.maximum_length_received = max_pdu
        request.implementation_class_uid = PYNETDICOM_IMPLEMENTATION_UID
        request.implementation_version_name = PYNETDICOM_IMPLEMENTATION_VERSION
        proposed = {}
        for n, (sop_class, syntax) in enumerate(contexts):
            cx = PresentationContext()
            cx.context_id = 2 * n + 1
            cx.abstract_syntax = sop_class
            cx.transfer_syntax = [syntax]
            proposed[cx.context_id] = (sop_class, syntax)
            request.presentation_context_definition_list.append(cx)
        encoded = compat.encode_associate_rq(request)
        try:
            sock = socket.create_connection((host, port), timeout=acse_timeout)
        except OSError as exc:
            raise AssociationFailed(connect_failure(exc, host, port, acse_timeout)) from exc
        set_nodelay(sock)
        if tls is not None:
            try:
                sock = tls.wrap_socket(sock, server_hostname=host)
            except (OSError, ValueError) as exc:
                sock.close()
                raise AssociationFailed(f"TLS with {host}:{port} failed: {exc}") from exc
        try:
            sock.sendall(encoded)
            kind, body = _read_pdu(sock, _MAX_NEGOTIATION_PDU)
        except TimeoutError as exc:
            sock.close()
            raise AssociationFailed(silent_peer(host, port, acse_timeout)) from exc
        except OSError as exc:
            sock.close()
            raise AssociationFailed(f"{host}:{port} ended the connection without answering"
                                    f" the association: {exc}") from exc
        if kind != _A_ASSOCIATE_AC:
            sock.close()
            if kind == _A_ASSOCIATE_RJ and len(body) >= 10:
                why = rejection_text(body[7], body[8], body[9])
                raise AssociationFailed(f"{called_ae}@{host}:{port} rejected the association:"
                                        f" {why}")
            raise AssociationFailed(f"{called_ae}@{host}:{port} answered the association"
                                    f" request with PDU type {kind}")
        answer = compat.decode_associate_ac(body)
        agreed = {proposed[cx.context_id]: cx.context_id
                  for cx in answer.presentation_context_definition_results_list
                  if cx.result == 0 and cx.context_id in proposed}
        sock.settimeout(dimse_timeout)
        return cls(sock, agreed, answer.maximum_length_received or 0, max_pdu)

    def accepted_syntaxes(self, sop_class: str) -> list[str]:
        """The transfer syntaxes the peer accepted for ``sop_class``, in proposal order."""
        return [syntax for (cls, syntax) in self.contexts if cls == sop_class]

    def context_id(self, sop_class: str, syntax: str) -> int:
        """The accepted context for this SOP class and syntax (NoContext when there is none)."""
        try:
            return self.contexts[(sop_class, syntax)]
        except KeyError:
            raise NoContext(f"{sop_class} in {syntax}") from None

    def frame_data(self, context_id: int, data: bytes) -> bytes:
        """A whole data set framed for this peer, ready to send."""
        return frame(data, context_id, self.fragment, False, True)

    def store(self, payload: _Payload, sop_class: str, sop_instance: str, msg_id: int,
              originator_aet: str | None = None, originator_id: int | None = None) -> None:
        """Send a C-STORE-RQ and its data set (read :meth:`response` next). Raises OSError."""
        command = store_command(sop_class, sop_instance, msg_id, originator_aet, originator_id)
        self.sock.sendall(frame(command, payload.context_id, self.fragment, True, True))
        if payload.framed is not None:
            self.sock.sendall(payload.framed)
            return
        assert payload.stream is not None
        block = payload.stream.read(_READ_BLOCK)
        while block:
            following = payload.stream.read(_READ_BLOCK)
            self.sock.sendall(frame(block, payload.context_id, self.fragment, False,
                                    not following))
            block = following

    def send(self, sop_class: str, sop_instance: str, syntax: str, dataset: bytes, msg_id: int,
             originator_aet: str | None = None,
             originator_id: int | None = None) -> StoreResponse | None:
        """C-STORE data set bytes already in ``syntax``: the response, or None when none came.

        Raises NoContext when the peer did not accept the SOP class in that syntax.
        """
        context_id = self.context_id(sop_class, syntax)
        payload = _Payload(context_id, syntax, False, framed=self.frame_data(context_id, dataset))
        try:
            self.store(payload, sop_class, sop_instance, msg_id, originator_aet, originator_id)
            return self.response(msg_id)
        except OSError:
            self.abort()
            return None

    def response(self, msg_id: int) -> StoreResponse | None:
        """Read PDUs until the C-STORE-RSP command is whole (None, aborting, when it is not
        one or answers another message). Raises OSError when the socket fails."""
        command = b""
        while True:
            kind, body = _read_pdu(self.sock, self.max_pdu)
            if kind != _P_DATA_TF:
                self.abort()
                return None
            at = _PDU_HEADER.size
            while at + _PDV_OVERHEAD <= len(body):
                length, _cx, header = _PDV_HEADER.unpack_from(body, at)
                if length < 2 or at + 4 + length > len(body):
                    self.abort()
                    return None
                if header & 0x01:  # command fragment (a C-STORE-RSP has no data set)
                    command += body[at + _PDV_OVERHEAD:at + 4 + length]
                at += 4 + length
                if header & 0x03 == 0x03:  # last fragment of a command
                    parsed = response_status(command)
                    if parsed is None or parsed[1] != msg_id:
                        self.abort()
                        return None
                    return StoreResponse(parsed[0], error_comment(command))

    def release(self) -> None:
        """A-RELEASE, waiting for the peer's answer (bounded by the timeout), then close."""
        if not self.is_established:
            return
        self.is_established = False
        try:
            self.sock.sendall(compat.encode_release_rq())
            while _read_pdu(self.sock, self.max_pdu)[0] not in (_A_RELEASE_RP, _A_ABORT):
                pass
        except OSError:
            pass
        finally:
            self.sock.close()

    def abort(self) -> None:
        """A-ABORT (service user) and close; the association is unusable afterwards."""
        if not self.is_established:
            return
        self.is_established = False
        try:
            self.sock.sendall(compat.encode_abort_rq(0x00))
        except OSError:
            pass
        finally:
            self.sock.close()


def _read_pdu(sock: socket.socket, limit: int) -> tuple[int, bytes]:
    """One PDU: its type and its whole bytes (header included, as pynetdicom decodes them)."""
    head = recv_exactly(sock, 6)
    kind, _reserved, length = _PDU_HEADER.unpack(head)
    if length > limit + 64:
        raise OSError(f"PDU of {length} bytes exceeds the {limit} announced")
    return kind, head + recv_exactly(sock, length)


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    """Exactly ``n`` bytes from a blocking socket; OSError when the peer closes first."""
    chunks, remaining = [], n
    while remaining:
        chunk = sock.recv(min(remaining, 1 << 20))
        if not chunk:
            raise OSError("connection closed by the peer")
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)
