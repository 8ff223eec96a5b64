"""A real Lamina node as a subprocess on an ephemeral port, for tests and benchmarks.

Stopped by process id (SIGTERM, or SIGKILL for crash tests), never by name.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from pynetdicom import AE
from pynetdicom.sop_class import Verification

from node.anonymize.keys import ProjectKey, create_key_file, load_project_key

TEST_AET = "TESTSCU"
REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_config(path: Path, sections: dict[str, dict[str, object]]) -> None:
    lines = []
    for name, values in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
        lines.append("")
    path.write_text("\n".join(lines))


class NodeProcess:
    """``lamina serve`` in a subprocess with its own config, data folder and keys."""

    def __init__(self, root: Path, *, workers: int = 1, node: dict | None = None,
                 storage: dict | None = None, peers: dict[str, dict] | None = None,
                 data: Path | None = None, sections: dict[str, dict] | None = None) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        self.port = free_port()
        self.data = data or root / "data"
        self.config = root / "node.toml"
        self.log_path = root / "node.log"
        self.workers = workers
        self.key_file = root / "keys" / "project.key"
        if not self.key_file.exists():
            create_key_file(self.key_file)
        peers = peers if peers is not None else {
            "tests": {"ae_title": TEST_AET, "host": "127.0.0.1", "port": 1,
                      "services": ["store", "find", "move", "get"]},
        }
        sections: dict[str, dict[str, object]] = {
            "node": {"ae_title": "LAMINA", "bind": "127.0.0.1", "port": self.port,
                     "workers": workers, **(node or {})},
            "storage": {"data": str(self.data), "min_free_mb": 0, **(storage or {})},
            "audit": {"signing_key": str(root / "keys" / "audit-signing.pem")},
            "log": {"level": "INFO"},
            "deidentify": {"key_file": str(self.key_file)},
            **(sections or {}),
        }
        sections.update({f"peers.{name}": values for name, values in peers.items()})
        write_config(self.config, sections)
        self.proc: subprocess.Popen | None = None

    def project_key(self) -> ProjectKey:
        """The node's key, so a test can compute the pseudonym of an original UID."""
        return load_project_key(self.key_file)

    @property
    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("LAMINA")}
        env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
        return env

    def start(self, timeout: float = 30.0) -> NodeProcess:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "node", "serve", "--config", str(self.config)],
            stdout=log, stderr=log, env=self.env, cwd=self.root,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"node exited with {self.proc.returncode}: {self.log()[-2000:]}")
            if self.listening_workers() >= self.workers and self.echo() == 0:
                return self
            time.sleep(0.2)
        raise TimeoutError(f"node did not answer C-ECHO: {self.log()[-2000:]}")

    def blob_path(self, sha256: str, area: str = "blobs") -> Path:
        """Where a blob lives: ``blobs`` (stored) or ``quarantine``."""
        return self.data / area / sha256[:2] / sha256

    def listening_workers(self) -> int:
        return self.log().count('"msg": "listening"')

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def echo(self, aet: str = TEST_AET) -> int | None:
        ae = AE(ae_title=aet)
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", self.port, ae_title="LAMINA")
        if not assoc.is_established:
            return None
        try:
            return int(assoc.send_c_echo().Status)
        finally:
            assoc.release()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def kill9(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def lamina(self, *args: str) -> subprocess.CompletedProcess:
        """Run a ``lamina`` CLI command against this node's config ($LAMINA_CONFIG)."""
        env = {**self.env, "LAMINA_CONFIG": str(self.config)}
        return subprocess.run([sys.executable, "-m", "node", *args], capture_output=True,
                              text=True, env=env, cwd=self.root, timeout=300)

    def __enter__(self) -> NodeProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def store(port: int, items: list, aet: str = TEST_AET) -> list[tuple[int, str]]:
    """C-STORE files or datasets over one association; (status, ErrorComment) for each.

    A status of -1 means the association was lost before the response.
    """
    from pydicom import dcmread
    from pydicom.dataset import Dataset

    ae = AE(ae_title=aet)
    contexts = set()
    for item in items:
        ds = item if isinstance(item, Dataset) else dcmread(item, stop_before_pixels=True)
        contexts.add((str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)))
    for sop_class, syntax in sorted(contexts):
        ae.add_requested_context(sop_class, [syntax])
    assoc = ae.associate("127.0.0.1", port, ae_title="LAMINA")
    if not assoc.is_established:
        raise ConnectionError("association not established")
    results = []
    try:
        for item in items:
            if not assoc.is_established:
                results.append((-1, "association lost"))
                continue
            rsp = assoc.send_c_store(item)
            status = int(rsp.Status) if "Status" in rsp else -1
            results.append((status, str(rsp.get("ErrorComment", ""))))
    finally:
        if assoc.is_established:
            assoc.release()
    return results
