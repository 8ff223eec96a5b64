"""Ingest throughput: DCMTK storescu into DCMTK storescp, Orthanc and ``lamina serve``.

Same 300-slice 512×512 CT series, same run, sender with TCP_NODELAY=1. One
warm-up, then 3 timed runs, with 1, 2 and 4 concurrent senders (each its own
series); the targets take turns, one run each per round, so the machine's drift
reaches them alike. Every run receives into an empty folder, so no
server takes a shortcut for resends; the folders are kept until the benchmark ends
(about 17 GB with the defaults; with less disk each is deleted after its run, which
then waits about 95 s): on ext4 without a journal, files created within minutes of a
deletion cost every target more CPU (``wait_out_deletions``), so the cost of creating
a file in the runs' folder is printed before and after the runs, and a benchmark that
starts within minutes of a deletion (another's cleanup) waits it out first. Lamina runs with
its default settings: DICOMweb on, metadata sidecars made on first request
(``http.prepare_metadata`` off). Prints instances/s and the ratios.
``--shape hospital`` sends slices that also carry a scanner's private groups and two
sequences (``benchmarks.common.hospital_shaped``: about 210 elements, not 47).

    .venv/bin/python -m benchmarks.ingest [--slices 300] [--runs 3] [--workers 2] [--senders 1,2,4]
                                          [--shape phantom|hospital]
    .venv/bin/python -m benchmarks.ingest --scale-out --senders 1,2,4,8

``--scale-out`` adds Lamina on a PostgreSQL index (a throwaway cluster with fsync on,
tests/harness.py PostgresCluster): one node, and two and three nodes (one worker each,
``node.id``, one shared blob folder) behind HAProxy with config/haproxy.cfg's settings
(send-proxy-v2: the nodes read the PROXY header, ``[dimse] proxy_protocol``), beside one
node on SQLite with one worker. ``--only storescp,orthanc,node`` keeps the targets whose
name contains one of the words (the scale-out curve beside the peers, in one run).
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

from benchmarks.common import write_series
from node.phantom import Phantom
from tests.harness import (
    REPO,
    TEST_AET,
    PostgresCluster,
    ProcessNode,
    free_port,
    peer,
    postgres_bindir,
    stop_process,
    wait_port,
    write_config,
)

Server = Callable[[Path], "contextmanager[tuple[str, int, list[int]]]"]


@contextmanager
def storescp(work: Path) -> Iterator[tuple[str, int, list[int]]]:
    port = free_port()
    out = work / "storescp"
    out.mkdir()
    proc = subprocess.Popen(["storescp", "--fork", "-od", str(out), "-aet", "STORESCP",
                             str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "TCP_NODELAY": "1"})
    try:
        wait_port(port)
        yield "STORESCP", port, [proc.pid]
    finally:
        proc.terminate()
        proc.wait()


@contextmanager
def orthanc(work: Path) -> Iterator[tuple[str, int, list[int]]]:
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
        wait_port(http)  # its HTTP server comes up after its DICOM one
        urllib.request.urlopen(f"http://127.0.0.1:{http}/system", timeout=10).read()
        yield "ORTHANC", port, [proc.pid]
    finally:
        proc.terminate()
        proc.wait()


def peers() -> dict[str, Server]:
    """DCMTK's storescp, and Orthanc when it is installed (said when it is not)."""
    servers: dict[str, Server] = {"storescp": storescp}
    if shutil.which("Orthanc"):
        servers["orthanc"] = orthanc
    else:
        print("Orthanc not installed (apt-get install orthanc): not measured")
    return servers


def lamina(workers: int, route: str = "clinical") -> Server:
    @contextmanager
    def server(work: Path) -> Iterator[tuple[str, int, list[int]]]:
        peers = {"bench": peer(TEST_AET, "store", route=route)}
        # DICOMweb on, as a node runs by default (its HTTP server beside the DIMSE one).
        node = ProcessNode.with_workers(work / "lamina", workers, peers=peers,
                                        http={"port": free_port()}).start()
        try:
            yield "LAMINA", node.port, [node.pid]
        finally:
            node.stop()

    return server


