"""A real Lamina node in a subprocess for network tests, and a raw-bytes C-STORE sender.

The node is started as ``lamina serve`` would be (same code path: migrations,
workers, series sweep) on an ephemeral port with its own data folder, and
stopped by its PID. Sending goes through pynetdicom with the dataset streamed
from a file as-is, so a test can put any bytes on the wire.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_file_meta_info
from pydicom.filewriter import dcmwrite
from pynetdicom import AE, _config

from node.anonymize.keys import create_key_file

REPO = Path(__file__).resolve().parents[1]
SCU_AE = "TESTSCU"
DCMTK_AE = "STORESCU"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RunningNode:
    port: int
    data: Path
    config: Path
    process: subprocess.Popen
    log: Path

    def stop(self) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=5)

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        """Run a ``lamina`` command against this node's config and data."""
        return run_cli(self.config, *args)


def run_cli(config: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", "from node.cli import main; main()", *args, "--config",
         str(config)],
        check=False, capture_output=True, text=True, timeout=120, env=_env(),
        cwd=config.parent,
    )


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def write_config(folder: Path, port: int, extra: str = "", workers: int = 1,
                 deidentify: dict[str, str] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "node.toml"
    key_file = folder / "keys" / "project.key"
    if not key_file.exists():
        create_key_file(key_file)
    config.write_text(f"""
[node]
ae_title = "LAMINA"
bind = "127.0.0.1"
port = {port}
workers = {workers}

[storage]
data = "{folder / 'data'}"
min_free_mb = 0

[audit]
signing_key = "{folder / 'keys' / 'audit.pem'}"

[log]
level = "INFO"

[deidentify]
key_file = "{key_file}"
{"".join(f'{k} = "{v}"' + chr(10) for k, v in (deidentify or {}).items())}
{extra}

[peers.scu]
ae_title = "{SCU_AE}"
host = "127.0.0.1"
port = 11113
services = ["store"]

[peers.dcmtk]
ae_title = "{DCMTK_AE}"
host = "127.0.0.1"
port = 11114
services = ["store"]
""")
    return config


def start_node(folder: Path, extra: str = "", workers: int = 1,
               deidentify: dict[str, str] | None = None) -> RunningNode:
    """Start ``lamina serve`` and wait until it accepts connections."""
    port = free_port()
    config = write_config(folder, port, extra, workers, deidentify)
    log = folder / "node.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-c", "from node.cli import main; main()", "serve",
             "--config", str(config)],
            stdout=out, stderr=subprocess.STDOUT, env=_env(), cwd=folder,
        )
    node = RunningNode(port, folder / "data", config, process, log)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"node exited: {log.read_text()[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return node
        except OSError:
            time.sleep(0.1)
    node.stop()
    raise RuntimeError("node did not start listening")


@dataclass(frozen=True)
class Response:
    status: int  # -1: no response (association failed or aborted)
    comment: str


def send_files(port: int, paths: list[Path], ae_title: str = SCU_AE) -> list[Response]:
    """C-STORE each file's dataset bytes exactly as they are in the file, one association."""
    _config.STORE_SEND_CHUNKED_DATASET = True
    _config.LOG_REQUEST_IDENTIFIERS = False
    ae = AE(ae_title=ae_title)
    contexts = set()
    for path in paths:
        meta = read_file_meta_info(path)
        contexts.add((str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID)))
    for sop_class, syntax in sorted(contexts):
        ae.add_requested_context(sop_class, [syntax])
    assoc = ae.associate("127.0.0.1", port, ae_title="LAMINA")
    if not assoc.is_established:
        return [Response(-1, "no association")] * len(paths)
    responses = []
    try:
        for path in paths:
            if not assoc.is_established:
                responses.append(Response(-1, "association lost"))
                continue
            rsp = assoc.send_c_store(path)
            responses.append(Response(int(rsp.Status) if "Status" in rsp else -1,
                                      str(rsp.get("ErrorComment", ""))))
    finally:
        if assoc.is_established:
            assoc.release()
    return responses


def as_file(ds: Dataset) -> bytes:
    """A DICOM file of ``ds`` exactly as given: pydicom's file-format enforcement would
    overwrite a deliberately mismatched file meta, so only the group length is added."""
    ds.preamble = b"\x00" * 128
    ds.file_meta.FileMetaInformationVersion = b"\x00\x01"
    ds.file_meta.FileMetaInformationGroupLength = 0  # recomputed when written
    buffer = DicomBytesIO()
    dcmwrite(buffer, ds, enforce_file_format=False)
    return buffer.getvalue()


def send_datasets(port: int, folder: Path, datasets: list[Dataset]) -> list[Response]:
    """Write datasets as DICOM files (contents untouched) and send them."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, ds in enumerate(datasets):
        path = folder / f"{i:05d}.dcm"
        path.write_bytes(as_file(ds))
        paths.append(path)
    return send_files(port, paths)
