"""Ingest throughput: DCMTK storescu into DCMTK storescp, Orthanc and ``lamina serve``.

Same 300-slice 512×512 CT series, same run, sender with TCP_NODELAY=1. One
warm-up, then 3 timed repeats, with 1 and with 2 concurrent senders (the
series split in halves). Every repeat receives into an empty folder, so no
server takes a shortcut for resends. Prints instances/s and the ratios.

    .venv/bin/python -m benchmarks.ingest [--slices 300] [--repeats 3] [--workers 2]
    .venv/bin/python -m benchmarks.ingest --scale-out --senders 1,2,4,8

``--scale-out`` adds Lamina on a PostgreSQL index (a throwaway cluster with fsync on,
tests/harness.py PostgresCluster): one node, and two and three nodes (one worker each,
``node.id``, one shared blob folder) behind HAProxy with config/haproxy.cfg's settings,
beside one node on SQLite with one worker.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from node.phantom import Phantom
from tests.harness import (
    REPO,
    TEST_AET,
    PostgresCluster,
    ProcessNode,
    free_port,
    postgres_bindir,
    stop_process,
    wait_port,
    write_config,
)

Server = Callable[[Path], "contextmanager[tuple[str, int]]"]


@contextmanager
def storescp(work: Path) -> Iterator[tuple[str, int]]:
    port = free_port()
    out = work / "storescp"
    out.mkdir()
    proc = subprocess.Popen(["storescp", "--fork", "-od", str(out), "-aet", "STORESCP",
                             str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "TCP_NODELAY": "1"})
    try:
        wait_port(port)
        yield "STORESCP", port
    finally:
        proc.terminate()
        proc.wait()


@contextmanager
def orthanc(work: Path) -> Iterator[tuple[str, int]]:
    port, http = free_port(), free_port()
    cfg = work / "orthanc.json"
    cfg.write_text(json.dumps({
        "Name": "bench", "DicomAet": "ORTHANC", "DicomPort": port, "HttpPort": http,
        "StorageDirectory": str(work / "orthanc-db"), "IndexDirectory": str(work / "orthanc-db"),
        "DicomCheckCalledAet": False, "DicomAlwaysAllowStore": True,
        "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "Plugins": [],
    }))
    # Orthanc's DICOM server is DCMTK: it too needs TCP_NODELAY=1 to be fair.
    proc = subprocess.Popen(["Orthanc", str(cfg)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "TCP_NODELAY": "1"})
    try:
        wait_port(port)
        urllib.request.urlopen(f"http://127.0.0.1:{http}/system", timeout=10).read()
        yield "ORTHANC", port
    finally:
        proc.terminate()
        proc.wait()


def lamina(workers: int) -> Server:
    @contextmanager
    def server(work: Path) -> Iterator[tuple[str, int]]:
        node = ProcessNode.with_workers(work / "lamina", workers).start()
        try:
            yield "LAMINA", node.port
        finally:
            node.stop()

    return server


def lamina_nodes(nodes: int, cluster: PostgresCluster | None) -> Server:
    """``nodes`` one-worker nodes on the cluster's PostgreSQL index (SQLite when None), each
    repeat on a fresh database; more than one behind HAProxy."""
    @contextmanager
    def server(work: Path) -> Iterator[tuple[str, int]]:
        index = {"backend": "postgresql", "dsn": cluster.database()} if cluster else None
        running: list[ProcessNode] = []
        proxy = None
        try:
            for k in range(1, nodes + 1):
                config = write_config(work / f"node{k}", node={"id": f"node{k}", "workers": 1},
                                      storage={"shared": str(work / "shared")}, index=index)
                if k > 1:
                    config.key_file.write_bytes((work / "node1" / "keys" / "project.key")
                                                .read_bytes())
                running.append(ProcessNode(config).start())
            if nodes == 1:
                yield "LAMINA", running[0].port
                return
            front = free_port()
            proxy = _haproxy(work, front, [n.port for n in running])
            yield "LAMINA", front
        finally:
            if proxy is not None:
                stop_process(proxy)
            for node in running:
                node.stop()

    return server


def _haproxy(work: Path, front: int, ports: list[int]) -> subprocess.Popen:
    """HAProxy with config/haproxy.cfg's settings and one server line per node."""
    lines = [line for line in (REPO / "config" / "haproxy.cfg").read_text().splitlines()
             if not line.strip().startswith("server node")]
    lines += [f'    server node{k} "127.0.0.1:{port}"' for k, port in enumerate(ports, 1)]
    cfg = work / "haproxy.cfg"
    cfg.write_text("\n".join(lines) + "\n")
    proc = subprocess.Popen(["haproxy", "-f", str(cfg), "-db"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL,
                            env={**os.environ, "LAMINA_FRONT": f"127.0.0.1:{front}"})
    wait_port(front)
    return proc


def send(called: str, port: int, files: list[Path], senders: int) -> float:
    """Seconds for ``senders`` concurrent storescu processes to send ``files`` between them."""
    chunks = [files[i::senders] for i in range(senders)]
    env = {**os.environ, "TCP_NODELAY": "1"}
    start = time.perf_counter()
    procs = [subprocess.Popen(["storescu", "-aet", TEST_AET, "-aec", called, "127.0.0.1",
                               str(port), *map(str, chunk)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for chunk in chunks]
    for p in procs:
        _, err = p.communicate()
        if p.returncode != 0:
            raise RuntimeError(f"storescu failed: {err.decode()[-500:]}")
    return time.perf_counter() - start


def measure(server: Server, files: list[Path], senders: int, repeats: int) -> list[float]:
    rates = []
    for run in range(repeats + 1):  # run 0 is the warm-up
        with tempfile.TemporaryDirectory() as tmp, server(Path(tmp)) as (called, port):
            seconds = send(called, port, files, senders)
        if run:
            rates.append(len(files) / seconds)
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2, help="lamina receiving processes")
    parser.add_argument("--senders", default="1,2", help="concurrent senders, comma-separated")
    parser.add_argument("--scale-out", action="store_true",
                        help="also 1 node on PostgreSQL and 2, 3 nodes behind HAProxy")
    args = parser.parse_args()
    if not shutil.which("storescu") or not shutil.which("storescp"):
        raise SystemExit("needs DCMTK (apt-get install dcmtk)")
    servers: dict[str, Server] = {"storescp": storescp}
    if shutil.which("Orthanc"):
        servers["orthanc"] = orthanc
    else:
        print("Orthanc not installed (apt-get install orthanc): not measured")
    servers[f"lamina ({args.workers} workers)"] = lamina(args.workers)
    with ExitStack() as stack:
        if args.scale_out:
            bindir = postgres_bindir()
            if bindir is None or not shutil.which("haproxy"):
                raise SystemExit("--scale-out needs postgresql and haproxy (apt-get install)")
            cluster = PostgresCluster(bindir, fsync=True).start()
            stack.callback(cluster.stop)
            servers["lamina 1 node sqlite"] = lamina_nodes(1, None)
            for nodes in (1, 2, 3):
                servers[f"lamina {nodes} node{'s' if nodes > 1 else ''} pg"] = \
                    lamina_nodes(nodes, cluster)
        run(servers, args)


def run(servers: dict[str, Server], args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        files = Phantom(seed="bench", slices_count=args.slices).write(Path(tmp) / "study")
        print(f"{args.slices} slices of 512x512 int16, {args.repeats} repeats after a warm-up")
        for senders in (int(n) for n in args.senders.split(",")):
            medians = {}
            for name, server in servers.items():
                rates = measure(server, files, senders, args.repeats)
                medians[name] = statistics.median(rates)
                print(f"  {senders} sender(s)  {name:<22} median {medians[name]:7.1f} inst/s"
                      f"  (runs: {', '.join(f'{r:.0f}' for r in rates)})")
            lamina_rate = medians[f"lamina ({args.workers} workers)"]
            for name in ("storescp", "orthanc"):
                if name in medians:
                    print(f"  {senders} sender(s)  ratio lamina/{name}: "
                          f"{lamina_rate / medians[name]:.2f}")
            if "lamina 1 node pg" in medians:
                base = medians["lamina 1 node pg"]
                print(f"  {senders} sender(s)  scale-out vs 1 node pg: " + ", ".join(
                    f"{name.removeprefix('lamina ')} {medians[name] / base:.2f}"
                    for name in medians if name.startswith("lamina ") and "pg" in name)
                    + f"; pg/sqlite (1 node) {base / medians['lamina 1 node sqlite']:.2f}")


if __name__ == "__main__":
    main()
