"""DICOMweb benchmark: Lamina beside Orthanc's DICOMweb plugin, same series, same run.

    python -m benchmarks.dicomweb                      # 300 slices of 512x512
    python -m benchmarks.dicomweb --slices 300 --rows 256 --repeats 20

A phantom CT series is written once, stored in ``lamina serve`` (one worker,
HTTP on an ephemeral port; C-STORE from a ``deidentified`` peer, so the UIDs
are the same on both sides) and uploaded to Orthanc (``/usr/sbin/Orthanc``
with the plugin of Debian's ``orthanc-dicomweb``, found with ``dpkg -L``),
both started in a temporary folder on ephemeral ports. Then, with one
keep-alive HTTP client each:

* QIDO-RS: the instance list of the series (``/studies/S/series/S/instances``);
* WADO-RS: the series metadata (``/studies/S/series/S/metadata``), the first request
  (cold: nothing in memory; Lamina joins the metadata sidecars its after-commit work wrote
  beside each blob, building any not written yet) and the median after;
* WADO-RS frames: frame 1 of every instance, one request each, as frames/s.

Medians are printed with the ratio Orthanc / Lamina (above 1: Lamina faster).
Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from node.phantom import Phantom
from tests.harness import ProcessNode, free_port, stop_process, write_config
from tests.studies import qr_peer

TOKEN = "benchmark-token-0123456789"
FRAMES = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'


def write_series(folder: Path, slices: int, rows: int) -> tuple[list[Path], str, str]:
    phantom = Phantom(seed="dicomweb-bench", slices_count=slices, rows=rows, columns=rows,
                      pixel_spacing=0.7 * 512 / rows)
    folder.mkdir(parents=True)
    paths = []
    for k in range(slices):
        path = folder / f"CT{k + 1:04d}.dcm"
        phantom.slice(k).save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths, phantom.study_uid, phantom.series_uid


def orthanc_plugin() -> str | None:
    try:
        listed = subprocess.run(["dpkg", "-L", "orthanc-dicomweb"], capture_output=True,
                                text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        return None
    return next((p for p in listed if p.endswith(".so") and "plugins" in p), None) or next(
        (p for p in listed if ".so" in p), None)


def timed(run: Callable[[], object], repeats: int) -> float:
    """Median seconds of ``repeats`` runs after one warm-up."""
    run()
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def measure(client: httpx.Client, root: str, study: str, series: str, repeats: int) -> dict:
    series_url = f"{root}/studies/{study}/series/{series}"

    def qido():
        r = client.get(f"{series_url}/instances", headers={"Accept": "application/dicom+json"})
        r.raise_for_status()
        return r.json()

    instances = qido()
    sops = [i["00080018"]["Value"][0] for i in instances]

    def metadata():
        r = client.get(f"{series_url}/metadata", headers={"Accept": "application/dicom+json"})
        r.raise_for_status()
        assert len(r.json()) == len(sops)

    def frames():
        for sop in sops:
            r = client.get(f"{series_url}/instances/{sop}/frames/1", headers={"Accept": FRAMES})
            r.raise_for_status()

    started = time.perf_counter()
    metadata()  # the first time: nothing cached yet on either side
    cold = time.perf_counter() - started
    frame_seconds = timed(frames, max(1, repeats // 5))
    return {"instances": len(sops), "qido_ms": timed(qido, repeats) * 1000,
            "metadata_cold_ms": cold * 1000, "metadata_ms": timed(metadata, repeats) * 1000,
            "frames_per_s": len(sops) / frame_seconds}


def lamina(work: Path, files: list[Path], study: str, series: str, repeats: int) -> dict:
    http_port = free_port()
    node = ProcessNode(write_config(
        work / "lamina", peers={"bench": qr_peer("BENCH", "store", "find", "get")},
        validation={"rules": {"modality": "warn"}},
        http={"port": http_port, "clients": {"bench": {"token": TOKEN, "peer": "bench"}}}))
    node.start()
    try:
        stored = node.store(files, "BENCH")
        assert all(code == 0 for code, _ in stored), "every slice stored"
        with httpx.Client(headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60) as client:
            return measure(client, f"http://127.0.0.1:{http_port}/dicom-web", study, series,
                           repeats)
    finally:
        node.stop()


@contextmanager
def orthanc_server(folder: Path, binary: str, plugin: str) -> Iterator[tuple[str, int]]:
    """Orthanc with its DICOMweb plugin, index and storage in ``folder``, on free ports:
    yields its HTTP root and PID once it answers; stopped by PID."""
    folder.mkdir(parents=True, exist_ok=True)
    http = free_port()
    config = folder / "orthanc.json"
    config.write_text(json.dumps({
        "Name": "benchmark", "StorageDirectory": str(folder / "db"),
        "IndexDirectory": str(folder / "db"), "DicomAet": "ORTHANC", "DicomPort": free_port(),
        "HttpPort": http, "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
        "Plugins": [plugin], "StorageCompression": False,
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}}))
    server = subprocess.Popen([binary, str(config)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        with httpx.Client(timeout=5) as client:
            for _ in range(300):
                try:
                    client.get(f"http://127.0.0.1:{http}/system").raise_for_status()
                    break
                except httpx.HTTPError:
                    time.sleep(0.1)
        yield f"http://127.0.0.1:{http}", server.pid
    finally:
        stop_process(server)


def orthanc(work: Path, files: list[Path], study: str, series: str, repeats: int,
            binary: str, plugin: str) -> dict:
    with orthanc_server(work / "orthanc", binary, plugin) as (root, _pid), \
            httpx.Client(timeout=60) as client:
        for f in files:
            client.post(f"{root}/instances", content=f.read_bytes()).raise_for_status()
        return measure(client, f"{root}/dicom-web", study, series, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--rows", type=int, default=512, help="rows = columns of each slice")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="lamina-dicomweb-"))
    try:
        files, study, series = write_series(work / "series", args.slices, args.rows)
        results = {"Lamina": lamina(work, files, study, series, args.repeats)}
        binary, plugin = shutil.which("Orthanc"), orthanc_plugin()
        if binary and plugin:
            results["Orthanc"] = orthanc(work, files, study, series, args.repeats, binary,
                                         plugin)
        else:
            print("Orthanc or its DICOMweb plugin (orthanc-dicomweb) not installed: skipped")
        print(f"\n{args.slices} slices of {args.rows}x{args.rows}, median of {args.repeats}")
        print(f"  {'server':10} {'QIDO instances ms':>18} {'metadata 1st ms':>16}"
              f" {'metadata ms':>12} {'frames/s':>10}")
        for name, r in results.items():
            print(f"  {name:10} {r['qido_ms']:18.1f} {r['metadata_cold_ms']:16.1f}"
                  f" {r['metadata_ms']:12.1f} {r['frames_per_s']:10.0f}"
                  f"   ({r['instances']} instances listed)")
        if "Orthanc" in results:
            o, x = results["Orthanc"], results["Lamina"]
            print(f"  ratio Orthanc/Lamina: QIDO {o['qido_ms'] / x['qido_ms']:.1f}x, metadata"
                  f" first {o['metadata_cold_ms'] / x['metadata_cold_ms']:.1f}x,"
                  f" then {o['metadata_ms'] / x['metadata_ms']:.1f}x, frames/s"
                  f" {x['frames_per_s'] / o['frames_per_s']:.1f}x (above 1: Lamina faster)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
