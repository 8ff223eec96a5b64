"""Outgoing DIMSE for people: ``lamina echo | send | find | move`` as an SCU.

* C-ECHO, and C-STORE of files to a peer through the node's one outgoing
  sender (:mod:`node.dimse.sender`): a file goes as it is when the peer
  accepts its transfer syntax, re-encoded into an uncompressed one otherwise.
* Query/retrieve: the arguments follow DCMTK's findscu/movescu (``-k
  KEY=VALUE``, ``-P``/``-S``), so a person who knows those tools knows these.
  Identifier values are never logged: pynetdicom's identifier logging stays off
  as in the node.
* When no association comes about, :func:`why_no_association` says why in one
  line: refused by the peer (with its reason), connection refused, no answer, or
  a connection that was taken but never answered (pynetdicom reports the last
  three alike as "aborted", so a plain TCP connect tells them apart).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from pydicom import dcmread
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)
from pynetdicom.status import code_to_category

from node.config import Settings
from node.dimse import compat
from node.dimse.ae import (
    associate,
    build_ae,
    connect_failure,
    probe_connect,
    rejection_text,
    silent_peer,
)
from node.dimse.sender import Outgoing, StoreSender
from node.dimse.tls import outgoing_context

_PEER_SPEC = re.compile(r"^(?P<ae>[^@]{1,16})@(?P<host>[^:]+):(?P<port>\d{1,5})$")


class PeerError(ValueError):
    """The named peer is neither configured nor a valid AE@HOST:PORT."""


class NoAssociation(ConnectionError):
    """No association with the peer; the message says why in one line."""


@dataclass(frozen=True)
class Target:
    ae_title: str
    host: str
    port: int
    tls: bool = False  # a configured peer with tls = true

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


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
        return Target(peer.ae_title, peer.host, peer.port, peer.tls)
    m = _PEER_SPEC.match(name)
    if m and 0 < int(m["port"]) < 65536:
        return Target(m["ae"], m["host"], int(m["port"]))
    known = ", ".join(p.name for p in settings.peers) or "none configured"
    raise PeerError(f"unknown peer {name!r} (known: {known}; or give AE@HOST:PORT)")


def _scu(settings: Settings, aet: str | None, contexts: Iterable[str] = ()) -> AE:
    """Our AE as a requester (calling AE title ``aet`` or the node's), with ``contexts``.

    Connecting waits at most the ACSE timeout too (the OS would wait minutes for a
    host that drops the connection request).
    """
    compat.configure_scu()
    node = replace(settings.node, ae_title=aet) if aet else settings.node
    ae = build_ae(node)
    ae.connection_timeout = node.acse_timeout
    for context in contexts:
        ae.add_requested_context(context)
    return ae


def why_no_association(assoc: Association, target: Target, timeout: float,
                       elapsed: float | None = None) -> str:
    """Why ``assoc`` was not established, in one line.

    A rejection carries the peer's reason. Otherwise pynetdicom only says
    "aborted", whether the connection was refused, never answered, or taken and
    left silent: a plain TCP connect to the peer with the ACSE timeout tells
    which. ``elapsed`` (how long the attempt took) separates a peer that stayed
    silent for the whole timeout from one that closed the connection at once.
    """
    if assoc.is_rejected:
        rj = assoc.acceptor.primitive
        why = rejection_text(rj.result, rj.result_source, rj.diagnostic)
        return f"{target} rejected the association: {why}"
    failure = probe_connect(target.host, target.port, timeout)
    if failure is not None:
        return connect_failure(failure, target.host, target.port, timeout)
    if elapsed is not None and elapsed < 0.8 * timeout:
        return (f"{target.host}:{target.port} accepted the connection but ended it without"
                f" answering the association (is it a DICOM node, TLS-only?)")
    return silent_peer(target.host, target.port, timeout)


def open_association(settings: Settings, ae: AE, target: Target) -> Association:
    """An established association with ``target``, or :class:`NoAssociation` saying why."""
    started = time.monotonic()
    assoc = associate(ae, target.host, target.port, target.ae_title)
    if assoc.is_established:
        return assoc
    raise NoAssociation(why_no_association(assoc, target, settings.node.acse_timeout,
                                           time.monotonic() - started))


def echo(settings: Settings, target: Target, aet: str | None = None) -> int | None:
    """C-ECHO status (None when the peer sent no status); NoAssociation when no association."""
    ae = _scu(settings, aet)
    ae.add_requested_context(Verification)
    assoc = open_association(settings, ae, target)
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
    """C-STORE each file through the node's one sender (:mod:`node.dimse.sender`).

    A file goes as it is when the peer accepts its transfer syntax, re-encoded
    into an uncompressed one when not (and when it can be); at most 128
    presentation contexts per association. Results follow ``files`` in order.
    """
    results: list[SendResult | None] = [None] * len(files)
    items: list[Outgoing] = []
    positions: list[int] = []  # where each item's result goes
    for n, path in enumerate(files):
        try:
            ds = dcmread(path, stop_before_pixels=True)
            items.append(Outgoing.file(path, str(ds.SOPClassUID), str(ds.SOPInstanceUID),
                                       str(ds.file_meta.TransferSyntaxUID)))
            positions.append(n)
        except (InvalidDicomError, AttributeError, OSError, ValueError) as exc:
            results[n] = SendResult(path, -1, f"unreadable: {exc}")
            progress(1)
    sender = StoreSender(aet or settings.node.ae_title, settings.node.max_pdu,
                         settings.node.acse_timeout, settings.node.dimse_timeout)
    sent = sender.send(items, target.host, target.port, target.ae_title,
                       tls=outgoing_context(settings.tls, target.tls))
    for n, result in zip(positions, sent, strict=True):
        results[n] = (SendResult(files[n], -1, result.reason) if result.status is None
                      else SendResult(files[n], result.status, result.comment))
        progress(1)
    return [r for r in results if r is not None]


# --- query/retrieve ------------------------------------------------------------

FIND = {"patient": PatientRootQueryRetrieveInformationModelFind,
        "study": StudyRootQueryRetrieveInformationModelFind}
MOVE = {"patient": PatientRootQueryRetrieveInformationModelMove,
        "study": StudyRootQueryRetrieveInformationModelMove}


class UnknownKey(ValueError):
    """A ``-k`` argument names no DICOM attribute."""


def build_identifier(level: str, keys: list[str], charset: str | None = None) -> Dataset:
    """``-k PatientName=DOE*`` / ``-k StudyInstanceUID`` / ``-k 0010,0020=X`` → an identifier."""
    ds = Dataset()
    if charset:
        ds.SpecificCharacterSet = charset
    ds.QueryRetrieveLevel = level.upper()
    for item in keys:
        name, _, value = item.partition("=")
        name = name.strip()
        tag = _tag(name)
        if tag is None:
            raise UnknownKey(f"-k {name}: not a DICOM keyword or gggg,eeee tag")
        vr = dictionary_VR(tag)
        ds.add_new(tag, vr.split(" or ")[0], value.split("\\") if "\\" in value else value)
    return ds


def key_names(keys: list[str]) -> list[str]:
    """The keywords of ``-k`` arguments, in the order given (the columns ``lamina find`` prints)."""
    names = []
    for item in keys:
        tag = _tag(item.partition("=")[0].strip())
        if tag is not None and keyword_for_tag(tag) not in names:
            names.append(keyword_for_tag(tag))
    return names


def _tag(name: str) -> int | None:
    if "," in name:
        group, _, element = name.partition(",")
        try:
            tag = (int(group, 16) << 16) | int(element, 16)
        except ValueError:
            return None
        return tag if keyword_for_tag(tag) else None
    return tag_for_keyword(name)


@dataclass(frozen=True)
class Reply:
    """One response: its status, comment, counts (retrieves) and identifier (find matches)."""

    status: int
    comment: str = ""
    identifier: Dataset | None = None
    remaining: int | None = None
    completed: int | None = None
    failed: int | None = None
    warning: int | None = None


def _replies(responses: Iterator[tuple[Dataset, Dataset | None]]) -> Iterator[Reply]:
    for status, identifier in responses:
        if "Status" not in status:
            yield Reply(-1, "no response (association lost or timed out)")
            return
        yield Reply(int(status.Status), str(status.get("ErrorComment", "")), identifier,
                    status.get("NumberOfRemainingSuboperations"),
                    status.get("NumberOfCompletedSuboperations"),
                    status.get("NumberOfFailedSuboperations"),
                    status.get("NumberOfWarningSuboperations"))


def find(settings: Settings, target: Target, model: str, identifier: Dataset,
         aet: str | None = None) -> Iterator[Reply]:
    """C-FIND: every response in order, the last one final (or -1 when none came)."""
    ae = _scu(settings, aet, [FIND[model]])
    try:
        assoc = open_association(settings, ae, target)
    except NoAssociation as exc:
        yield Reply(-1, str(exc))
        return
    try:
        yield from _replies(assoc.send_c_find(identifier, FIND[model]))
    finally:
        if assoc.is_established:
            assoc.release()


def move(settings: Settings, target: Target, model: str, identifier: Dataset,
         destination: str, aet: str | None = None,
         progress: Callable[[Reply], None] = lambda reply: None) -> Reply:
    """C-MOVE to ``destination`` (an AE title the peer knows); the final response."""
    ae = _scu(settings, aet, [MOVE[model]])
    try:
        assoc = open_association(settings, ae, target)
    except NoAssociation as exc:
        return Reply(-1, str(exc))
    last = Reply(-1, "no response")
    try:
        for reply in _replies(assoc.send_c_move(identifier, destination, MOVE[model])):
            last = reply
            if reply.status in (0xFF00, 0xFF01):
                progress(reply)
    finally:
        if assoc.is_established:
            assoc.release()
    return last
