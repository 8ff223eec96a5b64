"""The one test harness: a node's config, the node itself (in-process or as ``lamina serve``),
the peers around it (a C-STORE sender, a storage SCP, DCMTK's storescp), the CLI, and reads of
its index.

* :func:`write_config` writes ``node.toml`` and the project key for a test
  (port 0, data, keys and log under one folder) and returns a :class:`NodeConfig`.
* :class:`InProcessNode` runs the whole node in this process, as ``lamina serve``
  runs each worker: ``NodeContext.open`` + ``start(supervisor=True)`` +
  ``build_dimse_server``, on port 0. The default for every network test: it talks
  over real sockets on 127.0.0.1 like any peer, starts in a fraction of a second,
  and ``drain()`` waits for its after-commit work instead of polling.
* :class:`ProcessNode` runs ``python -m node serve`` in a subprocess, ready once it
  answers C-ECHO, stopped by its PID (SIGTERM; :meth:`ProcessNode.kill9` for crash
  tests). Only for what needs a process: kill -9, several workers, and the DCMTK
  end-to-end tests in ``tests/e2e/``.
* :func:`send` is the one C-STORE sender (files or datasets, their bytes as they
  are, over one association); :class:`StorageSCP` the one stand-in for a C-MOVE
  destination; :func:`storescp` starts DCMTK's; :func:`lamina` the one CLI runner
  (in-process, click's ``CliRunner``); :func:`require` finds DCMTK's tools or skips
  naming the Debian package.

Both node kinds share :class:`Node`: ``port``, ``config``, ``data``, ``store()``,
``echo()``, ``cli()``, ``rows()``, ``audit_actions()``, ``audit_events()``,
``blob_path()``, ``log()``. Processes are stopped by their PID, never by name.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import os
import shutil
import signal
import socket
import socketserver
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from click.testing import CliRunner, Result
from pydicom import config as pydicom_config
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_file_meta_info
from pydicom.filewriter import dcmwrite
from pynetdicom import AE, _config, evt
from pynetdicom.dimse_messages import C_ECHO_RQ
from pynetdicom.dimse_primitives import C_ECHO
from pynetdicom.dsutils import split_dataset
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.sop_class import Verification
from pynetdicom.transport import ThreadedAssociationServer

from node.anonymize.keys import ProjectKey, create_key_file, load_project_key
from node.atomic_file import exchange
from node.config import Settings, load
from node.dimse.sender import recv_exactly
from node.dimse.spool import MEMORY_FILE_NAME
from node.storage.backend import open_index
from node.storage.blobs import LocalBlobStore
from node.storage.interface import Index
from node.storage.postgresql.connection import PgConnection
from node.storage.postgresql.index import PostgresIndex

REPO = Path(__file__).resolve().parents[1]
#: The calling AE of the default test peer.
TEST_AET = "TESTSCU"
#: The node's AE title unless a test sets another.
NODE_AET = "LAMINA"
#: pynetdicom's process-wide flags a node in this process sets (restored when it stops).
PYNETDICOM_FLAGS = ("LOG_REQUEST_IDENTIFIERS", "LOG_RESPONSE_IDENTIFIERS",
                    "STORE_RECV_CHUNKED_DATASET", "STORE_SEND_CHUNKED_DATASET")


def require(binary: str, package: str = "dcmtk") -> str:
    """The path of an installed tool a test needs (DCMTK's by default), or a skip naming it
    and its Debian package.

    The interpreter's own scripts folder is not searched: pynetdicom installs
    Python apps named like DCMTK's (echoscu, storescu, findscu, getscu, movescu,
    storescp), and with an activated virtualenv they would stand in for DCMTK.
    """
    own = {Path(sysconfig.get_path("scripts")).resolve(), Path(sys.executable).parent.resolve()}
    # Debian puts servers (Orthanc, haproxy) in /usr/sbin, which a user's PATH may lack.
    dirs = [*os.environ.get("PATH", "").split(os.pathsep), "/usr/sbin"]
    search = os.pathsep.join(d for d in dirs if d and Path(d).resolve() not in own)
    path = shutil.which(binary, path=search)
    if path is None:
        import pytest

        pytest.skip(f"{binary} is not installed (Debian package {package}; .ci/run installs it)")
    return path


def free_port() -> int:
    """A port that was free a moment ago: for a peer that must be configured before it
    listens, or one that must not listen at all. Anything that can bind port 0, does."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 30.0) -> None:
    """Return once something accepts connections on 127.0.0.1:``port`` (a peer the test or
    benchmark started: Orthanc, storescp, HAProxy); TimeoutError after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listens on port {port}")


def memory_spools_open() -> int:
    """How many memory spools (:mod:`node.dimse.spool`) this process holds open: an
    in-process node's receiver must close each one it made."""
    count = 0
    for fd in Path("/proc/self/fd").iterdir():
        with suppress(OSError):  # closed between listing and reading
            count += MEMORY_FILE_NAME in os.readlink(fd)
    return count


