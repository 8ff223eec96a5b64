"""Bad input against the node and its peers: what each answers, how fast, and what it costs
the receiving process in memory.

Each case runs against a fresh server (``lamina serve`` with one worker, DCMTK's
``storescp`` and Orthanc where installed), so one case's memory peak or crash cannot
colour the next. Memory is the receiving process's peak RSS growth: VmHWM from
/proc/PID/status after the case minus VmHWM after a warm-up C-ECHO (for Lamina, its
receiving worker processes, read from its log). A server that died during a case
says so. Prints a table; asserts nothing.

    .venv/bin/python -m benchmarks.robustness [--bomb-mb 1024] [--only CASE ...]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import ssl
import struct
import subprocess
import tempfile
import threading
import time
import urllib.request
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from node.dimse.sender import AssociationFailed, StoreAssociation, frame, store_command
from node.dimse.tls import client_context
from tests.harness import (
    TEST_AET,
    InProcessNode,
    ProcessNode,
    as_file,
    free_port,
    process_status,
    send,
    stop_process,
    wait_port,
    write_config,
)
from tests.test_dimse_tls import _issue
from tests.test_ingest_deflate import write_bomb
from tests.test_ingest_validate import _nested, _split, encoded, good_slice

#: How long a case waits for an answer before it calls the server silent.
PATIENCE = 15.0
#: pynetdicom's default DIMSE timeout: a C-STORE unanswered this long is given up.
DIMSE_TIMEOUT = 30.0
#: The most a case may take; past it the server is stopped and the case reported unanswered.
CASE_LIMIT = 60.0
#: How long the idle and stalled-TLS cases watch a silent connection (past the 30 s ACSE
#: timeout Lamina bounds both by).
IDLE_WATCH = 35.0


@dataclass
class Server:
    """A running server: its name, port, called AE, and how to find its receiving PIDs."""

    name: str
    port: int
    called: str
    pids: Callable[[], set[int]]
    tls: ssl.SSLContext | None = None
    alive: Callable[[], bool] = lambda: True


@dataclass
class Row:
    case: str
    server: str
    answer: str
    seconds: float
    rss_mb: float | None
    notes: list[str] = field(default_factory=list)


# --- servers ------------------------------------------------------------------------------


@contextmanager
def lamina(work: Path) -> Iterator[Server]:
    node = ProcessNode(write_config(work / "lamina", node={"workers": 1})).start()
    try:
        yield Server("lamina", node.port, "LAMINA", lambda: node.worker_pids() | {node.pid},
                     alive=lambda: node.proc is not None and node.proc.poll() is None)
    finally:
        node.stop()


@contextmanager
def lamina_tls(work: Path) -> Iterator[Server]:
    """A TLS-only node, in this process (the harness's readiness check of a subprocess
    node speaks plain DICOM); its memory is this process's."""
    pki = work / "pki"
    pki.mkdir(parents=True)
    ca_key, ca = _issue(pki, "ca", "Bench CA", None, ca=True)
    _issue(pki, "server", "localhost", (ca_key, ca.subject), server=True)
    config = write_config(work / "lamina", tls={
        "mode": "only", "cert": str(pki / "server.pem"), "key": str(pki / "server.key")})
    with InProcessNode(config) as node:
        yield Server("lamina", node.port, "LAMINA", lambda: {os.getpid()},
                     client_context(str(pki / "ca.pem")))


@contextmanager
def storescp(work: Path) -> Iterator[Server]:
    port = free_port()
    out = work / "storescp"
    out.mkdir(exist_ok=True)
    # One process (no --fork): the process that receives is the one measured. +xa accepts
    # every transfer syntax DCMTK knows, deflate included.
    proc = subprocess.Popen(["storescp", "+xa", "-od", str(out), "-aet", "STORESCP", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "TCP_NODELAY": "1"})
    try:
        wait_port(port)
        yield Server("storescp", port, "STORESCP", lambda: {proc.pid},
                     alive=lambda: proc.poll() is None)
    finally:
        stop_process(proc)


