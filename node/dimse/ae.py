"""The pynetdicom Application Entity: contexts, transfer syntaxes, sockets, PDU size.

Two socket facts shape this module (see ../shared/NOTES.md):

* pynetdicom never sets TCP_NODELAY; DCMTK peers then run 10-30x slower.
  We set it on every accepted and every outgoing socket.
* pynetdicom's server ignores ``allow_reuse_port``; our server class sets
  SO_REUSEPORT itself (a node with one worker listens on its own). With several
  workers the supervisor accepts (node.acceptor) and :class:`HandedServer` serves
  the connections it hands over.
"""

from __future__ import annotations

import gc
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)
from pynetdicom.transport import ThreadedAssociationServer

from node.config import NodeSettings
from node.dimse import compat
from node.sop_classes import STORAGE_SOP_CLASSES

#: What we accept, stored as received (never transcoded). Uncompressed first
#: so that an SCU offering several syntaxes in one context gets the plain one.
ACCEPTED_TRANSFER_SYNTAXES = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
]


def configure_pynetdicom() -> None:
    """Process-wide pynetdicom settings: no patient data in logs, spool to disk.

    Received data sets are spooled straight to a file (the DICOM File Format
    with meta, in the default temp folder) so a multi-hundred-MB object is
    never held whole in memory; the ingest service takes that file. Stored
    files sent by path (C-GET) are read in PDU-sized pieces.
    """
    compat.configure_process()


def set_nodelay(sock: socket.socket | None) -> None:
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


#: Seconds between the accept loop's garbage collections (pynetdicom's, on a clock).
GC_INTERVAL = 30.0


class LaminaServer(ThreadedAssociationServer):
    """Association server with SO_REUSEPORT and TCP_NODELAY on accepted sockets.

    With ``handle_inline`` (no TLS handshake, no PROXY header: nothing about a new
    connection can block) the accepting thread builds and starts each association
    itself: socketserver's thread per connection only started the association's own
    thread and ended, one thread creation and one hand-over more per association.
    """

    _last_gc = 0.0
    #: Set by the DIMSE server when building an association reads nothing from the peer.
    handle_inline = False
    #: The framed acceptor (a :class:`node.dimse.framed.Acceptor`, not imported here: that
    #: module builds on this one) serving this server's connections first, set by the
    #: DIMSE server; None: pynetdicom serves every connection.
    framed: Any = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.contexts = compat.SharedContexts(self.contexts)

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

    def stop(self) -> None:
        """Stop accepting and close the socket.

        pynetdicom's own ``shutdown`` also unregisters the server from the AE,
        which fails for a server made by ``make_server`` (never registered).
        """
        socketserver.BaseServer.shutdown(self)
        self.server_close()

    def get_request(self) -> tuple[socket.socket, Any]:
        client, address = super().get_request()
        set_nodelay(client)
        return client, address

    def process_request(self, request: Any, client_address: Any) -> None:
        """In a thread of its own (socketserver), or here with ``handle_inline``: what
        pynetdicom's ``process_request_thread`` does, without the thread."""
        if not self.handle_inline:
            super().process_request(request, client_address)
            return
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
            self.shutdown_request(request)

    def association_ended(self) -> None:
        """An association of this server has ended (its thread is done): nothing to do
        here; :class:`HandedServer` counts it."""

    def service_actions(self) -> None:
        """pynetdicom runs a full ``gc.collect()`` every 60 turns of the accept loop (to
        reclaim ended associations). A collection takes ~65 ms with the node's modules
        loaded and holds the GIL, and our loop turns every 50 ms (so that ``stop`` is
        quick): collect on a clock instead, every :data:`GC_INTERVAL` seconds."""
        now = time.monotonic()
        if now - self._last_gc >= GC_INTERVAL:
            self._last_gc = now
            gc.collect()


class HandedServer(LaminaServer):
    """Serves connections the supervisor accepted and handed over (node.acceptor), never
    listening itself. ``on_count(n)`` hears this process's open connection count
    each time it changes (the supervisor picks the least-busy worker from it)."""

    on_count: Callable[[int], None] = staticmethod(lambda n: None)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._open = 0
        self._open_lock = threading.Lock()
        super().__init__(*args, **kwargs)
        self.socket.close()  # the one TCPServer made: never bound, never listened on

    def server_bind(self) -> None:
        pass

    def server_activate(self) -> None:
        pass

    def serve_handed(self, client: socket.socket) -> None:
        """Serve one handed connection (as an accepted one would be)."""
        self._count(+1)
        try:
            address = client.getpeername()
        except OSError:
            address = ("", 0)
        try:
            self.process_request(client, address)
        except Exception:
            self._count(-1)  # no thread took the connection
            raise

    def finish_request(self, request: Any, client_address: Any) -> None:
        """Handle the request. The open count covers the association's life, not its
        start: a started association counts itself out when its thread ends
        (:meth:`association_ended`, called by compat.AssociationHooks.run); a connection
        that never became one (a failed TLS handshake, a refused PROXY header) now.
        The handler names the thread that owns the connection (``connection_thread``):
        the one whose end is counted."""
        started = False
        try:
            handler = self.RequestHandlerClass(request, client_address, self)
            thread = getattr(handler, "connection_thread", None)
            started = thread is not None and thread.ident is not None
        finally:
            if not started:
                self._count(-1)

    def association_ended(self) -> None:
        self._count(-1)

    def _count(self, delta: int) -> None:
        with self._open_lock:
            self._open += delta
            now = self._open
        self.on_count(now)


