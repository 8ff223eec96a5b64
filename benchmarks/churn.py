"""Association churn: associate / C-ECHO / release, over and over, one cycle at a time.

DCMTK's storescp, Orthanc and ``lamina serve`` in the same run, each driven by
two clients: DCMTK ``echoscu`` (one process per cycle, TCP_NODELAY=1, as a
modality would) and a pynetdicom SCU looping in this process (the cost of the
association itself, without process start-up). The servers run side by side and
take turns: each client's cycles go in rounds, every server once per round. Prints
the median cycles/s, its ratio to Orthanc's with each round's own ratio beside it,
and the server's CPU milliseconds per cycle (every process under it, from /proc).

A fourth row, ``python framing only``, is :mod:`benchmarks.framed_echo`: a Python
server that frames the PDUs itself on pynetdicom's codecs and does nothing else (no
peer check, audit or log). It is not a node: it shows what Python itself costs on this
machine with each client. The node's echo and storage associations are framed the same
way (:mod:`node.dimse.framed`), with admission, audit and logs besides.

A third client, ``storescu (1 slice)``, opens an association per instance, as some
modalities and PACS send: DCMTK ``storescu`` with its default proposal (128
presentation contexts, every storage SOP class it knows with three transfer
syntaxes each), one 512x512 CT slice, release. It is the cost of negotiating a large
proposal, which C-ECHO cycles do not show. It sends the same slice each time (after
the first, a resend to every server) and runs fewer cycles (``--store-cycles``); the
framing-only server cannot store and is left out.

Then each server's own share of a cycle: a client on bare sockets sends the same
A-ASSOCIATE-RQ bytes as pynetdicom's SCU, one C-ECHO-RQ and an A-RELEASE-RQ, and
times each answer (median milliseconds): what the server adds to a cycle, without
either client's own time, which is most of the cycles/s figures. Last, the pynetdicom
client's own calls per server (:func:`pynetdicom_phases`): its release waits 10 ms or
not by a race between its own threads, which is most of that row's differences.

    .venv/bin/python -m benchmarks.churn [--cycles 1000] [--store-cycles 150] [--workers 1]
                                         [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from pynetdicom import AE
from pynetdicom.sop_class import Verification

from benchmarks.ingest import Server, cpu_seconds, lamina, peers
from node.phantom import Phantom
from tests.harness import TEST_AET, echo_request, free_port, read_pdu, stop_process, wait_port

ROOT = Path(__file__).resolve().parent.parent


def echoscu_cycles(called: str, port: int, cycles: int) -> None:
    env = {**os.environ, "TCP_NODELAY": "1"}
    for _ in range(cycles):
        subprocess.run(["echoscu", "-aet", TEST_AET, "-aec", called, "127.0.0.1", str(port)],
                       env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def pynetdicom_cycles(called: str, port: int, cycles: int) -> None:
    ae = AE(ae_title=TEST_AET)
    ae.add_requested_context(Verification)
    for _ in range(cycles):
        assoc = ae.associate("127.0.0.1", port, ae_title=called)
        if not assoc.is_established:
            raise RuntimeError(f"{called}: association refused")
        status = assoc.send_c_echo()
        assoc.release()
        if status is None or status.Status != 0:
            raise RuntimeError(f"{called}: C-ECHO failed")


#: A release the pynetdicom SCU sees end sooner than this skipped its 10 ms wait.
_QUICK_RELEASE_MS = 5.0


def pynetdicom_phases(called: str, port: int, cycles: int) -> tuple[float, float, float, float]:
    """Median milliseconds of each call the pynetdicom SCU makes in a cycle (associate,
    C-ECHO, release), and the share of releases that returned without its 10 ms wait.

    Why: its ``Association.release()`` ends in ``kill()``, which sleeps 10 ms and looks
    again unless its DUL thread has already closed the connection when it first looks.
    Which thread gets there first is a race between the client's own two threads, so
    half a cycle's time, and most of the difference between servers in the pynetdicom
    row, is whether that sleep happened: a server's answer time moves it only through
    the race. What the server does right after its A-RELEASE-RP moves it more: closing
    the connection at once and logging the release (Lamina until issue 15's sixth
    session) left 17-19 % of releases quick; waiting for the requestor to close, as
    PS3.8 (Sta13) and pynetdicom's own acceptor do, 39-46 %.
    """
    ae = AE(ae_title=TEST_AET)
    ae.add_requested_context(Verification)
    times = []
    for _ in range(cycles):
        start = time.perf_counter()
        assoc = ae.associate("127.0.0.1", port, ae_title=called)
        if not assoc.is_established:
            raise RuntimeError(f"{called}: association refused")
        associated = time.perf_counter()
        assoc.send_c_echo()
        echoed = time.perf_counter()
        assoc.release()
        released = time.perf_counter()
        times.append((associated - start, echoed - associated, released - echoed))
    associate, echo, release = (statistics.median(column) * 1000
                                for column in zip(*times, strict=True))
    quick = sum(1 for t in times if t[2] * 1000 < _QUICK_RELEASE_MS) / len(times)
    return associate, echo, release, quick


Client = Callable[[str, int, int], None]


def storescu_cycles(slice_file: Path) -> Client:
    """Cycles of an association per instance: storescu's default proposal, ``slice_file``."""
    def cycles_(called: str, port: int, cycles: int) -> None:
        env = {**os.environ, "TCP_NODELAY": "1"}
        for _ in range(cycles):
            subprocess.run(["storescu", "-aet", TEST_AET, "-aec", called, "127.0.0.1",
                            str(port), str(slice_file)], env=env, check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    return cycles_


@contextmanager
def framed_echo(work: Path) -> Iterator[tuple[str, int, list[int]]]:
    """:mod:`benchmarks.framed_echo` in a process of its own, stopped by PID."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.framed_echo", str(port)],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        yield "ANY", port, [proc.pid]
    finally:
        stop_process(proc)


#: A-RELEASE-RQ (PS3.8 9.3.6): type 5, length 4, four reserved bytes.
RELEASE_RQ = bytes.fromhex("05000000000400000000")


def association_request(called: str) -> bytes:
    """The A-ASSOCIATE-RQ pynetdicom's SCU sends (Verification only), as it goes on the
    wire: caught by a socket that reads it and hangs up."""
    listener = socket.create_server(("127.0.0.1", 0))
    caught: list[bytes] = []

    def catch() -> None:
        conn, _ = listener.accept()
        with conn:
            caught.append(read_pdu(conn))

    thread = threading.Thread(target=catch)
    thread.start()
    ae = AE(ae_title=TEST_AET)
    ae.add_requested_context(Verification)
    ae.acse_timeout = 1
    ae.associate("127.0.0.1", listener.getsockname()[1], ae_title=called)
    thread.join()
    listener.close()
    return caught[0]


def phase_latency(called: str, port: int, cycles: int) -> tuple[float, float, float]:
    """Median milliseconds from sending each of A-ASSOCIATE-RQ, C-ECHO-RQ and
    A-RELEASE-RQ to having its answer (connecting counted in the first)."""
    request, echo = association_request(called), echo_request()
    times: list[tuple[float, float, float]] = []
    for _ in range(cycles):
        start = time.perf_counter()
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.sendall(request)
            if read_pdu(sock)[0] != 0x02:
                raise RuntimeError(f"{called}: association not accepted")
            accepted = time.perf_counter()
            sock.sendall(echo)
            if read_pdu(sock)[0] != 0x04:
                raise RuntimeError(f"{called}: no C-ECHO response")
            echoed = time.perf_counter()
            sock.sendall(RELEASE_RQ)
            if read_pdu(sock)[0] != 0x06:
                raise RuntimeError(f"{called}: no A-RELEASE-RP")
            released = time.perf_counter()
        times.append((accepted - start, echoed - accepted, released - echoed))
    associate, echoing, release = (statistics.median(column) * 1000 for column in zip(*times, strict=True))
    return associate, echoing, release


def rounds(servers: dict[str, Server], client: Client, cycles: int, repeats: int
           ) -> dict[str, list[tuple[float, float]]]:
    """Each server's cycles/s and CPU ms per cycle, in ``repeats`` rounds of ``cycles``
    cycles, every server once per round (all started first, each warmed by 20 cycles):
    this machine's speed drifts by 15 % within minutes, and a drift then reaches every
    server's rounds alike instead of one server's whole run."""
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in servers}
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        started = {}
        for name, server in servers.items():
            work = Path(tmp) / name.replace(" ", "-")
            work.mkdir()
            started[name] = stack.enter_context(server(work))
            client(started[name][0], started[name][1], 20)
        for _ in range(repeats):
            for name, (called, port, roots) in started.items():
                before = cpu_seconds(roots)
                start = time.perf_counter()
                client(called, port, cycles)
                seconds = time.perf_counter() - start
                runs[name].append((cycles / seconds, (cpu_seconds(roots) - before) * 1000 / cycles))
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=1000)
    parser.add_argument("--store-cycles", type=int, default=150,
                        help="cycles of the storescu (1 slice) client")
    parser.add_argument("--workers", type=int, default=1, help="lamina receiving processes")
    parser.add_argument("--repeats", type=int, default=3, help="rounds per client")
    args = parser.parse_args()
    if not shutil.which("echoscu") or not shutil.which("storescp"):
        raise SystemExit("DCMTK not installed (apt-get install dcmtk)")
    servers = peers()
    servers[f"lamina ({args.workers} worker{'s' if args.workers > 1 else ''})"] = \
        lamina(args.workers)
    servers["python framing only"] = framed_echo
    slice_dir = tempfile.TemporaryDirectory(prefix="lamina-churn-")
    slice_file = Phantom(seed="churn", slices_count=1).write(Path(slice_dir.name))[0]
    storing = {name: server for name, server in servers.items() if server is not framed_echo}
    # (client, servers, cycles per round)
    clients: dict[str, tuple[Client, dict[str, Server], int]] = {
        "echoscu": (echoscu_cycles, servers, max(1, args.cycles // args.repeats)),
        "pynetdicom": (pynetdicom_cycles, servers, max(1, args.cycles // args.repeats)),
        "storescu (1 slice)": (storescu_cycles(slice_file), storing,
                               max(1, args.store_cycles // args.repeats))}
    print(f"{args.cycles} associate/C-ECHO/release cycles per client and server"
          f" ({args.store_cycles} associate/C-STORE/release for storescu), in {args.repeats}"
          f" rounds; load: {os.getloadavg()[0]:.2f}")
    print(f"{'client':<19} {'server':<20} {'cycles/s':>9} {'× orthanc':>10} {'CPU ms/cycle':>13}"
          "  per round × orthanc")
    for client_name, (client, targets, per_round) in clients.items():
        runs = rounds(targets, client, per_round, args.repeats)
        base = runs.get("orthanc")
        for name, results in runs.items():
            rate = statistics.median(r[0] for r in results)
            cpu = statistics.median(r[1] for r in results)
            ratio = same_round = "-"
            if base:
                ratio = f"{rate / statistics.median(r[0] for r in base):.2f}"
                same_round = ", ".join(f"{a[0] / b[0]:.2f}"
                                       for a, b in zip(results, base, strict=True))
            print(f"{client_name:<19} {name:<20} {rate:>9.1f} {ratio:>10} {cpu:>13.1f}"
                  f"  {same_round}")
    print(f"\nthe server's answer, median ms over {min(args.cycles, 300)} bare-socket cycles")
    print(f"{'server':<20} {'associate→AC':>13} {'C-ECHO→RSP':>11} {'release→RP':>11}")
    for name, server in servers.items():
        with tempfile.TemporaryDirectory() as tmp, server(Path(tmp)) as (called, port, _):
            phase_latency(called, port, 20)  # warm-up
            phases = phase_latency(called, port, min(args.cycles, 300))
        print(f"{name:<20} " + " ".join(f"{ms:>{w}.3f}" for ms, w in zip(phases, (13, 11, 11),
                                                                          strict=True)))
    print(f"\nthe pynetdicom client's own calls, median ms over {min(args.cycles, 300)} cycles,"
          f" and its releases without the 10 ms wait (pynetdicom_phases)")
    print(f"{'server':<20} {'associate':>10} {'C-ECHO':>8} {'release':>8} {'quick releases':>15}")
    for name, server in servers.items():
        with tempfile.TemporaryDirectory() as tmp, server(Path(tmp)) as (called, port, _):
            pynetdicom_phases(called, port, 20)  # warm-up
            *calls, quick = pynetdicom_phases(called, port, min(args.cycles, 300))
        print(f"{name:<20} " + " ".join(f"{ms:>{w}.2f}" for ms, w in zip(calls, (10, 8, 8),
                                                                         strict=True))
              + f" {100 * quick:>14.0f}%")
    print(f"load after: {os.getloadavg()[0]:.2f}")
    slice_dir.cleanup()


if __name__ == "__main__":
    main()
