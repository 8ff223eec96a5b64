"""QIDO-RS, WADO-RS and STOW-RS (PS3.18): thin routes over the node's services.

* QIDO-RS turns the query parameters into the same identifier a C-FIND
  carries and runs it through ``ctx.search`` (the one matcher: same keys, same
  matches, same audit); it only adds paging and DICOM JSON.
* WADO-RS plans with ``ctx.retrieve.start_get`` (C-GET's permission and plan:
  the unique keys of the path select the instances) and streams the stored
  files, re-encoded by the node's one transcoder when the client does not take
  the stored transfer syntax.
* STOW-RS spools the body (bounded by ``http.max_upload_mb``), splits it and
  hands each part to ``ctx.ingest`` with a :class:`~node.ingest.types.Source`
  built from the token's peer: validation, routes, de-identification,
  annotations and the audit trail are C-STORE's. Body and parts are spooled as
  a C-STORE data set is (:class:`~node.dimse.spool.DataSetSpool`): the body in
  memory up to its limit, then in the spool folder; each part in memory when the
  peer's route rewrites it, else in the spool folder, so that storing it as
  received is a rename; all requests' memory spools together hold at most
  ``STOW_MEMORY``. Files made and deleted per request would slow every file the
  node creates in the next 30 s (ext4 without a journal walks past recently freed
  inodes: :mod:`node.atomic_file`).

Refusals are :class:`~node.web.errors.WebError` (4xx with a reason), never 500.
"""

from __future__ import annotations

import asyncio
import logging
import mmap
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

from pydicom import dcmread
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.tag import Tag
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from node import status
from node.context import NodeContext
from node.dimse.spool import DataSetSpool, MemoryBudget
from node.dimse.transcode import choose, file_bytes, transcode
from node.ingest.types import Source, StoreResult
from node.metadata import MetadataSidecars
from node.metrics import Metrics
from node.retrieve import Retrieval
from node.status import Outcome
from node.storage.query import KEYS, Level, Model, StoredInstance
from node.web import media
from node.web.dicomjson import MetadataCache, bulk_value, match_json
from node.web.errors import WebError
from node.web.identity import Caller
from node.web.pixels import FRAME_MEDIA, PixelSource, frame_layout, parse_viewport, render
from node.web.windows import chosen_window

log = logging.getLogger("lamina.web")

DICOM_JSON = "application/dicom+json"
_UID = re.compile(r"[0-9]+(\.[0-9]+)*")
_HEX_TAG = re.compile(r"[0-9A-Fa-f]{8}")
_CHUNK = 1 << 20
#: Memory the STOW-RS spools hold at most, all requests together (four bodies of
#: ``node.dimse.spool.MEMORY_LIMIT``, or hundreds of single slices).
STOW_MEMORY = 64 << 20
#: QueryRetrieveLevel is C-FIND's: QIDO-RS answers leave it out.
_SKIPPED = frozenset({0x00080052})

#: PS3.18 Table 6.7.1-2 (the keys the matcher holds): returned without includefield.
DEFAULT_RETURN: dict[Level, tuple[str, ...]] = {
    Level.STUDY: ("StudyDate", "StudyTime", "AccessionNumber", "InstanceAvailability",
                  "ModalitiesInStudy", "ReferringPhysicianName", "RetrieveAETitle",
                  "PatientName", "PatientID", "PatientBirthDate", "PatientSex",
                  "StudyInstanceUID", "StudyID", "StudyDescription",
                  "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances"),
    Level.SERIES: ("StudyInstanceUID", "Modality", "SeriesDescription", "SeriesNumber",
                   "SeriesInstanceUID", "NumberOfSeriesRelatedInstances", "SeriesDate",
                   "SeriesTime", "InstanceAvailability", "RetrieveAETitle"),
    Level.IMAGE: ("StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID", "SOPInstanceUID",
                  "InstanceNumber", "InstanceAvailability", "RetrieveAETitle"),
}
#: The most matches one QIDO-RS answer carries (asked for or not).
MAX_LIMIT = 100_000


def _uid(value: str, what: str) -> str:
    if len(value) > 64 or not _UID.fullmatch(value):
        raise WebError(400, f"{what} is not a valid UID")
    return value