def lamina_nodes(nodes: int, cluster: PostgresCluster | None) -> Server:
    """``nodes`` one-worker nodes on the cluster's PostgreSQL index (SQLite when None), each
    repeat on a fresh database; more than one behind HAProxy."""
    @contextmanager
    def server(work: Path) -> Iterator[tuple[str, int, list[int]]]:
        index = {"backend": "postgresql", "dsn": cluster.database()} if cluster else None
        running: list[ProcessNode] = []
        proxy = None
        try:
            # behind HAProxy (send-proxy-v2) the nodes read the client's address from the
            # PROXY header, as in production
            dimse = {"proxy_protocol": True, "proxy_trusted": ["127.0.0.1/32"]} \
                if nodes > 1 else None
            for k in range(1, nodes + 1):
                config = write_config(work / f"node{k}", node={"id": f"node{k}", "workers": 1},
                                      storage={"shared": str(work / "shared")}, index=index,
                                      dimse=dimse, http={})
                if k > 1:
                    config.key_file.write_bytes((work / "node1" / "keys" / "project.key")
                                                .read_bytes())
                running.append(ProcessNode(config).start())
            if nodes == 1:
                yield "LAMINA", running[0].port, [n.pid for n in running]
                return
            front = free_port()
            proxy = _haproxy(work, front, [n.port for n in running])
            yield "LAMINA", front, [n.pid for n in running]
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