@contextmanager
def orthanc(work: Path) -> Iterator[Server]:
    port, http = free_port(), free_port()
    cfg = work / "orthanc.json"
    cfg.write_text(json.dumps({
        "Name": "robustness", "DicomAet": "ORTHANC", "DicomPort": port, "HttpPort": http,
        "StorageDirectory": str(work / "orthanc-db"), "IndexDirectory": str(work / "orthanc-db"),
        "DicomCheckCalledAet": False, "DicomAlwaysAllowStore": True, "DicomAlwaysAllowEcho": True,
        "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "Plugins": [],
    }))
    proc = subprocess.Popen(["Orthanc", str(cfg)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "TCP_NODELAY": "1"})
    try:
        wait_port(port)
        wait_port(http)  # its HTTP server comes up after its DICOM one
        urllib.request.urlopen(f"http://127.0.0.1:{http}/system", timeout=10).read()
        yield Server("orthanc", port, "ORTHANC", lambda: {proc.pid},
                     alive=lambda: proc.poll() is None)
    finally:
        stop_process(proc, grace=10)  # Orthanc waits for a receive in progress


# --- measuring ----------------------------------------------------------------------------


def hwm_kb(pid: int) -> int:
    """VmHWM (peak resident set, kB) of a process; 0 once it is gone."""
    try:
        return process_status(pid)["VmHWM"]
    except OSError:
        return 0


def echo(server: Server) -> str:
    ae = AE(ae_title=TEST_AET)
    ae.add_requested_context(Verification)
    kwargs = {"tls_args": (server.tls, "localhost")} if server.tls else {}
    assoc = ae.associate("127.0.0.1", server.port, ae_title=server.called, **kwargs)
    if not assoc.is_established:
        return "no association"
    try:
        rsp = assoc.send_c_echo()
        return f"0x{int(rsp.Status):04X}" if "Status" in rsp else "no answer"
    finally:
        assoc.release()


def pdu_answer(data: bytes) -> str:
    """What the first bytes a server sent back mean."""
    if not data and isinstance(data, Silent):
        return f"no answer, connection held open ({PATIENCE:.0f} s)"
    if not data:
        return "closed, no PDU"
    kind = data[0]
    if kind == 0x07 and len(data) >= 10:
        return f"A-ABORT (source {data[8]}, reason {data[9]})"
    if kind == 0x03 and len(data) >= 10:
        return f"A-ASSOCIATE-RJ ({data[7]}, {data[8]}, {data[9]})"
    if kind == 0x04:
        status = data.find(b"\x00\x00\x00\x09\x02\x00\x00\x00")
        if status >= 0 and len(data) >= status + 10:
            code = struct.unpack("<H", data[status + 8:status + 10])[0]
            return f"P-DATA: C-STORE-RSP 0x{code:04X}"
        return "P-DATA"
    return f"PDU type 0x{kind:02X}"


class Silent(bytes):
    """What a server sent before ``timeout`` passed with the connection still open."""


def read_answer(sock: socket.socket, timeout: float = PATIENCE) -> bytes:
    """What the server sends until it closes the connection; a :class:`Silent` when
    ``timeout`` passes first."""
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except TimeoutError:
        return Silent(data)
    except (ConnectionResetError, ssl.SSLError):
        pass
    return data


def raw(server: Server, payload: bytes) -> str:
    with socket.create_connection(("127.0.0.1", server.port), timeout=PATIENCE) as sock:
        with contextlib.suppress(OSError):  # the server may close while we still send
            sock.sendall(payload)
        return pdu_answer(read_answer(sock))


def store(server: Server, path: Path) -> str:
    start = time.monotonic()
    try:
        [(code, comment)] = send(server.port, [path], called=server.called)
    except ConnectionError:
        return "association not established"
    if code < 0 and time.monotonic() - start >= DIMSE_TIMEOUT:
        return f"no answer within the SCU's {DIMSE_TIMEOUT:.0f} s DIMSE timeout"
    if code < 0:
        return "association lost (abort or close)"
    return f"0x{code:04X}" + (f" {comment}" if comment else "")


# --- the cases ----------------------------------------------------------------------------


def slice_with(work: Path, name: str, extra: bytes) -> Path:
    """A good 16×16 CT slice with ``extra`` encoded elements just before its pixel data."""
    head, body = _split(encoded(good_slice(f"robustness-{name}")))
    pixels = body.index(b"\xe0\x7f\x10\x00OW")
    path = work / f"{name}.dcm"
    path.write_bytes(head + body[:pixels] + extra + body[pixels:])
    return path


