"""Shared by the query/retrieve tests: a node in a subprocess, small studies, a storage SCP.

The node runs as ``lamina serve`` (one worker) on an ephemeral port that it
reports in its "listening" log line; it is stopped by its PID. Studies are
written with the phantom generator at 32×32 so that hundreds of instances stay
cheap, and are loaded through the real C-STORE path.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.dsutils import split_dataset
from pynetdicom.presentation import AllStoragePresentationContexts

from node.anonymize.keys import create_key_file
from node.config import load
from node.dimse.scu import Target, send_files
from node.phantom import Phantom
from node.storage.blobs import LocalBlobStore
from node.storage.sqlite.index import SqliteIndex

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A port that was free a moment ago (for peers that must be configured before they start)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _toml(value: object) -> str:
    return json.dumps(value, ensure_ascii=False)


@dataclass
class Node:
    """A running ``lamina serve`` subprocess and where its data lives."""

    process: subprocess.Popen
    port: int
    data: Path
    config: Path
    log: Path
    ae_title: str = "LAMINA"

    def index(self) -> SqliteIndex:
        return SqliteIndex(self.data / "index.sqlite3")

    def blob_path(self, sop_instance_uid: str) -> Path:
        """Where the node keeps an instance's bytes (content-addressed)."""
        return blob_path(self.data, sop_instance_uid)

    def audit_events(self, prefix: str, until=lambda events: bool(events),
                     timeout: float = 5.0) -> list[dict]:
        """Audit rows whose action starts with ``prefix``, oldest first.

        Query and retrieve events are written in the background within a
        fraction of a second, so this waits (up to ``timeout``) for ``until``.
        """
        deadline = time.monotonic() + timeout
        while True:
            index = self.index()
            try:
                with index.connection() as conn:
                    rows = conn.execute(
                        "SELECT action, actor, object, outcome FROM audit_event"
                        " WHERE action LIKE ? ORDER BY seq", (prefix + "%",)).fetchall()
            finally:
                index.close()
            events = [{"action": a, "actor": json.loads(ac), "object": json.loads(o),
                       "outcome": out} for a, ac, o, out in rows]
            if until(events) or time.monotonic() > deadline:
                return events
            time.sleep(0.05)

    def store(self, files: list[Path], calling_ae: str) -> None:
        """C-STORE files through the real ingest path; every one must succeed."""
        settings = load(self.config)
        results = send_files(settings, Target(self.ae_title, "127.0.0.1", self.port), files,
                             aet=calling_ae)
        failed = [r for r in results if r.status != 0]
        assert not failed, failed[:3]

    def stop(self) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=5)


def blob_path(data: Path, sop_instance_uid: str) -> Path:
    """Where the node with this data folder keeps an instance's bytes (content-addressed)."""
    index = SqliteIndex(data / "index.sqlite3")
    try:
        with index.reader() as r:
            sha = r.instances.blob_of(sop_instance_uid)
    finally:
        index.close()
    return LocalBlobStore(data / "blobs", data / "spool").local_path(sha)


