"""Association lifecycle: admit or reject, then log and audit every ending.

Thin by design: the rules live in :mod:`node.policy`; this module applies them
to each association (served by pynetdicom, or by the framed acceptor of
:mod:`node.dimse.framed`) and keeps one :class:`Session` per live association.

Accepted / released / aborted events go through the context's audit queue
(:mod:`node.audit.served`), committed in batches like the query events but
waiting longer for company (``ASSOCIATION_LINGER``): a transaction with its
fsync and signed head per event was most of an echo-and-release cycle's cost.
They change nothing stored; every store's own event stays inside its ingest
transaction. Rejections stay synchronous (rare, and the record of a refused
peer should not wait).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import uuid
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

from pynetdicom import evt

from node import status
from node.audit.served import ASSOCIATION_LINGER
from node.audit.trail import Actor
from node.config import Peer
from node.context import NodeContext
from node.dimse import compat
from node.dimse.tls import certificate_problem
from node.identity import IdentityRefused, verify
from node.ingest.types import Source
from node.policy import SlotLimiter, admit
from node.status import Rejection

log = logging.getLogger("lamina.association")


@dataclass
class Session:
    """What we know about one association while it lives."""

    association_id: str
    calling_ae: str
    address: str
    peer: Peer | None = None
    #: The DICOM user identity (username) the peer negotiated, if any: the rater id of
    #: the annotations it sends. Staff, not patients, but never logged.
    user_identity: str = ""
    #: True once user_identity was verified against [identity] users (node.identity).
    user_verified: bool = False
    slot_fd: int | None = None
    peer_slot_fd: int | None = None
    stored: int = 0
    failed: int = 0
    ended: bool = False

    @property
    def source(self) -> Source:
        route = self.peer.route if self.peer else "clinical"
        may_store = self.peer is not None and "store" in self.peer.services
        return Source(self.calling_ae, self.address, self.association_id, route, may_store,
                      self.user_identity, self.user_verified)

    @property
    def actor(self) -> Actor:
        return self.source.actor


def _username(item: Any) -> str:
    """The username of a negotiated DICOM user identity item (types 1 and 2), else ''."""
    if item is None or item.user_identity_type not in (1, 2) or not item.primary_field:
        return ""
    return bytes(item.primary_field).decode("utf-8", "replace").strip()[:64]


@dataclass(frozen=True)
class Request:
    """What admission looks at in an A-ASSOCIATE-RQ and its connection."""

    calling_ae: str
    called_ae: str
    address: str
    #: The request's User Identity Negotiation item (pynetdicom's), or None.
    user_identity: Any
    #: The connection's socket (a TLS socket's peer certificate is checked).
    sock: Any


class Sessions:
    """Live associations of this process, keyed by the object that serves each one:
    pynetdicom's Association, or a :class:`node.dimse.framed.FramedAssociation`.

    The methods taking a ``key`` are the lifecycle both kinds share; the ``on_*``
    methods adapt pynetdicom's events to them.
    """

    def __init__(self, ctx: NodeContext) -> None:
        self.ctx = ctx
        self.limiter = SlotLimiter(ctx.run_dir, ctx.settings.node.max_associations)
        per_peer = ctx.settings.node.max_associations_per_peer
        #: One limiter per configured peer (slot files named after it), across processes.
        self.peer_limiters = {
            peer.name: SlotLimiter(ctx.run_dir, per_peer, "peer-" + hashlib.sha256(
                peer.name.encode()).hexdigest()[:16] + "-slot")
            for peer in ctx.settings.peers}
        self._by_key: dict[Hashable, Session] = {}
        self._lock = threading.Lock()

    def of(self, key: Hashable) -> Session:
        with self._lock:
            return self._by_key[key]

    # --- the lifecycle, for any kind of association ------------------------------------

    def admit(self, key: Hashable, request: Request) -> Rejection | None:
        """Admit a known peer from its address, within the association limits (its
        session and slots then held under ``key``), or say why not (recorded, logged and
        audited here; the caller sends the A-ASSOCIATE-RJ)."""
        # With [identity] users configured, a name counts only once verified (verify_user).
        unverified = "" if self.ctx.settings.identity.enabled else _username(
            request.user_identity)
        session = Session(uuid.uuid4().hex, request.calling_ae.strip(), request.address,
                          user_identity=unverified)
        with self._lock:
            self._by_key[key] = session
        verdict = admit(self.ctx.settings, session.calling_ae, request.called_ae,
                        session.address)
        rejection, detail = verdict.rejection, verdict.detail
        if rejection is None:
            problem = certificate_problem(verdict.peer, request.sock)
            if problem:
                rejection, detail = status.CALLING_AE_NOT_RECOGNISED, problem
        if rejection is None and verdict.peer.identity == "required" \
                and request.user_identity is None:
            rejection, detail = status.USER_IDENTITY_REQUIRED, "no user identity negotiated"
        if rejection is None:
            session.peer = verdict.peer
            session.peer_slot_fd = self.peer_limiters[verdict.peer.name].acquire()
            if session.peer_slot_fd is None:
                rejection = status.LOCAL_LIMIT_EXCEEDED
                detail = (f"{self.ctx.settings.node.max_associations_per_peer} associations"
                          " of this peer already active")
        if rejection is None:
            session.slot_fd = self.limiter.acquire()
            if session.slot_fd is None:
                rejection = status.LOCAL_LIMIT_EXCEEDED
                detail = f"{self.ctx.settings.node.max_associations} associations already active"
        if rejection is None:
            return None
        self.free_slots(key)
        self._rejected(session, rejection.reason, detail)
        return rejection

    def verify_user(self, key: Hashable, kind: int, primary: bytes, secondary: bytes) -> bool:
        """Verify a negotiated user identity; False: the association is to be rejected
        (recorded here). Without [identity] users a username is taken as given (a rater
        id), as before."""
        settings = self.ctx.settings.identity
        if not settings.enabled:
            return True
        session = self.of(key)
        try:
            user = verify(settings, kind, primary, secondary)
        except IdentityRefused as exc:
            self._rejected(session, "user identity not verified", str(exc))
            return False
        session.user_identity, session.user_verified = user, True
        return True

    def accepted(self, key: Hashable) -> None:
        session = self.of(key)
        peer = session.peer.name if session.peer else ""
        log.info("association accepted", extra={"fields": {
            "association": session.association_id, "calling_ae": session.calling_ae,
            "address": session.address, "peer": peer}})
        self.ctx.events.put("association.accepted", session.actor, {"peer": peer}, "success",
                            ASSOCIATION_LINGER)

    def released(self, key: Hashable) -> None:
        """The peer asked for the release (pynetdicom's event): :meth:`free_slots`, then
        :meth:`record_release`."""
        self.free_slots(key)
        self.record_release(key)

    def record_release(self, key: Hashable) -> None:
        """Log and audit a released association. The framed path calls this after the
        A-RELEASE-RP is sent, so the peer does not wait for the log line and the audit
        event (about a tenth of a millisecond of a release's answer, issue 15)."""
        self._ended(key, "released")

    def closed(self, key: Hashable) -> None:
        """The connection is gone: an association that ended without release was aborted."""
        self._ended(key, "aborted")
        self.free_slots(key)
        with self._lock:
            self._by_key.pop(key, None)

    def _rejected(self, session: Session, reason: str, detail: str) -> None:
        log.warning("association rejected", extra={"fields": {
            "association": session.association_id, "calling_ae": session.calling_ae,
            "address": session.address, "reason": reason, "detail": detail}})
        self.ctx.audit.record("association.rejected", session.actor,
                              {"reason": reason, "detail": detail}, outcome="minor-failure")

    def _ended(self, key: Hashable, how: str) -> None:
        """Log and audit an admitted association's end, once (events race across threads)."""
        with self._lock:
            session = self._by_key.get(key)
            if session is None or session.peer is None or session.ended:
                return
            session.ended = True
        log.info(f"association {how}", extra={"fields": {
            "association": session.association_id, "calling_ae": session.calling_ae,
            "stored": session.stored, "failed": session.failed}})
        self.ctx.events.put(f"association.{how}", session.actor,
                            {"stored": session.stored, "failed": session.failed},
                            "success" if how == "released" else "minor-failure",
                            ASSOCIATION_LINGER)

    def free_slots(self, key: Hashable) -> None:
        """Release the association's slots, once (release and close both call it): on a
        release, before the A-RELEASE-RP is sent, so they are free when the peer, having
        heard it, opens its next association."""
        with self._lock:
            session = self._by_key.get(key)
            if session is None:
                return
            fds = (session.slot_fd, session.peer_slot_fd)
            session.slot_fd = session.peer_slot_fd = None
        for fd in fds:
            if fd is not None:
                SlotLimiter.release(fd)

    # --- pynetdicom's events --------------------------------------------------------------

    def on_requested(self, event: evt.Event) -> None:
        assoc = event.assoc
        rq = assoc.requestor.primitive
        rejection = self.admit(assoc, Request(
            str(rq.calling_ae_title), str(rq.called_ae_title), str(assoc.requestor.address),
            assoc.requestor.user_identity, compat.socket_of(assoc)))
        if rejection is not None:
            assoc.acse.send_reject(rejection.result, rejection.source, rejection.diagnostic)
            assoc.kill()

    def on_user_id(self, event: evt.Event) -> tuple[bool, bytes | None]:
        """pynetdicom rejects the association on False."""
        return self.verify_user(event.assoc, event.user_id_type,
                                bytes(event.primary_field or b""),
                                bytes(event.secondary_field or b"")), None

    def on_accepted(self, event: evt.Event) -> None:
        self.accepted(event.assoc)

    def on_released(self, event: evt.Event) -> None:
        self.released(event.assoc)

    def on_aborted(self, event: evt.Event) -> None:
        self._ended(event.assoc, "aborted")

    def on_closed(self, event: evt.Event) -> None:
        self.closed(event.assoc)

    def handlers(self) -> list:
        return [
            (evt.EVT_REQUESTED, self.on_requested),
            (evt.EVT_USER_ID, self.on_user_id),
            (evt.EVT_ACCEPTED, self.on_accepted),
            (evt.EVT_RELEASED, self.on_released),
            (evt.EVT_ABORTED, self.on_aborted),
            (evt.EVT_CONN_CLOSE, self.on_closed),
        ]