def case_files(work: Path, bomb_mb: int) -> dict[str, Path]:
    files = {"deflate bomb": write_bomb(work / "bomb.dcm", bomb_mb << 20),
             "nested sequence x10000": slice_with(work, "nested", _nested(10_000))}
    ds = good_slice("robustness-traversal")
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = "../../etc/x"
    files["path-traversal UID"] = work / "traversal.dcm"
    files["path-traversal UID"].write_bytes(as_file(ds))
    size = 160 << 20  # above Lamina's default max_element_mb (128)
    files["over-long element"] = slice_with(
        work, "long-element", b"\x40\x00\x60\xa1UT\x00\x00" + struct.pack("<I", size)
        + b"x" * size)
    return files


def oversized_pdata(server: Server, path: Path) -> str:
    """A C-STORE whose data set comes in one P-DATA-TF of 1 MiB, whatever the server's
    advertised maximum."""
    ds = dcmread(path)
    try:
        assoc = StoreAssociation.open(TEST_AET, "127.0.0.1", server.port, server.called,
                                      [(str(ds.SOPClassUID), ExplicitVRLittleEndian)],
                                      16384, PATIENCE, PATIENCE)
    except AssociationFailed as exc:
        return f"association failed: {exc}"
    with assoc.sock as sock:
        cid = assoc.context_id(str(ds.SOPClassUID), ExplicitVRLittleEndian)
        body = as_file(ds)
        dataset = body[body.index(b"DICM") + 4:]
        dataset = dataset + b"\0" * max(0, (1 << 20) - len(dataset))
        command = store_command(str(ds.SOPClassUID), str(ds.SOPInstanceUID), 1)
        sock.sendall(frame(command, cid, max(assoc.peer_max_pdu, 16384) - 6, True, True))
        with contextlib.suppress(OSError):
            sock.sendall(frame(dataset[:1 << 20], cid, 1 << 21, False, True))
        return (pdu_answer(read_answer(sock))
                + f" (advertised max PDU {assoc.peer_max_pdu // 1024} KiB)")


def bytes_before_associate(server: Server, megabytes: int = 256) -> str:
    """An A-ASSOCIATE-RQ header announcing ``megabytes`` and that many bytes streamed."""
    size = megabytes << 20
    with socket.create_connection(("127.0.0.1", server.port), timeout=PATIENCE) as sock:
        got: list[bytes] = []
        reader = threading.Thread(target=lambda: got.append(read_answer(sock)))
        reader.start()
        chunk = b"\0" * (1 << 20)
        with contextlib.suppress(OSError):
            sock.sendall(struct.pack(">BBL", 0x01, 0, size))
            for _ in range(megabytes):
                sock.sendall(chunk)
        reader.join(PATIENCE + 5)
        return pdu_answer(got[0] if got else b"")


def idle(server: Server) -> str:
    """A connection that sends nothing: does a C-ECHO still get through, and when does the
    server close the silent one?"""
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        start = time.monotonic()
        result = echo(server)
        took = time.monotonic() - start
        closed = read_answer(sock, IDLE_WATCH)
        waited = time.monotonic() - start
        end = (f"still open at {IDLE_WATCH:.0f} s" if isinstance(closed, Silent)
               else f"closed at {waited:.1f} s: {pdu_answer(closed)}")
        return f"C-ECHO meanwhile {result} in {took * 1000:.0f} ms; idle one {end}"


def stalled_tls(server: Server) -> str:
    """Three connections that never start their TLS handshake, then a TLS C-ECHO; and when
    the server gives up on the silent ones."""
    socks = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(3)]
    try:
        start = time.monotonic()
        result = echo(server)
        took = time.monotonic() - start
        silent = isinstance(read_answer(socks[0], IDLE_WATCH), Silent)
        waited = time.monotonic() - start
        end = f"still open at {IDLE_WATCH:.0f} s" if silent else f"closed at {waited:.1f} s"
        return f"TLS C-ECHO meanwhile {result} in {took * 1000:.0f} ms; silent ones {end}"
    finally:
        for sock in socks:
            sock.close()