def write_config(folder: Path, peers: dict[str, dict], ae_title: str = "LAMINA") -> Path:
    """A node config (port 0, data under ``folder``) with these peers; its path."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = [
        "[node]", f"ae_title = {_toml(ae_title)}", 'bind = "127.0.0.1"', "port = 0",
        "workers = 1", "max_associations = 8", "dimse_timeout = 30", "network_timeout = 30",
        "[storage]", f"data = {_toml(str(folder / 'data'))}", "min_free_mb = 0",
        "[audit]", f"signing_key = {_toml(str(folder / 'keys' / 'audit.pem'))}",
        "[log]", 'level = "INFO"',
    ]
    key_file = folder / "keys" / "project.key"
    if not key_file.exists():
        create_key_file(key_file)
    lines += ["[deidentify]", f"key_file = {_toml(str(key_file))}",
              # The studies are phantom CT slices relabelled MR/PT to exercise
              # ModalitiesInStudy: validation records that instead of refusing it.
              "[validation.rules]", 'modality = "warn"']
    for name, peer in peers.items():
        # Matching is under test: the studies are synthetic and stored as sent.
        peer = {"route": "deidentified", **peer}
        lines.append(f"[peers.{name}]")
        lines += [f"{k} = {_toml(v)}" for k, v in peer.items()]
    config = folder / "node.toml"
    config.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return config


def start_node(folder: Path, peers: dict[str, dict], ae_title: str = "LAMINA") -> Node:
    """Write a config with these peers and start the node on an ephemeral port."""
    config = write_config(folder, peers, ae_title)
    log = folder / "node.log"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-c", "from node.cli import main; main()", "serve",
             "--config", str(config)], stdout=out, stderr=subprocess.STDOUT, env=env,
            cwd=folder)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
            if '"msg": "listening"' in line:
                port = json.loads(line)["port"]
                return Node(process, port, folder / "data", config, log, ae_title)
        if process.poll() is not None:
            break
        time.sleep(0.1)
    process.kill()
    raise RuntimeError(f"node did not start:\n{log.read_text()[-3000:]}")


@dataclass(frozen=True)
class StudySpec:
    """A small synthetic study: what the matching tests look for."""

    seed: str
    patient_name: str
    patient_id: str
    study_date: str
    study_time: str
    accession: str
    modality: str
    description: str = "Synthetic study"
    referring: str = "REFERRER^SYNTHETIC"
    birth_date: str = "19700101"
    sex: str = "O"
    slices: int = 3
    charset: str = "ISO_IR 100"


def write_study(folder: Path, spec: StudySpec) -> list[Path]:
    """The study's slices as files (32×32 pixels: fast to send, real geometry)."""
    phantom = Phantom(seed=spec.seed, slices_count=spec.slices, rows=32, columns=32,
                      pixel_spacing=11.2, patient_name=spec.patient_name,
                      patient_id=spec.patient_id)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(spec.slices):
        ds = phantom.slice(i)
        ds.SpecificCharacterSet = spec.charset
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = spec.study_date
        ds.StudyTime = spec.study_time
        ds.ContentTime = spec.study_time
        ds.AcquisitionDateTime = spec.study_date + spec.study_time
        ds.AccessionNumber = spec.accession
        ds.Modality = spec.modality
        ds.StudyDescription = spec.description
        ds.ReferringPhysicianName = spec.referring
        ds.PatientBirthDate = spec.birth_date
        ds.PatientSex = spec.sex
        path = folder / f"{spec.seed}-{i + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def identifier(level: str, **keys: object) -> Dataset:
    """A query identifier: ``identifier("STUDY", PatientName="DOE*", StudyInstanceUID="")``."""
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


@dataclass
class StorageSCP:
    """A pynetdicom storage SCP standing in for a C-MOVE destination.

    Keeps the received bytes per SOP Instance UID; ``fail_uids`` are answered
    0xA700 and ``delay`` slows every store (for cancel tests).
    """

    ae_title: str
    port: int
    fail_uids: set[str] = field(default_factory=set)
    delay: float = 0.0
    received: dict[str, bytes] = field(default_factory=dict)
    originators: set[str] = field(default_factory=set)
    server: object = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def _on_store(self, event: evt.Event) -> int:
        uid = str(event.request.AffectedSOPInstanceUID)
        if self.delay:
            time.sleep(self.delay)
        if uid in self.fail_uids:
            return 0xA700
        with self.lock:
            self.received[uid] = received_dataset(event)
            self.originators.add(str(event.request.MoveOriginatorApplicationEntityTitle))
        return 0x0000

    def start(self) -> StorageSCP:
        ae = AE(ae_title=self.ae_title)
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, cx.transfer_syntax)
        self.server = ae.start_server(("127.0.0.1", self.port), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, self._on_store)])
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()


def received_dataset(event: evt.Event) -> bytes:
    """The data set bytes a C-STORE carried, whether pynetdicom spooled them to a file
    (``STORE_RECV_CHUNKED_DATASET``, set by a node running in this process) or not."""
    try:
        path = event.dataset_path
    except AttributeError:
        path = None
    if path is None:
        return event.encoded_dataset(include_meta=False)
    return stored_dataset_bytes(Path(path))


def stored_dataset_bytes(path: Path) -> bytes:
    """The data set of a stored file as a C-STORE carries it (the bytes after the file meta)."""
    _meta, offset = split_dataset(path)
    return path.read_bytes()[offset:]
