"""The C-STORE receiver (node.dimse.receive) over raw sockets on 127.0.0.1.

The node reads an established association's P-DATA itself; these cases frame
the PDUs by hand, as a peer may legally (or not) send them: commands and data
sets cut into many fragments and PDUs, other services on the same association,
a command inside a data set, a PDV that runs outside its PDU, a connection lost
half-way. Each must end in an answer or a clean abort, with no spool file left
and the node still serving.
"""

from __future__ import annotations

import hashlib
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from io import BytesIO
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom.dsutils import create_file_meta

from node.dimse.receive import file_preamble
from node.dimse.sender import (
    StoreAssociation,
    _read_pdu,
    command_elements,
    frame,
    store_command,
)
from tests.harness import (
    NODE_AET,
    TEST_AET,
    InProcessNode,
    as_file,
    memory_spools_open,
    peer,
    write_config,
)

CT = "1.2.840.10008.5.1.4.1.1.2"
VERIFICATION = "1.2.840.10008.1.1"
MAX_PDU = 16384


def _serving(root: Path, route: str) -> InProcessNode:
    """A node whose peer stores on ``route``: ``deidentified`` spools to the spool folder,
    ``clinical`` (its objects de-identified on the way in) into memory."""
    return InProcessNode(write_config(root, node={"max_pdu": MAX_PDU, "dimse_timeout": 20,
                                                  "network_timeout": 20},
                                      peers={"tests": peer(TEST_AET, "store", route=route)}))


@pytest.fixture
def node(tmp_path: Path) -> Iterator[InProcessNode]:
    with _serving(tmp_path / "node", "deidentified") as n:
        yield n


@pytest.fixture
def clinical_node(tmp_path: Path) -> Iterator[InProcessNode]:
    with _serving(tmp_path / "node", "clinical") as n:
        yield n


@pytest.fixture
def spool(node: InProcessNode) -> Path:
    """Where the node spools received data sets: its own spool folder, swept at start-up."""
    return node.settings.spool_dir


def _open(node: InProcessNode) -> StoreAssociation:
    return StoreAssociation.open(TEST_AET, "127.0.0.1", node.port, NODE_AET,
                                 [(CT, ExplicitVRLittleEndian),
                                  (VERIFICATION, ImplicitVRLittleEndian)], MAX_PDU, 10, 10)


def _slice(path: Path) -> tuple[str, bytes]:
    """(SOP Instance UID, data set bytes in explicit VR little endian) of a phantom file."""
    ds = dcmread(path)
    body = as_file(ds)
    return str(ds.SOPInstanceUID), body[body.index(b"DICM") + 4:]


def _pdv(context_id: int, control: int, data: bytes) -> bytes:
    return struct.pack(">IBB", len(data) + 2, context_id, control) + data


def _pdu(*pdvs: bytes) -> bytes:
    body = b"".join(pdvs)
    return struct.pack(">BBI", 0x04, 0, len(body)) + body


def _command_answer(sock: socket.socket) -> dict[int, bytes]:
    """The elements of the next command set the node sends (a response)."""
    command = b""
    while True:
        kind, data = _read_pdu(sock, MAX_PDU)
        assert kind == 0x04, f"PDU type {kind} instead of P-DATA-TF"
        at = 6
        while at < len(data):
            length, _, control = struct.unpack_from(">IBB", data, at)
            command += data[at + 6:at + 4 + length]
            at += 4 + length
            if control & 3 == 3:
                found = command_elements(command)
                assert found is not None
                return found


def _us(value: bytes) -> int:
    return int.from_bytes(value, "little")


def _echo_command(msg_id: int) -> bytes:
    """A C-ECHO-RQ command set (implicit VR little endian)."""
    uid = VERIFICATION.encode() + b"\0"
    elements = [(0x0002, uid), (0x0100, struct.pack("<H", 0x0030)),
                (0x0110, struct.pack("<H", msg_id)), (0x0800, struct.pack("<H", 0x0101))]
    body = b"".join(struct.pack("<HHI", 0, e, len(v)) + v for e, v in elements)
    return struct.pack("<HHI", 0, 0, 4) + struct.pack("<I", len(body)) + body


def _aborted(sock: socket.socket) -> bool:
    """The node answers with an A-ABORT or closes the connection."""
    sock.settimeout(10)
    try:
        data = sock.recv(64)
    except ConnectionResetError:
        return True
    return data == b"" or data[0] == 0x07