def context_switches(pid: int, tid: int) -> int:
    """Context switches (voluntary and involuntary) of thread ``tid`` of process ``pid`` so
    far, from /proc: a thread woken for nothing shows here, whatever the machine's load."""
    lines = Path(f"/proc/{pid}/task/{tid}/status").read_text().splitlines()
    fields = dict(line.split(":\t", 1) for line in lines if ":\t" in line)
    return int(fields["voluntary_ctxt_switches"]) + int(fields["nonvoluntary_ctxt_switches"])


# --- config -------------------------------------------------------------------------------


def peer(ae_title: str, *services: str, host: str = "127.0.0.1", port: int = 1,
         **extra: Any) -> dict[str, Any]:
    """A ``[peers.NAME]`` table: ``peer("CLIENT", "store", "find", route="deidentified")``."""
    return {"ae_title": ae_title, "host": host, "port": port, "services": list(services),
            **extra}


#: The default peer: TESTSCU at 127.0.0.1, every service, the default (clinical) route.
DEFAULT_PEERS = {"tests": peer(TEST_AET, "store", "find", "move", "get")}


@dataclass(frozen=True)
class NodeConfig:
    """A test node's files: its config, data folder and project key (outside the data)."""

    root: Path
    path: Path
    data: Path
    key_file: Path

    def settings(self) -> Settings:
        """The settings as the node reads them (no environment overrides)."""
        return load(self.path, environ={})

    def project_key(self) -> ProjectKey:
        """The node's key, so a test can compute the pseudonym of an original UID."""
        return load_project_key(self.key_file)


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return json.dumps(str(value), ensure_ascii=False)  # a TOML basic string


def _table(name: str, values: dict[str, Any]) -> list[str]:
    lines = [f"[{name}]"]
    lines += [f"{k} = {_toml(v)}" for k, v in values.items()
              if v is not None and not isinstance(v, dict)]
    for key, sub in values.items():
        if isinstance(sub, dict):
            lines += _table(f"{name}.{key}", sub)
    return lines


def write_config(root: Path, *, peers: dict[str, dict] | None = None,
                 node: dict | None = None, storage: dict | None = None,
                 index: dict | None = None, audit: dict | None = None, log: dict | None = None,
                 deidentify: dict | None = None, validation: dict | None = None,
                 annotations: dict | None = None, review: dict | None = None,
                 forward: dict | None = None, http: dict | None = None,
                 identity: dict | None = None, tls: dict | None = None,
                 dimse: dict | None = None,
                 data: Path | None = None, key: bool = True) -> NodeConfig:
    """Write ``root/node.toml`` (and ``root/keys/project.key`` unless ``key=False``).

    Defaults: AE title LAMINA on 127.0.0.1 port 0, one worker; data in ``root/data``
    with no free-space floor; audit signing key and project key in ``root/keys``;
    the one peer of :data:`DEFAULT_PEERS`. Each keyword adds to or overrides its
    section; a nested dict is a sub-table (``validation={"rules": {...}}``).
    """
    root.mkdir(parents=True, exist_ok=True)
    key_file = root / "keys" / "project.key"
    if key and not key_file.exists():
        create_key_file(key_file)
    data = data or root / "data"
    sections: dict[str, dict[str, Any]] = {
        "node": {"ae_title": NODE_AET, "bind": "127.0.0.1", "port": 0, "workers": 1,
                 **(node or {})},
        "storage": {"data": str(data), "min_free_mb": 0, **(storage or {})},
        "audit": {"signing_key": str(root / "keys" / "audit-signing.pem"), **(audit or {})},
        "log": {"level": "INFO", **(log or {})},
        "deidentify": {"key_file": str(key_file), **(deidentify or {})},
    }
    # Double reading is off unless a test asks for it: which studies a random project
    # key chooses must not decide what an unrelated test sees.
    sections["annotations"] = {"double_read_fraction": 0.0, **(annotations or {})}
    # HTTP is off unless a test asks for it (then on port 0 unless it says otherwise).
    sections["http"] = {"port": 0, **http} if http is not None else {"enabled": False}
    for name, values in (("index", index), ("validation", validation), ("review", review),
                         ("forward", forward), ("identity", identity), ("tls", tls),
                         ("dimse", dimse)):
        if values:
            sections[name] = dict(values)
    for name, values in (DEFAULT_PEERS if peers is None else peers).items():
        sections[f"peers.{name}"] = values
    lines: list[str] = []
    for name, values in sections.items():
        lines += [*_table(name, values), ""]
    path = root / "node.toml"
    path.write_text("\n".join(lines), encoding="utf-8")
    return NodeConfig(root, path, data, key_file)


