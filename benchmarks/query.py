"""Query/retrieve benchmark: C-FIND latency as the index grows, C-MOVE throughput vs peers.

    python -m benchmarks.query                  # 10k and 100k instances, C-MOVE comparison
    python -m benchmarks.query --million        # ... and 1,000,000 instances
    python -m benchmarks.query --sizes 10000 --no-move
    python -m benchmarks.query --million --no-move --backends sqlite,postgresql

``--backends``: the same queries on each index backend, beside each other; PostgreSQL runs
on a throwaway cluster of its own (tests/harness.py PostgresCluster: Debian's postgresql
must be installed) with its default settings, fsync off (queries only read).

For each size an index is filled through the index code in bulk
(the index's ``bulk_insert``; no pixel files): N/20 studies of
20 instances (two series of 10) over N/100 patients, so 1M instances is
50,000 studies over 10,000 patients. A node (one worker) serves it, and one
held association (pynetdicom, TCP_NODELAY) runs each listed query with fresh
random values: p50/p95 of the time to the final response, the p50 time to
the first response, and the mean number of matches. For comparison, DCMTK
findscu repeats one of each query over one association ("findscu mean"): the
same server seen by a C++ client, without pynetdicom's per-response cost on
the client side.

C-MOVE: a 300-slice CT study (512×512) is stored in Lamina through C-STORE,
then moved with DCMTK movescu to DCMTK storescp (TCP_NODELAY=1); the same
files are served by DCMTK dcmqrscp and by Orthanc when installed, and moved
the same way. Peers that are not installed are skipped with a note.
Figures are printed; nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

from pydicom.dataset import Dataset
from pynetdicom import AE, _config
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as FIND

from node.dimse.ae import associate
from node.phantom import Phantom, index_records, synthetic_patient_name
from node.storage.interface import Index
from node.storage.postgresql import matcher as pg_matcher
from node.storage.postgresql.index import PostgresIndex
from node.storage.query import Model, parse
from node.storage.sqlite.index import SqliteIndex
from node.storage.sqlite.matcher import explain, rows_select
from tests.harness import (
    PostgresCluster,
    ProcessNode,
    free_port,
    postgres_bindir,
    stop_process,
    wait_port,
    write_config,
)
from tests.studies import QR_VALIDATION, qr_peer

STUDY_KEYS = ("PatientName", "PatientID", "PatientBirthDate", "StudyInstanceUID", "StudyDate",
              "StudyTime", "AccessionNumber", "StudyDescription", "ModalitiesInStudy",
              "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances")
SERIES_KEYS = ("SeriesInstanceUID", "Modality", "SeriesNumber", "SeriesDescription",
               "NumberOfSeriesRelatedInstances")
IMAGE_KEYS = ("SOPInstanceUID", "SOPClassUID", "InstanceNumber")
NODELAY = {**os.environ, "TCP_NODELAY": "1"}


def identifier(level: str, returned: tuple[str, ...], **match: str) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for keyword in returned:
        setattr(ds, keyword, "")
    for keyword, value in match.items():
        setattr(ds, keyword, value)
    return ds


def fill(data: Path, instances: int, dsn: str = "") -> float:
    """An index with ``instances`` rows, through the bulk insert; seconds taken. ``dsn``:
    a PostgreSQL database instead of the SQLite file in ``data``."""
    data.mkdir(parents=True, exist_ok=True)
    index = PostgresIndex(dsn) if dsn else SqliteIndex(data / "index.sqlite3")
    index.migrate()
    started = time.perf_counter()
    with index.transaction() as tx:
        tx.instances.bulk_insert(index_records(max(1, instances // 100), instances // 20, 20))
    with index.connection() as conn:
        conn.execute("ANALYZE")
    index.close()
    return time.perf_counter() - started


def queries(instances: int, rng: random.Random) -> dict[str, Callable[[], Dataset]]:
    """The listed queries, each drawing fresh values from the synthetic index's pattern."""
    studies, patients = instances // 20, max(1, instances // 100)
    base = next(index_records(1, 1, 1))[0].study_instance_uid.rsplit(".", 2)[0]

    def study_uid() -> str:
        return f"{base}.1.{rng.randrange(studies)}"

    def day() -> str:
        return f"{rng.randrange(2015, 2024)}{rng.randrange(1, 13):02d}{rng.randrange(1, 22):02d}"

    def week() -> str:
        start = day()
        return f"{start}-{start[:6]}{int(start[6:]) + 6:02d}"

    return {
        "study by PatientID": lambda: identifier(
            "STUDY", STUDY_KEYS, PatientID=f"PAT{rng.randrange(patients):07d}"),
        "study by PatientName wildcard": lambda: identifier(
            "STUDY", STUDY_KEYS,
            PatientName=synthetic_patient_name(rng.randrange(patients)).split("^")[0][:-1] + "*"),
        "study by StudyDate range (7 days)": lambda: identifier(
            "STUDY", STUDY_KEYS, StudyDate=week()),
        "study by Modality (PT)": lambda: identifier(
            "STUDY", STUDY_KEYS, ModalitiesInStudy="PT"),
        "study by AccessionNumber": lambda: identifier(
            "STUDY", STUDY_KEYS, AccessionNumber=f"ACC{rng.randrange(studies):08d}"),
        "series of a study": lambda: identifier("SERIES", SERIES_KEYS,
                                                StudyInstanceUID=study_uid()),
        "instances of a series": lambda: identifier(
            "IMAGE", IMAGE_KEYS, SeriesInstanceUID=study_uid() + ".0"),
    }