def _wait_empty(folder: Path) -> list[str]:
    deadline = time.monotonic() + 10
    while (left := sorted(p.name for p in folder.iterdir())) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def test_fragmented_command_and_data_set_are_stored_as_sent(node, spool, phantom_files):
    uid, dataset = _slice(phantom_files[0])
    assoc = _open(node)
    cid = assoc.context_id(CT, ExplicitVRLittleEndian)
    command = store_command(CT, uid, 7)
    # The command in two PDUs, then the data set in 1000-byte PDVs, four to a PDU.
    assoc.sock.sendall(_pdu(_pdv(cid, 0x01, command[:20])) + _pdu(_pdv(cid, 0x03, command[20:])))
    pieces = [dataset[i:i + 1000] for i in range(0, len(dataset), 1000)]
    pdvs = [_pdv(cid, 0x02 if n == len(pieces) - 1 else 0x00, piece)
            for n, piece in enumerate(pieces)]
    for start in range(0, len(pdvs), 4):
        assoc.sock.sendall(_pdu(*pdvs[start:start + 4]))
    answer = assoc.response(7)
    assoc.release()
    assert answer is not None and answer.status == 0x0000, answer
    [(sha256,)] = node.rows("SELECT blob_sha256 FROM instance")
    assert dcmread(node.blob_path(sha256)).PixelData == dcmread(phantom_files[0]).PixelData
    # named by the hash the spool took as the fragments arrived: the bytes' own
    assert hashlib.sha256(node.blob_path(sha256).read_bytes()).hexdigest() == sha256
    assert _wait_empty(spool) == []


def test_a_pdu_the_reactor_saw_arrive_is_read_without_asking_again(node, phantom_files,
                                                                   monkeypatch):
    """The reactor waits in select until the socket is readable; the PDU it saw is read
    at once: one select per PDU of a data set, not a second one before reading it."""
    uid, dataset = _slice(phantom_files[0])
    assoc = _open(node)
    cid = assoc.context_id(CT, ExplicitVRLittleEndian)
    pdus = [frame(dataset[i:i + 8000], cid, MAX_PDU - 6, False, i + 8000 >= len(dataset))
            for i in range(0, len(dataset), 8000)]
    test_thread, real_select, selects = threading.current_thread(), select.select, []

    def counted(*args):
        if threading.current_thread() is not test_thread:
            selects.append(args[0])
        return real_select(*args)

    monkeypatch.setattr(select, "select", counted)
    assoc.sock.sendall(frame(store_command(CT, uid, 1), cid, 4000, True, True))
    for pdu in pdus:  # one at a time, each after the node has read the last
        assoc.sock.sendall(pdu)
        time.sleep(0.002)
    answer = assoc.response(1)
    monkeypatch.undo()
    assoc.release()
    assert answer is not None and answer.status == 0x0000, answer
    assert len(selects) <= len(pdus) + 4, f"{len(selects)} selects for {len(pdus)} PDUs"


def test_the_response_names_the_request(node, phantom_files):
    uid, dataset = _slice(phantom_files[1])
    assoc = _open(node)
    cid = assoc.context_id(CT, ExplicitVRLittleEndian)
    assoc.sock.sendall(frame(store_command(CT, uid, 41), cid, 4000, True, True)
                       + frame(dataset, cid, MAX_PDU - 6, False, True))
    found = _command_answer(assoc.sock)
    assoc.release()
    assert _us(found[0x0100]) == 0x8001  # C-STORE-RSP
    assert _us(found[0x0120]) == 41
    assert _us(found[0x0800]) == 0x0101
    assert _us(found[0x0900]) == 0x0000
    assert found[0x0002].rstrip(b"\0") == CT.encode()
    assert found[0x1000].rstrip(b"\0") == uid.encode()


def test_a_refusal_carries_its_reason(node):
    assoc = _open(node)
    cid = assoc.context_id(CT, ExplicitVRLittleEndian)
    uid = "1.2.826.0.1.3680043.8.498.1"
    garbage = b"\xff\xff\xff\xff not a data set"
    assoc.sock.sendall(frame(store_command(CT, uid, 3), cid, 4000, True, True)
                       + frame(garbage, cid, 4000, False, True))
    found = _command_answer(assoc.sock)
    assoc.release()
    assert _us(found[0x0900]) != 0x0000
    assert found.get(0x0902, b"").strip(), "a refusal without an ErrorComment"
    assert node.rows("SELECT COUNT(*) FROM instance") == [(0,)]
    assert node.echo() == 0x0000