# --- the CLI --------------------------------------------------------------------------------


def lamina(*args: str, config: Path | NodeConfig | None = None,
           env: dict[str, str | None] | None = None, input: str | None = None) -> Result:
    """``lamina ARGS [--config CONFIG]`` in this process (click's CliRunner).

    The result has ``exit_code``, ``stdout``, ``stderr`` and ``output``. Commands
    that set process-wide state (logging, pydicom's validation modes) have it
    restored afterwards. ``$LAMINA_*`` from the environment is not seen. ``input`` is
    what the user types at prompts.
    """
    from node.cli import main

    if isinstance(config, NodeConfig):
        config = config.path
    argv = [*args, "--config", str(config)] if config is not None else list(args)
    environ: dict[str, str | None] = {k: None for k in os.environ if k.startswith("LAMINA")}
    environ.update(env or {})
    with _process_state_kept():
        return CliRunner(env=environ).invoke(main, argv, input=input)


@contextmanager
def _process_state_kept() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    pynetdicom_level = logging.getLogger("pynetdicom").level
    reading = pydicom_config.settings.reading_validation_mode
    writing = pydicom_config.settings.writing_validation_mode
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        logging.getLogger("pynetdicom").setLevel(pynetdicom_level)
        pydicom_config.settings.reading_validation_mode = reading
        pydicom_config.settings.writing_validation_mode = writing


# --- sending -----------------------------------------------------------------------------


class Response(NamedTuple):
    """A C-STORE response: its status (-1: the association was lost first) and ErrorComment."""

    status: int
    comment: str


def as_file(ds: Dataset) -> bytes:
    """A DICOM file of ``ds`` exactly as given (its file meta too, even when it contradicts
    the data set: pydicom's file-format enforcement would overwrite it). ``ds`` is not
    changed."""
    out = copy.copy(ds)  # shares the elements; the preamble and file meta are its own
    out.preamble = b"\x00" * 128
    out.file_meta = copy.deepcopy(ds.file_meta)
    out.file_meta.FileMetaInformationVersion = b"\x00\x01"
    out.file_meta.FileMetaInformationGroupLength = 0  # recomputed when written
    buffer = DicomBytesIO()
    dcmwrite(buffer, out, enforce_file_format=False)
    return buffer.getvalue()


_chunked = threading.Lock()
_chunked_users = 0
_chunked_before = False


@contextmanager
def _files_sent_as_they_are() -> Iterator[None]:
    """pynetdicom sends a file's data set bytes without decoding them only in its chunked
    mode, a process-wide flag: on while any send runs, then back as it was."""
    global _chunked_users, _chunked_before
    with _chunked:
        if _chunked_users == 0:
            _chunked_before = _config.STORE_SEND_CHUNKED_DATASET
            _config.STORE_SEND_CHUNKED_DATASET = True
        _chunked_users += 1
    try:
        yield
    finally:
        with _chunked:
            _chunked_users -= 1
            if _chunked_users == 0:
                _config.STORE_SEND_CHUNKED_DATASET = _chunked_before


def send(port: int, items: Sequence[Path | Dataset], aet: str = TEST_AET,
         called: str = NODE_AET, host: str = "127.0.0.1", source: str = "") -> list[Response]:
    """C-STORE each item over one association (pynetdicom as SCU); a Response for each.

    A file goes as its bytes are, file meta and all (the contexts come from its meta);
    a data set is written as a file first (:func:`as_file`), so a test can put a
    deliberately broken object on the wire. Raises ConnectionError when the
    association is not established. ``source``: the local address to connect from (another
    loopback address, e.g. 127.0.0.2, tells a client apart from a proxy on 127.0.0.1).
    """
    with tempfile.TemporaryDirectory(prefix="lamina-send-") as tmp:
        paths = []
        for i, item in enumerate(items):
            if isinstance(item, Dataset):
                path = Path(tmp) / f"{i:05d}.dcm"
                path.write_bytes(as_file(item))
                item = path
            paths.append(Path(item))
        return _send_files(host, port, paths, aet, called, source)


