"""STOW-RS: Lamina (clinical and deidentified routes) beside Orthanc's DICOMweb plugin.

    python -m benchmarks.stow [--slices 300] [--repeats 3]

A phantom CT series (512x512) is uploaded to a fresh server per run, two ways:
one instance per request (a pipeline or viewer storing its objects as it makes
them) and the whole series in one request (``dicomweb-client``'s
``store_instances`` with every file, the way a study is pushed). The bodies are
built before the clock starts; one keep-alive HTTP client sends them in turn.
``lamina serve`` runs one worker, its HTTP server on an ephemeral port, a client
token mapped to a peer on the measured route; Orthanc is Debian's with the
plugin of ``orthanc-dicomweb`` (found with ``dpkg -L``), index and storage in the
run's folder. Both are stopped by PID.

As ``benchmarks.ingest`` does, the targets take turns (one run each per round after
a warm-up each: this machine's speed drifts within minutes) and every run's folder
is kept until the end, then the kernel's "recently deleted" window is waited out
(:func:`benchmarks.ingest.wait_out_deletions`). Prints the median instances/s,
the server's CPU milliseconds per instance (every process under it, from /proc)
and the ratio of medians to Orthanc's. Asserts nothing about time.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import httpx

from benchmarks.dicomweb import orthanc_plugin, orthanc_server
from benchmarks.ingest import cpu_seconds, wait_out_deletions
from node.phantom import Phantom
from tests.harness import ProcessNode, free_port, peer, write_config

TOKEN = "benchmark-token-0123456789"

#: A target: started in an empty folder, yields (STOW-RS root URL, headers, PIDs to count).
Target = Callable[[Path], AbstractContextManager[tuple[str, dict[str, str], list[int]]]]


def multipart(files: list[Path]) -> tuple[bytes, str]:
    """A multipart/related body of ``files`` as application/dicom parts, and its type."""
    boundary = uuid.uuid4().hex
    parts = [b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n"
             + f.read_bytes() + b"\r\n" for f in files]
    body = b"".join(parts) + b"--" + boundary.encode() + b"--\r\n"
    return body, f'multipart/related; type="application/dicom"; boundary={boundary}'


def lamina(route: str) -> Target:
    @contextmanager
    def target(work: Path) -> Iterator[tuple[str, dict[str, str], list[int]]]:
        http_port = free_port()
        node = ProcessNode(write_config(
            work / "lamina", peers={"bench": peer("BENCH", "store", route=route)},
            http={"port": http_port, "clients": {"bench": {"token": TOKEN, "peer": "bench"}}}))
        node.start()
        try:
            yield (f"http://127.0.0.1:{http_port}/dicom-web",
                   {"Authorization": f"Bearer {TOKEN}"}, [node.pid])
        finally:
            node.stop()

    return target


def orthanc(binary: str, plugin: str) -> Target:
    @contextmanager
    def target(work: Path) -> Iterator[tuple[str, dict[str, str], list[int]]]:
        with orthanc_server(work, binary, plugin) as (root, pid):
            yield f"{root}/dicom-web", {}, [pid]

    return target


def measure(target: Target, bodies: list[tuple[bytes, str]], instances: int, work: Path
            ) -> tuple[float, float]:
    """One run into a fresh server: instances/s and server CPU ms per instance."""
    with target(work) as (root, headers, pids), \
            httpx.Client(headers=headers, timeout=600) as client:
        before = cpu_seconds(pids)
        started = time.perf_counter()
        for body, content_type in bodies:
            answer = client.post(f"{root}/studies", content=body,
                                 headers={"Content-Type": content_type,
                                          "Accept": "application/dicom+json"})
            if answer.status_code != 200:
                raise RuntimeError(f"STOW-RS answered {answer.status_code}: {answer.text[:300]}")
        seconds = time.perf_counter() - started
        cpu = cpu_seconds(pids) - before
    return instances / seconds, cpu * 1000 / instances


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    targets: dict[str, Target] = {"lamina clinical": lamina("clinical"),
                                  "lamina deidentified": lamina("deidentified")}
    binary, plugin = shutil.which("Orthanc"), orthanc_plugin()
    if binary and plugin:
        targets["orthanc"] = orthanc(binary, plugin)
    else:
        print("Orthanc or its DICOMweb plugin (orthanc-dicomweb) not installed: not measured")
    with tempfile.TemporaryDirectory(prefix="lamina-stow-") as tmp:
        files = Phantom(seed="stow-bench", slices_count=args.slices).write(Path(tmp) / "series")
        ways = {"1 instance per request": [multipart([f]) for f in files],
                "the series in 1 request": [multipart(files)]}
        runs: dict[tuple[str, str], list[tuple[float, float]]] = {}
        for way, bodies in ways.items():
            for name, target in targets.items():
                measure(target, bodies, len(files), Path(tmp) / f"warm-up-{way}-{name}")
            for k in range(args.repeats):
                for name, target in targets.items():
                    runs.setdefault((way, name), []).append(
                        measure(target, bodies, len(files), Path(tmp) / f"run-{way}-{name}-{k}"))
    wait_out_deletions()
    print(f"\nSTOW-RS of {args.slices} slices of 512x512 CT, median of {args.repeats} runs")
    print(f"  {'way':24} {'target':20} {'inst/s':>8} {'CPU ms/inst':>12} {'vs Orthanc':>11}")
    for way in ways:
        reference = runs.get((way, "orthanc"))
        for name in targets:
            rates = [r for r, _ in runs[(way, name)]]
            cpu = statistics.median(c for _, c in runs[(way, name)])
            ratio = (f"{statistics.median(rates) / statistics.median(r for r, _ in reference):.2f}x"
                     if reference else "")
            print(f"  {way:24} {name:20} {statistics.median(rates):8.1f} {cpu:12.2f}"
                  f" {ratio:>11}   (runs: {', '.join(f'{r:.0f}' for r in rates)})")


if __name__ == "__main__":
    main()
