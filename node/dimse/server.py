"""The receiving DIMSE server, built from a NodeContext: ``build_dimse_server(ctx)``.

One call wires everything pynetdicom needs from the node: the AE (contexts,
timeouts, PDU size), the event handlers (association admission, C-ECHO,
C-STORE, C-FIND, C-MOVE, C-GET), and a server whose associations route the
query/retrieve SOP classes to Lamina's own loops. That routing is scoped to
this server (its request handler adopts each new association into
:class:`~node.dimse.qr_loops.QueryRetrieveAssociation`); no pynetdicom global
is replaced, so another AE or server in the same process is untouched.

:class:`DimseServer` binds on :meth:`~DimseServer.start` (port 0 picks a free
port, read back from :attr:`~DimseServer.port`) and serves in a background
thread until :meth:`~DimseServer.stop`. It does not own the context: whoever
opened the context closes it after stopping the server.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
from functools import partial
from typing import Any

from pynetdicom import AE, evt
from pynetdicom.association import Association

from node.acceptor import WorkerChannel
from node.config import NodeSettings, TlsSettings
from node.context import NodeContext
from node.dimse import compat, guard, tls
from node.dimse.ae import HandedServer, LaminaServer, build_scp, configure_pynetdicom
from node.dimse.framed import REASON_NOT_SPECIFIED, Acceptor, FramedAssociation, Proposals
from node.dimse.guard import PduBounds, PduGuard
from node.dimse.handlers.association import Sessions
from node.dimse.handlers.echo import handle_echo
from node.dimse.handlers.find import handle_sop_extended, make_find_handler
from node.dimse.handlers.move_get import make_retrieve_handlers
from node.dimse.handlers.store import StoreService
from node.dimse.proxy_protocol import ProxyHeaderError, ProxyPolicy, read_header, speaks
from node.dimse.qr_loops import QueryRetrieveAssociation
from node.dimse.receive import StoreReceiver
from node.dimse.sender import BlobSource

log = logging.getLogger("lamina.server")


class NodeRequestHandler(compat.RequestHandlerHooks):
    """Adopts each association of our server so its Q/R requests run Lamina's loops."""

    def __init__(self, request: Any, client_address: Any, server: Any, *,
                 blobs: BlobSource, limits: NodeSettings,
                 tls: ssl.SSLContext | None = None,
                 tls_settings: TlsSettings | None = None,
                 proxy: ProxyPolicy | None = None,
                 store: StoreService | None = None) -> None:
        # before the parent's __init__, which handles the request
        #: The thread that owns the connection and counts itself out when it ends (a
        #: HandedServer's open count): the framed association, or pynetdicom's.
        self.connection_thread: threading.Thread | None = None
        self.store = store
        self.guard: PduGuard | None = None
        self.proxy = proxy
        self.blobs = blobs
        self.limits = limits
        self.tls = tls
        self.tls_settings = tls_settings or TlsSettings()
        super().__init__(request, client_address, server)

    def handle(self) -> None:
        """With TLS, the handshake runs here, in the connection's own thread (never in
        the accept loop), bounded by the ACSE timeout; a failed one closes the socket.
        Behind a balancer, its PROXY header comes first (the real client address)."""
        if self.proxy is not None and not self._proxied(self.proxy):
            return
        if self.tls is not None:
            wrapped = tls.handshake(self.tls, self.request, self.limits.acse_timeout)
            if wrapped is None:
                return
            self.request = wrapped
        acceptor = self.server.framed
        if acceptor is None:
            super().handle()
            return
        framed = FramedAssociation(acceptor, self.request, str(self.client_address[0]),
                                   self._hand_to_pynetdicom, self.server.association_ended)
        self.connection_thread = framed
        framed.start()

    def _hand_to_pynetdicom(self, sock: socket.socket, request: bytes,
                            bounds: PduBounds) -> None:
        """Serve with pynetdicom a connection whose A-ASSOCIATE-RQ the framed acceptor
        read and leaves to it (:mod:`node.dimse.framed`): its state machine gets the
        request as its own reader would have, and the guard goes on counting from it."""
        self.request = sock
        assoc = self._create_association()
        if self.guard is not None:
            self.guard.bounds = bounds
        compat.give_pdu(assoc, request)
        evt.trigger(assoc, evt.EVT_CONN_OPEN, {"address": self.client_address})
        assoc.start()

    def _proxied(self, policy: ProxyPolicy) -> bool:
        """Take the client's address from the PROXY header; False: close the connection."""
        source = str(self.client_address[0])
        try:
            if not policy.trusts(source):
                raise ProxyHeaderError("PROXY header from an untrusted address")
            real = read_header(self.request, self.limits.acse_timeout)
        except ProxyHeaderError as exc:
            log.warning("connection closed", extra={"fields": {
                "address": source, "reason": str(exc)}})
            return False
        if real is None:  # LOCAL: the balancer's own connection (a health check closes at once)
            return speaks(self.request, self.limits.acse_timeout)
        self.client_address = real
        return True

    def created(self, assoc: Association) -> Association:
        compat.adopt(assoc, QueryRetrieveAssociation)
        compat.wake_on_arrival(assoc)
        compat.reactor_without_polling(assoc)
        assoc.blobs = self.blobs
        assoc.tls = self.tls_settings
        sock = self.guard = guard.install(assoc, self.limits)
        compat.DimseHooks(assoc, partial(_receive_failed, assoc))
        if self.store is not None and sock is not None:
            compat.install_receiver(assoc, StoreReceiver(compat.PynetdicomLink(assoc, sock),
                                                         sock.socket, self.store))
        if self.connection_thread is None:  # not one the framed association hands over
            self.connection_thread = assoc
        return assoc


