"""The framed acceptor (node.dimse.framed): storage and echo associations on one thread,
answered with the bytes pynetdicom's acceptor sends, everything else left to pynetdicom."""

from __future__ import annotations

import socket
import struct
import threading
import time
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    AsynchronousOperationsWindowNegotiation,
    ImplementationClassUIDNotification,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
    UserIdentityNegotiation,
)
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import (
    CTImageStorage,
    MRImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
    Verification,
)

from node.dimse.framed import Proposals
from node.dimse.handlers.association import Sessions
from tests.harness import (
    NODE_AET,
    TEST_AET,
    InProcessNode,
    echo_request,
    read_pdu,
    write_config,
)

#: A SOP class no node supports: its context is rejected, the association still served.
UNKNOWN_SOP_CLASS = "1.2.3.4.5.6.7.8.9"
TIMEOUT = 10
#: A-RELEASE-RQ (PS3.8 9.3.6): type 5, length 4, four reserved bytes.
RELEASE_RQ = bytes.fromhex("05000000000400000000")


def request(contexts: list[tuple[str, list[str]]], calling: str = TEST_AET,
            extra: list | None = None) -> bytes:
    """An A-ASSOCIATE-RQ as pynetdicom's codec encodes it."""
    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title = calling
    primitive.called_ae_title = NODE_AET
    cxs = []
    for number, (sop_class, syntaxes) in enumerate(contexts):
        cx = build_context(sop_class, syntaxes)
        cx.context_id = 2 * number + 1
        cxs.append(cx)
    primitive.presentation_context_definition_list = cxs
    length = MaximumLengthNotification()
    length.maximum_length_received = 16384
    uid = ImplementationClassUIDNotification()
    uid.implementation_class_uid = "1.2.826.0.1.3680043.9.3811.2.1.0"
    primitive.user_information = [length, uid, *(extra or [])]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    return bytes(pdu.encode())


def answer_to(port: int, rq: bytes) -> bytes:
    """The first PDU the node answers ``rq`` with."""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        sock.sendall(rq)
        return read_pdu(sock)


def role(sop_class: str) -> SCP_SCU_RoleSelectionNegotiation:
    item = SCP_SCU_RoleSelectionNegotiation()
    item.sop_class_uid = sop_class
    item.scu_role, item.scp_role = True, True
    return item


def username(name: bytes) -> UserIdentityNegotiation:
    item = UserIdentityNegotiation()
    item.user_identity_type = 1
    item.primary_field = name
    return item


def served_by(node: InProcessNode) -> set[str]:
    """The kinds of thread serving this node's associations now."""
    server = node.server._server
    kinds = {"pynetdicom" for _ in server.active_associations}
    return kinds | {"framed" for _ in server.framed.alive}


@pytest.fixture
def node(tmp_path: Path):
    with InProcessNode(write_config(tmp_path / "node")) as running:
        yield running


def associate(node: InProcessNode, *sop_classes: str):
    ae = AE(ae_title=TEST_AET)
    for sop_class in sop_classes:
        ae.add_requested_context(sop_class)
    return ae.associate("127.0.0.1", node.port, ae_title=NODE_AET)


def test_a_storage_association_is_framed_and_stores(node, phantom_files):
    assoc = associate(node, CTImageStorage, Verification)
    try:
        assert assoc.is_established
        assert served_by(node) == {"framed"}
        assert assoc.send_c_echo().Status == 0
        answer = assoc.send_c_store(dcmread(phantom_files[0]))
        assert answer.Status == 0
    finally:
        assoc.release()
    node.drain()
    with node.index() as index, index.reader() as r:
        assert r.reports.counts()["instance"] == 1
    actions = node.audit_actions()
    assert actions.count("association.accepted") == 1
    assert actions.count("association.released") == 1
    assert "instance.stored" in actions