def cases(files: dict[str, Path]) -> dict[str, Callable[[Server], str]]:
    return {
        "deflate bomb": lambda s: store(s, files["deflate bomb"]),
        "oversized P-DATA (1 MiB)": lambda s: oversized_pdata(s, files["path-traversal UID"]),
        "unknown PDU type 0x53": lambda s: raw(s, struct.pack(">BBL", 0x53, 0, 4) + b"\0" * 4),
        "256 MiB before A-ASSOCIATE-RQ": bytes_before_associate,
        "A-ASSOCIATE-RQ length 2 GiB": lambda s: raw(s, struct.pack(">BBL", 1, 0, 0x7FFF_FFFF)),
        "nested sequence x10000": lambda s: store(s, files["nested sequence x10000"]),
        "path-traversal UID": lambda s: store(s, files["path-traversal UID"]),
        "over-long element (160 MiB)": lambda s: store(s, files["over-long element"]),
        "idle connection": idle,
    }


def run_case(name: str, case: Callable[[Server], str], server: Server) -> Row:
    warm = echo(server)
    pids = server.pids()
    before = {pid: hwm_kb(pid) for pid in pids}
    start = time.monotonic()
    answers: list[str] = []

    def attempt() -> None:
        try:
            answers.append(case(server))
        except Exception as exc:  # a benchmark reports what happened; it does not stop
            answers.append(f"client error: {type(exc).__name__}: {exc}")

    # A sender blocked on a server that stopped reading has no timeout of its own: the
    # case gets CASE_LIMIT, then the server is stopped (which frees the sender).
    worker = threading.Thread(target=attempt, daemon=True)
    worker.start()
    worker.join(CASE_LIMIT)
    seconds = time.monotonic() - start
    after = {pid: hwm_kb(pid) for pid in pids}
    notes = [] if warm == "0x0000" else [f"warm-up echo {warm}"]
    if not answers:
        rss = sum(max(0, after[p] - before[p]) for p in pids) / 1024
        return Row(name, server.name, f"no answer within {CASE_LIMIT:.0f} s", seconds, rss,
                   [*notes, "server stopped to end the case"])
    answer = answers[0]
    if not server.alive() or not all(after.values()):
        notes.append("SERVER DIED")
        rss = None
    else:
        rss = sum(max(0, after[p] - before[p]) for p in pids) / 1024
        notes.append(f"echo after: {echo(server)}")
    return Row(name, server.name, answer, seconds, rss, notes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bomb-mb", type=int, default=1024,
                        help="inflated size of the deflate bomb (Lamina's cap: 512 MB)")
    parser.add_argument("--only", nargs="*", help="run only these cases (names as printed)")
    parser.add_argument("--peers", nargs="*", default=["storescp", "orthanc"])
    args = parser.parse_args()
    # pydicom warns about the hostile values it reads, quoting them: noise here.
    warnings.simplefilter("ignore", UserWarning)
    servers: dict[str, Callable[[Path], contextlib.AbstractContextManager[Server]]] = {
        "lamina": lamina}
    if "storescp" in args.peers and shutil.which("storescp"):
        servers["storescp"] = storescp
    if "orthanc" in args.peers and shutil.which("Orthanc"):
        servers["orthanc"] = orthanc
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="lamina-bench-robust-") as tmp:
        root = Path(tmp)
        files = case_files(root, args.bomb_mb)
        todo = {k: v for k, v in cases(files).items() if not args.only or k in args.only}
        for n, (name, case) in enumerate(todo.items()):
            for server_name, start in servers.items():
                work = root / f"{n}-{server_name}"
                work.mkdir()
                with start(work) as server:
                    rows.append(run_case(name, case, server))
                print_row(rows[-1], flush=True)
        if not args.only or "stalled TLS handshake" in args.only:
            with lamina_tls(root / "tls") as server:
                rows.append(run_case("stalled TLS handshake", stalled_tls, server))
            print_row(rows[-1], flush=True)
    print()
    print(f"{'case':<32} {'server':<9} {'time s':>7} {'peak RSS +MB':>12}  answer")
    for row in rows:
        rss = "died" if row.rss_mb is None else f"{row.rss_mb:.1f}"
        print(f"{row.case:<32} {row.server:<9} {row.seconds:7.2f} {rss:>12}  {row.answer}"
              + (f"  [{'; '.join(row.notes)}]" if row.notes else ""))


def print_row(row: Row, flush: bool = False) -> None:
    rss = "died" if row.rss_mb is None else f"+{row.rss_mb:.1f} MB"
    print(f"  {row.case} / {row.server}: {row.answer} ({row.seconds:.2f} s, {rss})",
          flush=flush)


if __name__ == "__main__":
    main()