def _receive_failed(assoc: Association, exc: Exception) -> None:
    """A message could not be received (the spool write failed: disk full, I/O error).

    The half-written spool file is gone; a C-STORE is answered 0xA700, anything
    else aborts the association. The worker, its threads and the association
    slot carry on (the slot is released when the connection closes).
    """
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
    log.error("receive failed", extra={"fields": {
        "address": str(assoc.requestor.address), "reason": reason}})


class DimseServer:
    """The node's DIMSE server: bind and serve with :meth:`start`, end with :meth:`stop`."""

    def __init__(self, ae: AE, address: tuple[str, int], handlers: list,
                 blobs: BlobSource, limits: NodeSettings,
                 tls_context: ssl.SSLContext | None = None,
                 tls_settings: TlsSettings | None = None,
                 proxy: ProxyPolicy | None = None,
                 store: StoreService | None = None) -> None:
        self.ae = ae
        self.store = store
        self.proxy = proxy
        self.tls_settings = tls_settings or TlsSettings()
        self.limits = limits
        self.tls_context = tls_context
        self.address = address
        self.handlers = handlers
        self.blobs = blobs
        self._server: LaminaServer | None = None
        self._channel: WorkerChannel | None = None
        self._thread: threading.Thread | None = None

    def start(self, channel: WorkerChannel | None = None) -> DimseServer:
        """Bind (SO_REUSEPORT, TCP_NODELAY on accepted sockets) and serve in a thread; with
        ``channel``, serve the connections the supervisor hands over on it instead."""
        if self._server is not None:
            raise RuntimeError("the DIMSE server is already started")
        server = self.ae.make_server(
            self.address, evt_handlers=self.handlers,
            server_class=HandedServer if channel is not None else LaminaServer,
            request_handler=partial(NodeRequestHandler, blobs=self.blobs, limits=self.limits,
                                    tls=self.tls_context, tls_settings=self.tls_settings,
                                    proxy=self.proxy, store=self.store))
        self._server = server
        server.handle_inline = self.tls_context is None and self.proxy is None
        if self.store is not None:
            server.framed = Acceptor(self.store.sessions, self.store, self.limits, Proposals(
                server.contexts, self.ae.maximum_pdu_size, self.ae.implementation_class_uid,
                self.ae.implementation_version_name or ""), set())
        if channel is not None:
            assert isinstance(server, HandedServer)
            server.on_count = channel.report
            self._channel = channel
            target = partial(_serve_channel, server, channel)
        else:
            # socketserver's default poll interval (0.5 s) is how long stop() waits.
            target = partial(server.serve_forever, poll_interval=0.05)
        self._thread = threading.Thread(target=target, name="dimse-acceptor", daemon=True)
        self._thread.start()
        return self

    @property
    def port(self) -> int:
        """The port actually bound (the configured one, or the free one picked for port 0)."""
        if self._server is None:
            raise RuntimeError("the DIMSE server is not started")
        if self._channel is not None:
            return int(self.address[1])  # the supervisor's port
        return int(self._server.server_address[1])

    def stop(self) -> None:
        """Stop accepting, abort the associations still open, and close the socket."""
        server, self._server = self._server, None
        if server is None:
            return
        channel, self._channel = self._channel, None
        if channel is not None:
            channel.close()
            server.server_close()
        else:
            server.stop()
        for assoc in server.active_associations:
            assoc.abort()
        if server.framed is not None:
            for framed in list(server.framed.alive):
                framed.abort(REASON_NOT_SPECIFIED)
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None


def _serve_channel(server: HandedServer, channel: WorkerChannel) -> None:
    """Serve each connection handed over on ``channel`` until it closes."""
    channel.report(0)
    while (client := channel.receive()) is not None:
        try:
            server.serve_handed(client)
        except Exception:  # one connection that cannot be served must not end the loop
            log.exception("handed connection not served")
            client.close()


def build_dimse_server(ctx: NodeContext) -> DimseServer:
    """The node's DIMSE server, wired to ``ctx``'s services (not yet bound)."""
    configure_pynetdicom()
    node = ctx.settings.node
    sessions = Sessions(ctx)
    store = StoreService(ctx, sessions)
    handlers = [
        *sessions.handlers(),
        (evt.EVT_C_ECHO, handle_echo),
        (evt.EVT_C_STORE, store.handle),
        (evt.EVT_C_FIND, make_find_handler(ctx, sessions)),
        (evt.EVT_SOP_EXTENDED, handle_sop_extended),
        *make_retrieve_handlers(ctx, sessions),
    ]
    return DimseServer(build_scp(node), (node.bind, node.port), handlers, ctx.blobs, node,
                       tls.server_context(ctx.settings.tls), ctx.settings.tls,
                       ProxyPolicy.parse(ctx.settings.dimse.proxy_trusted)
                       if ctx.settings.dimse.proxy_protocol else None, store)