def test_a_query_association_is_left_to_pynetdicom(node):
    assoc = associate(node, StudyRootQueryRetrieveInformationModelFind, CTImageStorage)
    try:
        assert assoc.is_established
        assert served_by(node) == {"pynetdicom"}
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = ""
        statuses = [s.Status for s, _ in assoc.send_c_find(
            query, StudyRootQueryRetrieveInformationModelFind)]
        assert statuses == [0]
    finally:
        assoc.release()


@pytest.mark.parametrize("rq", [
    pytest.param(request([(Verification, ["1.2.840.10008.1.2"])]), id="echo"),
    pytest.param(request([(CTImageStorage, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"]),
                          (UNKNOWN_SOP_CLASS, ["1.2.840.10008.1.2"]),
                          (MRImageStorage, ["1.2.840.10008.1.2.4.50"]),
                          (Verification, ["1.2.840.10008.1.2"])],
                         extra=[role(CTImageStorage), username(b"rater1")]),
                 id="storage-roles-identity"),
    pytest.param(request([(Verification, ["1.2.840.10008.1.2"])], calling="STRANGER"),
                 id="unknown-caller"),
])
def test_the_answer_is_the_one_pynetdicom_sends(node, rq):
    framed = answer_to(node.port, rq)
    node.server._server.framed, acceptor = None, node.server._server.framed
    try:
        plain = answer_to(node.port, rq)
    finally:
        node.server._server.framed = acceptor
    assert framed[0] in (0x02, 0x03)  # A-ASSOCIATE-AC or -RJ
    assert framed == plain


def test_proposals_are_judged_once_and_extended_negotiation_is_left(node):
    """One decode per distinct request; what the acceptor cannot serve is left (None)."""
    proposals: Proposals = node.server._server.framed.proposals
    rq = request([(CTImageStorage, ["1.2.840.10008.1.2"])])
    first = proposals.of(rq)
    assert first is not None and first.accepted[1].abstract_syntax == CTImageStorage
    assert proposals.of(rq) is first
    window = AsynchronousOperationsWindowNegotiation()
    window.maximum_number_operations_invoked = window.maximum_number_operations_performed = 2
    assert proposals.of(request([(CTImageStorage, ["1.2.840.10008.1.2"])],
                                extra=[window])) is None
    asking = username(b"rater1")
    asking.positive_response_requested = True
    assert proposals.of(request([(CTImageStorage, ["1.2.840.10008.1.2"])],
                                extra=[asking])) is None
    assert proposals.of(rq[:40]) is None  # does not decode: pynetdicom's to answer
    # a passcode is never kept in memory past its association: judged every time
    secret = username(b"rater1")
    secret.user_identity_type, secret.secondary_field = 2, b"passcode"
    with_secret = request([(CTImageStorage, ["1.2.840.10008.1.2"])], extra=[secret])
    judged = proposals.of(with_secret)
    assert judged is not None and proposals.of(with_secret) is not judged
    assert proposals.of(request([(CTImageStorage, ["1.2.840.10008.1.2"])],
                                extra=[username(b"rater1")])) is not None


def _framed_thread(node: InProcessNode) -> threading.Thread:
    """The one framed association serving ``node`` now (waited for)."""
    deadline = time.monotonic() + TIMEOUT
    while not node.server._server.framed.alive and time.monotonic() < deadline:
        time.sleep(0.01)
    (framed,) = node.server._server.framed.alive
    return framed


def _established(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    sock.sendall(request([(Verification, ["1.2.840.10008.1.2"])]))
    assert read_pdu(sock)[0] == 0x02
    return sock


def test_a_message_it_does_not_serve_aborts_the_association(node):
    with _established(node.port) as sock:
        command = bytearray(echo_request())
        # the same command set made a C-FIND-RQ (0x0020): not served on this association
        at = command.index(struct.pack("<HHI", 0x0000, 0x0100, 2))
        command[at + 8:at + 10] = struct.pack("<H", 0x0020)
        sock.sendall(command)
        answer = read_pdu(sock)
    assert answer[0] == 0x07
    assert node.echo() == 0


def test_an_unexpected_pdu_aborts_with_its_reason(node):
    with _established(node.port) as sock:
        sock.sendall(request([(Verification, ["1.2.840.10008.1.2"])]))
        answer = read_pdu(sock)
    assert answer[0] == 0x07 and answer[8:10] == b"\x02\x02"  # provider, unexpected PDU
    node.drain()
    assert "association.aborted" in node.audit_actions()


def test_echo_and_release_on_the_wire(node):
    with _established(node.port) as sock:
        sock.sendall(echo_request())
        reply = read_pdu(sock)
        assert reply[0] == 0x04
        status_at = reply.index(struct.pack("<HHI", 0x0000, 0x0900, 2))
        assert reply[status_at + 8:status_at + 10] == b"\0\0"
        sock.sendall(RELEASE_RQ)
        assert read_pdu(sock)[0] == 0x06


def test_after_the_release_the_requestor_closes_the_connection(node):
    """PS3.8 Sta13, as pynetdicom's acceptor: after the A-RELEASE-RP the node waits for the
    requestor to close the connection rather than closing it under the requestor (whose
    own release then often waited 10 ms more, benchmarks.churn), and its thread ends."""
    with _established(node.port) as sock:
        framed = _framed_thread(node)
        sock.sendall(RELEASE_RQ)
        assert read_pdu(sock)[0] == 0x06
        sock.settimeout(0.3)
        with pytest.raises(TimeoutError):
            sock.recv(1)  # still open: the node waits for us
        assert framed.is_alive()
    framed.join(TIMEOUT)
    assert not framed.is_alive()
    node.drain()
    actions = node.audit_actions()
    assert actions.count("association.released") == 1
    assert "association.aborted" not in actions


def test_a_release_is_answered_before_it_is_logged_and_audited(node, monkeypatch):
    """The A-RELEASE-RP does not wait for the release's log line and audit event: held
    here until the peer has its answer (before, the answer came after them)."""
    recording, answered = threading.Event(), threading.Event()
    original = Sessions._ended

    def held(self, key, how):
        if how == "released":
            recording.set()
            answered.wait(TIMEOUT)
        original(self, key, how)

    monkeypatch.setattr(Sessions, "_ended", held)
    with _established(node.port) as sock:
        sock.settimeout(2)
        sock.sendall(RELEASE_RQ)
        try:
            assert read_pdu(sock)[0] == 0x06
        finally:
            answered.set()
    assert recording.wait(TIMEOUT)
    node.drain()
    assert node.audit_actions().count("association.released") == 1


@pytest.mark.parametrize("keeps_sending", [False, True], ids=["silent", "sending"])
def test_a_requestor_that_does_not_close_after_the_release_is_closed_after_the_acse_timeout(
        tmp_path, keeps_sending):
    """Silent, or sending bytes faster than the timeout: the ACSE timeout bounds the whole
    wait for the requestor's close, as pynetdicom's ARTIM timer does."""
    with InProcessNode(write_config(tmp_path / "node", node={"acse_timeout": 1})) as node, \
            _established(node.port) as sock:
        sock.sendall(RELEASE_RQ)
        assert read_pdu(sock)[0] == 0x06
        started = time.monotonic()
        sock.settimeout(0.2)
        while time.monotonic() - started < TIMEOUT:
            try:
                if keeps_sending:
                    sock.sendall(b"\0" * 10)
                if sock.recv(1) == b"":
                    break  # the node closed it
            except TimeoutError:
                continue
            except OSError:
                break  # reset: closed too
        assert 0.5 < time.monotonic() - started < 5


def test_stopping_the_server_aborts_its_framed_associations(tmp_path):
    node = InProcessNode(write_config(tmp_path / "node")).start()
    try:
        sock = _established(node.port)
        framed = _framed_thread(node)
    finally:
        node.stop()
    with sock:
        assert read_pdu(sock)[0] == 0x07
    framed.join(TIMEOUT)
    assert not framed.is_alive()
    assert not [t for t in threading.enumerate() if t.name == "FramedAssociation"]
