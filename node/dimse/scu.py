"""Outgoing DIMSE for people: C-ECHO and C-STORE of files to a peer.

Sends files as stored (pynetdicom reads each from disk; no decode/re-encode),
proposing for each SOP class the transfer syntax the file is in.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pynetdicom import AE, _config
from pynetdicom.sop_class import Verification
from pynetdicom.status import code_to_category

from node.config import Settings
from node.dimse.ae import associate, build_ae, context_batches

_PEER_SPEC = re.compile(r"^(?P<ae>[^@]{1,16})@(?P<host>[^:]+):(?P<port>\d{1,5})$")


class PeerError(ValueError):
    """The named peer is neither configured nor a valid AE@HOST:PORT."""


@dataclass(frozen=True)
class Target:
    ae_title: str
    host: str
    port: int


@dataclass(frozen=True)
class SendResult:
    path: Path
    status: int  # -1: not sent (no association or no accepted context)
    comment: str = ""

    @property
    def status_text(self) -> str:
        if self.status < 0:
            return "not sent"
        category = code_to_category(self.status)
        return f"0x{self.status:04X} {category}"


def resolve_peer(settings: Settings, name: str) -> Target:
    peer = settings.peer_named(name)
    if peer:
        return Target(peer.ae_title, peer.host, peer.port)
    m = _PEER_SPEC.match(name)
    if m and 0 < int(m["port"]) < 65536:
        return Target(m["ae"], m["host"], int(m["port"]))
    known = ", ".join(p.name for p in settings.peers) or "none configured"
    raise PeerError(f"unknown peer {name!r} (known: {known}; or give AE@HOST:PORT)")


def _scu(settings: Settings, aet: str | None) -> AE:
    _config.LOG_REQUEST_IDENTIFIERS = False
    _config.LOG_RESPONSE_IDENTIFIERS = False
    _config.STORE_SEND_CHUNKED_DATASET = True  # stream files from disk
    node = settings.node
    if aet:
        from dataclasses import replace

        node = replace(node, ae_title=aet)
    return build_ae(node)


def echo(settings: Settings, target: Target, aet: str | None = None) -> int | None:
    """C-ECHO status, or None when no association could be made."""
    ae = _scu(settings, aet)
    ae.add_requested_context(Verification)
    assoc = associate(ae, target.host, target.port, target.ae_title)
    if not assoc.is_established:
        return None
    try:
        rsp = assoc.send_c_echo()
        return int(rsp.Status) if "Status" in rsp else None
    finally:
        assoc.release()


def find_dicom_files(paths: Iterable[Path]) -> list[Path]:
    """Files under the given paths that carry a DICOM preamble, sorted."""
    found: list[Path] = []
    for path in paths:
        candidates = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for p in candidates:
            with open(p, "rb") as f:
                head = f.read(132)
            if len(head) == 132 and head[128:132] == b"DICM":
                found.append(p)
    return found


def send_files(
    settings: Settings,
    target: Target,
    files: list[Path],
    aet: str | None = None,
    progress: Callable[[int], None] = lambda n: None,
) -> list[SendResult]:
    """C-STORE each file, in batches of at most 128 (SOP class, syntax) contexts."""
    headers: list[tuple[Path, str, str]] = []
    results: list[SendResult] = []
    for path in files:
        try:
            ds = dcmread(path, stop_before_pixels=True)
            headers.append((path, str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)))
        except (InvalidDicomError, AttributeError, OSError, ValueError) as exc:
            results.append(SendResult(path, -1, f"unreadable: {exc}"))
            progress(1)
    for batch in context_batches(headers, lambda h: (h[1], h[2])):
        results.extend(_send_batch(settings, target, batch, aet, progress))
    return results


def _send_batch(settings: Settings, target: Target, batch: list[tuple[Path, str, str]],
                aet: str | None, progress: Callable[[int], None]) -> list[SendResult]:
    ae = _scu(settings, aet)
    for sop_class, syntax in sorted({(b[1], b[2]) for b in batch}):
        # Only the file's own syntax: files are sent as stored, never transcoded.
        ae.add_requested_context(sop_class, [syntax])
    assoc = associate(ae, target.host, target.port, target.ae_title)
    if not assoc.is_established:
        progress(len(batch))
        return [SendResult(p, -1, "association refused or failed") for p, _, _ in batch]
    results = []
    try:
        for path, _, _ in batch:
            if not assoc.is_established:
                results.append(SendResult(path, -1, "association lost"))
            else:
                rsp = assoc.send_c_store(path)
                code = int(rsp.Status) if "Status" in rsp else -1
                results.append(SendResult(path, code, str(rsp.get("ErrorComment", ""))))
            progress(1)
    finally:
        if assoc.is_established:
            assoc.release()
    return results
