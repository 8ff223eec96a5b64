"""Bounds the library leaves open, each configurable in [node]: element length, sequence
nesting depth, associations per peer, idle timeout. Over real associations on 127.0.0.1;
past a bound the answer is a clean status (or rejection) and the node keeps serving."""

from __future__ import annotations

import struct
import time

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from node import status
from tests.harness import NODE_AET, TEST_AET, InProcessNode, peer, write_config
from tests.test_ingest_validate import _nested, _split, encoded, good_slice


@pytest.fixture
def bounded(tmp_path):
    config = write_config(tmp_path / "node", node={"max_element_mb": 1, "max_depth": 8},
                          peers={"tests": peer(TEST_AET, "store", route="deidentified")})
    with InProcessNode(config) as node:
        yield node


def _with(name: str, extra: bytes, tmp_path) -> object:
    """A good slice with ``extra`` encoded elements just before its pixel data."""
    head, body = _split(encoded(good_slice(name)))
    pixels = body.index(b"\xe0\x7f\x10\x00OW")
    path = tmp_path / f"{name}.dcm"
    path.write_bytes(head + body[:pixels] + extra + body[pixels:])
    return path


def _ut(size: int) -> bytes:
    """(0040,A160) TextValue, UT, ``size`` bytes: a long non-pixel element."""
    return b"\x40\x00\x60\xa1UT\x00\x00" + struct.pack("<I", size) + b"x" * size


def test_an_element_over_max_element_mb_is_refused(bounded, tmp_path):
    [(code, comment)] = bounded.store([_with("long-element", _ut(2 << 20), tmp_path)])
    assert code == status.CANNOT_UNDERSTAND.code
    assert "(0040,A160) of 2097152 bytes, too long" in comment
    assert bounded.rows("SELECT COUNT(*) FROM quarantine") == [(0,)]  # not read to be sealed
    [(code, _)] = bounded.store([_with("short-element", _ut(1000), tmp_path)])
    assert code == 0


def test_sequences_nested_over_max_depth_are_refused(bounded, tmp_path):
    [(code, comment)] = bounded.store([_with("nested-9", _nested(9), tmp_path)])
    assert code == status.CANNOT_UNDERSTAND.code
    assert "nested deeper than 8 levels" in comment
    [(code, _)] = bounded.store([_with("nested-8", _nested(8), tmp_path)])
    assert code == 0


def _associate(port: int, aet: str):
    ae = AE(ae_title=aet)
    ae.add_requested_context(Verification)
    return ae.associate("127.0.0.1", port, ae_title=NODE_AET)


def test_associations_per_peer_are_bounded(tmp_path):
    config = write_config(tmp_path / "node", node={"max_associations_per_peer": 1},
                          peers={"a": peer("PEERA", "store"), "b": peer("PEERB", "store")})
    with InProcessNode(config) as node:
        held = _associate(node.port, "PEERA")
        try:
            assert held.is_established
            second = _associate(node.port, "PEERA")
            assert second.is_rejected
            assert (second.acceptor.primitive.result, second.acceptor.primitive.diagnostic) \
                == (0x02, 0x02)  # transient, local limit exceeded
            other = _associate(node.port, "PEERB")  # another peer still gets in
            assert other.is_established
            other.release()
        finally:
            held.release()
        again = _associate(node.port, "PEERA")  # the slot came back on release
        assert again.is_established
        again.release()


def test_an_idle_association_is_closed_after_the_network_timeout(tmp_path):
    config = write_config(tmp_path / "node", node={"network_timeout": 1})
    with InProcessNode(config) as node:
        assoc = _associate(node.port, TEST_AET)
        assert assoc.is_established
        deadline = time.monotonic() + 10
        while assoc.is_established and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not assoc.is_established
        assert node.echo() == 0
