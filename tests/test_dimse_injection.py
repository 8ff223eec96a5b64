"""Path and command injection through UIDs and AE titles, over real associations.

UIDs and AE titles never become paths or shell words (DESIGN.md, "Untrusted input is
bounded"): a UID like ``../../x`` or ``$(touch x)`` is refused with a DIMSE status that
says why, an AE title with ``../`` or shell metacharacters gets the association
rejected, and nothing is written outside the data folder. The test runs with its
working directory in a canary folder, and each payload names a file in it, so a
relative or absolute write, or a shell that ran, would leave a trace there.
"""

from __future__ import annotations

import json
import os
import socket
import struct
from pathlib import Path

import pytest

from node import status
from tests.harness import NODE_AET, TEST_AET, InProcessNode, write_config
from tests.test_ingest_validate import good_slice

UID_FIELDS = ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID")
REFUSED = {status.DOES_NOT_MATCH_SOP_CLASS.code, status.CANNOT_UNDERSTAND.code}


def uid_payloads(canary: Path) -> dict[str, str]:
    """Hostile UIDs, each aimed at a file in ``canary``."""
    return {
        "dotdot": "../../canary/x",
        "absolute": f"{canary}/x",
        "semicolon": f"1.2.3;touch {canary}/x",
        "substitution": f"$(touch {canary}/x)",
        "backticks": f"1.2.`touch {canary}/x`",
        "nul": "1.2.3\x00/../x",
        "newline": "1.2.3\n../x",
        "backslash": "..\\..\\x",
        "overlong": "1." + "9" * 200,
    }


def tree(root: Path) -> set[str]:
    """Every path under ``root``, relative to it."""
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.fixture
def setting(tmp_path, monkeypatch):
    """A node, a canary folder as the working directory, and the trees before any send."""
    canary = tmp_path / "canary"
    canary.mkdir()
    (canary / "keep").write_text("untouched")
    monkeypatch.chdir(canary)
    with InProcessNode(write_config(tmp_path / "node")) as node:
        yield node, canary, tree(tmp_path)


def assert_nothing_escaped(node: InProcessNode, canary: Path, before: set[str]) -> None:
    """New files only inside the data folder, under names the node made (hex, digits);
    the canary folder exactly as it was; the log still one JSON object per line."""
    root = canary.parent
    new = tree(root) - before
    data = str(node.data.relative_to(root))
    outside = {p for p in new if p != "node/node.log" and not p.startswith(data + os.sep)}
    assert not outside, f"written outside the data folder: {sorted(outside)}"
    assert tree(canary) == {"keep"}
    for path in new:
        assert all(c.isascii() and (c.isalnum() or c in "._-") for c in Path(path).name), path
    for line in node.log_path.read_text().splitlines():
        json.loads(line)  # a newline in a UID or AE title did not split a log line


@pytest.mark.parametrize("field", UID_FIELDS)
def test_hostile_uids_are_refused_with_a_reason(setting, field):
    node, canary, before = setting
    for name, uid in uid_payloads(canary).items():
        ds = good_slice(f"inject-{field}-{name}")
        setattr(ds, field, uid)
        # The command's Affected SOP Instance UID comes from the file meta; pynetdicom's
        # SCU refuses to put an over-long or multi-valued UID there, so for those the meta
        # keeps a good one and the hostile UID travels in the data set only.
        if field == "SOPInstanceUID" and len(uid) <= 64 and "\\" not in uid:
            ds.file_meta.MediaStorageSOPInstanceUID = uid
        [(code, comment)] = node.store([ds])
        assert code in REFUSED, (name, hex(code), comment)
        assert "bad UID" in comment or "does not match" in comment, (name, comment)
    node.drain()
    assert node.rows("SELECT COUNT(*) FROM instance") == [(0,)]
    assert node.echo() == 0
    assert_nothing_escaped(node, canary, before)


def associate_rq(calling: bytes, called: bytes) -> bytes:
    """A raw A-ASSOCIATE-RQ for Verification with AE title fields as given.

    Written by hand because every SCU library (pynetdicom included) refuses to encode
    the AE titles under test; the bytes follow PS3.8 9.3.2.
    """
    def item(kind: int, body: bytes) -> bytes:
        return struct.pack(">BBH", kind, 0, len(body)) + body

    context = item(0x20, b"\x01\x00\x00\x00" + item(0x30, b"1.2.840.10008.1.1")
                   + item(0x40, b"1.2.840.10008.1.2"))
    body = (struct.pack(">HH", 1, 0) + called.ljust(16, b" ")[:16]
            + calling.ljust(16, b" ")[:16] + b"\0" * 32
            + item(0x10, b"1.2.840.10008.3.1.1.1") + context
            + item(0x50, item(0x51, struct.pack(">I", 16384))))
    return struct.pack(">BBL", 0x01, 0, len(body)) + body


def answer(port: int, pdu: bytes) -> bytes:
    """The first 10 bytes the node sends back to ``pdu``."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(pdu)
        got = b""
        while len(got) < 10:
            chunk = sock.recv(10 - len(got))
            if not chunk:
                break
            got += chunk
        return got


#: Titles outside PS3.5's AE repertoire (non-ASCII, a backslash, control characters): the
#: A-ASSOCIATE-RQ carrying one cannot be decoded, and the answer is an A-ABORT (PS3.8
#: 9.3.8: an invalid PDU) instead of a rejection.
UNDECODABLE = {"backslash", "nul", "newline", "latin1", "utf8"}

HOSTILE_AES = {
    "dotdot": b"../../canary/x",
    "slash": b"/canary/x",
    "semicolon": b"A;touch x",
    "substitution": b"$(touch x)",
    "backticks": b"`touch x`",
    "pipe": b"A|touch x",
    "backslash": b"..\\..\\x",
    "nul": b"TEST\x00SCU",
    "newline": b"TEST\nSCU",
    "latin1": "TÉST".encode("latin-1"),
    "utf8": "ТЕСТ".encode(),
}


def test_hostile_calling_ae_titles_are_rejected(setting):
    node, canary, before = setting
    for name, calling in HOSTILE_AES.items():
        got = answer(node.port, associate_rq(calling, NODE_AET.encode()))
        if name in UNDECODABLE:
            assert got[:1] == b"\x07", (name, got)  # A-ABORT
            continue
        # A-ASSOCIATE-RJ: rejected-permanent, service user, calling AE not recognised.
        assert got[:1] == b"\x03", (name, got)
        assert tuple(got[7:10]) == (0x01, 0x01, 0x03), (name, got)
    assert node.echo() == 0
    assert_nothing_escaped(node, canary, before)


def test_hostile_called_ae_titles_are_rejected(setting):
    node, canary, before = setting
    for name, called in HOSTILE_AES.items():
        got = answer(node.port, associate_rq(TEST_AET.encode(), called))
        if name in UNDECODABLE:
            assert got[:1] == b"\x07", (name, got)  # A-ABORT
            continue
        # A-ASSOCIATE-RJ: rejected-permanent, service user, called AE not recognised.
        assert got[:1] == b"\x03", (name, got)
        assert tuple(got[7:10]) == (0x01, 0x01, 0x07), (name, got)
    # The raw request itself is sound: with the right titles it is accepted.
    assert answer(node.port, associate_rq(TEST_AET.encode(), NODE_AET.encode()))[:1] == b"\x02"
    assert node.echo() == 0
    assert_nothing_escaped(node, canary, before)
