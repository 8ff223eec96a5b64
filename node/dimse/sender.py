"""The C-MOVE sub-association: stored files sent as C-STORE requests, as fast as the peer takes them.

Why not a pynetdicom Association: every PDU it sends or receives passes its
DUL thread (which polls the socket every millisecond), its state machine and
pydicom's encoder, about 0.3 ms of Python per PDU and a millisecond per
command set. DCMTK's storescp accepts 16 KB PDUs by default, so a 512 KB CT
slice is 32 PDUs; a 300-slice C-MOVE moved ~110 instances/s that way, where
dcmqrscp and Orthanc move ~650. This association is simple enough to drive
directly: one requester, one operation at a time, nothing else on the wire.
pynetdicom's PDU classes still encode the A-ASSOCIATE-RQ and decode the
answer; this module frames P-DATA (PS3.8 9.3.5, E.2), writes the C-STORE-RQ
command set (PS3.7 9.3.1.1) and reads the C-STORE-RSP's status, with blocking
socket calls under the configured timeouts. Tests compare its bytes with
pynetdicom's and run it against pynetdicom and DCMTK storage SCPs.

Received PDUs are bounded by the maximum length we announced.
"""

from __future__ import annotations

import socket
import struct
from pathlib import Path
from typing import Self

from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION
from pynetdicom.dsutils import split_dataset
from pynetdicom.pdu import A_ABORT_RQ, A_ASSOCIATE_AC, A_ASSOCIATE_RQ, A_RELEASE_RQ
from pynetdicom.pdu_primitives import A_ABORT, A_ASSOCIATE
from pynetdicom.presentation import PresentationContext

from node.dimse.ae import set_nodelay
from node.storage.query import StoredInstance

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
# PDU types (PS3.8 9.3.1)
_A_ASSOCIATE_AC, _A_ASSOCIATE_RJ, _P_DATA_TF, _A_RELEASE_RP, _A_ABORT = 0x02, 0x03, 0x04, 0x06, 0x07


class AssociationFailed(ConnectionError):
    """The destination could not be reached, rejected the association or broke it off."""


class NoContext(LookupError):
    """The peer accepted no presentation context for the stored SOP class and syntax."""


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
    body = b"".join(_ELEMENT.pack(0x0000, element, len(value)) + value
                    for element, value in elements)
    return _ELEMENT.pack(0x0000, 0x0000, 4) + _UL.pack(len(body)) + body


def _ui(uid: str) -> bytes:
    value = uid.encode("ascii")
    return value + b"\0" * (len(value) % 2)


def response_status(command: bytes) -> tuple[int, int] | None:
    """(Status, MessageIDBeingRespondedTo) of a C-STORE-RSP command set, or None if it is not one."""
    found: dict[int, int] = {}
    at = 0
    while at + 8 <= len(command):
        group, element, length = _ELEMENT.unpack_from(command, at)
        at += 8
        if group != 0x0000 or at + length > len(command):
            return None
        if element in (0x0100, 0x0120, 0x0900) and length == 2:
            found[element] = _US.unpack_from(command, at)[0]
        at += length
    if found.get(0x0100) != _C_STORE_RSP or 0x0900 not in found or 0x0120 not in found:
        return None
    return found[0x0900], found[0x0120]


def dataset_offset(path: Path) -> int:
    """Where the data set starts in a stored file: after the preamble and the file meta.

    The meta's group length (0002,0000), which PS3.10 requires first, gives it
    without parsing the meta; files without one are measured by pynetdicom.
    """
    with open(path, "rb") as f:
        head = f.read(_META_START + 12)
    if head[128:132] == b"DICM" and head[_META_START:_META_START + 6] == b"\x02\0\0\0UL":
        return _META_START + 12 + _UL.unpack_from(head, _META_START + 8)[0]
    return split_dataset(path)[1]


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