def _send_files(host: str, port: int, paths: list[Path], aet: str,
                called: str, source: str = "") -> list[Response]:
    ae = AE(ae_title=aet)
    contexts = set()
    for path in paths:
        meta = read_file_meta_info(path)
        contexts.add((str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID)))
    for sop_class, syntax in sorted(contexts):
        ae.add_requested_context(sop_class, [syntax])
    with _files_sent_as_they_are():
        assoc = ae.associate(host, port, ae_title=called, bind_address=(source, 0))
        if not assoc.is_established:
            raise ConnectionError(f"association to {called}@{host}:{port} not established")
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


def echo(port: int, aet: str = TEST_AET, called: str = NODE_AET,
         source: str = "") -> int | None:
    """C-ECHO: the status, or None when the association is not established."""
    ae = AE(ae_title=aet)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title=called, bind_address=(source, 0))
    if not assoc.is_established:
        return None
    try:
        rsp = assoc.send_c_echo()
        return int(rsp.Status) if "Status" in rsp else None
    finally:
        assoc.release()


def proxy_v1(client: str, port: int = 40000) -> bytes:
    """A PROXY v1 line naming ``client`` as the connection's real source (IPv4)."""
    return f"PROXY TCP4 {client} 127.0.0.1 {port} 104\r\n".encode("ascii")


def proxy_relay(node_port: int, header: bytes) -> int:
    """A one-connection stand-in for HAProxy's send-proxy: a port that, when connected to,
    opens a connection to the node, writes ``header`` (a PROXY line) and then relays bytes
    both ways; for reaching one node of several whose ``proxy_protocol`` is on."""
    listener = socket.create_server(("127.0.0.1", 0))

    def pipe(src: socket.socket, dst: socket.socket) -> None:
        with src, dst, suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)

    def run() -> None:
        client, _ = listener.accept()
        listener.close()
        upstream = socket.create_connection(("127.0.0.1", node_port))
        upstream.sendall(header)
        threading.Thread(target=pipe, args=(client, upstream.dup()), daemon=True).start()
        pipe(upstream, client.dup())

    threading.Thread(target=run, daemon=True).start()
    return listener.getsockname()[1]


# --- the node -----------------------------------------------------------------------------


class Node:
    """What both node kinds offer a test; see :class:`InProcessNode` and :class:`ProcessNode`."""

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        settings = config.settings()
        self.ae_title = settings.node.ae_title
        #: A calling AE the node admits from 127.0.0.1 (readiness checks).
        self.local_aet = next((p.ae_title for p in settings.peers
                               if p.allows_address("127.0.0.1")), TEST_AET)
        #: With [dimse] proxy_protocol on, a connection without a PROXY header is closed.
        self.proxied = settings.dimse.proxy_protocol

    @property
    def port(self) -> int:
        raise NotImplementedError

    @property
    def data(self) -> Path:
        return self.config.data

    @property
    def log_path(self) -> Path:
        return self.config.root / "node.log"

    def drain(self) -> None:
        """Wait for the node's after-commit work where the harness can (in-process)."""

    # --- as a peer sees it

    def store(self, items: Sequence[Path | Dataset], aet: str = TEST_AET) -> list[Response]:
        """C-STORE ``items`` from ``aet`` over one association (see :func:`send`)."""
        return send(self.port, items, aet=aet, called=self.ae_title)

    def echo(self, aet: str = TEST_AET) -> int | None:
        port = proxy_relay(self.port, proxy_v1("127.0.0.1")) if self.proxied else self.port
        return echo(port, aet, self.ae_title)

    def cli(self, *args: str, env: dict[str, str | None] | None = None) -> Result:
        """``lamina ARGS --config`` this node's config (in this process)."""
        return lamina(*args, config=self.config, env=env)

    # --- what it stored

    @contextmanager
    def index(self) -> Iterator[Index]:
        """The node's index (SQLite or PostgreSQL, as configured), for reads (``.reader()``)
        and raw SQL (``.connection()``)."""
        settings = self.config.settings()
        index = open_index(settings.index.backend, settings.index_path,
                           settings.index.busy_timeout_ms, dsn=settings.index.dsn)
        try:
            yield index
        finally:
            index.close()

    def rows(self, sql: str, *args: object) -> list[tuple]:
        """The rows of one SQL query (``?`` placeholders) on the node's index, as tuples."""
        with self.index() as index, index.connection() as conn:
            if isinstance(index, PostgresIndex):
                conn = PgConnection(conn)
            return [tuple(r) for r in conn.execute(sql, args).fetchall()]

    def audit_actions(self) -> list[str]:
        """Every audit event's action, oldest first (after :meth:`drain`)."""
        self.drain()
        return [a for (a,) in self.rows("SELECT action FROM audit_event ORDER BY seq")]

    def audit_events(self, prefix: str, until: Callable[[list[dict]], Any] = bool,
                     timeout: float = 5.0) -> list[dict]:
        """Audit events whose action starts with ``prefix``, oldest first, decoded.

        Query and retrieve events are written in the background: this drains
        what it can and waits (up to ``timeout``) until ``until(events)``.
        """
        deadline = time.monotonic() + timeout
        while True:
            self.drain()
            events = [{"action": a, "actor": json.loads(actor), "object": json.loads(obj),
                       "outcome": outcome}
                      for a, actor, obj, outcome in self.rows(
                          "SELECT action, actor, object, outcome FROM audit_event"
                          " WHERE action LIKE ? ORDER BY seq", prefix + "%")]
            if until(events) or time.monotonic() > deadline:
                return events
            time.sleep(0.05)

    def blob_path(self, sha256: str, area: str = "blobs") -> Path:
        """Where a blob lives: ``blobs`` (stored) or ``quarantine``."""
        settings = self.config.settings()
        return LocalBlobStore(settings.blob_root / area, settings.spool_dir).local_path(sha256)

    def instance_path(self, sop_instance_uid: str) -> Path:
        """The stored file of an instance (its blob, found through the index)."""
        with self.index() as index, index.reader() as r:
            sha = r.instances.blob_of(sop_instance_uid)
        return self.blob_path(sha)

    def project_key(self) -> ProjectKey:
        return self.config.project_key()

    def log(self) -> str:
        """The node's log so far (JSON lines)."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


class _LogFile(logging.Handler):
    """The node's log lines (as ``lamina serve`` writes them) appended to its log file."""

    def __init__(self, path: Path) -> None:
        from node.logs import JsonFormatter

        super().__init__(logging.INFO)
        self.setFormatter(JsonFormatter())
        self._file = open(path, "a", encoding="utf-8")  # closed in close()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._file.write(self.format(record) + "\n")
            self._file.flush()
        except Exception:  # logging never fails the node
            self.handleError(record)

    def write_traceback(self, args: threading.ExceptHookArgs) -> None:
        """An exception no thread of the node caught, as a process would print it."""
        import traceback

        text = "".join(traceback.format_exception(args.exc_type, args.exc_value,
                                                  args.exc_traceback))
        with suppress(ValueError):  # closed
            self._file.write(f"Exception in thread {getattr(args.thread, 'name', '?')}:\n"
                             f"{text}")
            self._file.flush()

    def close(self) -> None:
        self._file.close()
        super().close()


