"""The forward worker: sends the outbox's due rows with the node's one outgoing sender.

One thread, owned by the supervisor's :class:`~node.context.NodeContext`
(approvals made in receiving workers or at the command line are found by
polling the index every ``forward.poll_seconds``). Per destination it sends
the due rows over :class:`~node.dimse.sender.StoreSender`: the stored bytes as
they are, re-encoded only when the destination refuses the stored syntax.

What a delivery means, row by row:

* success (0x0000) → ``sent``; a warning status (0x0001, 0xB000–0xBFFF) →
  ``sent`` with the warning kept;
* anything else (a failure status, no presentation context, the association
  refused or lost) → ``failed``, retried after an exponential backoff with
  jitter; after ``forward.max_attempts`` → ``dead`` with the last error kept.
  Never reported as sent.

Results are recorded (with one ``export.forward`` audit event, DICOM 110106)
every few instances, so a crash resends at most those few once: at most one
identical duplicate per instance after a crash, none without one.

Before anything leaves, each row's annotation must still be ``approved``;
otherwise the row is ``refused`` and audited. A re-identified route maps the
stored object back onto the clinical originals with the encrypted map (the
same engine as ``lamina reidentify``), audited first as a Patient Record
event (110110).
"""

from __future__ import annotations

import io
import logging
import random
import threading
import time
from collections.abc import Callable
from contextlib import closing
from dataclasses import replace
from functools import partial
from itertools import groupby
from typing import BinaryIO

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.tag import Tag

from node.annotations.states import AnnotationState
from node.anonymize.keys import ProjectKey
from node.anonymize.reidmap import ReidentificationMap, reidentify_dataset
from node.audit.trail import Actor, AuditTrail, utc_now
from node.config import Peer, Settings
from node.dimse.sender import Outgoing, Sent, StoreSender
from node.dimse.tls import outgoing_context
from node.storage.interface import BlobStore, Index, LocalBlobFiles
from node.storage.records import Row

log = logging.getLogger("lamina.forward")

#: Results recorded per transaction: what a crash may resend (once) at most.
RECORD_EVERY = 16
#: Rows read per pass.
PASS_LIMIT = 1024
_PIXEL_DATA = Tag(0x7FE0, 0x0010)
#: Shortest pause between passes (seconds).
_MIN_WAIT = 0.05


def is_warning(status: int) -> bool:
    """C-STORE warning statuses (PS3.7 C.4.2.1.4 and Annex C): delivered, but not cleanly."""
    return status == 0x0001 or 0xB000 <= status <= 0xBFFF


