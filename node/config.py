"""Settings: TOML file, then ``LAMINA__SECTION__KEY`` environment overrides, then CLI flags.

Every value is checked when the node starts; a bad one is refused with a
single line naming the key and the problem (``node.port: must be ...``), so a
PACS administrator never has to read a traceback to fix a typo.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from node.anonymize.settings import DeidSettings
from node.forward.rules import ForwardSettings
from node.identity import IdentitySettings, JwtSettings
from node.ingest.rules import ACTIONS, default_actions

SERVICES = frozenset({"store", "find", "move", "get", "review"})  # review: the /review pages
#: How objects from a peer are treated on the way in (see node.ingest.routes).
ROUTES = frozenset({"clinical", "annotator", "deidentified"})
ENV_PREFIX = "LAMINA__"


class ConfigError(ValueError):
    """A setting is missing, unknown or out of range. The message names the key."""


@dataclass(frozen=True)
class Peer:
    """A remote AE we talk to: who may call us, and where we send to."""

    name: str
    ae_title: str
    host: str
    port: int
    services: frozenset[str]
    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
    route: str = "clinical"
    #: Names of the peers this peer may name as C-MOVE destination (default: itself).
    move_destinations: tuple[str, ...] = ()
    #: "required": associations without a verified DICOM user identity are rejected.
    identity: str = "optional"
    #: A client certificate this peer must present: its SHA-256 fingerprint (hex) and/or
    #: its subject (RFC 4514, e.g. "CN=scanner,O=Hospital"); empty: none required.
    tls_fingerprint: str = ""
    tls_subject: str = ""
    #: Associations we open to this peer speak DICOM TLS (node.dimse.tls.outgoing_context).
    tls: bool = False

    def allows_address(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
            ip = ip.ipv4_mapped
        return any(ip in net for net in self.networks)


@dataclass(frozen=True)
class NodeSettings:
    ae_title: str = "LAMINA"
    bind: str = "0.0.0.0"
    port: int = 11112
    workers: int = 2
    max_pdu: int = 131072
    max_associations: int = 16
    acse_timeout: float = 30.0
    dimse_timeout: float = 60.0
    network_timeout: float = 60.0
    #: This node among several on one index: in its logs and in every audit event it writes.
    id: str = ""
    #: Bounds on what a peer can make a worker read or hold (node.dimse.guard).
    max_associations_per_peer: int = 8
    max_associate_kb: int = 256
    max_association_mb: int = 65536
    max_inflated_mb: int = 512
    max_element_mb: int = 128
    max_depth: int = 64


@dataclass(frozen=True)
class StorageSettings:
    data: Path = Path("./data")
    min_free_mb: int = 100
    #: Several nodes: the folder they share for blobs and quarantine (spool: one per node id).
    shared: Path | None = None


@dataclass(frozen=True)
class IndexSettings:
    backend: str = "sqlite"
    path: Path | None = None  # default: <data>/index.sqlite3
    busy_timeout_ms: int = 10_000
    #: backend "postgresql": the libpq connection string or URI (password: LAMINA_PG_PASSWORD)
    dsn: str = ""
    #: False: ``lamina serve`` refuses a schema that is not current (``lamina migrate`` first)
    migrate_on_start: bool = True


@dataclass(frozen=True)
class DimseSettings:
    """``[dimse]``: the PROXY protocol from a load balancer (node.dimse.proxy_protocol)."""

    proxy_protocol: bool = False
    #: networks allowed to send the header (CIDR); others are closed and logged
    proxy_trusted: tuple[str, ...] = ()


@dataclass(frozen=True)
class AuditSettings:
    signing_key: Path = Path("./keys/audit-signing.pem")
    #: A second place for signed checkpoints, outside the data folder (rollback detection);
    #: None: only the head beside the index.
    checkpoint_path: Path | None = None
    checkpoint_interval: float = 60.0  # seconds: the longest a checkpoint lags while events come
    #: "host:port" of a syslog collector (RFC 5424 over TLS, RFC 5425); "" streams nothing.
    syslog: str = ""
    syslog_ca: Path | None = None  # CA certificates the collector's certificate must chain to
    syslog_cert: Path | None = None  # client certificate (mutual TLS), optional
    syslog_key: Path | None = None


@dataclass(frozen=True)
class ReviewSettings:
    """Electronic signatures (issue 10 §4)."""

    allow_self_approval: bool = False
    lock_after: int = 5  # wrong passphrases in a row before the user is locked


@dataclass(frozen=True)
class AnnotationSettings:
    protocol: Path | None = None  # labelling protocol TOML; None: generic checks only
    settle_seconds: float = 1.0  # an overlay set is checked once quiet this long
    #: An annotation whose images are not stored waits this long (``pending``) for
    #: them, then is refused with the reason.
    pending_seconds: float = 3600.0
    #: Share of studies chosen (by a keyed hash of the pseudonymous StudyInstanceUID) for
    #: a second independent reading (issue 10).
    double_read_fraction: float = 0.12


@dataclass(frozen=True)
class TlsSettings:
    """``[tls]``: DICOM TLS on the node's port (node.dimse.tls)."""

    mode: str = "off"  # "off": plain DICOM; "only": TLS only, plaintext refused
    cert: Path | None = None  # our certificate chain (PEM)
    key: Path | None = None  # its private key (PEM)
    ca: Path | None = None  # CA certificates client certificates must chain to (optional)