class InProcessNode(Node):
    """The whole node in this process on port 0 (or the configured port).

    As ``lamina serve`` runs a worker: ``NodeContext.open(migrate, with_key)``,
    ``ctx.start(supervisor=True)``, ``build_dimse_server(ctx).start()``. Its
    ``lamina.*`` log lines go to ``node.log`` as JSON, and so does the traceback
    of any exception a thread leaves uncaught (a process would print it on
    stderr). :meth:`stop` stops the server, closes the context and restores what
    the node set process-wide (pynetdicom's flags, pydicom's validation modes,
    logging, the thread excepthook). A context manager::

        with InProcessNode(write_config(tmp_path)) as node:
            assert node.store([ds]) == [(0, "")]
            node.drain()
    """

    def __init__(self, config: NodeConfig) -> None:
        super().__init__(config)
        self.ctx: Any = None
        self.server: Any = None
        self._saved: dict[str, Any] = {}
        self._handler: _LogFile | None = None

    @property
    def settings(self) -> Settings:
        return self.ctx.settings if self.ctx is not None else self.config.settings()

    @property
    def port(self) -> int:
        if self.server is None:
            raise RuntimeError("the node is not started")
        return self.server.port

    def start(self) -> InProcessNode:
        from node.context import NodeContext
        from node.dimse.server import build_dimse_server
        from node.logs import quiet_pydicom

        if self.server is not None:
            return self
        self._saved = {
            "pynetdicom": {name: getattr(_config, name) for name in PYNETDICOM_FLAGS},
            "pydicom": (pydicom_config.settings.reading_validation_mode,
                        pydicom_config.settings.writing_validation_mode),
            "lamina_level": logging.getLogger("lamina").level,
            "excepthook": threading.excepthook,
        }
        self._handler = handler = _LogFile(self.log_path)
        previous = threading.excepthook

        def excepthook(args: threading.ExceptHookArgs) -> None:
            handler.write_traceback(args)
            previous(args)

        threading.excepthook = excepthook
        lamina_log = logging.getLogger("lamina")
        lamina_log.addHandler(self._handler)
        lamina_log.setLevel(logging.INFO)
        quiet_pydicom()  # as serve does: pydicom's warnings would quote patient data
        try:
            self.ctx = NodeContext.open(self.config.settings(), migrate=True, with_key=True)
            self.ctx.start(supervisor=True)
            self.server = build_dimse_server(self.ctx).start()
        except BaseException:
            self.stop()
            raise
        return self

    @contextmanager
    def index(self) -> Iterator[Any]:
        """The running node's own index (see :meth:`Node.index`)."""
        if self.ctx is None:
            with super().index() as index:
                yield index
        else:
            yield self.ctx.index

    def drain(self, timeout: float = 30.0) -> None:
        """Wait for after-commit work (a SEG's check) and queued audit events."""
        if self.ctx is not None:
            self.ctx.drain(timeout)

    def stop(self) -> None:
        server, self.server = self.server, None
        ctx, self.ctx = self.ctx, None
        try:
            if server is not None:
                server.stop()
        finally:
            try:
                if ctx is not None:
                    ctx.close()
            finally:
                self._restore()

    def _restore(self) -> None:
        saved, self._saved = self._saved, {}
        if saved:
            for name, value in saved["pynetdicom"].items():
                setattr(_config, name, value)
            (pydicom_config.settings.reading_validation_mode,
             pydicom_config.settings.writing_validation_mode) = saved["pydicom"]
            logging.getLogger("lamina").setLevel(saved["lamina_level"])
            threading.excepthook = saved["excepthook"]
        if self._handler is not None:
            logging.getLogger("lamina").removeHandler(self._handler)
            self._handler.close()
            self._handler = None

    def __enter__(self) -> InProcessNode:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class ProcessNode(Node):
    """``lamina serve`` (``python -m node serve --config ...``) in a subprocess.

    Ready when every worker has logged "listening" and the node answers C-ECHO.
    With one worker it binds port 0 and the port is read from its log; with more,
    they must share a fixed port, taken from :func:`free_port`. Stopped by PID:
    :meth:`stop` (SIGTERM, then SIGKILL after 20 s), :meth:`kill9`. Starting again
    reuses the config and data folder (a restart). Its log is ``node.log``.
    """

    def __init__(self, config: NodeConfig) -> None:
        super().__init__(config)
        settings = config.settings()
        self.workers = settings.node.workers
        self._fixed_port = settings.node.port
        self.proc: subprocess.Popen | None = None
        self._port: int | None = None
        self._log_offset = 0

    @classmethod
    def with_workers(cls, root: Path, workers: int, **config: Any) -> ProcessNode:
        """A node of ``workers`` receiving processes on one fixed port."""
        node = dict(config.pop("node", None) or {})
        node.update(workers=workers, port=free_port() if workers > 1 else 0)
        return cls(write_config(root, node=node, **config))

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("the node is not started")
        return self._port

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @staticmethod
    def env() -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("LAMINA")}
        env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
        return env

    def start(self, timeout: float = 60.0) -> ProcessNode:
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        self._port = None
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "node", "serve", "--config", str(self.config.path)],
                stdout=log, stderr=log, env=self.env(), cwd=self.config.root)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"node exited with {self.proc.returncode}:"
                                   f" {self.log()[-2000:]}")
            listening = self._listening()
            if len(listening) >= self.workers:
                self._port = self._fixed_port or int(listening[0]["port"])
                if self.echo(self.local_aet) == 0:
                    return self
            time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"node did not answer C-ECHO: {self.log()[-2000:]}")

    def _listening(self) -> list[dict]:
        """The "listening" lines this run logged (one per worker)."""
        if not self.log_path.exists():
            return []
        with open(self.log_path, "rb") as f:
            f.seek(self._log_offset)
            text = f.read().decode(errors="replace")
        found = []
        for line in text.splitlines():
            if '"msg": "listening"' in line:
                with suppress(ValueError):  # a line still being written
                    found.append(json.loads(line))
        return found

    def worker_pids(self) -> set[int]:
        """The PIDs of this run's receiving processes."""
        return {int(line["pid"]) for line in self._listening()}

    def stop(self) -> None:
        """SIGTERM by PID and wait (SIGKILL after 20 s)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def kill9(self) -> None:
        """SIGKILL the node (its workers die with it) and reap it."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def __enter__(self) -> ProcessNode:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --- peers ----------------------------------------------------------------------------------