class StoreAssociation:
    """A storage association we request and drive ourselves, for C-STORE only."""

    def __init__(self, sock: socket.socket, contexts: dict[tuple[str, str], int],
                 peer_max_pdu: int, max_pdu: int) -> None:
        self.sock = sock
        self.contexts = contexts  # (SOP class, transfer syntax) → accepted context ID
        self.fragment = (peer_max_pdu or _UNLIMITED_PDU) - _PDV_OVERHEAD
        self.max_pdu = max_pdu
        self.is_established = True
        self._prefetched: dict[Path, bytes] = {}

    @classmethod
    def open(cls, calling_ae: str, host: str, port: int, called_ae: str,
             contexts: list[tuple[str, str]], max_pdu: int, acse_timeout: float,
             dimse_timeout: float) -> Self:
        """Connect (TCP_NODELAY), negotiate, and return the association.

        ``contexts`` are (SOP class, transfer syntax) pairs, at most 128; the
        ones the peer rejects are simply absent afterwards (:class:`NoContext`
        when used). Connecting and negotiating wait at most ``acse_timeout``,
        each later read or write ``dimse_timeout``. Raises AssociationFailed.
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
        pdu = A_ASSOCIATE_RQ()
        pdu.from_primitive(request)
        try:
            sock = socket.create_connection((host, port), timeout=acse_timeout)
        except OSError as exc:
            raise AssociationFailed(f"cannot connect: {exc.strerror or exc}") from exc
        set_nodelay(sock)
        try:
            sock.sendall(pdu.encode())
            kind, body = _read_pdu(sock, _MAX_NEGOTIATION_PDU)
        except OSError as exc:
            sock.close()
            raise AssociationFailed(f"negotiation failed: {exc}") from exc
        if kind != _A_ASSOCIATE_AC:
            sock.close()
            why = "rejected" if kind == _A_ASSOCIATE_RJ else f"answered with PDU {kind}"
            raise AssociationFailed(f"the destination {why} the association")
        accepted = A_ASSOCIATE_AC()
        accepted.decode(body)
        answer = accepted.to_primitive()
        agreed = {proposed[cx.context_id]: cx.context_id
                  for cx in answer.presentation_context_definition_results_list
                  if cx.result == 0 and cx.context_id in proposed}
        sock.settimeout(dimse_timeout)
        return cls(sock, agreed, answer.maximum_length_received or 0, max_pdu)

    def send(self, instance: StoredInstance, path: Path, msg_id: int,
             originator_aet: str | None = None, originator_id: int | None = None,
             upcoming: tuple[StoredInstance, Path] | None = None) -> int | None:
        """C-STORE one stored file; the response status, or None when none came back.

        ``upcoming`` (the next instance) is read and framed while the peer
        stores this one. Raises NoContext when the peer did not accept the
        instance's SOP class in its stored syntax, OSError when the file fails.
        """
        context_id = self.contexts.get((instance.sop_class_uid, instance.transfer_syntax_uid))
        if context_id is None:
            raise NoContext(instance.sop_class_uid)
        command = store_command(instance.sop_class_uid, instance.sop_instance_uid, msg_id,
                                originator_aet, originator_id)
        framed = self._prefetched.pop(path, None)
        with open(path, "rb") as f:  # opened first: a missing blob fails before any byte is sent
            try:
                self.sock.sendall(frame(command, context_id, self.fragment, True, True))
                if framed is not None:
                    self.sock.sendall(framed)
                else:
                    f.seek(dataset_offset(path))
                    block = f.read(_READ_BLOCK)
                    while block:
                        following = f.read(_READ_BLOCK)
                        self.sock.sendall(frame(block, context_id, self.fragment, False,
                                                not following))
                        block = following
                if upcoming is not None:
                    self._prefetch(*upcoming)
                return self._response(msg_id)
            except OSError:  # the socket: timeout, reset, broken pipe
                self.abort()
                return None

    def _response(self, msg_id: int) -> int | None:
        """Read PDUs until the C-STORE-RSP command is whole; its status."""
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
                    return parsed[0]

    def _prefetch(self, instance: StoredInstance, path: Path) -> None:
        """Read and frame a file of at most one read block ahead of its turn."""
        self._prefetched.clear()
        context_id = self.contexts.get((instance.sop_class_uid, instance.transfer_syntax_uid))
        try:
            offset = dataset_offset(path)
            if context_id is None or path.stat().st_size - offset > _READ_BLOCK:
                return
            with open(path, "rb") as f:
                f.seek(offset)
                data = f.read()
        except OSError:
            return  # the send itself will fail and say so
        self._prefetched[path] = frame(data, context_id, self.fragment, False, True)

    def release(self) -> None:
        """A-RELEASE, waiting for the peer's answer (bounded by the timeout), then close."""
        if not self.is_established:
            return
        self.is_established = False
        try:
            self.sock.sendall(A_RELEASE_RQ().encode())
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
        primitive = A_ABORT()
        primitive.abort_source = 0x00
        pdu = A_ABORT_RQ()
        pdu.from_primitive(primitive)
        try:
            self.sock.sendall(pdu.encode())
        except OSError:
            pass
        finally:
            self.sock.close()


def _read_pdu(sock: socket.socket, limit: int) -> tuple[int, bytes]:
    """One PDU: its type and its whole bytes (header included, as pynetdicom decodes them)."""
    head = _recv_exactly(sock, 6)
    kind, _reserved, length = _PDU_HEADER.unpack(head)
    if length > limit + 64:
        raise OSError(f"PDU of {length} bytes exceeds the {limit} announced")
    return kind, head + _recv_exactly(sock, length)


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    chunks, remaining = [], n
    while remaining:
        chunk = sock.recv(min(remaining, 1 << 20))
        if not chunk:
            raise OSError("connection closed by the peer")
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)
