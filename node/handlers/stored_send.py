"""C-STORE of stored files on an association we opened, written straight onto its socket.

Why: pynetdicom sends every P-DATA-TF PDU through its DUL thread and state
machine, about 0.3 ms of Python per PDU, and encodes each C-STORE command set
with pydicom twice (once for its group length), about a millisecond. DCMTK's
storescp accepts 16 KB PDUs by default, so a 512 KB CT slice is 32 PDUs, and
a 300-slice C-MOVE spent seconds in that path (measured: ~110 instances/s,
where dcmqrscp and Orthanc move ~550). Here the command set
(:func:`store_command`) and the framing (PS3.8 9.3.5: PDU type 04, PDV items
with their message control header) are written directly, a file at a time;
pynetdicom still negotiates the association and receives the response.

Only for associations that nothing else writes to while it runs (a C-MOVE
sub-association): the DUL thread never sends on its own during a C-STORE, and
the association's reactor is paused, as pynetdicom's own ``send_c_store``
does, so it cannot take the response off the queue.
"""

from __future__ import annotations

import struct
import time
from pathlib import Path
from typing import Self

from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import split_dataset

from node.storage.query import StoredInstance

_ELEMENT = struct.Struct("<HHI")  # implicit VR little endian: group, element, length
_US = struct.Struct("<H")
_UL = struct.Struct("<I")
_META_START = 132  # 128-byte preamble + "DICM"
_PDU_HEADER = struct.Struct(">BBI")  # type 0x04, reserved, PDU length
_PDV_HEADER = struct.Struct(">IBB")  # item length, presentation context ID, control header
_PDV_OVERHEAD = 6  # item length (4) + context ID (1) + control header (1)
_DUL_POLL = 0.0002  # seconds between socket polls while sub-operations run
_UNLIMITED_PDU = 1 << 20  # fragment size when the peer sets no maximum
_READ_BLOCK = 8 << 20  # bytes read (and framed) at a time: bounds memory for huge objects


def store_command(sop_class_uid: str, sop_instance_uid: str, msg_id: int,
                  originator_aet: str | None = None, originator_id: int | None = None) -> bytes:
    """A C-STORE-RQ command set, implicit VR little endian (PS3.7 9.3.1.1, E.1).

    Written directly because pydicom's writer costs about a millisecond per
    request here (pynetdicom encodes the command twice, once for its group
    length); tests compare the bytes with pynetdicom's for the same request.
    """
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


class NoContext(LookupError):
    """The peer accepted no presentation context for the stored SOP class and syntax."""


class StoredSender:
    """Sends stored instances as C-STORE requests over one requestor association."""

    def __init__(self, assoc: Association) -> None:
        self.assoc = assoc
        peer_max = assoc.dimse.maximum_pdu_size
        self.fragment = (peer_max or _UNLIMITED_PDU) - _PDV_OVERHEAD
        self.contexts = {(str(cx.abstract_syntax), str(cx.transfer_syntax[0])): cx.context_id
                         for cx in assoc.accepted_contexts}
        self._prefetched: dict[Path, bytes] = {}

    def __enter__(self) -> Self:
        # The DUL thread sleeps between polls of the socket when idle (1 ms by default);
        # each response waits for that. This association is busy until it is released,
        # so it polls more often (pynetdicom's run-loop delay is meant to be tuned).
        self.assoc.dul._run_loop_delay = _DUL_POLL
        # Pause the association's reactor so that the response stays on the DIMSE queue
        # for us (pynetdicom's send_c_store does the same).
        self.assoc._reactor_checkpoint.clear()
        while not self.assoc._is_paused and self.assoc.is_established:
            time.sleep(0.0001)
        return self

    def __exit__(self, *exc: object) -> None:
        self.assoc._reactor_checkpoint.set()

    def send(self, instance: StoredInstance, path: Path, msg_id: int,
             originator_aet: str | None = None, originator_id: int | None = None,
             upcoming: tuple[StoredInstance, Path] | None = None) -> int | None:
        """C-STORE one stored file; the response status, or None when none came back.

        ``upcoming`` (the next instance) is read and framed while the peer
        stores this one, so that the next send starts at once. Raises
        NoContext when the peer did not accept the instance's SOP class in its
        stored transfer syntax, OSError when the file or socket fails.
        """
        context_id = self.contexts.get((instance.sop_class_uid, instance.transfer_syntax_uid))
        if context_id is None:
            raise NoContext(instance.sop_class_uid)
        sock = self.assoc.dul.socket.socket
        command = store_command(instance.sop_class_uid, instance.sop_instance_uid, msg_id,
                                originator_aet, originator_id)
        sock.sendall(self._frame(context_id, command, is_command=True, last=True))
        framed = self._prefetched.pop(path, None)
        if framed is not None:
            sock.sendall(framed)
        else:
            with open(path, "rb") as f:
                f.seek(dataset_offset(path))
                block = f.read(_READ_BLOCK)
                while block:
                    following = f.read(_READ_BLOCK)
                    sock.sendall(self._frame(context_id, block, is_command=False,
                                             last=not following))
                    block = following
        if upcoming is not None:
            self._prefetch(*upcoming)
        _cx, rsp = self.assoc.dimse.get_msg(block=True)
        if rsp is None:  # DIMSE timeout: the peer is not answering, as pynetdicom does
            self.assoc.abort()
            return None
        if not isinstance(rsp, C_STORE) or rsp.MessageIDBeingRespondedTo != msg_id:
            return None
        return int(rsp.Status) if rsp.Status is not None else None

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
        self._prefetched[path] = self._frame(context_id, data, is_command=False, last=True)

    def _frame(self, context_id: int, data: bytes, is_command: bool, last: bool) -> bytes:
        """P-DATA-TF PDUs carrying ``data`` in fragments the peer accepts (PS3.8 E.2).

        Message control header: bit 0 set for a command, bit 1 on the message's
        last fragment (``last`` says whether ``data`` ends the message).
        """
        parts = []
        view = memoryview(data)
        for start in range(0, max(len(view), 1), self.fragment):
            chunk = view[start:start + self.fragment]
            final = last and start + self.fragment >= len(view)
            header = (0x01 if is_command else 0x00) | (0x02 if final else 0x00)
            parts += [_PDU_HEADER.pack(0x04, 0, len(chunk) + _PDV_OVERHEAD),
                      _PDV_HEADER.pack(len(chunk) + 2, context_id, header), chunk]
        return b"".join(parts)