def plan(index: Index, query: Dataset) -> str:
    """The backend's plan for the query's main statement, one step per ``;``."""
    parsed = parse(query, Model.STUDY_ROOT)
    if isinstance(index, PostgresIndex):
        sql, params = pg_matcher.RENDERER.rows_select(parsed)
        with index.connection() as conn:
            return "; ".join(step.strip().split("  (cost")[0] for step in
                             pg_matcher.explain(conn, sql, params)
                             if "(cost" in step and "SubPlan" not in step)
    sql, params = rows_select(parsed)
    with index.connection() as conn:
        return "; ".join(step for step in explain(conn, sql, params)
                         if not step.startswith(("CORRELATED", "LIST SUBQUERY")))


def time_queries(port: int, index: Index, instances: int, repeats: int,
                 seed: int) -> list[dict]:
    """Run every query ``repeats`` times over one held association."""
    _config.LOG_RESPONSE_IDENTIFIERS = False
    ae = AE(ae_title="BENCH")
    ae.add_requested_context(FIND)
    assoc = associate(ae, "127.0.0.1", port, "LAMINA")
    if not assoc.is_established:
        raise RuntimeError("the node refused the benchmark association")
    rng = random.Random(seed)
    rows = []
    try:
        for name, make in queries(instances, rng).items():
            runs = 3 if "Modality" in name and instances >= 1_000_000 else repeats
            for _ in range(3):  # warm the page cache for this query shape
                _run(assoc, make())
            totals, firsts, matches = [], [], []
            for _ in range(runs):
                total, first, count = _run(assoc, make())
                totals.append(total)
                firsts.append(first)
                matches.append(count)
            rows.append({"query": name, "matches": statistics.mean(matches),
                         "p50": _pct(totals, 50), "p95": _pct(totals, 95),
                         "first_p50": _pct(firsts, 50), "runs": runs,
                         "findscu": findscu_mean(port, make(), min(runs, 20)),
                         "plan": plan(index, make())})
    finally:
        assoc.release()
    return rows


def findscu_mean(port: int, query: Dataset, repeats: int) -> float | None:
    """Mean ms per query of DCMTK findscu repeating it over one association.

    A C++ client's view: what the node costs without pynetdicom's per-response
    work on the client side. None when findscu is not installed.
    """
    if not shutil.which("findscu"):
        return None
    args = ["findscu", "-aet", "BENCH", "-aec", "LAMINA", "-S"]
    for elem in query:
        value = elem.value if elem.value not in (None, "") else ""
        args += ["-k", f"{elem.keyword}={value}" if value != "" else elem.keyword]
    timings = []
    for n in (1, repeats + 1):
        started = time.perf_counter()
        subprocess.run([*args, "--repeat", str(n), "127.0.0.1", str(port)], env=NODELAY,
                       capture_output=True, check=True)
        timings.append(time.perf_counter() - started)
    return (timings[1] - timings[0]) / repeats * 1000


def _run(assoc, query: Dataset) -> tuple[float, float, int]:
    started = time.perf_counter()
    first, count, final = None, 0, None
    for status, ds in assoc.send_c_find(query, FIND):
        if ds is not None:
            count += 1
            if first is None:
                first = time.perf_counter() - started
        else:
            final = int(status.Status) if "Status" in status else None
    total = time.perf_counter() - started
    if final != 0x0000:
        raise RuntimeError(f"query ended with status {final}")
    return total * 1000, (first if first is not None else total) * 1000, count


def _pct(values: list[float], pct: int) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(pct / 100 * (len(ordered) - 1)))]


# --- C-MOVE -----------------------------------------------------------------------------