def process_status(pid: int) -> dict[str, int]:
    """The numeric fields of ``/proc/PID/status`` (VmRSS, VmHWM in kB; Threads a count):
    what the memory and churn checks sample in the process that does the work."""
    fields: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        first = value.split()[:1]
        if first and first[0].isdigit():
            fields[name] = int(first[0])
    return fields


@contextmanager
def http_root(ctx: Any) -> Iterator[str]:
    """The context's HTTP app served on an ephemeral port of 127.0.0.1: its root URL
    (``http://127.0.0.1:PORT``) while the block runs, the server stopped after."""
    from node.web.app import build_app  # Starlette only for the tests that serve HTTP
    from node.web.server import HttpServer

    server = HttpServer(build_app(ctx), "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{server.port}"
    finally:
        server.stop()


def received_dataset(event: evt.Event) -> bytes:
    """The data set bytes a C-STORE carried, whether pynetdicom spooled them to a file
    (``STORE_RECV_CHUNKED_DATASET``, set while a node runs in this process) or not."""
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


@dataclass
class StorageSCP:
    """A pynetdicom storage SCP standing in for a C-MOVE (or send) destination.

    Listens on ``port`` (0: a free one, read back from :attr:`port` once started).
    Accepts every storage SOP class in pynetdicom's default syntaxes, or only
    ``syntaxes`` ({SOP class: [transfer syntaxes]}) when given. Keeps the data
    set bytes received per SOP Instance UID (:attr:`received`) and the transfer
    syntax they came in (:attr:`syntax`); ``fail_uids`` are answered 0xA700 and
    ``delay`` slows every store (for cancel tests).
    """

    ae_title: str
    port: int = 0
    syntaxes: dict[str, list[str]] | None = None
    fail_uids: set[str] = field(default_factory=set)
    delay: float = 0.0
    received: dict[str, bytes] = field(default_factory=dict)
    syntax: dict[str, str] = field(default_factory=dict)
    originators: set[str] = field(default_factory=set)
    server: Any = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    _thread: threading.Thread | None = None

    def _on_store(self, event: evt.Event) -> int:
        uid = str(event.request.AffectedSOPInstanceUID)
        if self.delay:
            time.sleep(self.delay)
        if uid in self.fail_uids:
            return 0xA700
        with self.lock:
            self.received[uid] = received_dataset(event)
            self.syntax[uid] = str(event.context.transfer_syntax)
            self.originators.add(str(event.request.MoveOriginatorApplicationEntityTitle))
        return 0x0000

    def start(self) -> StorageSCP:
        ae = AE(ae_title=self.ae_title)
        if self.syntaxes is None:
            for cx in AllStoragePresentationContexts:
                ae.add_supported_context(cx.abstract_syntax, cx.transfer_syntax)
        else:
            for sop_class, syntaxes in self.syntaxes.items():
                ae.add_supported_context(sop_class, syntaxes)
        # As ae.start_server(block=False) does, but polling for shutdown every 50 ms
        # rather than 0.5 s (how long stop() waits).
        self.server = ae.make_server(("127.0.0.1", self.port),
                                     evt_handlers=[(evt.EVT_C_STORE, self._on_store)],
                                     server_class=ThreadedAssociationServer)
        self._thread = threading.Thread(
            target=functools.partial(self.server.serve_forever, poll_interval=0.05),
            name=f"storage-scp-{self.ae_title}", daemon=True)
        self._thread.start()
        self.port = int(self.server.server_address[1])
        return self

    def stop(self) -> None:
        server, self.server = self.server, None
        if server is not None:
            socketserver.BaseServer.shutdown(server)
            server.server_close()
            for assoc in server.active_associations:
                assoc.abort()
            if self._thread is not None:
                self._thread.join(timeout=10)

    def got(self, sop_instance_uid: str) -> tuple[str, bytes]:
        """(transfer syntax, data set bytes) received for an instance."""
        with self.lock:
            return self.syntax[sop_instance_uid], self.received[sop_instance_uid]

    def __enter__(self) -> StorageSCP:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def storescp(port: int, out: Path, *options: str, aet: str = "STORESCP") -> subprocess.Popen:
    """DCMTK's storescp on ``port`` writing into ``out``, once it accepts connections (a
    skip without it). End it with :func:`stop_process`."""
    binary = require("storescp")
    out.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen([binary, *options, "-aet", aet, "-od", str(out), str(port)],
                               env={**os.environ, "TCP_NODELAY": "1"},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return process
        except OSError:
            time.sleep(0.05)
    stop_process(process)
    raise RuntimeError("storescp did not start")


def stop_process(process: subprocess.Popen, grace: float = 5) -> None:
    """SIGTERM a process this test started (by its PID), SIGKILL after ``grace`` seconds."""
    process.terminate()
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


# --- a throwaway PostgreSQL cluster -----------------------------------------------------


def postgres_bindir() -> Path | None:
    """The directory of Debian's PostgreSQL server tools (initdb, pg_ctl), newest first;
    None when the server is not installed."""
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"),
                        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit()
                        else 0, reverse=True)
    if candidates:
        return candidates[0].parent
    found = shutil.which("initdb") or shutil.which("pg_ctl")
    return Path(found).resolve().parent if found else None


class PostgresCluster:
    """A PostgreSQL cluster of its own for a test session: ``initdb`` into a temporary
    folder, ``pg_ctl start`` on a free port (TCP on 127.0.0.1, and a Unix socket in that
    folder), stopped by its postmaster's PID. :meth:`database` makes a fresh database.

    initdb and the server refuse to run as root. When the tests run as root (CI does), the
    cluster runs as the unprivileged ``nobody`` through ``runuser`` and its folder is given
    to that user; as any other user it runs as that user. Authentication is ``trust`` on the
    socket and on 127.0.0.1 only, for the one user ``lamina``; fsync is off unless asked for
    (a test cluster is thrown away, durability is not what these tests measure).
    """

    USER = "lamina"

    def __init__(self, bindir: Path, *, fsync: bool = False) -> None:
        """``fsync``: on for benchmarks that compare durable ingest (off in tests)."""
        self.bindir = bindir
        self.fsync = fsync
        self.root = Path(tempfile.mkdtemp(prefix="lamina-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        self.pid: int | None = None
        self._as: list[str] = []
        self._count = 0
        if os.geteuid() == 0:
            self._as = ["runuser", "-u", "nobody", "--"]
            shutil.chown(self.root, "nobody")
            os.chmod(self.root, 0o755)

    def start(self) -> PostgresCluster:
        run = functools.partial(subprocess.run, check=True, capture_output=True, text=True,
                                timeout=120)
        if not self.data.exists():
            run([*self._as, str(self.bindir / "initdb"), "-D", str(self.data), "-U", self.USER,
                 "--auth=trust", "-E", "UTF8", "--locale=C.UTF-8", "-N"])
        options = (f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1"
                   f" -c fsync={'on' if self.fsync else 'off'} -c max_connections=200")
        run([*self._as, str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l",
             str(self.root / "server.log"), "-w", "-t", "60", "-o", options, "start"])
        self.pid = int((self.data / "postmaster.pid").read_text().split()[0])
        return self

    def dsn(self, dbname: str = "postgres") -> str:
        return f"host={self.root} port={self.port} user={self.USER} dbname={dbname}"

    def database(self) -> str:
        """A new, empty database; its DSN."""
        import psycopg

        self._count += 1
        name = f"test_{self._count}"
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.dsn(name)

    def stop(self, *, remove: bool = True) -> None:
        """Fast shutdown by the postmaster's PID, then the folder is removed (kept with
        ``remove=False``: :meth:`start` brings the same cluster back)."""
        if self.pid is not None:
            with suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGINT)
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline:
                    os.kill(self.pid, 0)
                    time.sleep(0.05)
                os.kill(self.pid, signal.SIGKILL)
            self.pid = None
        if remove:
            shutil.rmtree(self.root, ignore_errors=True)


def inodes(*paths: Path) -> set[int]:
    """The inode numbers of those of ``paths`` that exist."""
    return {p.stat().st_ino for p in paths if p.exists()}


def exchanges_here(folder: Path) -> bool:
    """Whether this system and filesystem swap two names (renameat2 RENAME_EXCHANGE)."""
    first, second = folder / "probe-a", folder / "probe-b"
    first.write_bytes(b"a")
    second.write_bytes(b"b")
    swapped = exchange(first, second)
    first.unlink()
    second.unlink()
    return swapped


# --- the raw wire: PDUs on a bare socket -------------------------------------------------


def echo_request() -> bytes:
    """One C-ECHO-RQ on presentation context 1, as P-DATA-TF PDUs."""
    primitive = C_ECHO()
    primitive.MessageID = 1
    primitive.AffectedSOPClassUID = Verification
    message = C_ECHO_RQ()
    message.primitive_to_message(primitive)
    return b"".join(_p_data(p) for p in message.encode_msg(1, 16382))


def _p_data(primitive: object) -> bytes:
    pdu = P_DATA_TF()
    pdu.from_primitive(primitive)
    return bytes(pdu.encode())


def read_pdu(sock: socket.socket) -> bytes:
    """One whole PDU (type, reserved, 4-byte length, body)."""
    header = recv_exactly(sock, 6)
    return header + recv_exactly(sock, int.from_bytes(header[2:6], "big"))
