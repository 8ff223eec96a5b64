"""Append-only, hash-chained audit trail with a signed head checkpoint.

Each event's hash covers its sequence number, content and the previous hash,
so editing, deleting or reordering rows breaks the chain. A chain alone cannot
show that its tail was cut off (or that an older copy of the file was put
back), so after commits the newest (seq, hash) is written, signed with
Ed25519, to a head file outside the index (by a writer thread, at most every
``HEAD_MIN_SECONDS``, and always at close). ``verify`` checks both.

The head file lives in the data folder, so whoever owns that folder can cut
the trail's tail and put an older head back. :class:`ExternalCheckpoints`
closes that gap: the same signed (seq, hash) is also appended to a configured
second path outside the data folder, at least every ``interval`` seconds while
events come, at shutdown, and at once at every approval; ``verify`` checks
every checkpoint there against the chain.

Entries name UIDs, hashes, AE titles and addresses: never a patient name or
identifier (the callers pass objects built from UIDs and hashes only).
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import json
import logging
import os
import threading
import time as clock
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from node.atomic_file import write_atomically
from node.storage.interface import Index, Transaction
from node.storage.records import AuditRow

log = logging.getLogger("lamina.audit")

GENESIS = "0" * 64
#: Seconds between attempts to write the signed head after a failed write (disk full).
HEAD_RETRY_SECONDS = 1.0
#: The writer thread signs the head at most this often: one sequential sender
#: never lets stores batch, and an Ed25519 signature plus a file replace per
#: instance cost about a millisecond of CPU each. The chain itself is written per
#: event inside each store's transaction; the head only bounds how far a cut tail
#: can reach, and it is still written at close() (and at once for an approval).
HEAD_MIN_SECONDS = 0.1


@dataclass(frozen=True)
class Actor:
    """Who did it: a peer over an association, or a person at the command line."""

    ae_title: str = ""
    address: str = ""
    association_id: str = ""
    user: str = ""

    def as_dict(self) -> dict[str, str]:
        return {k: v for k, v in self.__dict__.items() if v}


@dataclass(frozen=True)
class AuditEntry:
    seq: int
    hash: str


@dataclass(frozen=True)
class VerifyReport:
    ok: bool
    entries: int
    problem: str = ""


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _entry_hash(
    seq: int, time: str, actor: str, action: str, obj: str, outcome: str, prev_hash: str
) -> str:
    canonical = json.dumps(
        [seq, time, actor, action, obj, outcome, prev_hash], separators=(",", ":")
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


def _canonical(value: dict[str, Any]) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


class ExternalCheckpoints:
    """Signed (seq, hash) checkpoints appended, one JSON line each, to a file outside the
    data folder: what a restored old head or a cut tail is compared with."""

    def __init__(self, path: Path, interval: float = 60.0) -> None:
        self.path = path
        self.interval = interval

    def append(self, seq: int, hash_: str, signature: bytes) -> None:
        """Append one checkpoint (fsync'd) unless the file already has one as new."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            last = self._last(fd)
            if last is not None and last >= seq:
                return
            line = json.dumps({"seq": seq, "hash": hash_, "time": utc_now(),
                               "signature": base64.b64encode(signature).decode()})
            os.write(fd, (line + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)

    @staticmethod
    def _last(fd: int) -> int | None:
        size = os.fstat(fd).st_size
        if not size:
            return None
        tail = os.pread(fd, min(size, 4096), max(0, size - 4096)).decode(errors="replace")
        lines = [line for line in tail.splitlines() if line.strip()]
        try:
            return int(json.loads(lines[-1])["seq"])
        except (IndexError, ValueError, KeyError):
            return None

    def read(self) -> list[tuple[int, str, bytes]] | None:
        """Every checkpoint, oldest first; None when there is no file."""
        if not self.path.exists():
            return None
        out = []
        for line in self.path.read_text().splitlines():
            if line.strip():
                data = json.loads(line)
                out.append((int(data["seq"]), str(data["hash"]),
                            base64.b64decode(data["signature"])))
        return out


class HeadCheckpoint:
    """The newest (seq, hash), signed, in a file beside (not inside) the index, and
    (when configured) in :class:`ExternalCheckpoints` too."""

    def __init__(self, head_path: Path, key_path: Path, *, create_key: bool = True,
                 external: ExternalCheckpoints | None = None) -> None:
        """``create_key=False`` (tools on an existing node): a missing key is not made up
        front; one is made only when a head is first written, and :meth:`verify` says
        there is none rather than creating one."""
        self.head_path = head_path
        self.key_path = key_path
        self.external = external
        self._external_at = float("-inf")  # monotonic time of the last external checkpoint
        self._external_seq = 0
        self._newest: tuple[int, str, bytes] | None = None  # the last head this process signed
        self._key_lock = threading.Lock()
        self._key: Ed25519PrivateKey | None = None
        if create_key or self.key_path.exists():
            self._key = self._load_or_create_key()
        self._write_lock = threading.Lock()  # flock is per open file: threads queue here
        self._lock_fd: int | None = None
        self._pending: AuditEntry | None = None
        self._in_flight: AuditEntry | None = None  # taken by the writer thread, being written
        self._pending_changed = threading.Condition()
        self._writer: threading.Thread | None = None
        self._closed = False
        #: Set by close(): ends the writer's pause between two heads. An Event of its own,
        #: not the condition above, so that advance() (once per stored instance) does not
        #: wake the pausing writer each time only for it to sleep again: that was a thread
        #: switch and a GIL hand-off per instance, on the receiving thread's time.
        self._stopping = threading.Event()

    def _load_or_create_key(self) -> Ed25519PrivateKey:
        if self.key_path.exists():
            key = serialization.load_pem_private_key(self.key_path.read_bytes(), password=None)
            if not isinstance(key, Ed25519PrivateKey):
                raise ValueError(f"{self.key_path.name} is not an Ed25519 private key")
            return key
        self.key_path.parent.mkdir(parents=True, exist_ok=True)
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        fd = os.open(self.key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        return key

    @staticmethod
    def _message(seq: int, hash_: str) -> bytes:
        return f"lamina-audit-head:{seq}:{hash_}".encode()

    def advance(self, entry: AuditEntry) -> None:
        """Ask for the head to move forward to ``entry``; returns at once.

        A background thread writes the newest pending entry, at most every
        ``HEAD_MIN_SECONDS``, so a burst of stores (or one steady sender) costs
        one signed write per interval, not one per instance. The head may lag
        the trail by that interval's events (and after kill -9 or a power cut), which
        verify accepts; it can never lead it, because the index commit came first.
        """
        with self._pending_changed:
            if self._pending is None or entry.seq > self._pending.seq:
                self._pending = entry
                self._pending_changed.notify_all()
            closed = self._closed
            if not closed and self._writer is None:
                self._writer = threading.Thread(target=self._write_loop, name="audit-head",
                                                daemon=True)
                self._writer.start()
        if closed:  # no writer thread any more
            self.flush()

    def flush(self) -> None:
        """Write any pending head now (at shutdown, and before a verify in the same process),
        after the one the writer thread may be writing at this moment."""
        with self._pending_changed:
            entry, self._pending = self._pending, None
            self._pending_changed.wait_for(lambda: self._in_flight is None)
        if entry is not None:
            self._write(entry)

    def checkpoint(self, entry: AuditEntry) -> None:
        """Write ``entry`` (or a newer head another process wrote) as the head and as an
        external checkpoint now (an approval)."""
        self._write(entry)
        self._write_external(force=True)

    def close(self) -> None:
        """Write any pending head, end the writer thread and close the lock file."""
        with self._pending_changed:
            self._closed = True
            self._pending_changed.notify_all()
        self._stopping.set()
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.join(timeout=10)
        self.flush()
        self._write_external(force=True)
        with self._write_lock:
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None

    def _write_loop(self) -> None:
        while True:
            idle = False
            with self._pending_changed:
                while self._pending is None and not self._closed and not idle:
                    # With an external copy, wake at its interval: a head written since
                    # the last one is copied even when no event follows it.
                    idle = not self._pending_changed.wait(
                        self.external.interval if self.external else None)
                if idle and self._pending is None and not self._closed:
                    entry = None
                elif self._pending is None:  # closed, nothing left to write
                    return
                else:
                    entry, self._pending = self._pending, None
                    self._in_flight = entry
            if entry is None:
                self._write_external(force=True)
                continue
            failed = False
            try:
                self._write(entry)
            except OSError as exc:
                # A full disk or a lost mount must not end this thread (the head would
                # then never move again): keep the entry pending and retry.
                failed = True
                log.error("audit head not written, retrying", extra={"fields": {
                    "seq": entry.seq, "error": exc.strerror or str(exc)}})
            finally:
                with self._pending_changed:
                    self._in_flight = None
                    if failed and (self._pending is None or self._pending.seq < entry.seq):
                        self._pending = entry
                    self._pending_changed.notify_all()
            if self._stopping.wait(HEAD_RETRY_SECONDS if failed else HEAD_MIN_SECONDS):
                return  # close() flushes the pending entry once more

    def _write(self, entry: AuditEntry) -> None:
        """Write ``entry`` as the head unless a newer one is already there (other processes)."""
        with self._write_lock:
            if self._lock_fd is None:
                self.head_path.parent.mkdir(parents=True, exist_ok=True)
                self._lock_fd = os.open(self.head_path.with_suffix(".lock"),
                                        os.O_RDWR | os.O_CREAT, 0o600)
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            try:
                current = self.read()
                if current and current[0] >= entry.seq:
                    # another process signed a newer head: that one goes outside next
                    if self._newest is None or current[0] > self._newest[0]:
                        self._newest = current
                    return
                signature = self._signing_key().sign(self._message(entry.seq, entry.hash))
                body = json.dumps({"seq": entry.seq, "hash": entry.hash,
                                   "signature": base64.b64encode(signature).decode()})
                # Under the lock: the processes share the spare file (node.atomic_file).
                write_atomically(self.head_path, body.encode())
                self._newest = (entry.seq, entry.hash, signature)
            finally:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            self._write_external(force=False)

    def _write_external(self, *, force: bool) -> None:
        """Copy the newest head this process signed to the external checkpoints, when one
        is configured and it is new, and ``force`` or the interval has passed."""
        if self.external is None or self._newest is None:
            return
        seq, hash_, signature = self._newest
        if seq <= self._external_seq:
            return
        if not force and clock.monotonic() - self._external_at < self.external.interval:
            return
        try:
            self.external.append(seq, hash_, signature)
        except OSError as exc:  # a lost mount must not stop the head: retried next time
            log.error("external audit checkpoint not written", extra={"fields": {
                "path": str(self.external.path), "seq": seq, "error": exc.strerror or str(exc)}})
            return
        self._external_seq, self._external_at = seq, clock.monotonic()

    def read(self) -> tuple[int, str, bytes] | None:
        if not self.head_path.exists():
            return None
        data = json.loads(self.head_path.read_text())
        return int(data["seq"]), str(data["hash"]), base64.b64decode(data["signature"])

    def sign(self, seq: int, hash_: str) -> bytes:
        """The signature of a (seq, hash) checkpoint, as the head carries it (syslog stream)."""
        return self._signing_key().sign(self._message(seq, hash_))

    def _signing_key(self) -> Ed25519PrivateKey:
        with self._key_lock:
            if self._key is None:
                self._key = self._load_or_create_key()
            return self._key

    @property
    def has_key(self) -> bool:
        return self._key is not None or self.key_path.exists()

    def signature_valid(self, seq: int, hash_: str, signature: bytes) -> bool:
        try:
            self._signing_key().public_key().verify(signature, self._message(seq, hash_))
        except InvalidSignature:
            return False
        return True


class AuditTrail:
    """Writes and verifies audit events in the index."""

    def __init__(self, index: Index, checkpoint: HeadCheckpoint, node_id: str = "") -> None:
        """``node_id``: this node among several writing one chain (``node.id``); it is
        recorded in the actor of every event it writes."""
        self.index = index
        self.checkpoint = checkpoint
        self.node = {"node": node_id} if node_id else {}

    def append(
        self,
        tx: Transaction,
        action: str,
        actor: Actor,
        obj: dict[str, Any],
        outcome: str = "success",
    ) -> AuditEntry:
        """Add an event inside the caller's transaction.

        Call :meth:`committed` with the result once the transaction commits.
        """
        last = tx.audit.last()
        seq, prev_hash = (last[0] + 1, last[1]) if last else (1, GENESIS)
        time, obj_s = utc_now(), _canonical(obj)
        actor_s = _canonical({**actor.as_dict(), **self.node})
        digest = _entry_hash(seq, time, actor_s, action, obj_s, outcome, prev_hash)
        tx.audit.insert(AuditRow(seq, time, actor_s, action, obj_s, outcome, prev_hash, digest))
        return AuditEntry(seq, digest)

    def committed(self, entry: AuditEntry, *, checkpoint: bool = False) -> None:
        """After the commit: move the head to ``entry``; ``checkpoint`` (an approval)
        writes it and the external checkpoint before returning."""
        if checkpoint:
            self.checkpoint.checkpoint(entry)
        else:
            self.checkpoint.advance(entry)

    def close(self) -> None:
        self.checkpoint.close()

    def record(
        self, action: str, actor: Actor, obj: dict[str, Any], outcome: str = "success"
    ) -> AuditEntry:
        """Write one event in its own transaction (events with no other index change)."""
        with self.index.transaction() as tx:
            entry = self.append(tx, action, actor, obj, outcome)
        self.committed(entry)
        return entry

    def verify(self) -> VerifyReport:
        """Walk the chain and compare its end with the signed head."""
        expected_seq, prev_hash, count = 1, GENESIS, 0
        self.checkpoint.flush()
        head = self.checkpoint.read()
        hash_at_head = None
        external = self.checkpoint.external
        try:
            kept = external.read() if external is not None else None
        except (OSError, ValueError, KeyError, TypeError):
            return VerifyReport(False, 0, f"external checkpoints at {external.path} unreadable")
        wanted = {seq for seq, _, _ in kept or ()}
        hashes: dict[int, str] = {}
        with self.index.reader() as r:
            for row in r.audit.rows():
                seq = row.seq
                if seq != expected_seq:
                    return VerifyReport(
                        False, count,
                        f"entry {expected_seq}: missing or out of order (found {seq} in its place)",
                    )
                if row.prev_hash != prev_hash:
                    return VerifyReport(
                        False, count, f"entry {seq}: previous-hash link broken"
                    )
                if _entry_hash(seq, row.time, row.actor, row.action, row.object, row.outcome,
                               row.prev_hash) != row.hash:
                    return VerifyReport(
                        False, count, f"entry {seq}: content does not match its hash"
                    )
                if head and seq == head[0]:
                    hash_at_head = row.hash
                if seq in wanted:
                    hashes[seq] = row.hash
                prev_hash, expected_seq, count = row.hash, seq + 1, count + 1
        if head is None:
            if count:
                return VerifyReport(False, count, "head checkpoint missing")
            return VerifyReport(True, 0)
        head_seq, head_hash, signature = head
        if not self.checkpoint.has_key:
            return VerifyReport(False, count, f"head checkpoint cannot be checked: no signing key"
                                              f" at {self.checkpoint.key_path}")
        if not self.checkpoint.signature_valid(head_seq, head_hash, signature):
            return VerifyReport(False, count, "head checkpoint signature invalid")
        if head_seq > count:
            return VerifyReport(
                False, count,
                f"entry {count + 1}: trail truncated (signed head is at entry {head_seq},"
                f" trail ends at {count})",
            )
        if hash_at_head != head_hash:
            return VerifyReport(False, count, f"entry {head_seq}: does not match the signed head")
        if external is not None:
            problem = self._compare_external(external, kept, hashes, count)
            if problem:
                return VerifyReport(False, count, problem)
        return VerifyReport(True, count)

    def _compare_external(self, external: ExternalCheckpoints,
                          kept: list[tuple[int, str, bytes]] | None, hashes: dict[int, str],
                          count: int) -> str:
        """What is wrong between the trail and the checkpoints kept outside the data folder."""
        if kept is None:
            return f"external checkpoints missing at {external.path}" if count else ""
        for seq, hash_, signature in kept:
            if not self.checkpoint.signature_valid(seq, hash_, signature):
                return f"external checkpoint at entry {seq}: signature invalid"
            if seq > count:
                return (f"entry {count + 1}: trail rolled back (an external checkpoint is at"
                        f" entry {seq}, trail ends at {count})")
            if hashes.get(seq) != hash_:
                return f"entry {seq}: does not match the external checkpoint"
        return ""