def test_other_services_share_the_association(node, phantom_files):
    assoc = _open(node)
    cid = assoc.context_id(CT, ExplicitVRLittleEndian)
    echo_cid = assoc.context_id(VERIFICATION, ImplicitVRLittleEndian)
    statuses = []
    for msg_id, path in enumerate(phantom_files[:2], start=1):
        uid, dataset = _slice(path)
        assoc.sock.sendall(frame(store_command(CT, uid, msg_id), cid, 4000, True, True)
                           + frame(dataset, cid, MAX_PDU - 6, False, True))
        statuses.append(_us(_command_answer(assoc.sock)[0x0900]))
        assoc.sock.sendall(frame(_echo_command(100 + msg_id), echo_cid, 4000, True, True))
        echo = _command_answer(assoc.sock)
        assert _us(echo[0x0100]) == 0x8030 and _us(echo[0x0120]) == 100 + msg_id
        statuses.append(_us(echo[0x0900]))
    assoc.release()
    assert statuses == [0, 0, 0, 0]
    assert node.rows("SELECT COUNT(*) FROM instance") == [(2,)]


def test_a_command_inside_a_data_set_aborts_and_leaves_no_spool(node, spool, phantom_files):
    uid, dataset = _slice(phantom_files[2])
    assoc = _open(node)
    cid = assoc.context_id(CT, ExplicitVRLittleEndian)
    assoc.sock.sendall(frame(store_command(CT, uid, 1), cid, 4000, True, True)
                       + frame(dataset[:50000], cid, MAX_PDU - 6, False, False)
                       + frame(_echo_command(2), cid, 4000, True, True))
    assert _aborted(assoc.sock)
    assoc.sock.close()
    assert _wait_empty(spool) == []
    assert node.rows("SELECT COUNT(*) FROM instance") == [(0,)]
    assert node.echo() == 0x0000


def test_a_pdv_running_outside_its_pdu_aborts(node, spool, phantom_files):
    uid, dataset = _slice(phantom_files[3])
    assoc = _open(node)
    cid = assoc.context_id(CT, ExplicitVRLittleEndian)
    bad = struct.pack(">IBB", 5000, cid, 0x00) + dataset[:100]  # claims 5000, holds 100
    assoc.sock.sendall(frame(store_command(CT, uid, 1), cid, 4000, True, True)
                       + frame(dataset[:20000], cid, MAX_PDU - 6, False, False)
                       + struct.pack(">BBI", 0x04, 0, len(bad)) + bad)
    assert _aborted(assoc.sock)
    assoc.sock.close()
    assert _wait_empty(spool) == []
    assert node.echo() == 0x0000


def _until(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 10
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.02)


