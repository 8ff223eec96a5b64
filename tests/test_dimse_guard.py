"""The PDU guard over raw sockets on 127.0.0.1: bad headers are refused at once with
A-ABORT, before the body is read, and the node keeps serving.

Each case was found by a robustness run: pynetdicom held an unknown PDU type for
its 10 s timeout, read any A-ASSOCIATE-RQ length whole, and stored a P-DATA-TF
eight times larger than the maximum PDU length it advertised.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import time
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian

from node.dimse.sender import StoreAssociation, frame, store_command
from node.phantom import Phantom
from tests.harness import NODE_AET, TEST_AET, InProcessNode, as_file, write_config

MAX_PDU = 16384
#: Well under the network timeout of the node below: "at once", not "at the timeout".
QUICK = 3.0


@pytest.fixture
def guarded(tmp_path: Path):
    config = write_config(tmp_path / "node", node={
        "max_pdu": MAX_PDU, "acse_timeout": 20, "network_timeout": 20, "dimse_timeout": 20,
        "max_associate_kb": 64})
    with InProcessNode(config) as node:
        yield node


def _answer(sock: socket.socket) -> tuple[bytes, float]:
    """What the node sends back until it closes the connection, and how long that took."""
    start = time.monotonic()
    sock.settimeout(QUICK + 5)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    return data, time.monotonic() - start


def _is_abort(data: bytes, reason: int) -> bool:
    """An A-ABORT (type 7) from the service provider (source 2) with this reason."""
    return len(data) >= 10 and data[0] == 0x07 and data[8] == 2 and data[9] == reason


def _raw(node: InProcessNode, payload: bytes) -> tuple[bytes, float]:
    with socket.create_connection(("127.0.0.1", node.port), timeout=5) as sock:
        sock.sendall(payload)
        return _answer(sock)


def test_unknown_pdu_type_is_aborted_at_once(guarded):
    data, took = _raw(guarded, struct.pack(">BBL", 0x53, 0, 4) + b"\0" * 4)
    assert _is_abort(data, 1), data  # reason 1: unrecognised PDU
    assert took < QUICK
    assert guarded.echo() == 0x0000  # the node keeps serving


def test_absurd_associate_rq_length_is_refused_before_its_body(guarded):
    # 2 GiB announced, nothing of it sent: the node must answer without waiting for it.
    data, took = _raw(guarded, struct.pack(">BBL", 0x01, 0, 0x7FFF_FFFF))
    assert _is_abort(data, 6), data  # reason 6: invalid PDU parameter value
    assert took < QUICK
    assert guarded.echo() == 0x0000


def test_pdata_before_the_association_is_aborted(guarded):
    data, took = _raw(guarded, struct.pack(">BBL", 0x04, 0, 6) + b"\0" * 6)
    assert _is_abort(data, 2), data  # reason 2: unexpected PDU
    assert took < QUICK


def test_pdata_above_the_advertised_maximum_is_aborted_and_not_stored(guarded, phantom_files):
    path = phantom_files[0]  # 512x512 CT, ~0.5 MB
    assoc = StoreAssociation.open(TEST_AET, "127.0.0.1", guarded.port, NODE_AET,
                                  [("1.2.840.10008.5.1.4.1.1.2", ExplicitVRLittleEndian)],
                                  MAX_PDU, 10, 10)
    assert assoc.peer_max_pdu == MAX_PDU
    cid = assoc.context_id("1.2.840.10008.5.1.4.1.1.2", ExplicitVRLittleEndian)
    ds = dcmread(path)
    body = as_file(ds)
    dataset = body[body.index(b"DICM") + 4:]
    command = store_command(str(ds.SOPClassUID), str(ds.SOPInstanceUID), 1)
    assoc.sock.sendall(frame(command, cid, MAX_PDU - 6, True, True))
    # One P-DATA-TF of 1 MiB against the 16 KiB we advertised (the node may close
    # while we still send: that is the point).
    with contextlib.suppress(OSError):
        assoc.sock.sendall(frame(dataset[:1 << 20], cid, 1 << 21, False, True))
    data, took = _answer(assoc.sock)
    assoc.sock.close()
    assert _is_abort(data, 6), data[:16]
    assert took < QUICK
    assert guarded.rows("SELECT COUNT(*) FROM instance") == [(0,)]
    assert guarded.store([path]) == [(0, "")]  # an honest sender is still served


def test_bytes_per_association_are_bounded(tmp_path):
    config = write_config(tmp_path / "node", node={"max_association_mb": 1})
    with InProcessNode(config) as node:
        results = node.store(Phantom(seed="guard", slices_count=4).write(tmp_path / "files"))
        # 0.5 MiB of pixels each: the second crosses 1 MiB and the association is aborted.
        assert results[0] == (0, "")
        assert all(status != 0 for status, _ in results[1:]), results
        assert node.rows("SELECT COUNT(*) FROM instance") == [(1,)]
        assert node.echo() == 0x0000
