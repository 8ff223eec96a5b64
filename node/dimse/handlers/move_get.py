"""C-MOVE and C-GET: hand the identifier to the retrieve service and return its plan.

The handlers only plan: the :class:`~node.retrieve.Retrieval` they return (or
the refusal) is run by :mod:`node.dimse.qr_loops`, which sends each
instance through :mod:`node.dimse.sender`.
"""

from __future__ import annotations

from pynetdicom import evt

from node.context import NodeContext
from node.dimse.handlers.association import Sessions
from node.dimse.handlers.find import MODELS, decoded_identifier
from node.retrieve import Retrieval
from node.status import Outcome


def make_retrieve_handlers(ctx: NodeContext, sessions: Sessions) -> list[tuple]:
    """EVT_C_MOVE and EVT_C_GET handlers bound to the node's retrieve service."""
    service = ctx.retrieve

    def handle_move(event: evt.Event) -> Retrieval | Outcome:
        session = sessions.of(event.assoc)
        return service.start_move(session.peer, session.actor, decoded_identifier(event),
                                  MODELS[event.request.AffectedSOPClassUID],
                                  event.move_destination)

    def handle_get(event: evt.Event) -> Retrieval | Outcome:
        session = sessions.of(event.assoc)
        return service.start_get(session.peer, session.actor, decoded_identifier(event),
                                 MODELS[event.request.AffectedSOPClassUID])

    return [(evt.EVT_C_MOVE, handle_move), (evt.EVT_C_GET, handle_get)]