class ForwardWorker:
    """Sends due outbox rows; start()/stop() by the context, or deliver_due() directly."""

    def __init__(self, settings: Settings, index: Index, blobs: BlobStore, audit: AuditTrail,
                 key: ProjectKey | None, make_seg: Callable[[int], Dataset]) -> None:
        self.settings = settings
        self.forward = settings.forward
        self.index = index
        self.blobs = blobs
        self.audit = audit
        self.key = key
        #: An annotation as a new SEG (overlay annotations: AnnotationService.as_seg).
        self.make_seg = make_seg
        self.actor = Actor(ae_title=settings.node.ae_title, user="forward-worker")
        self.tls = settings.tls
        self.sender = StoreSender(settings.node.ae_title, settings.node.max_pdu,
                                  settings.node.acse_timeout, settings.node.dimse_timeout)
        self._random = random.Random()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    # --- the thread --------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name="forward", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop after the instance in flight; rows not sent stay queued for the next start."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._stopping.set()
        self._wake.set()
        thread.join(timeout)

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                self.deliver_due()
                wait = self.forward.poll_seconds
                with self.index.reader() as r:
                    due = r.outbox.next_due()
                if due is not None:  # never a busy loop, whatever the backoff
                    wait = max(_MIN_WAIT, min(wait, due - time.time()))
            except Exception:  # the index or a peer misbehaving must not end forwarding
                log.exception("forward pass failed")
                wait = self.forward.poll_seconds
            self._wake.wait(wait)
            self._wake.clear()

    # --- one pass ----------------------------------------------------------------------

    def deliver_due(self) -> int:
        """Send every row due now; how many were delivered."""
        with self.index.reader() as r:
            rows = r.outbox.due(time.time(), PASS_LIMIT)
        delivered = 0
        for destination, group in groupby(rows, key=lambda row: row["destination"]):
            if self._stopping.is_set():
                break
            delivered += self._deliver(destination, self._allowed(list(group)))
        return delivered

    def _allowed(self, rows: list[Row]) -> list[Row]:
        """Rows whose annotation is still approved; the others are refused and audited."""
        allowed, refused = [], []
        for row in rows:
            (allowed if row["annotation_state"] == AnnotationState.APPROVED else refused
             ).append(row)
        if refused:
            with self.index.transaction() as tx:
                for row in refused:
                    tx.outbox.refuse(row["id"], f"annotation {row['annotation_fk']} is"
                                     f" {row['annotation_state']}, not approved", utc_now())
                entry = self.audit.append(tx, "forward.refused", self.actor, {
                    "items": [r["id"] for r in refused],
                    "annotations": sorted({r["annotation_fk"] for r in refused}),
                    "reason": "only approved annotations can leave"}, outcome="minor-failure")
            self.audit.committed(entry)
        return allowed

    def _deliver(self, destination: str, rows: list[Row]) -> int:
        if not rows:
            return 0
        peer = self.settings.peer_named(destination)
        if peer is None:
            self._record(destination, [(row, None, f"{destination!r} is no longer a configured"
                                        " peer") for row in rows])
            return 0
        rows = self._made(destination, rows)
        try:
            items = [self._outgoing(row) for row in rows]
        except Exception as exc:  # no key, an unknown map entry: retried, then dead
            self._record(destination, [(row, None, f"cannot prepare: {exc}") for row in rows])
            return 0
        reidentified = [row["id"] for row in rows if row["mode"] == "reidentified"]
        if reidentified:
            self.audit.record("patient-record.reidentify", self.actor, {
                "purpose": "forward", "destination": destination, "items": reidentified})
        return self._send(peer, rows, items)

    def _send(self, peer: Peer, rows: list[Row], items: list[Outgoing]) -> int:
        by_item = {id(item): row for item, row in zip(items, rows, strict=True)}
        pending: list[tuple[Row, Sent | None, str]] = []
        delivered = 0
        results = self.sender.send(items, peer.host, peer.port, peer.ae_title,
                                   tls=outgoing_context(self.tls, peer.tls))
        with closing(results):
            for sent in results:
                pending.append((by_item[id(sent.item)], sent, ""))
                if sent.status is not None and (sent.status == 0 or is_warning(sent.status)):
                    delivered += 1
                if len(pending) >= RECORD_EVERY:
                    self._record(peer.name, pending)
                    pending = []
                if self._stopping.is_set():
                    break
        if pending:
            self._record(peer.name, pending)
        return delivered

    def _record(self, destination: str, results: list[tuple[Row, Sent | None, str]]) -> None:
        """Each row's outcome and one export event, in one transaction."""
        now = utc_now()
        sent, failed, dead = [], [], []
        with self.index.transaction() as tx:
            for row, result, error in results:
                status = result.status if result is not None else None
                if status is not None and (status == 0 or is_warning(status)):
                    warning = (f"0x{status:04X}" + (f": {result.comment}" if result.comment
                                                   else "")) if status else None
                    if tx.outbox.mark_sent(row["id"], status, warning, now):
                        sent.append({"item": row["id"], "uid": row["sop_instance_uid"],
                                     **({"warning": warning} if warning else {})})
                    continue
                if result is not None:
                    error = (f"0x{status:04X}" + (f": {result.comment}" if result.comment else "")
                             if status is not None else result.reason)
                state = tx.outbox.mark_failed(row["id"], status, error,
                                              time.time() + self.backoff(row["attempts"] + 1),
                                              self.forward.max_attempts, now)
                outcome = {"item": row["id"], "uid": row["sop_instance_uid"], "error": error}
                if state == "dead":
                    dead.append(outcome)
                elif state == "failed":
                    failed.append(outcome)
            entry = self.audit.append(
                tx, "export.forward", self.actor,
                {"destination": destination, "sent": sent, "failed": failed, "dead": dead},
                outcome="success" if not failed and not dead else "minor-failure")
            if dead:
                entry = self.audit.append(tx, "forward.dead-letter", self.actor,
                                          {"destination": destination, "items": dead},
                                          outcome="serious-failure")
        self.audit.committed(entry)
        if failed or dead:
            log.warning("forward failures", extra={"fields": {
                "destination": destination, "failed": len(failed), "dead": len(dead),
                "error": (failed or dead)[-1]["error"]}})

    def backoff(self, attempts: int) -> float:
        """Seconds before attempt ``attempts + 1``: doubling from ``backoff_seconds``, capped,
        with "equal jitter" (half fixed, half random) so that rows failed together spread."""
        delay = min(self.forward.backoff_max_seconds,
                    self.forward.backoff_seconds * 2 ** (attempts - 1))
        return delay / 2 + self._random.uniform(0, delay / 2)

    # --- what goes out -----------------------------------------------------------------

    def _made(self, destination: str, rows: list[Row]) -> list[Row]:
        """Rows whose object exists: an overlay annotation's SEG is made at its first send,
        stored, and reused by its other rows (other destinations, retries). Rows whose SEG
        cannot be made fail (retried, then dead) with the reason."""
        ready, failed = [], []
        for row in rows:
            if row["blob_sha256"]:
                ready.append(row)
                continue
            try:
                ready.append(self._make(row))
            except Exception as exc:  # nothing to convert, a slice gone: said in the row
                failed.append((row, None, f"cannot make the SEG: {exc}"))
        if failed:
            self._record(destination, failed)
        return ready

    def _make(self, row: Row) -> Row:
        annotation_id = row["annotation_fk"]
        with self.index.reader() as r:
            made = next((o for o in r.outbox.list(annotation_id=annotation_id)
                         if o["kind"] == "seg" and o["blob_sha256"]), None)
        if made is None:
            seg = self.make_seg(annotation_id)
            buffer = DicomBytesIO()
            seg.save_as(buffer, enforce_file_format=True)
            ref = self.blobs.put_bytes(buffer.getvalue())
            made = {"sop_instance_uid": str(seg.SOPInstanceUID),
                    "sop_class_uid": str(seg.SOPClassUID), "blob_sha256": ref.sha256,
                    "transfer_syntax_uid": str(seg.file_meta.TransferSyntaxUID)}
        keys = ("sop_instance_uid", "sop_class_uid", "blob_sha256", "transfer_syntax_uid")
        with self.index.transaction() as tx:
            tx.outbox.set_object(row["id"], *(made[k] for k in keys), utc_now())
        return {**row, **{k: made[k] for k in keys}}

    def _outgoing(self, row: Row) -> Outgoing:
        sha = row["blob_sha256"]
        if row["mode"] == "stored":
            item = Outgoing(row["sop_class_uid"], row["sop_instance_uid"],
                            row["transfer_syntax_uid"], partial(self.blobs.open, sha), label=sha)
            if isinstance(self.blobs, LocalBlobFiles):  # the sender streams a local file
                item = replace(item, local_path=partial(self.blobs.local_path, sha))
            return item
        if self.key is None:
            raise RuntimeError("the project key is not loaded: nothing can be re-identified")
        rmap = ReidentificationMap(self.key)
        with self.index.reader() as r:
            uid = rmap.lookup_uid(r, row["sop_instance_uid"]) or row["sop_instance_uid"]
        return Outgoing(row["sop_class_uid"], uid, row["transfer_syntax_uid"],
                        partial(self._reidentified, sha, rmap), label=f"reidentified:{sha}")

    def _reidentified(self, sha: str, rmap: ReidentificationMap) -> BinaryIO:
        """The stored object mapped back onto the originals, as a Part 10 file in memory.

        The pixel data (which holds no identifiers) is set aside while the rest is
        mapped, so that the mapping's defensive copy does not copy the pixels too."""
        with self.blobs.open(sha) as f:
            ds = dcmread(f)
        pixels = ds.pop(_PIXEL_DATA, None)
        with self.index.reader() as r:
            out = reidentify_dataset(r, rmap, ds)
        if pixels is not None:
            out[_PIXEL_DATA] = pixels
        buffer = DicomBytesIO()
        out.save_as(buffer, enforce_file_format=True)
        return io.BytesIO(buffer.getvalue())