def _tree(roots: list[int]) -> list[int]:
    """The processes under ``roots`` (the server and its workers), from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], list(roots)
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += children.get(pid, [])
    return found


def cpu_seconds(roots: list[int]) -> float:
    """CPU (user + system, with reaped children's) of every process under ``roots``."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in _tree(roots):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(f) for f in fields[11:15])  # utime stime cutime cstime
    return total / tick


def _sockets(state: str, ports: set[int] | None = None) -> dict[int, int]:
    """Socket inode -> local port of the TCP sockets in ``state`` ("01" established, "0A"
    listening), those on ``ports`` only when given."""
    found = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            cols = line.split()
            local = int(cols[1].rsplit(":", 1)[1], 16)
            if cols[3] == state and (ports is None or local in ports):
                found[int(cols[9])] = local
    return found


def _ports(port: int, pids: list[int]) -> set[int]:
    """``port`` and the ports the ``pids`` listen on: the senders' connections end on one
    of them (behind HAProxy the front port is HAProxy's; the nodes' ports are their own)."""
    listening = _sockets("0A")
    return {port, *(listening[i] for held in _owners(pids, set(listening)).values()
                    for i in held)}


def _all_seen(senders: int, seen: set[int], served: dict[int, set[int]]) -> bool:
    """Whether one connection per sender has been seen on the target's ports and, when
    the target's processes hold them (storescp --fork's children are not among the
    processes looked at), in those processes."""
    held = set().union(*served.values())
    return len(seen) >= senders and (not held or len(held) >= senders)


def _owners(pids: list[int], inodes: set[int]) -> dict[int, set[int]]:
    """For each process, the inodes of ``inodes`` it holds open."""
    held: dict[int, set[int]] = {}
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inode = int(target[8:-1])
                    if inode in inodes:
                        held.setdefault(pid, set()).add(inode)
        except OSError:
            continue
    return held


def send(called: str, port: int, series: list[list[Path]],
         roots: list[int]) -> tuple[float, list[int]]:
    """Seconds for one storescu process per series, all at once, to send them,
    and how many of the associations each receiving process served (sampled from /proc:
    the process holding the connection's socket), busiest first.

    The connections are looked up until one per sender has been seen (a storescu sends
    its series on one association), then the senders are waited for without polling.
    Why not poll to the end: reading ``/proc/net/tcp`` walks the kernel's whole table of
    established connections (262,144 buckets on this machine), 1.7 ms of CPU a read;
    polled every 50 ms to the end (and the listening ports with it), the sampler took
    7 % of this 2-core machine's CPU (``perf record -a``, 4 senders) from the servers
    it measures."""
    env = {**os.environ, "TCP_NODELAY": "1"}
    pids = _tree(roots)
    ports = _ports(port, pids)
    served: dict[int, set[int]] = {}
    start = time.perf_counter()
    procs = [subprocess.Popen(["storescu", "-aet", TEST_AET, "-aec", called, "127.0.0.1",
                               str(port), *map(str, chunk)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for chunk in series]
    seen: set[int] = set()
    while any(p.poll() is None for p in procs) and not _all_seen(len(procs), seen, served):
        connections = set(_sockets("01", ports))
        seen |= connections
        for pid, inodes in _owners(pids, connections).items():
            served.setdefault(pid, set()).update(inodes)
        time.sleep(0.05)
    for p in procs:
        p.wait()
    seconds = time.perf_counter() - start
    for p in procs:
        _, err = p.communicate()
        if p.returncode != 0:
            raise RuntimeError(f"storescu failed: {err.decode()[-500:]}")
    return seconds, sorted((len(s) for s in served.values()), reverse=True)


def measure(server: Server, series: list[list[Path]], work: Path
            ) -> tuple[float, float, list[int]]:
    """One run into a fresh server in the empty folder ``work``: inst/s, server CPU ms per
    instance, associations per receiving process."""
    work.mkdir()
    with server(work) as (called, port, roots):
        before = cpu_seconds(roots)
        seconds, counts = send(called, port, series, roots)
        cpu = cpu_seconds(roots) - before
    count = sum(map(len, series))
    return count / seconds, cpu * 1000 / count, counts


def interleaved(servers: dict[str, Server], series: list[list[Path]], repeats: int,
                runs_dir: Path, keep: bool) -> dict[str, list[tuple[float, float, list[int]]]]:
    """Each target's timed runs, taken in rounds (every target once per round, after one
    warm-up run each): this machine's speed drifts by 15 % within minutes, and a drift
    then reaches every target's runs alike instead of one target's all.

    Each run receives into a folder of its own under ``runs_dir``. With ``keep`` the
    folders stay until the whole benchmark ends (:func:`run`); without (too little disk),
    each is deleted after its run and the next waits out the deletion
    (:func:`wait_out_deletions`).
    """
    runs: dict[str, list[tuple[float, float, list[int]]]] = {name: [] for name in servers}
    senders = len(series)

    def measured(name: str, server: Server, label: str) -> tuple[float, float, list[int]]:
        work = runs_dir / f"{senders}-senders-{label}-{name.replace(' ', '-')}"
        result = measure(server, series, work)
        if not keep:
            shutil.rmtree(work)
            wait_out_deletions()
        return result

    for name, server in servers.items():
        measured(name, server, "warm-up")
    for k in range(repeats):
        for name, server in servers.items():
            runs[name].append(measured(name, server, f"run-{k}"))
    return runs


#: Microseconds of CPU to create a file (:func:`file_creation_cpu`) above which files
#: were deleted recently on this filesystem: 14-47 µs with none in the last minutes on
#: this machine, 136-510 µs within a minute of a benchmark's cleanup.
QUIET_CREATION_US = 100


def wait_out_deletions() -> None:
    """Sleep until the files just deleted are no longer "recently deleted" for ext4.

    Why: ext4 without a journal (as on this project's machines) will not reuse an inode
    freed less than 60 s ago (300 s more while its inode-table block is not yet written
    back: ``RECENTCY_MIN``/``RECENTCY_DIRTY`` in the kernel's ``fs/ext4/ialloc.c``), and
    every file created meanwhile looks each such inode up first: with a previous run's
    thousand files just deleted, creating one file took 0.4-1.1 ms of CPU instead of
    0.03 ms (``perf``: ``recently_deleted``). Deleting each run's folder before the next
    run charged every target that, each per file it creates; no server deletes
    files while it receives, so the runs are measured without it. This waits for the
    writeback (``vm.dirty_expire_centisecs`` + 5 s) and the 60 s after it; a block
    written to again meanwhile can keep some inodes recent longer, which
    :func:`file_creation_cpu` shows.
    """
    try:
        writeback = int(Path("/proc/sys/vm/dirty_expire_centisecs").read_text()) / 100 + 5
    except (OSError, ValueError):
        return  # not Linux: no such rule to wait out
    time.sleep(writeback + 60)


def file_creation_cpu(folder: Path, files: int = 300) -> float:
    """Microseconds of CPU this process spends creating one empty file in a fresh subfolder
    of ``folder``: what each file a target creates costs it beyond its own work on this
    filesystem now (see :func:`wait_out_deletions`). The files stay, to be deleted with
    ``folder``: deleting them here would make the next files cost more."""
    probe = folder / f"file-creation-{time.monotonic_ns()}"
    probe.mkdir()
    start = time.thread_time()
    for i in range(files):
        os.close(os.open(probe / str(i), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    return (time.thread_time() - start) * 1e6 / files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--runs", "--repeats", dest="repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2, help="lamina receiving processes")
    parser.add_argument("--senders", default="1,2,4", help="concurrent senders, comma-separated")
    parser.add_argument("--scale-out", action="store_true",
                        help="also 1 node on PostgreSQL and 2, 3 nodes behind HAProxy")
    parser.add_argument("--only", default="",
                        help="comma-separated words: keep only targets whose name has one")
    parser.add_argument("--shape", choices=("phantom", "hospital"), default="phantom",
                        help="hospital: slices with a scanner's private groups and sequences")
    args = parser.parse_args()
    if not shutil.which("storescu") or not shutil.which("storescp"):
        raise SystemExit("needs DCMTK (apt-get install dcmtk)")
    servers = peers()
    servers[f"lamina ({args.workers} workers)"] = lamina(args.workers)
    servers["lamina deidentified"] = lamina(args.workers, "deidentified")
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
        if args.only:
            words = [w for w in args.only.split(",") if w]
            servers = {name: server for name, server in servers.items()
                       if any(w in name for w in words)}
        run(servers, args)


def run(servers: dict[str, Server], args: argparse.Namespace) -> None:
    senders_list = [int(n) for n in args.senders.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        # One series of its own per sender (no two senders send the same instance).
        series = [write_series(Phantom(seed=f"bench{k}", slices_count=args.slices),
                               Path(tmp) / f"s{k}", args.shape)
                  for k in range(max(senders_list))]
        runs_dir = Path(tmp) / "runs"
        runs_dir.mkdir()
        # Every run's folder is kept until the end when the disk has room for them all:
        # nothing is deleted between runs (see wait_out_deletions).
        series_bytes = sum(p.stat().st_size for s in series for p in s)
        needed = sum((args.repeats + 1) * len(servers) * series_bytes * n // max(senders_list)
                     for n in senders_list)
        keep = shutil.disk_usage(tmp).free > 2 * needed
        print(f"{args.slices} {args.shape} slices of 512x512 int16 per sender, {args.repeats}"
              f" runs after a warm-up; lamina has {args.workers} workers")
        if not keep:
            print(f"  (under {2 * needed >> 30} GB free: each run's folder is deleted after"
                  " it, and the next run waits out the deletion)")
        cost = file_creation_cpu(runs_dir)
        if cost > QUIET_CREATION_US:
            # Files were deleted minutes ago (an earlier benchmark's runs, just cleaned up):
            # waited out, or the first rounds' targets pay for them (wait_out_deletions).
            print(f"  creating a file in the runs' folder costs {cost:.0f} µs of CPU now:"
                  " waiting out recent deletions first")
            wait_out_deletions()
            cost = file_creation_cpu(runs_dir)
        print(f"  creating a file in the runs' folder costs {cost:.0f} µs"
              " of CPU now (every target pays it per file it creates: wait_out_deletions)")
        table: dict[str, dict[int, tuple[float, float, list[list[int]]]]] = {}
        for senders in senders_list:
            medians, rounds = {}, {}
            for name, runs in interleaved(servers, series[:senders], args.repeats, runs_dir,
                                          keep).items():
                rates = rounds[name] = [r[0] for r in runs]
                medians[name] = statistics.median(rates)
                cpu = statistics.median(r[1] for r in runs)
                table.setdefault(name, {})[senders] = (medians[name], cpu, [r[2] for r in runs])
                print(f"  {senders} sender(s)  {name:<22} median {medians[name]:7.1f} inst/s"
                      f"  cpu {cpu:5.1f} ms/inst  (runs: {', '.join(f'{r:.0f}' for r in rates)};"
                      f" associations per process: {[r[2] for r in runs]})")
            for lamina_name in medians:
                if not lamina_name.startswith("lamina"):
                    continue
                for name in ("storescp", "orthanc"):
                    if name in medians:
                        same_round = ", ".join(f"{a / b:.2f}" for a, b in
                                               zip(rounds[lamina_name], rounds[name], strict=True))
                        print(f"  {senders} sender(s)  ratio {lamina_name}/{name}: "
                              f"{medians[lamina_name] / medians[name]:.2f}"
                              f" (per round: {same_round})")
            if "lamina 1 node pg" in medians:
                base = medians["lamina 1 node pg"]
                print(f"  {senders} sender(s)  scale-out vs 1 node pg: " + ", ".join(
                    f"{name.removeprefix('lamina ')} {medians[name] / base:.2f}"
                    for name in medians if name.startswith("lamina ") and "pg" in name)
                    + (f"; pg/sqlite (1 node) {base / medians['lamina 1 node sqlite']:.2f}"
                       if "lamina 1 node sqlite" in medians else ""))
        print(f"  creating a file in the runs' folder costs {file_creation_cpu(runs_dir):.0f} µs"
              " of CPU after the runs")
        print()
        print("| target | " + " | ".join(f"{n} sender{'s' if n > 1 else ''}"
                                          for n in senders_list)
              + " | server CPU ms/instance | associations per process (per run) |")
        print("|---|" + "---|" * (len(senders_list) + 2))
        for name, row in table.items():
            cpus = [row[n][1] for n in senders_list]
            # storescp --fork's children live too briefly to be sampled: no count for it.
            spread = "; ".join(f"{n}: {row[n][2]}" for n in senders_list
                               if any(row[n][2])) or "—"
            print(f"| {name} | " + " | ".join(f"{row[n][0]:.0f}" for n in senders_list)
                  + f" | {min(cpus):.1f}–{max(cpus):.1f} | {spread} |")


if __name__ == "__main__":
    main()
