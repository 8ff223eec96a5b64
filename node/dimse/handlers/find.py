"""C-FIND: hand the identifier to the search service; answer SOP Class Extended Negotiation.

The handler only plans: it returns the service's :class:`~node.search.Search`
(or refusal), and :mod:`node.dimse.qr_loops` streams the matches.

Relational queries and retrievals are agreed when an SCU asks for them in
SOP Class Extended Negotiation (the matcher accepts keys at any level above the
query level either way, see :mod:`node.storage.query`); the other options
(combined date-time matching, fuzzy person names, timezone adjustment) are
declined.
"""

from __future__ import annotations

from pydicom.dataset import Dataset
from pynetdicom import evt
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from node.context import NodeContext
from node.dimse.handlers.association import Sessions
from node.search import Search
from node.status import Outcome
from node.storage.query import Model

#: The information model each Q/R SOP class queries or retrieves in.
MODELS: dict[str, Model] = {
    PatientRootQueryRetrieveInformationModelFind: Model.PATIENT_ROOT,
    PatientRootQueryRetrieveInformationModelMove: Model.PATIENT_ROOT,
    PatientRootQueryRetrieveInformationModelGet: Model.PATIENT_ROOT,
    StudyRootQueryRetrieveInformationModelFind: Model.STUDY_ROOT,
    StudyRootQueryRetrieveInformationModelMove: Model.STUDY_ROOT,
    StudyRootQueryRetrieveInformationModelGet: Model.STUDY_ROOT,
}


def decoded_identifier(event: evt.Event) -> Dataset | None:
    """The request's identifier, or None when its bytes do not decode."""
    try:
        return event.identifier
    except Exception:
        return None


def make_find_handler(ctx: NodeContext, sessions: Sessions):
    """Bind the handler to the node's search service and session registry."""
    service = ctx.search

    def handle_find(event: evt.Event) -> Search | Outcome:
        session = sessions.of(event.assoc)
        return service.start(session.peer, session.actor, decoded_identifier(event),
                             MODELS[event.request.AffectedSOPClassUID])

    return handle_find


def handle_sop_extended(event: evt.Event) -> dict[str, bytes]:
    """Agree to relational queries/retrievals (byte 0) for the Q/R classes; decline the rest."""
    replies = {}
    for sop_class, info in event.app_info.items():
        if sop_class in MODELS and info:
            replies[sop_class] = bytes([1 if info[0] == 1 else 0]) + bytes(len(info) - 1)
    return replies
