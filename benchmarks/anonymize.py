"""Files per second of ``lamina anonymize`` against dicognito and Orthanc on the same CT series.

Both command-line tools run as programs (``python -m node anonymize`` and
``python -m dicognito``), one after the other in the same run, on the same generated
300-slice 512x512 CT series with planted PHI, each writing to its own empty folder;
the wall time includes interpreter start-up for both, with their bytecode cached as an
installed program's is (``_AS_INSTALLED``). Lamina is timed single-process
(``--jobs 1``, like dicognito) and with ``--jobs 2`` (its default on this 2-core machine).

Orthanc (Debian's ``Orthanc``, started here on ephemeral ports with a temporary config
and storage, stopped by PID) first receives the series over REST (not timed), then is
timed anonymizing it with ``POST /instances/{id}/anonymize`` per instance, two requests
in flight (its HTTP server is multi-threaded, as ``--jobs 2`` is two processes), each
answer written to a file. That is the same job as ``lamina anonymize``: one
de-identified file out per file in, nothing stored in the server; ``/studies/{id}/
anonymize`` would instead store a new study inside Orthanc (index + storage writes that
``lamina anonymize`` does not do), so per instance is the fair comparison.

Lamina's start-up (the same command on an empty folder: interpreter, imports, engine)
is timed first, and every program's CPU time (its own and its workers', from the
kernel's accounting of waited-for children) is printed beside its wall time, so the
per-file CPU of ``lamina anonymize`` is (CPU of the run - CPU of the start-up) / files.

In the same run, the engine alone (in process: read, de-identify, encode) is timed with
the residual-PHI text scan (issue 16) off and on, interleaved, on the same files, so the
scan's cost is a before/after figure. Prints the figures; asserts nothing about time.

    .venv/bin/python -m benchmarks.anonymize [--slices 300] [--size 512] [--repeat 1]
                                             [--baseline OTHER_CHECKOUT]
                                             [--no-scan-figure | --scan-only]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from io import BytesIO
from pathlib import Path

from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian

from node.anonymize.anonymizer import Deidentifier, encode
from node.anonymize.keys import create_key_file, load_project_key
from node.anonymize.settings import DeidSettings
from tests.harness import free_port, stop_process, wait_port
from tests.phi_corpus import PATIENTS, Study, write_ct_series

ROOT = Path(__file__).resolve().parent.parent


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


#: The programs' environment: this one, but free to write bytecode. pip compiled the
#: installed tools (dicognito, pydicom) when it installed them; a checkout's ``node``
#: package is compiled on its first import, unless PYTHONDONTWRITEBYTECODE forbids it
#: (as some shells and CI images set), and then every run compiles it again: 0.1-0.2 s
#: of each start-up that no installed ``lamina`` pays. The first start-up run writes it.
_AS_INSTALLED = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def _set_aside(out: Path) -> None:
    """Move a previous run's output folder out of the way, to be deleted with the work
    folder at the end: deleting it here would make every file the next run creates
    slower (ext4 without a journal, :func:`benchmarks.ingest.wait_out_deletions`)."""
    if out.exists():
        out.rename(out.with_name(f"{out.name}.done-{uuid.uuid4().hex[:8]}"))


def _timed(command: list[str], out: Path, cwd: Path = ROOT) -> tuple[float, float]:
    """Wall seconds and CPU seconds (the program's and its workers') of one run; ``python
    -m node`` runs the checkout in ``cwd``."""
    _set_aside(out)
    cpu = _children_cpu()
    start = time.perf_counter()
    # Output is captured, not shown: dicognito's warnings quote element values.
    run = subprocess.run(command, cwd=cwd, check=False, capture_output=True, text=True,
                         env=_AS_INSTALLED)
    elapsed = time.perf_counter() - start
    if run.returncode != 0:
        raise SystemExit(f"{command[2]} failed ({run.returncode}):\n{run.stderr[-2000:]}")
    return elapsed, _children_cpu() - cpu


def _orthanc_rate(work: Path, series: list[Path], repeat: int) -> float:
    """Best files/s of Orthanc's per-instance anonymization over ``repeat`` rounds."""
    port, http = free_port(), free_port()
    storage = work / "orthanc-db"
    config = work / "orthanc.json"
    config.write_text(json.dumps({
        "Name": "bench", "DicomAet": "ORTHANC", "DicomPort": port, "HttpPort": http,
        "StorageDirectory": str(storage), "IndexDirectory": str(storage),
        "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "Plugins": [],
    }))
    process = subprocess.Popen(["Orthanc", str(config)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{http}"
    try:
        wait_port(http)

        def call(method: str, path: str, body: bytes | None = None) -> bytes:
            request = urllib.request.Request(base + path, data=body, method=method)
            with urllib.request.urlopen(request, timeout=60) as answer:
                return answer.read()

        ids = [json.loads(call("POST", "/instances", p.read_bytes()))["ID"] for p in series]
        best = 0.0
        out = work / "out-o"

        def anonymize(item: tuple[int, str]) -> None:
            # Orthanc's default profile (PS3.15 basic); the answer is the new file
            (out / f"{item[0]}.dcm").write_bytes(
                call("POST", f"/instances/{item[1]}/anonymize", b"{}"))

        for round_ in range(repeat):
            _set_aside(out)
            out.mkdir()

            start = time.perf_counter()
            with ThreadPoolExecutor(2) as pool:
                list(pool.map(anonymize, enumerate(ids)))
            seconds = time.perf_counter() - start
            written = sum(1 for _ in out.iterdir())
            rate = written / seconds
            best = max(best, rate)
            print(f"round {round_ + 1}  {'orthanc':17s} {written} files in {seconds:6.2f} s "
                  f"= {rate:6.1f} files/s")
        return best
    finally:
        stop_process(process)


def _engine_rate(files: list[bytes], engine: Deidentifier) -> float:
    """Files per second through read + de-identify + encode, in this process."""
    start = time.perf_counter()
    for data in files:
        encode(engine.deidentify(dcmread(BytesIO(data))).dataset)
    return len(files) / (time.perf_counter() - start)


def _text_scan_figure(series: list[Path], key_file: Path, repeat: int) -> None:
    key = load_project_key(key_file)
    files = [p.read_bytes() for p in series]
    engines = {
        "text scan off": Deidentifier(DeidSettings(), key, text_scan=False),
        "text scan on": Deidentifier(DeidSettings(), key),
    }
    best: dict[str, float] = {}
    for round_ in range(max(repeat, 2)):
        for name, engine in engines.items():
            rate = _engine_rate(files, engine)
            best[name] = max(best.get(name, 0.0), rate)
            print(f"round {round_ + 1}  engine, {name:13s} {rate:6.1f} files/s")
    off, on = best["text scan off"], best["text scan on"]
    print(f"engine: text scan off {off:.1f} files/s, on {on:.1f} files/s, "
          f"scan cost {100 * (1 - on / off):.1f}% of the de-identification time")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--baseline", type=Path, default=None,
                        help="another checkout of Lamina (e.g. `git archive main | tar -x`), "
                             "timed in the same run as 'before'")
    parser.add_argument("--no-scan-figure", action="store_true",
                        help="skip the in-process text scan off/on figure (large corpora)")
    parser.add_argument("--scan-only", action="store_true",
                        help="only the in-process text scan off/on figure")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="lamina-bench-") as tmp:
        work = Path(tmp)
        study = Study(PATIENTS[0], 90, "20230314", ExplicitVRLittleEndian, n_slices=args.slices)
        series = write_ct_series(study, work / "in", rows=args.size, columns=args.size)
        key = create_key_file(work / "keys" / "project.key")
        size_mb = sum(p.stat().st_size for p in series) / 1e6
        print(f"series: {len(series)} CT slices, {args.size}x{args.size}, {size_mb:.0f} MB")
        if not args.no_scan_figure:
            _text_scan_figure(series, key, args.repeat)
        if args.scan_only:
            return 0
        lamina = [sys.executable, "-m", "node", "anonymize",
                  str(work / "in"), "--key-file", str(key), "--out"]
        roots = {"lamina": ROOT}
        if args.baseline is not None:
            roots = {"before": args.baseline.resolve(), **roots}
        tools: dict[str, tuple[list[str], Path, Path]] = {}
        for label, root in roots.items():
            for jobs in ("1", "2"):
                out = work / f"out-{label}-{jobs}"
                tools[f"{label} --jobs {jobs}"] = ([*lamina, str(out), "--jobs", jobs], out, root)
        if importlib.util.find_spec("dicognito") is not None:
            tools["dicognito"] = ([sys.executable, "-m", "dicognito", "--quiet",
                                   "--output-directory", str(work / "out-d"), str(work / "in")],
                                  work / "out-d", ROOT)
        else:
            print("dicognito: not installed (.venv/bin/pip install dicognito), not compared")
        (work / "empty").mkdir()
        startup = [*lamina[:4], str(work / "empty"), *lamina[5:], str(work / "out-0")]
        best: dict[str, float] = {}
        cpu_per_file: dict[str, float] = {}
        for round_ in range(args.repeat):
            start_cpu = {}
            for label, root in roots.items():
                wall, start_cpu[label] = min(_timed(startup, work / "out-0", root)
                                             for _ in range(3))
                print(f"round {round_ + 1}  {label} start-up (no files) {wall:6.3f} s wall, "
                      f"{start_cpu[label]:6.3f} s CPU (best of 3)")
            for name, (command, out, root) in tools.items():
                seconds, cpu = _timed(command, out, root)
                written = sum(1 for _ in out.iterdir())
                rate = written / seconds
                best[name] = max(best.get(name, 0.0), rate)
                extra = ""
                label = name.split()[0]
                if label in start_cpu:
                    per_file = 1000 * (cpu - start_cpu[label]) / written
                    cpu_per_file[name] = min(cpu_per_file.get(name, per_file), per_file)
                    extra = f", {per_file:.2f} ms CPU per file after start-up"
                print(f"round {round_ + 1}  {name:17s} {written} files in {seconds:6.2f} s "
                      f"= {rate:6.1f} files/s; CPU {cpu:6.2f} s{extra}")
        orthanc = _orthanc_rate(work, series, args.repeat)
        for name in cpu_per_file:
            against_dicognito = (f"dicognito: {best['dicognito']:.1f} files/s, ratio "
                                 f"{best[name] / best['dicognito']:.2f}; "
                                 if "dicognito" in best else "")
            print(f"{name}: {best[name]:.1f} files/s, {against_dicognito}orthanc: "
                  f"{orthanc:.1f} files/s, ratio {best[name] / orthanc:.2f}; "
                  f"{cpu_per_file[name]:.2f} ms CPU per file after start-up")
    return 0


if __name__ == "__main__":
    sys.exit(main())