@pytest.mark.parametrize("route", ["deidentified", "clinical"])
def test_a_connection_lost_mid_data_set_leaves_no_spool(tmp_path, route, phantom_files):
    """The half-received data set is dropped: its spool file (stored as received) or its
    memory spool (rewritten by the route) is gone, and the node serves on."""
    with _serving(tmp_path / "node", route) as node:
        folder = node.settings.spool_dir
        spools = (memory_spools_open if route == "clinical"
                  else lambda: len(list(folder.iterdir())))
        uid, dataset = _slice(phantom_files[4])
        assoc = _open(node)
        cid = assoc.context_id(CT, ExplicitVRLittleEndian)
        assoc.sock.sendall(frame(store_command(CT, uid, 1), cid, 4000, True, True)
                           + frame(dataset[:len(dataset) // 2], cid, MAX_PDU - 6, False, False))
        _until(lambda: spools() > 0)
        assert spools() == 1, "the data set was not being spooled"
        assoc.sock.close()
        _until(lambda: spools() == 0)
        assert spools() == 0
        assert _wait_empty(folder) == []
        assert node.rows("SELECT COUNT(*) FROM instance") == [(0,)]
        assert node.echo() == 0x0000


@pytest.mark.parametrize("instance", ["1.2.3.4", "1.2.3.45", "1.2.826.0.1.3680043.8.498.12345"])
@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, "1.2.840.10008.1.2.4.50"])
def test_the_spool_file_meta_is_pydicoms_byte_for_byte(instance, syntax):
    expected = BytesIO(b"\0" * 128 + b"DICM")
    expected.seek(0, 2)
    write_file_meta_info(expected, create_file_meta(
        sop_class_uid=UID(CT), sop_instance_uid=UID(instance), transfer_syntax=UID(syntax)))
    assert file_preamble(CT, instance, str(syntax)) == expected.getvalue()


def _cropped(path: Path, size: int) -> tuple[str, bytes, bytes]:
    """(SOP Instance UID, data set bytes, pixel bytes) of a phantom slice cut down to
    ``size`` x ``size``, under a new SOP Instance UID: a smaller data set than a slice."""
    ds = dcmread(path)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.PixelData = ds.pixel_array[:size, :size].tobytes()
    ds.Rows = ds.Columns = size
    body = as_file(ds)
    return str(ds.SOPInstanceUID), body[body.index(b"DICM") + 4:], ds.PixelData


def test_an_association_reuses_its_memory_spool_and_each_data_set_is_whole(
        clinical_node, phantom_files):
    """Data set after data set, the association's memory spool is rewound, not made
    again; a smaller data set after a larger one is stored without a byte of the
    larger one's left behind it."""
    assoc = _open(clinical_node)
    cid = assoc.context_id(CT, ExplicitVRLittleEndian)
    small_uid, small, small_pixels = _cropped(phantom_files[1], 64)
    sends = [_slice(phantom_files[0]), (small_uid, small), _slice(phantom_files[2])]
    for n, (uid, dataset) in enumerate(sends, start=1):
        assoc.sock.sendall(frame(store_command(CT, uid, n), cid, 4000, True, True)
                           + frame(dataset, cid, MAX_PDU - 6, False, True))
        answer = assoc.response(n)
        assert answer is not None and answer.status == 0x0000, answer
        assert memory_spools_open() == 1, "a memory spool per data set, not per association"
    assoc.release()
    rows = clinical_node.rows("SELECT blob_sha256 FROM instance ORDER BY id")
    assert len(rows) == 3
    stored, after = (dcmread(clinical_node.blob_path(sha)) for (sha,) in rows[1:])
    assert (stored.Rows, stored.Columns) == (64, 64)
    assert stored.PixelData == small_pixels
    # The larger data set's bytes past the smaller one's end would be read as elements,
    # which de-identification removes: its evidence would name them.
    assert set(stored.keys()) == set(after.keys())
    evidence = clinical_node.rows("SELECT t.evidence FROM deid_evidence e"
                                  " JOIN deid_evidence_text t ON t.id = e.evidence_fk"
                                  " JOIN instance i ON i.sop_instance_uid = e.sop_instance_uid"
                                  " ORDER BY i.id")
    assert evidence[1] == evidence[2]
    _until(lambda: memory_spools_open() == 0)
    assert memory_spools_open() == 0


def test_a_rewritten_data_set_never_touches_the_spool_folder(clinical_node, phantom_files):
    """On a route that stores its own de-identified object the received bytes stay in
    memory: the spool folder sees nothing, and every memory spool is closed."""
    spool = clinical_node.settings.spool_dir
    seen: set[str] = set()
    assoc = _open(clinical_node)
    cid = assoc.context_id(CT, ExplicitVRLittleEndian)
    for n, path in enumerate(phantom_files[:3], start=1):
        uid, dataset = _slice(path)
        assoc.sock.sendall(frame(store_command(CT, uid, n), cid, 4000, True, True))
        for start in range(0, len(dataset), 8000):
            last = start + 8000 >= len(dataset)
            assoc.sock.sendall(frame(dataset[start:start + 8000], cid, MAX_PDU - 6, False, last))
            if not last:  # after the last one the stored object's blob is written there
                seen.update(p.name for p in spool.iterdir())
        answer = assoc.response(n)
        assert answer is not None and answer.status == 0x0000, answer
    assoc.release()
    assert seen == set()
    assert clinical_node.rows("SELECT COUNT(*) FROM instance") == [(3,)]
    _until(lambda: memory_spools_open() == 0)
    assert memory_spools_open() == 0

