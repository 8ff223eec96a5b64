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
#: Rejected-transient, service-provider (presentation), local limit exceeded.
LOCAL_LIMIT_EXCEEDED = Rejection(0x02, 0x03, 0x02, "local limit exceeded")
