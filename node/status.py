"""Every DIMSE status Lamina answers, its HTTP twin, and its plain-words reason.

Handlers (DIMSE and, later, DICOMweb) never invent status codes: services return
an :class:`Outcome` naming one of the statuses below, and each front end turns
it into its own wire form. That keeps C-STORE and STOW-RS answering the same
thing for the same input.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydicom.dataset import Dataset

#: ErrorComment (0000,0902) is LO: at most 64 characters on the wire.
ERROR_COMMENT_MAX = 64


@dataclass(frozen=True)
class Status:
    """One DIMSE status code with its HTTP equivalent and a short name."""

    code: int
    http: int
    name: str

    @property
    def is_success(self) -> bool:
        return self.code == 0x0000

    @property
    def is_failure(self) -> bool:
        """Neither success, pending, cancel nor warning (0xB000-0xBFFF)."""
        return (self.code not in (0x0000, 0xFF00, 0xFF01, 0xFE00)
                and not 0xB000 <= self.code <= 0xBFFF)


SUCCESS = Status(0x0000, 200, "Success")
#: Out of disk space, or the index could not commit.
OUT_OF_RESOURCES = Status(0xA700, 503, "Refused: Out of Resources")
#: Fails IOD or geometry validation; the object is quarantined.
DOES_NOT_MATCH_SOP_CLASS = Status(0xA900, 422, "Error: Data Set does not match SOP Class")
#: Cannot be parsed; the raw bytes are quarantined.
CANNOT_UNDERSTAND = Status(0xC000, 400, "Error: Cannot understand")
#: A known SOP Instance UID arrived with different bytes. PS3.7 C.4 general
#: failure "Duplicate SOP Instance": the new bytes are kept as a conflict and
#: never overwrite what is stored, so the sender must not read it as success.
DUPLICATE_SOP_INSTANCE = Status(0x0111, 409, "Failure: Duplicate SOP Instance")
#: PS3.7 C.4 general failure: the peer is not permitted this service.
NOT_AUTHORISED = Status(0x0124, 403, "Refused: Not Authorised")

# Query/retrieve (PS3.4 C.4.1.1.4, C.4.2.1.5, C.4.3.1.4). The HTTP twins are
# what QIDO-RS / WADO-RS answer for the same outcome.
#: A match follows (C-FIND); a sub-operation finished (C-MOVE / C-GET).
PENDING = Status(0xFF00, 200, "Pending")
#: A match follows, but some keys of the identifier were not supported.
PENDING_KEYS_UNSUPPORTED = Status(0xFF01, 200, "Pending: optional keys not supported")
#: The SCU sent C-CANCEL; the operation stopped.
CANCELLED = Status(0xFE00, 499, "Cancel: terminated by C-CANCEL")
#: QueryRetrieveLevel missing or not in the model, or a key's value malformed.
IDENTIFIER_DOES_NOT_MATCH = Status(0xA900, 400, "Error: Identifier does not match SOP Class")
#: The C-MOVE destination is not a configured peer.
MOVE_DESTINATION_UNKNOWN = Status(0xA801, 404, "Refused: Move Destination unknown")
#: More matches than the sub-operation counters (US, at most 65535) can count.
TOO_MANY_MATCHES = Status(0xA701, 413, "Refused: Out of Resources - too many matches")
#: No sub-operation succeeded (destination refused or unreachable, every store failed).
SUBOPERATIONS_IMPOSSIBLE = Status(
    0xA702, 502, "Refused: Out of Resources - unable to perform sub-operations")
#: The node failed while answering (a bug or an association cut short).
UNABLE_TO_PROCESS = Status(0xC001, 500, "Failed: Unable to process")
#: Sub-operations complete, one or more failed or warned (FailedSOPInstanceUIDList says which).
SUBOPERATIONS_FAILED = Status(0xB000, 207, "Warning: Sub-operations complete with failures")


@dataclass(frozen=True)
class Outcome:
    """What a service answers: a status and, unless it is success, why."""

    status: Status
    comment: str = ""

    def as_dimse(self) -> Dataset:
        """The status dataset a pynetdicom handler returns."""
        ds = Dataset()
        ds.Status = self.status.code
        if self.comment:
            ds.ErrorComment = shorten(self.comment)
        return ds


def shorten(text: str, limit: int = ERROR_COMMENT_MAX) -> str:
    """Fit a reason into an LO element without cutting it silently mid-word."""
    text = " ".join(text.split())
    if len(text) <= limit:
        return text
    return text[: limit - 1].rstrip() + "~"


@dataclass(frozen=True)
class Rejection:
    """An A-ASSOCIATE-RJ (result, source, diagnostic) triple and its reason."""

    result: int
    source: int
    diagnostic: int
    reason: str


#: PS3.8 9.3.4: rejected-permanent, service-user, calling AE title not recognised.
CALLING_AE_NOT_RECOGNISED = Rejection(0x01, 0x01, 0x03, "calling AE title not recognised")
#: Rejected-permanent, service-user, called AE title not recognised.
CALLED_AE_NOT_RECOGNISED = Rejection(0x01, 0x01, 0x07, "called AE title not recognised")
#: Rejected-permanent, service-user, no reason given: the peer must negotiate a user identity.
USER_IDENTITY_REQUIRED = Rejection(0x01, 0x01, 0x01, "user identity required")
#: Rejected-transient, service-provider (presentation), local limit exceeded.
LOCAL_LIMIT_EXCEEDED = Rejection(0x02, 0x03, 0x02, "local limit exceeded")
#: Rejected-transient, service-provider (ACSE), no reason given: a negotiated user identity
#: failed verification (what pynetdicom's acceptor answers then).
USER_IDENTITY_NOT_VERIFIED = Rejection(0x02, 0x02, 0x01, "user identity not verified")
