"""The PDU guard: every PDU header is checked before pynetdicom reads the PDU's body.

pynetdicom reads a PDU as its 6-byte header then the whole body into memory,
whatever the length says, and holds an unknown PDU type open until a timeout
(see ``../shared/NOTES.md``). The guard sits in the association's socket
(:class:`~node.dimse.compat.SocketHooks`) and refuses at the header, with an
A-ABORT from the service provider (PS3.8 9.3.8) and the connection closed:

* a PDU type PS3.8 does not define (reason 1, unrecognised PDU);
* anything but an A-ASSOCIATE-RQ as the first PDU (reason 2, unexpected PDU);
* an A-ASSOCIATE-RQ longer than ``node.max_associate_kb``, a P-DATA-TF longer
  than the maximum PDU length we advertised (``node.max_pdu``, the bound a
  peer agreed to), or more than ``node.max_association_mb`` in one association
  (reason 6, invalid PDU parameter value).

So memory per connection stays bounded by the largest PDU we allow, however
much a peer sends.
"""

from __future__ import annotations

import logging
import struct

from node.config import NodeSettings
from node.dimse import compat

log = logging.getLogger("lamina.guard")

#: PDU types of PS3.8 9.3: A-ASSOCIATE-RQ/AC/RJ, P-DATA-TF, A-RELEASE-RQ/RP, A-ABORT.
ASSOCIATE_RQ, P_DATA_TF = 0x01, 0x04
KNOWN_TYPES = frozenset(range(0x01, 0x08))
#: A-RELEASE-RQ/RP and A-ABORT have a 4-byte body; AC and RJ never come to an acceptor
#: but are bounded like a request.
SMALL_PDU = 1024

#: A-ABORT reasons (PS3.8 Table 9-26), source 2 (service provider).
UNRECOGNISED_PDU, UNEXPECTED_PDU, INVALID_PARAMETER_VALUE = 1, 2, 6


class PduBounds:
    """The checks of one connection's PDU headers, and what it has received so far.

    Used by :class:`PduGuard` on pynetdicom's associations and by the framed acceptor
    (:mod:`node.dimse.framed`), which reads its PDUs itself.
    """

    def __init__(self, limits: NodeSettings) -> None:
        self.limits = limits
        self.first = True
        self.received = 0
        #: Why the last header was refused ('' while none was).
        self.refused = ""

    def take(self, header: bytes | bytearray) -> int | None:
        """None when the PDU may be read (it is counted); else the A-ABORT reason, with
        :attr:`refused` saying why."""
        pdu_type, _, length = struct.unpack(">BBL", header)
        problem = self.check(pdu_type, length)
        if problem is not None:
            reason, self.refused = problem
            return reason
        self.first = False
        self.received += 6 + length
        return None

    def check(self, pdu_type: int, length: int) -> tuple[int, str] | None:
        """(A-ABORT reason, why) for a header we refuse, None for one we read."""
        limits = self.limits
        if pdu_type not in KNOWN_TYPES:
            return UNRECOGNISED_PDU, f"unknown PDU type 0x{pdu_type:02X}"
        if self.first and pdu_type != ASSOCIATE_RQ:
            return UNEXPECTED_PDU, f"PDU type 0x{pdu_type:02X} before an A-ASSOCIATE-RQ"
        if pdu_type == P_DATA_TF:
            bound, what = limits.max_pdu, "the maximum PDU length we advertised"
        elif pdu_type == ASSOCIATE_RQ:
            bound, what = limits.max_associate_kb * 1024, "node.max_associate_kb"
        else:
            bound, what = SMALL_PDU, "the size of such a PDU"
        if length > bound:
            return INVALID_PARAMETER_VALUE, (
                f"PDU type 0x{pdu_type:02X} of {length} bytes, above {what} ({bound})")
        total = limits.max_association_mb * 1024 * 1024
        if self.received + 6 + length > total:
            return INVALID_PARAMETER_VALUE, (
                f"more than node.max_association_mb ({limits.max_association_mb} MB)"
                " in one association")
        return None


def log_refused(address: str, why: str) -> None:
    """The one log line of a connection refused at a PDU header."""
    log.warning("association aborted", extra={"fields": {"address": address, "reason": why}})


class PduGuard(compat.SocketHooks):
    """An acceptor socket that checks each PDU header (set up by :func:`install`)."""

    bounds: PduBounds
    body_next: bool

    def read(self, nr_bytes: int) -> bytearray:
        if self.bounds.refused:
            return bytearray()  # refused: nothing more is read from this peer
        if self.body_next:
            self.body_next = False
            return super().read(nr_bytes)
        header = super().read(nr_bytes)
        if nr_bytes != 6 or len(header) != 6:
            return header
        if not self.admit(header):
            return bytearray()  # a short header: pynetdicom ends the association (Evt17)
        self.body_next = True
        return header

    def admit(self, header: bytes | bytearray) -> bool:
        """Check a PDU header before its body is read; False: refused (the peer has had
        its A-ABORT and the connection is shut). Also called by the C-STORE receiver
        (:mod:`node.dimse.receive`), which reads P-DATA itself."""
        first = self.bounds.first
        reason = self.bounds.take(header)
        if reason is None:
            return True
        log_refused(getattr(self.assoc.requestor, "address", ""), self.bounds.refused)
        compat.abort_connection(self, reason)
        if first:
            compat.end_before_association(self.assoc)
        return False


def install(assoc: object, limits: NodeSettings) -> PduGuard | None:
    """Guard the reads of a new acceptor association (before its threads start)."""
    sock = compat.adopt_socket(assoc, PduGuard)  # type: ignore[arg-type]
    if sock is None:
        return None
    sock.bounds = PduBounds(limits)
    sock.body_next = False
    return sock