@dataclass(frozen=True)
class LogSettings:
    level: str = "INFO"


@dataclass(frozen=True)
class ValidationSettings:
    """What is checked on ingest and when a series is checked (see node.ingest.rules)."""

    enabled: bool = True
    quiet_period: float = 10.0
    orientation_tolerance: float = 1e-3
    spacing_tolerance: float = 0.01
    rules: dict[str, str] = field(default_factory=default_actions)

    def action(self, rule: str) -> str:
        return self.rules[rule]


@dataclass(frozen=True)
class HttpClient:
    """A DICOMweb client: its bearer token and the configured peer whose identity it takes
    (services, route, audit name)."""

    name: str
    token: str
    peer: str


@dataclass(frozen=True)
class HttpSettings:
    """The HTTP front end (DICOMweb, health, metrics), served beside DIMSE by ``lamina serve``."""

    enabled: bool = True
    bind: str = ""  # empty: node.bind
    port: int = 8042
    #: Path prefix of the DICOMweb root (``/dicom-web``); QIDO/WADO/STOW live under it.
    base_path: str = "/dicom-web"
    #: Honour X-Forwarded-Proto/Host/Prefix (only behind a reverse proxy that sets them).
    forwarded: bool = False
    cors_origins: tuple[str, ...] = ()
    max_upload_mb: int = 2048
    #: Build each instance's WADO-RS metadata (a sidecar beside its blob) right after it is
    #: stored; false: on the first request for it (then kept). Off by default: it costs the
    #: store path ~0.5-0.8 ms of CPU per CT slice, and most series of a training set are
    #: read as files, never as metadata.
    prepare_metadata: bool = False
    #: A peer name whose identity requests without a token take; empty: 401 without a token.
    anonymous: str = ""
    clients: tuple[HttpClient, ...] = ()
    #: OIDC access tokens (JWTs) accepted as bearer tokens beside the static ones.
    jwt: JwtSettings = field(default_factory=JwtSettings)


@dataclass(frozen=True)
class Settings:
    node: NodeSettings = field(default_factory=NodeSettings)
    storage: StorageSettings = field(default_factory=StorageSettings)
    index: IndexSettings = field(default_factory=IndexSettings)
    audit: AuditSettings = field(default_factory=AuditSettings)
    log: LogSettings = field(default_factory=LogSettings)
    deidentify: DeidSettings = field(default_factory=DeidSettings)
    validation: ValidationSettings = field(default_factory=ValidationSettings)
    peers: tuple[Peer, ...] = ()
    annotations: AnnotationSettings = field(default_factory=AnnotationSettings)
    review: ReviewSettings = field(default_factory=ReviewSettings)
    forward: ForwardSettings = field(default_factory=ForwardSettings)
    http: HttpSettings = field(default_factory=HttpSettings)
    identity: IdentitySettings = field(default_factory=IdentitySettings)
    tls: TlsSettings = field(default_factory=TlsSettings)
    dimse: DimseSettings = field(default_factory=DimseSettings)

    @property
    def index_path(self) -> Path:
        return self.index.path or self.storage.data / "index.sqlite3"

    @property
    def blob_root(self) -> Path:
        """Where blobs and quarantine live: the shared folder of several nodes, or the data."""
        return self.storage.shared or self.storage.data

    @property
    def spool_dir(self) -> Path:
        """Receiving files before they are blobs: on the blobs' filesystem (a rename moves
        them), one folder per node when shared (a starting node clears only its own)."""
        if self.storage.shared:
            return self.storage.shared / "spool" / self.node.id
        return self.storage.data / "spool"

    def peer_named(self, name: str) -> Peer | None:
        return next((p for p in self.peers if p.name == name), None)

    def peers_with_ae(self, ae_title: str) -> list[Peer]:
        return [p for p in self.peers if p.ae_title == ae_title]


