"""Query/retrieve for people: ``lamina find`` and ``lamina move`` as an SCU.

The arguments follow DCMTK's findscu/movescu (``-k KEY=VALUE``, ``-P``/``-S``),
so a person who knows those tools knows these. Identifier values are never
logged: pynetdicom's identifier logging stays off as in the node.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataset import Dataset
from pynetdicom import _config
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelMove,
)

from node.config import Settings
from node.dimse.ae import associate, build_ae
from node.dimse.scu import Target

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


def _scu(settings: Settings, aet: str | None, contexts: list[str]):
    from dataclasses import replace

    _config.LOG_REQUEST_IDENTIFIERS = False
    _config.LOG_RESPONSE_IDENTIFIERS = False
    node = replace(settings.node, ae_title=aet) if aet else settings.node
    ae = build_ae(node)
    for context in contexts:
        ae.add_requested_context(context)
    return ae


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
    assoc = associate(ae, target.host, target.port, target.ae_title)
    if not assoc.is_established:
        yield Reply(-1, "association refused or failed")
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
    assoc = associate(ae, target.host, target.port, target.ae_title)
    if not assoc.is_established:
        return Reply(-1, "association refused or failed")
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
