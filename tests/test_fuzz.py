"""Property-based fuzzing of the PDU and data set parsing paths (hypothesis).

A short run in ``make test`` (a few dozen examples each); ``make fuzz`` runs the
same properties long (``LAMINA_FUZZ_EXAMPLES``, default 2000). Every crash found
becomes a regression test beside the ones in test_dimse_guard / test_dimse_bounds.

Properties: any bytes sent before or instead of an association end with the
connection closed (never a hung worker), and the node still answers C-ECHO; any
mutation of a valid file through the ingest service ends in a DIMSE status, never
an exception.
"""

from __future__ import annotations

import errno
import os
import socket
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from node.dimse.guard import KNOWN_TYPES
from node.ingest.types import Source
from tests.harness import TEST_AET, InProcessNode, peer, write_config
from tests.test_ingest_validate import encoded, good_slice

EXAMPLES = int(os.environ.get("LAMINA_FUZZ_EXAMPLES", "40"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize="LAMINA_FUZZ_EXAMPLES" not in
                os.environ, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                   HealthCheck.too_slow])

#: Every status the C-STORE path may answer (PS3.4 B.2.3 and ours).
STORE_STATUSES = {0x0000, 0xA700, 0xA900, 0xC000, 0x0111, 0x0124, 0xB000, 0xB006, 0xB007}


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    config = write_config(tmp_path_factory.mktemp("fuzz") / "node",
                          node={"acse_timeout": 1, "network_timeout": 2, "dimse_timeout": 2,
                                "max_pdu": 16384},
                          peers={"tests": peer(TEST_AET, "store", route="deidentified")})
    with InProcessNode(config) as n:
        yield n


def _closed_by_node(port: int, payload: bytes) -> bool:
    """Send ``payload``, then read until the node closes (True) or 5 s pass (False)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        try:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)  # we send nothing more: the node must finish
            while sock.recv(65536):
                pass
        except TimeoutError:
            return False
        except (ConnectionResetError, BrokenPipeError):
            return True
        except OSError as exc:  # ENOTCONN: the node aborted before our own shutdown
            if exc.errno != errno.ENOTCONN:
                raise
            return True
    return True


pdu_headers = st.builds(
    lambda kind, length, body: struct.pack(">BBL", kind, 0, length) + body,
    st.one_of(st.sampled_from(sorted(KNOWN_TYPES)), st.integers(0, 255)),
    st.one_of(st.integers(0, 512), st.integers(0, 2**32 - 1)),
    st.binary(max_size=512))


@FUZZ
@given(payload=st.one_of(pdu_headers, st.binary(max_size=1024),
                         st.lists(pdu_headers, min_size=2, max_size=4).map(b"".join)))
def test_any_bytes_before_an_association_end_cleanly(node, payload):
    assert _closed_by_node(node.port, payload)


@pytest.fixture(scope="module")
def valid_file() -> bytes:
    return encoded(good_slice("fuzz"))


mutations = st.lists(st.tuples(st.integers(0, 4000), st.integers(0, 255)), min_size=1,
                     max_size=8)


@FUZZ
@given(changes=mutations, cut=st.one_of(st.none(), st.integers(132, 4000)))
def test_any_mutated_file_gets_a_status(node, valid_file, changes, cut):
    data = bytearray(valid_file)
    for at, value in changes:
        data[at % len(data)] = value
    if cut is not None:
        data = data[:cut]
    source = Source(TEST_AET, "127.0.0.1", "fuzz", "deidentified", True)
    result = node.ctx.ingest.ingest_bytes(bytes(data), source)
    assert result.outcome.status.code in STORE_STATUSES, result


def test_the_node_still_serves_after_the_fuzzing(node):
    assert node.echo() == 0