def _movescu(port: int, called: str, study_uid: str, runs: int, dest: Path,
             dest_port: int) -> list[float]:
    """Seconds per C-MOVE of the study to a fresh storescp, ``runs`` times."""
    times = []
    for _ in range(runs):
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir(parents=True)
        storescp = subprocess.Popen(["storescp", "-aet", "STORESCP", "-od", str(dest),
                                     str(dest_port)], env=NODELAY,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_port(dest_port)
            started = time.perf_counter()
            result = subprocess.run(
                ["movescu", "-aet", "MOVESCU", "-aec", called, "-aem", "STORESCP", "-S",
                 "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study_uid}",
                 "127.0.0.1", str(port)], env=NODELAY, capture_output=True, check=False)
            times.append(time.perf_counter() - started)
        finally:
            stop_process(storescp)
        received = len(list(dest.iterdir()))
        if result.returncode != 0 or received == 0:
            raise RuntimeError(f"{called}: move failed ({received} received): "
                               f"{result.stderr.decode(errors='replace')[-500:]}")
    return times


def move_benchmark(work: Path, slices: int, runs: int) -> list[dict]:
    """C-MOVE of a ``slices``-slice study from Lamina, dcmqrscp and Orthanc to storescp."""
    for tool in ("storescp", "movescu"):
        if not shutil.which(tool):
            print(f"C-MOVE benchmark skipped: DCMTK {tool} not installed")
            return []
    phantom = Phantom(seed="benchmark-move", slices_count=slices)
    files = phantom.write(work / "study")
    study_uid, dest_port = phantom.study_uid, free_port()
    dest = work / "received"
    results = []

    node = ProcessNode(write_config(work / "lamina", validation=QR_VALIDATION, peers={
        "bench": qr_peer("MOVESCU", "store", "move", move_destinations=["storescp"]),
        "storescp": qr_peer("STORESCP", port=dest_port)}))
    try:
        node.start()
        failed = [r for r in node.store(files, "MOVESCU") if r.status != 0]
        if failed:
            raise RuntimeError(f"loading the study failed: {failed[:3]}")
        results.append(_result("Lamina", _movescu(node.port, "LAMINA", study_uid, runs, dest,
                                                  dest_port), slices))
    finally:
        node.stop()

    if shutil.which("dcmqrscp") and shutil.which("dcmqridx"):
        results.append(_result("DCMTK dcmqrscp", _dcmqrscp(work / "dcmqrscp", files, study_uid,
                                                           runs, dest, dest_port), slices))
    else:
        print("dcmqrscp not installed: skipped")
    orthanc = shutil.which("Orthanc") or shutil.which("orthanc")
    if orthanc:
        results.append(_result("Orthanc", _orthanc(orthanc, work / "orthanc", files, study_uid,
                                                   runs, dest, dest_port), slices))
    else:
        print("Orthanc not installed: skipped")
    return results


def _result(name: str, times: list[float], slices: int) -> dict:
    best, median = min(times), statistics.median(times)
    return {"server": name, "median_s": median, "best_s": best,
            "instances_per_s": slices / median}


def _dcmqrscp(folder: Path, files: list[Path], study_uid: str, runs: int, dest: Path,
              dest_port: int) -> list[float]:
    storage = folder / "storage"
    storage.mkdir(parents=True)
    for f in files:
        shutil.copy(f, storage / f.name)
    subprocess.run(["dcmqridx", str(storage), *sorted(str(p) for p in storage.glob("*.dcm"))],
                   check=True, capture_output=True)
    port = free_port()
    config = folder / "dcmqrscp.cfg"
    config.write_text(
        f"NetworkTCPPort = {port}\nMaxPDUSize = 131072\nMaxAssociations = 16\n"
        "HostTable BEGIN\n"
        f"storescp = (STORESCP, 127.0.0.1, {dest_port})\n"
        "HostTable END\nVendorTable BEGIN\nVendorTable END\n"
        f"AETable BEGIN\nDCMQRSCP {storage} RW (10, 4096mb) ANY\nAETable END\n")
    server = subprocess.Popen(["dcmqrscp", "-c", str(config), "--disable-host-lookup"],
                              env=NODELAY, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        return _movescu(port, "DCMQRSCP", study_uid, runs, dest, dest_port)
    finally:
        stop_process(server)


def _orthanc(binary: str, folder: Path, files: list[Path], study_uid: str, runs: int,
             dest: Path, dest_port: int) -> list[float]:
    folder.mkdir(parents=True)
    port, http = free_port(), free_port()
    config = folder / "orthanc.json"
    config.write_text(json.dumps({
        "Name": "benchmark", "StorageDirectory": str(folder / "db"),
        "IndexDirectory": str(folder / "db"), "DicomAet": "ORTHANC", "DicomPort": port,
        "HttpPort": http, "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
        "DicomModalities": {"storescp": ["STORESCP", "127.0.0.1", dest_port],
                            "movescu": ["MOVESCU", "127.0.0.1", 104]},
        "Plugins": [], "StorageCompression": False}))
    server = subprocess.Popen([binary, str(config)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, env=NODELAY)
    try:
        wait_port(http)
        for f in files:
            request = urllib.request.Request(f"http://127.0.0.1:{http}/instances",
                                             data=f.read_bytes(), method="POST")
            urllib.request.urlopen(request).read()
        wait_port(port)
        return _movescu(port, "ORTHANC", study_uid, runs, dest, dest_port)
    finally:
        stop_process(server)


# --- report -----------------------------------------------------------------------------


def run(sizes: list[int], repeats: int, move_slices: int, move_runs: int,
        work: Path, backends: list[str]) -> Iterator[str]:
    cluster = None
    if "postgresql" in backends:
        bindir = postgres_bindir()
        if bindir is None:
            yield "PostgreSQL not installed (Debian package postgresql): its rows are skipped"
            backends = [b for b in backends if b != "postgresql"]
        else:
            cluster = PostgresCluster(bindir).start()
    try:
        for size in sizes:
            for backend in backends:
                yield from _run_size(size, backend, cluster, repeats, work)
    finally:
        if cluster is not None:
            cluster.stop()
    if move_slices:
        yield f"\nC-MOVE of a {move_slices}-slice CT study (512x512) to DCMTK storescp"
        for r in move_benchmark(work / "move", move_slices, move_runs):
            yield (f"  {r['server']:16} median {r['median_s']:.2f} s  best {r['best_s']:.2f} s"
                   f"  {r['instances_per_s']:.0f} instances/s")


def _run_size(size: int, backend: str, cluster: PostgresCluster | None, repeats: int,
              work: Path) -> Iterator[str]:
    """One index size on one backend: fill, serve, time every query, print the plans."""
    folder = work / f"index-{size}-{backend}"
    dsn = cluster.database() if backend == "postgresql" and cluster else ""
    seconds = fill(folder / "node" / "data", size, dsn)
    yield (f"\n{size:,} instances ({size // 20:,} studies, {max(1, size // 100):,} patients)"
           f" on {backend}")
    yield f"  bulk fill + ANALYZE: {seconds:.1f} s ({size / seconds:,.0f} instances/s)"
    node = ProcessNode(write_config(
        folder / "node", validation=QR_VALIDATION, peers={"bench": qr_peer("BENCH", "find")},
        index={"backend": "postgresql", "dsn": dsn} if dsn else None))
    try:
        node.start()
        with node.index() as index:
            rows = time_queries(node.port, index, size, repeats, seed=size)
    finally:
        node.stop()
    yield (f"  {'query':36} {'matches':>8} {'p50 ms':>8} {'p95 ms':>8} {'first p50':>10}"
           f" {'findscu mean':>13}")
    for r in rows:
        dcmtk = f"{r['findscu']:13.2f}" if r["findscu"] is not None else f"{'n/a':>13}"
        yield (f"  {r['query']:36} {r['matches']:8.1f} {r['p50']:8.2f} {r['p95']:8.2f}"
               f" {r['first_p50']:10.2f} {dcmtk}"
               + (f"  ({r['runs']} runs)" if r["runs"] < repeats else ""))
    yield "  plans:"
    for r in rows:
        yield f"    {r['query']}: {r['plan']}"
    shutil.rmtree(folder, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000",
                        help="comma-separated instance counts (default: 10000,100000)")
    parser.add_argument("--million", action="store_true", help="also run 1,000,000 instances")
    parser.add_argument("--repeats", type=int, default=50, help="timed runs per query")
    parser.add_argument("--move-slices", type=int, default=300)
    parser.add_argument("--move-runs", type=int, default=3)
    parser.add_argument("--no-move", action="store_true", help="skip the C-MOVE comparison")
    parser.add_argument("--work", help="scratch folder (default: a temporary one)")
    parser.add_argument("--backends", default="sqlite",
                        help="comma-separated index backends: sqlite, postgresql")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s]
    if args.million and 1_000_000 not in sizes:
        sizes.append(1_000_000)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="lamina-bench-"))
    try:
        for line in run(sizes, args.repeats, 0 if args.no_move else args.move_slices,
                        args.move_runs, work, args.backends.split(",")):
            print(line, flush=True)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
