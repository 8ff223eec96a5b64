"""The least a Python server does for one associate / C-ECHO / release cycle: a reference
row for ``benchmarks.churn``, not a DICOM node.

It frames the PDUs itself on pynetdicom's codecs (as ``node.dimse.sender`` does on the
sending side), in a thread per connection, and does nothing else: no peer check, no
slots, no audit event, no log line, every Verification context accepted with its first
transfer syntax, anything else refused. So its cycles/s are an upper bound for a
receiving side of the node written this way (issue 15: "answering the association on
our own framing"): if this row does not reach Orthanc with a client, a rewrite of the
node's association handling in Python will not either.

    .venv/bin/python -m benchmarks.framed_echo PORT     # serves until killed
"""

from __future__ import annotations

import socket
import struct
import sys
import threading

from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    MaximumLengthNotification,
)
from pynetdicom.presentation import PresentationContext

from node.dimse.sender import VERIFICATION, command_elements, echo_response, frame
from tests.harness import read_pdu

_A_ASSOCIATE_RQ, _P_DATA_TF, _A_RELEASE_RQ = 0x01, 0x04, 0x05
_RELEASE_RP = bytes.fromhex("06000000000400000000")
_ACCEPTED, _ABSTRACT_SYNTAX_NOT_SUPPORTED = 0, 3
_MESSAGE_ID = 0x0110  # (0000,0110) in a command set
#: Implementation Class UID of this reference server (a 2.25 UUID-derived UID).
_IMPLEMENTATION_UID = "2.25.329800735698586629295641978511506172918"


def _accept(request: bytes) -> bytes:
    """The A-ASSOCIATE-AC for a request: Verification accepted, the rest refused."""
    pdu = A_ASSOCIATE_RQ()
    pdu.decode(request)
    rq = pdu.to_primitive()
    answer = A_ASSOCIATE()
    answer.application_context_name = rq.application_context_name
    answer.calling_ae_title = rq.calling_ae_title
    answer.called_ae_title = rq.called_ae_title
    answer.result, answer.result_source = 0, 1
    results = []
    for proposed in rq.presentation_context_definition_list:
        result = PresentationContext()
        result.context_id = proposed.context_id
        result.transfer_syntax = [proposed.transfer_syntax[0]]
        result.result = (_ACCEPTED if proposed.abstract_syntax == VERIFICATION
                         else _ABSTRACT_SYNTAX_NOT_SUPPORTED)
        results.append(result)
    answer.presentation_context_definition_results_list = results
    length, implementation = MaximumLengthNotification(), ImplementationClassUIDNotification()
    length.maximum_length_received = 16384
    implementation.implementation_class_uid = _IMPLEMENTATION_UID
    answer.user_information = [length, implementation]
    encoded = A_ASSOCIATE_AC()
    encoded.from_primitive(answer)
    return encoded.encode()


def serve_connection(conn: socket.socket) -> None:
    """One association: accept, answer each C-ECHO-RQ, answer the release."""
    with conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            request = read_pdu(conn)
            if request[0] != _A_ASSOCIATE_RQ:
                return
            conn.sendall(_accept(request))
            while True:
                pdu = read_pdu(conn)
                kind = pdu[0]
                if kind == _P_DATA_TF:
                    # one PDV carrying a whole command set: the C-ECHO-RQ
                    context_id, command = pdu[10], pdu[12:]
                    found = command_elements(command) or {}
                    message_id = struct.unpack("<H", found.get(_MESSAGE_ID, b"\x00\x00"))[0]
                    conn.sendall(frame(echo_response(message_id), context_id, 16000, True, True))
                elif kind == _A_RELEASE_RQ:
                    conn.sendall(_RELEASE_RP)
                    return
                else:
                    return
        except OSError:
            return


def main() -> None:
    listener = socket.create_server(("127.0.0.1", int(sys.argv[1])), backlog=64)
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=serve_connection, args=(conn,), daemon=True).start()


if __name__ == "__main__":
    main()