# --- loading ---------------------------------------------------------------


def load(
    path: Path | None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Read a TOML file (or the built-in defaults), apply env and flag overrides, check all.

    Relative paths are relative to the working directory, as with DCMTK's tools.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    for dotted, value in _env_overrides(environ if environ is not None else os.environ):
        _set_path(raw, dotted, value)
    for dotted, value in (overrides or {}).items():
        if value is not None:
            _set_path(raw, dotted, value)
    return _build(raw)


def _env_overrides(environ: Mapping[str, str]) -> list[tuple[str, Any]]:
    """``LAMINA__NODE__PORT=11113`` → ("node.port", 11113). Values parse as TOML, else text."""
    found = []
    for name, text in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        dotted = ".".join(part.lower() for part in name[len(ENV_PREFIX):].split("__"))
        try:
            value = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            value = text
        found.append((dotted, value))
    return found


def _set_path(raw: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    target = raw
    for part in parents:
        target = target.setdefault(part, {})
        if not isinstance(target, dict):
            raise ConfigError(f"{dotted}: {part} is not a section")
    target[leaf] = value


def _section(raw: dict[str, Any], name: str, allowed: set[str]) -> dict[str, Any]:
    section = raw.get(name, {})
    if not isinstance(section, dict):
        raise ConfigError(f"{name}: must be a section")
    for key in section:
        if key not in allowed:
            raise ConfigError(f"{name}.{key}: unknown key")
    return section


def _get(section: dict[str, Any], prefix: str, key: str, kind: type, default: Any) -> Any:
    value = section.get(key, default)
    where = f"{prefix}.{key}"
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: must be an integer, got {value!r}")
    elif kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: must be a number, got {value!r}")
        value = float(value)
    elif kind is bool and not isinstance(value, bool):
        raise ConfigError(f"{where}: must be true or false, got {value!r}")
    elif kind is str and not isinstance(value, str):
        raise ConfigError(f"{where}: must be text, got {value!r}")
    return value


def _ae_title(value: str, where: str) -> str:
    stripped = value.strip()
    if not 1 <= len(stripped) <= 16 or "\\" in stripped or not stripped.isprintable():
        raise ConfigError(f"{where}: AE title must be 1-16 printable characters, got {value!r}")
    return stripped


def _range(value: float, lo: float, hi: float, where: str) -> None:
    if not lo <= value <= hi:
        raise ConfigError(f"{where}: must be between {lo} and {hi}, got {value}")


def _resolve_networks(host: str, where: str) -> tuple:
    """A peer host may be an IP, a CIDR network, ``*`` (anywhere) or a resolvable name."""
    if host == "*":
        return (ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0"))
    try:
        return (ipaddress.ip_network(host, strict=False),)
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except socket.gaierror:
        raise ConfigError(f"{where}: host {host!r} does not resolve") from None
    return tuple({ipaddress.ip_network(info[4][0]) for info in infos})


def _build(raw: dict[str, Any]) -> Settings:
    for key in raw:
        if key not in {"node", "storage", "index", "audit", "log", "deidentify", "validation",
                       "peers", "annotations", "review", "forward", "http", "identity",
                       "tls", "dimse"}:
            raise ConfigError(f"{key}: unknown section")
    d = NodeSettings()
    s = _section(raw, "node", set(NodeSettings.__dataclass_fields__))
    node = NodeSettings(
        ae_title=_ae_title(_get(s, "node", "ae_title", str, d.ae_title), "node.ae_title"),
        bind=_get(s, "node", "bind", str, d.bind),
        port=_get(s, "node", "port", int, d.port),
        workers=_get(s, "node", "workers", int, d.workers),
        max_pdu=_get(s, "node", "max_pdu", int, d.max_pdu),
        max_associations=_get(s, "node", "max_associations", int, d.max_associations),
        acse_timeout=_get(s, "node", "acse_timeout", float, d.acse_timeout),
        dimse_timeout=_get(s, "node", "dimse_timeout", float, d.dimse_timeout),
        network_timeout=_get(s, "node", "network_timeout", float, d.network_timeout),
        id=_get(s, "node", "id", str, d.id),
        max_associations_per_peer=_get(s, "node", "max_associations_per_peer", int,
                                       d.max_associations_per_peer),
        max_associate_kb=_get(s, "node", "max_associate_kb", int, d.max_associate_kb),
        max_association_mb=_get(s, "node", "max_association_mb", int, d.max_association_mb),
        max_inflated_mb=_get(s, "node", "max_inflated_mb", int, d.max_inflated_mb),
        max_element_mb=_get(s, "node", "max_element_mb", int, d.max_element_mb),
        max_depth=_get(s, "node", "max_depth", int, d.max_depth),
    )
    if node.id and not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", node.id):
        raise ConfigError(f"node.id: 1-64 letters, digits, '.', '_' or '-', got {node.id!r}")
    _range(node.port, 0, 65535, "node.port")
    _range(node.workers, 1, 64, "node.workers")
    _range(node.max_pdu, 4096, 2**31 - 1, "node.max_pdu")
    _range(node.max_associations, 1, 1000, "node.max_associations")
    _range(node.max_associations_per_peer, 1, 1000, "node.max_associations_per_peer")
    _range(node.max_associate_kb, 16, 65536, "node.max_associate_kb")
    _range(node.max_association_mb, 1, 2**40, "node.max_association_mb")
    _range(node.max_inflated_mb, 1, 2**20, "node.max_inflated_mb")
    _range(node.max_element_mb, 1, 4096, "node.max_element_mb")
    _range(node.max_depth, 1, 512, "node.max_depth")
    for key in ("acse_timeout", "dimse_timeout", "network_timeout"):
        _range(getattr(node, key), 0.1, 86400, f"node.{key}")

    s = _section(raw, "storage", set(StorageSettings.__dataclass_fields__))
    storage = StorageSettings(
        data=Path(_get(s, "storage", "data", str, str(StorageSettings.data))),
        min_free_mb=_get(s, "storage", "min_free_mb", int, StorageSettings.min_free_mb),
        shared=Path(shared) if (shared := _get(s, "storage", "shared", str, "")) else None,
    )
    if storage.shared and not node.id:
        raise ConfigError("storage.shared: several nodes share it, so node.id must name this one")
    _range(storage.min_free_mb, 0, 2**40, "storage.min_free_mb")

    s = _section(raw, "index", set(IndexSettings.__dataclass_fields__))
    backend = _get(s, "index", "backend", str, IndexSettings.backend)
    if backend not in ("sqlite", "postgresql"):
        raise ConfigError(f"index.backend: 'sqlite' or 'postgresql', got {backend!r}")
    index_path = _get(s, "index", "path", str, "")
    dsn = _get(s, "index", "dsn", str, "")
    if backend == "postgresql" and not dsn:
        raise ConfigError("index.dsn: backend 'postgresql' needs a connection string"
                          " (e.g. \"host=db dbname=lamina user=lamina\")")
    index = IndexSettings(
        backend=backend,
        path=Path(index_path) if index_path else None,
        busy_timeout_ms=_get(s, "index", "busy_timeout_ms", int, IndexSettings.busy_timeout_ms),
        dsn=dsn,
        migrate_on_start=_get(s, "index", "migrate_on_start", bool, True),
    )
    _range(index.busy_timeout_ms, 1, 600_000, "index.busy_timeout_ms")

    s = _section(raw, "audit", set(AuditSettings.__dataclass_fields__))
    checkpoint_path = _get(s, "audit", "checkpoint_path", str, "")
    syslog = _get(s, "audit", "syslog", str, "")
    tls_files = {}
    for key in ("syslog_ca", "syslog_cert", "syslog_key"):
        value = _get(s, "audit", key, str, "")
        if value and not Path(value).is_file():
            raise ConfigError(f"audit.{key}: file {value!r} not found")
        tls_files[key] = Path(value) if value else None
    if syslog:
        host, _, port = syslog.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"audit.syslog: must be host:port, got {syslog!r}")
        if tls_files["syslog_ca"] is None:
            raise ConfigError("audit.syslog_ca: required with audit.syslog (the collector's"
                              " certificate is always verified)")
    if (tls_files["syslog_cert"] is None) != (tls_files["syslog_key"] is None):
        raise ConfigError("audit.syslog_cert and audit.syslog_key: give both or neither")
    audit = AuditSettings(
        signing_key=Path(_get(s, "audit", "signing_key", str, str(AuditSettings.signing_key))),
        checkpoint_path=Path(checkpoint_path) if checkpoint_path else None,
        checkpoint_interval=_get(s, "audit", "checkpoint_interval", float,
                                 AuditSettings.checkpoint_interval),
        syslog=syslog, **tls_files,
    )
    _range(audit.checkpoint_interval, 1, 86400, "audit.checkpoint_interval")
    if audit.checkpoint_path is not None and audit.checkpoint_path.resolve().is_relative_to(
            storage.data.resolve()):
        raise ConfigError("audit.checkpoint_path: must be outside the data folder"
                          f" ({storage.data})")

    s = _section(raw, "review", set(ReviewSettings.__dataclass_fields__))
    allow_self = s.get("allow_self_approval", ReviewSettings.allow_self_approval)
    if not isinstance(allow_self, bool):
        raise ConfigError("review.allow_self_approval: must be true or false")
    review = ReviewSettings(allow_self_approval=allow_self,
                            lock_after=_get(s, "review", "lock_after", int,
                                            ReviewSettings.lock_after))
    _range(review.lock_after, 1, 100, "review.lock_after")

    s = _section(raw, "log", set(LogSettings.__dataclass_fields__))
    level = _get(s, "log", "level", str, LogSettings.level).upper()
    if level not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
        raise ConfigError(f"log.level: must be DEBUG, INFO, WARNING or ERROR, got {level!r}")

    deid_raw = raw.get("deidentify", {})
    if not isinstance(deid_raw, dict):
        raise ConfigError("deidentify: must be a section")
    try:
        deidentify = DeidSettings.from_mapping(deid_raw)
    except ValueError as exc:  # DeidConfigError names the key already
        raise ConfigError(str(exc)) from None

    s = _section(raw, "annotations", set(AnnotationSettings.__dataclass_fields__))
    protocol = _get(s, "annotations", "protocol", str, "")
    if protocol and not Path(protocol).is_file():
        raise ConfigError(f"annotations.protocol: file {protocol!r} not found")
    annotations = AnnotationSettings(
        protocol=Path(protocol) if protocol else None,
        settle_seconds=_get(s, "annotations", "settle_seconds", float,
                            AnnotationSettings.settle_seconds),
        pending_seconds=_get(s, "annotations", "pending_seconds", float,
                             AnnotationSettings.pending_seconds),
        double_read_fraction=_get(s, "annotations", "double_read_fraction", float,
                                  AnnotationSettings.double_read_fraction))
    _range(annotations.settle_seconds, 0, 3600, "annotations.settle_seconds")
    _range(annotations.pending_seconds, 0, 30 * 86400, "annotations.pending_seconds")
    _range(annotations.double_read_fraction, 0, 1, "annotations.double_read_fraction")

    peers = _peers(raw.get("peers", {}))
    try:
        forward = ForwardSettings.from_mapping(raw.get("forward", {}))
        forward.check({p.name: _reachable(p.host) for p in peers}, None)
    except ValueError as exc:  # ForwardConfigError names the key already
        raise ConfigError(str(exc)) from None
    identity = _identity(raw)
    for peer in peers:
        if peer.identity == "required" and not identity.enabled:
            raise ConfigError(f"peers.{peer.name}.identity: required, but [identity] users"
                              " names no user")
    return Settings(node, storage, index, audit, LogSettings(level), deidentify,
                    _validation(raw), peers, annotations, review, forward,
                    _http(raw, peers), identity, _tls(raw, peers), _dimse(raw))


def _dimse(raw: dict[str, Any]) -> DimseSettings:
    import ipaddress

    s = _section(raw, "dimse", set(DimseSettings.__dataclass_fields__))
    enabled = _get(s, "dimse", "proxy_protocol", bool, False)
    trusted = s.get("proxy_trusted", [])
    if not isinstance(trusted, list) or not all(isinstance(n, str) for n in trusted):
        raise ConfigError("dimse.proxy_trusted: must be a list of networks (CIDR)")
    for network in trusted:
        try:
            ipaddress.ip_network(network, strict=False)
        except ValueError:
            raise ConfigError(f"dimse.proxy_trusted: not a network: {network!r}") from None
    if enabled and not trusted:
        raise ConfigError("dimse.proxy_trusted: proxy_protocol needs the balancers' networks")
    return DimseSettings(enabled, tuple(trusted))


def _http(raw: dict[str, Any], peers: tuple[Peer, ...]) -> HttpSettings:
    d = HttpSettings()
    s = _section(raw, "http", set(HttpSettings.__dataclass_fields__))
    enabled = s.get("enabled", d.enabled)
    forwarded = s.get("forwarded", d.forwarded)
    prepare = s.get("prepare_metadata", d.prepare_metadata)
    for key, value in (("enabled", enabled), ("forwarded", forwarded),
                       ("prepare_metadata", prepare)):
        if not isinstance(value, bool):
            raise ConfigError(f"http.{key}: must be true or false, got {value!r}")
    base = _get(s, "http", "base_path", str, d.base_path).rstrip("/")
    if base and (not base.startswith("/") or "?" in base or "#" in base):
        raise ConfigError(f"http.base_path: must be a path starting with /, got {base!r}")
    origins = s.get("cors_origins", [])
    if not isinstance(origins, list) or not all(isinstance(o, str) for o in origins):
        raise ConfigError("http.cors_origins: must be a list of origins")
    names = {p.name for p in peers}
    anonymous = _get(s, "http", "anonymous", str, d.anonymous)
    if anonymous and anonymous not in names:
        raise ConfigError(f"http.anonymous: {anonymous!r} is not a configured peer")
    clients_raw = s.get("clients", {})
    if not isinstance(clients_raw, dict):
        raise ConfigError("http.clients: must be a section of [http.clients.NAME] tables")
    clients, tokens = [], set()
    for name, c in clients_raw.items():
        where = f"http.clients.{name}"
        if not isinstance(c, dict):
            raise ConfigError(f"{where}: must be a table")
        for key in c:
            if key not in {"token", "peer"}:
                raise ConfigError(f"{where}.{key}: unknown key")
        token = _get(c, where, "token", str, "")
        if len(token) < 16 or not token.isascii() or not token.isprintable() or " " in token:
            raise ConfigError(f"{where}.token: must be at least 16 printable ASCII characters")
        if token in tokens:
            raise ConfigError(f"{where}.token: the same token is given to another client")
        tokens.add(token)
        peer = _get(c, where, "peer", str, "")
        if peer not in names:
            raise ConfigError(f"{where}.peer: {peer!r} is not a configured peer")
        clients.append(HttpClient(name, token, peer))
    settings = HttpSettings(
        enabled=enabled, bind=_get(s, "http", "bind", str, d.bind),
        port=_get(s, "http", "port", int, d.port), base_path=base, forwarded=forwarded,
        cors_origins=tuple(origins),
        max_upload_mb=_get(s, "http", "max_upload_mb", int, d.max_upload_mb),
        prepare_metadata=prepare, anonymous=anonymous, clients=tuple(clients),
        jwt=_http_jwt(s.get("jwt", {}), names))
    _range(settings.port, 0, 65535, "http.port")
    _range(settings.max_upload_mb, 1, 1 << 20, "http.max_upload_mb")
    return settings


def _http_jwt(s: Any, names: set[str]) -> JwtSettings:
    d = JwtSettings()
    if not isinstance(s, dict):
        raise ConfigError("http.jwt: must be a table")
    for key in s:
        if key not in JwtSettings.__dataclass_fields__:
            raise ConfigError(f"http.jwt.{key}: unknown key")
    jwks = _get(s, "http.jwt", "jwks", str, d.jwks)
    if jwks and not jwks.startswith(("https://", "http://")) and not Path(jwks).is_file():
        raise ConfigError(f"http.jwt.jwks: no JWKS file at {jwks}")
    algorithms = s.get("algorithms", list(d.algorithms))
    if not isinstance(algorithms, list) or not algorithms or not all(
            isinstance(a, str) and a.lower() != "none" for a in algorithms):
        raise ConfigError("http.jwt.algorithms: must be a list of algorithm names (not none)")
    peers = s.get("peers", {})
    if not isinstance(peers, dict) or not all(isinstance(v, str) for v in peers.values()):
        raise ConfigError("http.jwt.peers: must be a table of claim value = \"peer name\"")
    for value, peer in peers.items():
        if peer not in names:
            raise ConfigError(f"http.jwt.peers.{value}: {peer!r} is not a configured peer")
    settings = JwtSettings(jwks, _get(s, "http.jwt", "issuer", str, d.issuer),
                           _get(s, "http.jwt", "audience", str, d.audience),
                           tuple(algorithms), _get(s, "http.jwt", "claim", str, d.claim),
                           dict(peers))
    if settings.enabled and not (settings.issuer and settings.audience and settings.claim):
        raise ConfigError("http.jwt: issuer, audience and claim are needed with jwks"
                          " (a token for another service must not pass)")
    return settings


def _tls(raw: dict[str, Any], peers: tuple[Peer, ...]) -> TlsSettings:
    s = _section(raw, "tls", set(TlsSettings.__dataclass_fields__))
    mode = _get(s, "tls", "mode", str, "off")
    if mode not in ("off", "only"):
        raise ConfigError(f"tls.mode: must be off or only, got {mode!r}")
    paths = {k: Path(v) if (v := _get(s, "tls", k, str, "")) else None
             for k in ("cert", "key", "ca")}
    if mode == "only" and (paths["cert"] is None or paths["key"] is None):
        raise ConfigError("tls.cert and tls.key: needed when tls.mode is only")
    for peer in peers:
        if (peer.tls_fingerprint or peer.tls_subject) and (mode != "only" or not paths["ca"]):
            raise ConfigError(f"peers.{peer.name}: a pinned client certificate needs"
                              " tls.mode = only and tls.ca")
    return TlsSettings(mode, paths["cert"], paths["key"], paths["ca"])


def _identity(raw: dict[str, Any]) -> IdentitySettings:
    s = _section(raw, "identity", {"users", "jwt_key_file", "jwt_algorithms"})
    users = s.get("users", {})
    if not isinstance(users, dict):
        raise ConfigError("identity.users: must be a table of user = { passcode = HASH }")
    table = {}
    for user, entry in users.items():
        if not isinstance(entry, dict) or set(entry) - {"passcode"} \
                or not isinstance(entry.get("passcode", ""), str):
            raise ConfigError(f"identity.users.{user}: must be {{ passcode = \"scrypt$...\" }}"
                              " or {}")
        passcode = entry.get("passcode", "")
        if passcode and not passcode.startswith("scrypt$"):
            raise ConfigError(f"identity.users.{user}.passcode: must be a hash made by"
                              " `lamina identity hash`, never the passcode itself")
        table[str(user)] = passcode
    key = _get(s, "identity", "jwt_key_file", str, "")
    algorithms = s.get("jwt_algorithms", list(IdentitySettings.jwt_algorithms))
    if not isinstance(algorithms, list) or not all(isinstance(a, str) for a in algorithms):
        raise ConfigError("identity.jwt_algorithms: must be a list of names")
    return IdentitySettings(table, Path(key) if key else None, tuple(algorithms))


def _validation(raw: dict[str, Any]) -> ValidationSettings:
    d = ValidationSettings()
    s = _section(raw, "validation", set(ValidationSettings.__dataclass_fields__))
    enabled = s.get("enabled", d.enabled)
    if not isinstance(enabled, bool):
        raise ConfigError(f"validation.enabled: must be true or false, got {enabled!r}")
    settings = ValidationSettings(
        enabled=enabled,
        quiet_period=_get(s, "validation", "quiet_period", float, d.quiet_period),
        orientation_tolerance=_get(s, "validation", "orientation_tolerance", float,
                                   d.orientation_tolerance),
        spacing_tolerance=_get(s, "validation", "spacing_tolerance", float,
                               d.spacing_tolerance),
        rules={**d.rules, **_rule_actions(s.get("rules", {}))},
    )
    _range(settings.quiet_period, 0.0, 86400, "validation.quiet_period")
    _range(settings.orientation_tolerance, 0.0, 0.5, "validation.orientation_tolerance")
    _range(settings.spacing_tolerance, 0.0, 0.5, "validation.spacing_tolerance")
    return settings


def _rule_actions(raw: Any) -> dict[str, str]:
    if not isinstance(raw, dict):
        raise ConfigError("validation.rules: must be a table of rule = \"reject\" | \"warn\"")
    known = default_actions()
    for rule, action in raw.items():
        where = f"validation.rules.{rule}"
        if rule not in known:
            raise ConfigError(f"{where}: unknown rule (known: {', '.join(sorted(known))})")
        if action not in ACTIONS:
            raise ConfigError(f"{where}: must be \"reject\" or \"warn\", got {action!r}")
    return dict(raw)


def _peers(raw: Any) -> tuple[Peer, ...]:
    if not isinstance(raw, dict):
        raise ConfigError("peers: must be a section of [peers.NAME] tables")
    peers = []
    for name, s in raw.items():
        where = f"peers.{name}"
        if not isinstance(s, dict):
            raise ConfigError(f"{where}: must be a table")
        for key in s:
            if key not in {"ae_title", "host", "port", "services", "route",
                           "move_destinations", "identity", "tls_fingerprint",
                           "tls_subject", "tls"}:
                raise ConfigError(f"{where}.{key}: unknown key")
        if "ae_title" not in s:
            raise ConfigError(f"{where}.ae_title: missing")
        ae = _ae_title(_get(s, where, "ae_title", str, ""), f"{where}.ae_title")
        host = _get(s, where, "host", str, "127.0.0.1")
        port = _get(s, where, "port", int, 104)
        _range(port, 1, 65535, f"{where}.port")
        services = s.get("services", ["store"])
        if not isinstance(services, list) or not all(isinstance(x, str) for x in services):
            raise ConfigError(f"{where}.services: must be a list of service names")
        unknown = set(services) - SERVICES
        if unknown:
            raise ConfigError(
                f"{where}.services: unknown service {min(unknown)!r}"
                f" (known: {', '.join(sorted(SERVICES))})"
            )
        route = _get(s, where, "route", str, "clinical")
        if route not in ROUTES:
            raise ConfigError(f"{where}.route: must be one of {', '.join(sorted(ROUTES))},"
                              f" got {route!r}")
        networks = _resolve_networks(host, f"{where}.host")
        destinations = s.get("move_destinations", [name] if _reachable(host) else [])
        if not isinstance(destinations, list) or not all(isinstance(x, str) for x in destinations):
            raise ConfigError(f"{where}.move_destinations: must be a list of peer names")
        identity = _get(s, where, "identity", str, "optional")
        if identity not in ("optional", "required"):
            raise ConfigError(f"{where}.identity: must be optional or required, got {identity!r}")
        fingerprint = _get(s, where, "tls_fingerprint", str, "").replace(":", "").lower()
        if fingerprint and (len(fingerprint) != 64
                            or not all(c in "0123456789abcdef" for c in fingerprint)):
            raise ConfigError(f"{where}.tls_fingerprint: must be a SHA-256 in hex")
        peers.append(Peer(name, ae, host, port, frozenset(services), networks, route,
                          tuple(destinations), identity, fingerprint,
                          _get(s, where, "tls_subject", str, ""), _get(s, where, "tls", bool, False)))
    _check_move_destinations(peers)
    return tuple(peers)


def _reachable(host: str) -> bool:
    """A host we can open a connection to: a name or a single address, not ``*`` or a network."""
    if host == "*":
        return False
    try:
        net = ipaddress.ip_network(host, strict=False)
    except ValueError:
        return True
    return net.num_addresses == 1


def _check_move_destinations(peers: list[Peer]) -> None:
    """Each destination is a known peer we can connect to, and its AE title is unambiguous.

    A C-MOVE names its destination by AE title only, so two allowed
    destinations with one title would leave the choice of host to chance.
    """
    by_name = {p.name: p for p in peers}
    for peer in peers:
        where = f"peers.{peer.name}.move_destinations"
        titles: dict[str, str] = {}
        for name in peer.move_destinations:
            dest = by_name.get(name)
            if dest is None:
                raise ConfigError(f"{where}: {name!r} is not a configured peer")
            if not _reachable(dest.host):
                raise ConfigError(f"{where}: peer {name!r} has no single host to connect to"
                                  f" (host = {dest.host!r})")
            if dest.ae_title in titles:
                raise ConfigError(f"{where}: {titles[dest.ae_title]!r} and {name!r} share"
                                  f" AE title {dest.ae_title!r}")
            titles[dest.ae_title] = name