def _attribute(name: str) -> int:
    """A QIDO key or includefield by keyword or by tag (``00100020``)."""
    if "." in name:
        raise WebError(400, f"sequence matching ({name[:80]}) is not supported")
    if _HEX_TAG.fullmatch(name):
        tag = int(name, 16)
    else:
        found = tag_for_keyword(name)
        if found is None:
            raise WebError(400, f"unknown attribute {name[:80]!r}")
        tag = found
    try:
        dictionary_VR(tag)
    except KeyError:
        raise WebError(400, f"unknown attribute {name[:80]!r}") from None
    return tag


def _int_param(name: str, value: str, high: int) -> int:
    try:
        number = int(value)
    except ValueError:
        raise WebError(400, f"{name} must be a non-negative integer") from None
    if not 0 <= number <= high:
        raise WebError(400, f"{name} must be between 0 and {high}")
    return number


class DicomWeb:
    """The routes, bound to one node context."""

    def __init__(self, ctx: NodeContext, metrics: Metrics) -> None:
        self.ctx = ctx
        self.metrics = metrics
        self.max_upload = ctx.settings.http.max_upload_mb << 20
        self.metadata = MetadataCache(MetadataSidecars(ctx.blobs).read)
        #: A client that stops sending its body mid-way is answered, not waited for.
        self.read_timeout = ctx.settings.node.network_timeout
        self.spool_dir = ctx.settings.spool_dir
        #: What the STOW-RS requests' memory spools hold all together (bodies and parts):
        #: nothing else bounds how many requests upload at once; past it, the spool folder.
        self.spool_memory = MemoryBudget(STOW_MEMORY)

    def routes(self) -> list[Route]:
        s, se, i = "/studies/{study}", "/series/{series}", "/instances/{instance}"
        q, r = self.qido, self.retrieve
        return [
            Route("/studies", self.stow, methods=["POST"]),
            Route(s, self.stow, methods=["POST"]),
            Route("/studies", q(Level.STUDY)),
            Route(f"{s}/series", q(Level.SERIES)),
            Route("/series", q(Level.SERIES)),
            Route(f"{s}{se}/instances", q(Level.IMAGE)),
            Route(f"{s}/instances", q(Level.IMAGE)),
            Route("/instances", q(Level.IMAGE)),
            Route(s, r(Level.STUDY, "dicom")),
            Route(f"{s}{se}", r(Level.SERIES, "dicom")),
            Route(f"{s}{se}{i}", r(Level.IMAGE, "dicom")),
            Route(f"{s}/metadata", r(Level.STUDY, "metadata")),
            Route(f"{s}{se}/metadata", r(Level.SERIES, "metadata")),
            Route(f"{s}{se}{i}/metadata", r(Level.IMAGE, "metadata")),
            Route(f"{s}{se}{i}/frames/{{frames}}", r(Level.IMAGE, "frames")),
            Route(f"{s}{se}{i}/bulkdata/{{tag}}", r(Level.IMAGE, "bulkdata")),
            Route(f"{s}{se}{i}/rendered", r(Level.IMAGE, "rendered")),
            Route(f"{s}{se}{i}/frames/{{frames}}/rendered", r(Level.IMAGE, "rendered")),
            Route(f"{s}/thumbnail", r(Level.STUDY, "thumbnail")),
            Route(f"{s}{se}/thumbnail", r(Level.SERIES, "thumbnail")),
            Route(f"{s}{se}{i}/thumbnail", r(Level.IMAGE, "thumbnail")),
        ]

    # --- QIDO-RS -------------------------------------------------------------------

    def qido(self, level: Level):
        def endpoint(request: Request) -> Response:
            return self._search(request, level)
        return endpoint

    def _search(self, request: Request, level: Level) -> Response:
        caller: Caller = request.state.caller
        _negotiate_json(request)
        started = time.perf_counter()
        identifier, limit, offset = self._identifier(request, level)
        search = self.ctx.search.start(caller.peer, caller.actor, identifier, Model.STUDY_ROOT)
        if isinstance(search, Outcome):
            raise WebError.of(search)
        root = request.state.root
        out: list[dict[str, Any]] = []
        outcome = Outcome(status.UNABLE_TO_PROCESS, "failed while answering")
        cut = limit is None  # unbounded answers are bounded here, and say so
        truncated = False
        try:
            for n, match in enumerate(search.results(MAX_LIMIT + 1 if cut else limit, offset)):
                if n == MAX_LIMIT:
                    truncated = True
                    break
                answer = match_json(match.elements, _SKIPPED)
                answer["00081190"] = {"vr": "UR", "Value": [_retrieve_url(root, level, answer)]}
                out.append(answer)
            outcome = Outcome(status.SUCCESS)
        finally:
            search.finish(outcome)
        self.metrics.query_seconds.labels("qido", level.name.lower()).observe(
            time.perf_counter() - started)
        warnings = []
        if search.query.unsupported:
            warnings.append('299 lamina "some keys are not supported here: they were answered '
                            'empty"')
        if truncated:
            warnings.append(f'299 lamina "the answer stops at {MAX_LIMIT} matches: page with '
                            'limit and offset"')
        headers = {"Warning": ", ".join(warnings)} if warnings else {}
        return JSONResponse(out, media_type=DICOM_JSON, headers=headers)

    def _identifier(self, request: Request, level: Level) -> tuple[Dataset, int | None, int]:
        """The query as a C-FIND identifier (study root), plus limit and offset.

        The query string is decoded before any list is split, so ``%2C`` is a comma.
        """
        try:
            params = parse_qsl(request.url.query, keep_blank_values=True, errors="strict")
        except (UnicodeDecodeError, ValueError):
            raise WebError(400, "the query string is not valid UTF-8") from None
        ds = Dataset()
        ds.QueryRetrieveLevel = level.name
        path = request.path_params
        if "study" in path:
            ds.StudyInstanceUID = _uid(path["study"], "the study UID in the path")
        if "series" in path:
            ds.SeriesInstanceUID = _uid(path["series"], "the series UID in the path")
        limit: int | None = None
        offset = 0
        includes: list[int] = []
        include_all = False
        for name, value in params:
            if name == "limit":
                limit = _int_param("limit", value, MAX_LIMIT)
            elif name == "offset":
                offset = _int_param("offset", value, 1 << 31)
            elif name == "fuzzymatching":
                if value.lower() not in ("true", "false"):
                    raise WebError(400, "fuzzymatching must be true or false")
            elif name == "includefield":
                for field in (f.strip() for f in value.split(",")):
                    if field == "all":
                        include_all = True
                    elif field:
                        includes.append(_attribute(field))
            else:
                self._match_key(ds, _attribute(name), value, name)
        keywords = list(DEFAULT_RETURN[level])
        if include_all:
            keywords += [k.keyword for k in KEYS.values() if k.level <= level]
        tags = [Tag(tag_for_keyword(k)) for k in keywords] + [Tag(t) for t in includes]
        for tag in tags:
            if tag not in ds:
                ds.add_new(tag, dictionary_VR(tag).split(" or ")[0], None)
        return ds, limit, offset

    @staticmethod
    def _match_key(ds: Dataset, tag: int, value: str, name: str) -> None:
        vr = dictionary_VR(tag).split(" or ")[0]
        if vr == "SQ":
            raise WebError(400, f"{name[:80]}: sequence matching is not supported")
        if vr == "UI":
            value = "\\".join(_uid(v.strip(), name[:80]) for v in re.split(r"[,\\]", value)
                              if v.strip())
        try:
            ds.add_new(tag, vr, value if value != "" else None)
        except Exception:  # pydicom refuses values of the wrong form in many ways
            raise WebError(400, f"{name[:80]}: the value is not valid for its VR {vr}") from None

    # --- WADO-RS -------------------------------------------------------------------

    def retrieve(self, level: Level, kind: str):
        handlers = {"dicom": self._instances, "metadata": self._metadata,
                    "frames": self._frames, "bulkdata": self._bulkdata,
                    "rendered": self._rendered, "thumbnail": self._rendered}

        def endpoint(request: Request) -> Response:
            plan = self._plan(request, level)
            return handlers[kind](request, plan)
        return endpoint

    def _plan(self, request: Request, level: Level) -> Retrieval:
        """C-GET's plan for the path's UIDs; 404 when nothing is stored there."""
        caller: Caller = request.state.caller
        path = request.path_params
        ds = Dataset()
        ds.QueryRetrieveLevel = level.name
        ds.StudyInstanceUID = _uid(path["study"], "the study UID in the path")
        if "series" in path:
            ds.SeriesInstanceUID = _uid(path["series"], "the series UID in the path")
        if "instance" in path:
            ds.SOPInstanceUID = _uid(path["instance"], "the instance UID in the path")
        plan = self.ctx.retrieve.start_get(caller.peer, caller.actor, ds, Model.STUDY_ROOT)
        if isinstance(plan, Outcome):
            raise WebError.of(plan)
        if not plan.instances:
            plan.finish(Outcome(status.SUCCESS))
            what = {Level.STUDY: "study", Level.SERIES: "series", Level.IMAGE: "instance"}[level]
            raise WebError(404, f"no such {what} is stored here")
        return plan

    def _path(self, instance: StoredInstance) -> Path:
        return self.ctx.blobs.local_path(instance.blob_sha256)

    def _instances(self, request: Request, plan: Retrieval) -> Response:
        """multipart/related of application/dicom parts; for one instance also a bare
        application/dicom body (single part, as OHIF asks for SEGs)."""
        syntaxes: list[str] = []
        single: bool | None = None
        for alt in media.accepted(request.headers.get("accept"),
                                  'multipart/related; type="application/dicom"'):
            if alt.type in ("*/*", "multipart/*") or (
                    alt.type == "multipart/related" and alt.part_type in (None, "application/dicom")):
                default = "*" if alt.type != "multipart/related" else media.EXPLICIT_LE
                syntaxes.append(alt.transfer_syntax or default)
                single = False if single is None else single
            elif alt.type == "application/dicom" and len(plan.instances) == 1:
                syntaxes.append(alt.transfer_syntax or "*")
                single = True if single is None else single
        if not syntaxes:
            plan.finish(Outcome(status.SUCCESS))
            raise WebError(406, 'instances are sent as multipart/related; type="application/dicom"'
                                " (one instance also as application/dicom)")
        chosen = []
        for instance in plan.instances:
            target = (instance.transfer_syntax_uid if "*" in syntaxes
                      else choose(instance.transfer_syntax_uid, syntaxes))
            if target is None:
                plan.finish(Outcome(status.SUCCESS))
                raise WebError(406, "an instance cannot be sent in the transfer syntax asked "
                                    "for; ask for transfer-syntax=* to get it as stored")
            chosen.append((instance, target))
        if single:
            return StreamingResponse(self._stream_instances(plan, chosen, None),
                                     media_type="application/dicom")
        boundary = media.new_boundary()
        return StreamingResponse(self._stream_instances(plan, chosen, boundary),
                                 media_type=media.content_type("application/dicom", boundary))

    def _stream_instances(self, plan: Retrieval, chosen: list[tuple[StoredInstance, str]],
                          boundary: str | None) -> Iterator[bytes]:
        """The instances as parts of ``boundary`` (None: one bare instance)."""
        sent = 0
        try:
            for instance, target in chosen:
                if boundary:
                    yield media.part_head(boundary, f"application/dicom; transfer-syntax={target}")
                path = self._path(instance)
                if target == instance.transfer_syntax_uid:
                    with path.open("rb") as f:
                        while chunk := f.read(_CHUNK):
                            sent += len(chunk)
                            yield chunk
                else:
                    with path.open("rb") as f:
                        data = file_bytes(instance.sop_class_uid, instance.sop_instance_uid,
                                          target, transcode(f, target))
                    sent += len(data)
                    yield data
                if boundary:
                    yield b"\r\n"
                plan.counts.record(0x0000, instance.sop_instance_uid)
            if boundary:
                yield media.closing(boundary)
        finally:
            plan.counts.fail_remaining(
                [i.sop_instance_uid for i, _ in chosen[plan.counts.completed:]])
            plan.finish(plan.outcome())
            self.metrics.sent_bytes.inc(sent)

    def _metadata(self, request: Request, plan: Retrieval) -> Response:
        try:
            _negotiate_json(request)
            items = []
            for instance in plan.instances:
                items.append(self.metadata.get(instance.blob_sha256))
                plan.counts.record(0x0000, instance.sop_instance_uid)
        finally:
            plan.finish(plan.outcome())
        return Response(MetadataCache.answer(items, request.state.root), media_type=DICOM_JSON)

    def _frames(self, request: Request, plan: Retrieval) -> Response:
        instance = plan.instances[0]
        try:
            numbers = _frame_numbers(request.path_params["frames"])
            path = self._path(instance)
            layout = frame_layout(path)  # once per blob: no parse per frame request
            layout.check(numbers)
            stored = str(layout.syntax)
            compressed = layout.syntax.is_compressed
            stored_media = FRAME_MEDIA.get(stored)
            choice = _frame_choice(request.headers.get("accept"), stored, compressed, stored_media)
            if choice is None:
                raise WebError(406, "frames are sent as multipart/related; type="
                                    '"application/octet-stream"' + (
                                        f' or type="{stored_media}"' if stored_media else ""))
            if choice == "native":
                frames = (layout.read(path, numbers) if layout.offset is not None
                          else PixelSource.open(path).native_frames(numbers))
                part_type = f"application/octet-stream; transfer-syntax={media.EXPLICIT_LE}"
            else:
                frames = PixelSource.open(path).stored_frames(numbers)
                part_type = f"{choice}; transfer-syntax={stored}"
            plan.counts.record(0x0000, instance.sop_instance_uid)
        finally:
            plan.finish(plan.outcome())
        boundary = media.new_boundary()
        body = b"".join(media.multipart(((part_type, (f,)) for f in frames), boundary))
        self.metrics.sent_bytes.inc(len(body))
        return Response(body, media_type=media.content_type(part_type.split(";")[0], boundary))

    def _bulkdata(self, request: Request, plan: Retrieval) -> Response:
        instance = plan.instances[0]
        try:
            name = request.path_params["tag"]
            if not _HEX_TAG.fullmatch(name):
                raise WebError(400, "bulkdata is addressed by a tag of 8 hexadecimal digits")
            single = None
            for a in media.accepted(request.headers.get("accept"),
                                    'multipart/related; type="application/octet-stream"'):
                if a.type in ("*/*", "multipart/*") or (
                        a.type == "multipart/related"
                        and a.part_type in (None, "application/octet-stream")):
                    single = False
                    break
                if a.type == "application/octet-stream":
                    single = True
                    break
            if single is None:
                raise WebError(406, 'bulk data is sent as multipart/related; '
                                    'type="application/octet-stream" or application/octet-stream')
            found = bulk_value(self._path(instance), int(name, 16))
            if found is None:
                raise WebError(404, f"the instance has no bulk data at {name}")
            plan.counts.record(0x0000, instance.sop_instance_uid)
        finally:
            plan.finish(plan.outcome())
        if single:
            return Response(found[1], media_type="application/octet-stream")
        boundary = media.new_boundary()
        body = b"".join(media.multipart([("application/octet-stream", (found[1],))], boundary))
        return Response(body, media_type=media.content_type("application/octet-stream", boundary))

    def _rendered(self, request: Request, plan: Retrieval) -> Response:
        thumbnail = request.url.path.endswith("/thumbnail")
        try:
            instance = plan.instances[len(plan.instances) // 2]  # study/series: the middle one
            frames = request.path_params.get("frames")
            numbers = _frame_numbers(frames) if frames else [1]
            if len(numbers) != 1:
                raise WebError(400, "a rendered frame is asked for one frame at a time")
            kind = None
            for alt in media.accepted(request.headers.get("accept"), "image/jpeg"):
                if alt.type in ("image/jpeg", "image/png"):
                    kind = alt.type
                    break
                if alt.type in ("*/*", "image/*"):
                    kind = "image/jpeg"
                    break
            if kind is None:
                raise WebError(406, "rendered images are image/jpeg or image/png")
            params = request.query_params
            viewport = parse_viewport(params.get("viewport")) or ((128, 128) if thumbnail
                                                                  else None)
            with self.ctx.index.reader() as reader:  # a study's rendered: the query's or its own
                window = chosen_window(params.get("window"), self.ctx.annotations.protocol,
                                       reader, request.path_params.get("series"))
            body = render(self._path(instance), numbers[0], kind, window, viewport)
            plan.counts.record(0x0000, instance.sop_instance_uid)
        finally:
            plan.finish(plan.outcome())
        return Response(body, media_type=kind)

    # --- STOW-RS -------------------------------------------------------------------

    async def stow(self, request: Request) -> Response:
        caller: Caller = request.state.caller
        source = caller.source()
        if not source.may_store:
            raise WebError(403, "this client may not store (store is not in its services)")
        study = request.path_params.get("study")
        if study is not None:
            _uid(study, "the study UID in the path")
        content, boundary = media.boundary_of(request.headers.get("content-type"))
        if content.part_type not in (None, "application/dicom"):
            raise WebError(415, f"parts of type {content.part_type} are not accepted; "
                                'send type="application/dicom"')
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.max_upload:
            raise WebError(413, f"the body is over http.max_upload_mb "
                                f"({self.max_upload >> 20} MB)")
        body = DataSetSpool(self.spool_dir, in_memory=True, budget=self.spool_memory)
        try:
            chunks = request.stream().__aiter__()
            while True:
                try:
                    chunk = await asyncio.wait_for(chunks.__anext__(), self.read_timeout)
                except StopAsyncIteration:
                    break
                except TimeoutError:
                    raise WebError(408, f"no body data came for {self.read_timeout:g} s "
                                        "(node.network_timeout)") from None
                if body.size + len(chunk) > self.max_upload:
                    raise WebError(413, f"the body is over http.max_upload_mb "
                                        f"({self.max_upload >> 20} MB)")
                if body.in_memory and body.stays_in_memory(len(chunk)):
                    body.write(memoryview(chunk))  # a copy in memory: nothing to wait for
                else:  # to the spool folder (and the move there): off the event loop
                    await run_in_threadpool(body.write, memoryview(chunk))
            body.complete()
            self.metrics.received_bytes.inc(body.size)
            answer = await run_in_threadpool(self._store_parts, Path(body.path), boundary,
                                             source, study, request.state.root)
        finally:
            body.remove()
        return answer

    def _store_parts(self, spooled: Path, boundary: str, source: Source, study: str | None,
                     root: str) -> Response:
        parts = media.split_parts(spooled, boundary)
        for part in parts:
            if media.parse_media(part.content_type).type != "application/dicom":
                raise WebError(415, "a body part is not application/dicom; nothing was stored")
        referenced, failed = Sequence(), Sequence()
        in_memory = not self.ctx.ingest.router.stores_as_received(source.route)
        spare: DataSetSpool | None = None  # a memory spool, rewound for the next part
        try:
            with open(spooled, "rb") as f, \
                    mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as body:
                for part in parts:
                    one, spare = spare or DataSetSpool(self.spool_dir, in_memory,
                                                        budget=self.spool_memory), None
                    try:
                        for at in range(part.start, part.end, _CHUNK):
                            one.write(memoryview(body[at:min(at + _CHUNK, part.end)]))
                        one.complete()
                        sop_class, sop_instance, study_uid, series_uid = _received_uids(
                            Path(one.path))
                        if study is not None and study_uid != study:
                            failed.append(_failed(sop_class, sop_instance, 0xA900,
                                                  "StudyInstanceUID differs from the request's"))
                            continue
                        started = time.perf_counter()
                        result = self.ctx.ingest.ingest_file(Path(one.path), source)
                        self.metrics.ingest_seconds.labels("stow").observe(
                            time.perf_counter() - started)
                    finally:
                        if one.rewind():
                            spare = one
                        else:
                            one.remove()
                    self._answered(result, source, sop_class, sop_instance, study_uid,
                                   series_uid, root, referenced, failed)
        finally:
            if spare is not None:
                spare.remove()
        answer = Dataset()
        if study is not None:
            answer.RetrieveURL = f"{root}/studies/{study}"
        if referenced:
            answer.ReferencedSOPSequence = referenced
        if failed:
            answer.FailedSOPSequence = failed
        code = 200 if not failed else (409 if not referenced else 202)
        return JSONResponse(answer.to_json_dict(), status_code=code, media_type=DICOM_JSON)

    def _answered(self, result: StoreResult, source: Source, sop_class: str,
                  sop_instance: str, study_uid: str, series_uid: str, root: str,
                  referenced: Sequence, failed: Sequence) -> None:
        """Count, log and list one part's outcome in the answer's sequences."""
        code = result.outcome.status.code
        self.metrics.stored.labels(f"0x{code:04X}").inc()
        # A success is DEBUG, as a C-STORE's is (node.dimse.handlers.store).
        level = logging.DEBUG if result.outcome.status.is_success else logging.INFO
        log.log(level, "stow instance " + result.action, extra={"fields": {
            "association": source.association_id, "sha256": result.sha256,
            "status": f"0x{code:04X}", "reason": result.outcome.comment}})
        if result.outcome.status.is_success:
            item = Dataset()
            item.ReferencedSOPClassUID = sop_class
            item.ReferencedSOPInstanceUID = sop_instance
            if result.sop_instance_uid == sop_instance and study_uid and series_uid:
                # Only where the route kept the sender's UIDs: a pseudonymised
                # instance's location would link the sender's UIDs to ours.
                item.RetrieveURL = (f"{root}/studies/{study_uid}/series/{series_uid}"
                                    f"/instances/{sop_instance}")
            referenced.append(item)
        else:
            failed.append(_failed(sop_class, sop_instance, code,
                                  result.outcome.comment or result.outcome.status.name))


def _negotiate_json(request: Request) -> None:
    alts = media.accepted(request.headers.get("accept"), DICOM_JSON)
    if not any(a.matches(DICOM_JSON) or a.matches("application/json") for a in alts):
        raise WebError(406, "this resource is available as application/dicom+json only")


def _frame_choice(accept: str | None, stored: str, compressed: bool,
                  stored_media: str | None) -> str | None:
    """How to send frames: ``native`` (uncompressed, decoded if need be), the media type to
    send the stored compressed frames under, or None (406)."""
    octet = "application/octet-stream"
    for alt in media.accepted(accept, f'multipart/related; type="{octet}"'):
        if alt.type in ("*/*", "multipart/*"):
            part, ts = "*/*", None
        elif alt.type == "multipart/related":
            part, ts = alt.part_type or octet, alt.transfer_syntax
        else:
            continue
        if part in ("*/*", "*"):
            return (stored_media or octet) if compressed else "native"
        if part == octet:
            if ts in (None, media.EXPLICIT_LE) or (ts in ("*", stored) and not compressed):
                return "native"
            if ts in ("*", stored):
                return octet
        if compressed and part == stored_media and ts in (None, "*", stored):
            return stored_media
    return None


def _retrieve_url(root: str, level: Level, answer: dict[str, Any]) -> str:
    def uid(key: str) -> str:
        return (answer.get(key, {}).get("Value") or [""])[0]
    url = f"{root}/studies/{uid('0020000D')}"
    if level >= Level.SERIES:
        url += f"/series/{uid('0020000E')}"
    if level == Level.IMAGE:
        url += f"/instances/{uid('00080018')}"
    return url


def _frame_numbers(text: str) -> list[int]:
    try:
        numbers = [int(n) for n in text.split(",")]
    except ValueError:
        raise WebError(400, "frames are a comma-separated list of numbers from 1") from None
    if not numbers or len(numbers) > 10_000 or min(numbers) < 1:
        raise WebError(400, "frames are a comma-separated list of numbers from 1")
    return numbers


def _received_uids(path: Path) -> tuple[str, str, str, str]:
    """The part's SOP class, SOP instance, study and series UIDs as sent ("" when
    unreadable: the ingest then quarantines the bytes and says why)."""
    keywords = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
    try:
        ds = dcmread(path, stop_before_pixels=True, specific_tags=list(keywords))
        return tuple(str(ds.get(k, "")) for k in keywords)  # type: ignore[return-value]
    except Exception:  # not DICOM: the ingest's parse step reports it
        return "", "", "", ""


def _failed(sop_class: str, sop_instance: str, code: int, reason: str) -> Dataset:
    item = Dataset()
    if sop_class:
        item.ReferencedSOPClassUID = sop_class
    if sop_instance:
        item.ReferencedSOPInstanceUID = sop_instance
    item.FailureReason = code
    item.TransactionStatusComment = reason
    return item