def _nodelay_on_open(event: evt.Event) -> None:
    set_nodelay(compat.socket_of(event.assoc))


def build_ae(node: NodeSettings) -> AE:
    """An AE carrying our title, timeouts and PDU size, with no contexts yet."""
    ae = AE(ae_title=node.ae_title)
    ae.maximum_pdu_size = node.max_pdu
    ae.acse_timeout = node.acse_timeout
    ae.dimse_timeout = node.dimse_timeout
    ae.network_timeout = node.network_timeout
    # Our own slot limiter (node.dimse.handlers.association) enforces the limit across
    # processes; pynetdicom's per-process check must never trigger first. It counts
    # association threads still alive, and those of released or rejected associations
    # linger for a moment after their peer has moved on: leave room for them.
    ae.maximum_associations = 2 * node.max_associations + 4
    return ae


#: Query/retrieve SOP classes we serve (C-FIND, C-MOVE, C-GET in both models).
QUERY_RETRIEVE_SOP_CLASSES = [
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelMove,
    PatientRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelGet,
]


def build_scp(node: NodeSettings) -> AE:
    """The receiving AE: Verification, query/retrieve, every storage SOP class pynetdicom knows.

    Storage contexts accept SCP/SCU role selection both ways: a C-GET SCU
    proposes to be the storage SCP on them, so the sub-operations can come back
    on its own association.
    """
    ae = build_ae(node)
    ae.add_supported_context(Verification, ACCEPTED_TRANSFER_SYNTAXES[:3])
    for sop_class in QUERY_RETRIEVE_SOP_CLASSES:
        # Little endian, implicit or explicit VR: what C-FIND responses are encoded in.
        ae.add_supported_context(sop_class, ACCEPTED_TRANSFER_SYNTAXES[:2])
    for sop_class in STORAGE_SOP_CLASSES:
        ae.add_supported_context(sop_class, ACCEPTED_TRANSFER_SYNTAXES,
                                 scu_role=True, scp_role=True)
    return ae


#: PS3.8: at most 128 presentation contexts in one association request.
MAX_CONTEXTS = 128


_Item = TypeVar("_Item")


def context_batches(items: Iterable[_Item],
                    contexts_of: Callable[[_Item], Iterable[tuple[str, str]]]
                    ) -> Iterator[list[_Item]]:
    """Split items, in order, so that no batch needs more than 128 presentation contexts.

    ``contexts_of(item)`` names the (SOP class, transfer syntax) contexts an
    item needs (one per syntax proposed for it); one association per batch.
    """
    batch: list[_Item] = []
    contexts: set[tuple[str, str]] = set()
    for item in items:
        needed = set(contexts_of(item)) - contexts
        if batch and len(contexts) + len(needed) > MAX_CONTEXTS:
            yield batch
            batch, contexts = [], set()
            needed = set(contexts_of(item))
        contexts |= needed
        batch.append(item)
    if batch:
        yield batch


def associate(
    ae: AE, host: str, port: int, ae_title: str, handlers: list | None = None
) -> Association:
    """Request an association with TCP_NODELAY set as soon as the socket opens."""
    return ae.associate(host, port, ae_title=ae_title,
                        evt_handlers=[(evt.EVT_CONN_OPEN, _nodelay_on_open), *(handlers or [])])


# --- why an association could not be made: one wording for every SCU and the sender ---


def rejection_text(result: int, source: int, diagnostic: int) -> str:
    """An A-ASSOCIATE-RJ in pynetdicom's words: ``Calling AE title not recognised
    (Rejected Permanent, Service User)``."""
    primitive = A_ASSOCIATE()
    try:
        primitive.result = result
        primitive.result_source = source
        primitive.diagnostic = diagnostic
    except ValueError:
        return f"result {result}, source {source}, reason {diagnostic}"
    return f"{primitive.reason_str} ({primitive.result_str}, {primitive.source_str})"


def connect_failure(exc: OSError, host: str, port: int, timeout: float) -> str:
    """Why a TCP connection to ``host:port`` failed, in one line a person can act on."""
    if isinstance(exc, ConnectionRefusedError):
        return f"connection refused by {host}:{port} (is a DICOM node listening?)"
    if isinstance(exc, TimeoutError):
        return f"no answer from {host}:{port} within {timeout:g} s"
    if isinstance(exc, socket.gaierror):
        return f"host {host!r} does not resolve"
    return f"cannot reach {host}:{port}: {exc.strerror or exc}"


def silent_peer(host: str, port: int, timeout: float) -> str:
    """The peer took the connection but no A-ASSOCIATE-AC/RJ came within ``timeout``."""
    return (f"{host}:{port} accepted the connection but did not answer the association"
            f" within {timeout:g} s")


def probe_connect(host: str, port: int, timeout: float) -> OSError | None:
    """Open and close a plain TCP connection: None when it connects, else why not."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as exc:
        return exc
