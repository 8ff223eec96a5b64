"""The audit trail streamed to a syslog collector: RFC 5424 messages over TLS (RFC 5425).

Each event goes out as its DICOM audit message (:mod:`node.audit.atna`), the
way IHE ATNA repositories take them (facility 10, MSGID ``IHE+RFC-3881``);
after each batch a signed checkpoint of the trail (MSGID
``lamina-checkpoint``: seq, hash, Ed25519 signature) follows, so the
collector holds a copy of the head the data folder's owner cannot roll back.

The spool is the trail itself: a cursor file beside the head records the last
event the collector took. While the collector is unreachable (or its
certificate does not verify) nothing moves and events keep accumulating in the
index; when it is back, everything after the cursor is sent in order. A crash
between sending and moving the cursor sends a batch again (at least once; the
trail entry's seq and hash are in each message to match duplicates).
"""

from __future__ import annotations

import base64
import json
import logging
import os
import socket
import ssl
import threading
from datetime import UTC, datetime
from pathlib import Path
from xml.etree import ElementTree as ET

from node.atomic_file import write_atomically
from node.audit.atna import to_message
from node.audit.trail import HeadCheckpoint
from node.config import AuditSettings
from node.storage.interface import Index
from node.storage.records import AuditRow

log = logging.getLogger("lamina.audit")

FACILITY = 10  # security/authorization messages (authpriv), as IHE ATNA uses
SEVERITY = {"success": 5, "minor-failure": 4, "serious-failure": 3, "major-failure": 2}
BATCH = 200
BOM = "\ufeff"


def frame(message: bytes) -> bytes:
    """RFC 5425 octet-counting: the length, a space, the message."""
    return f"{len(message)} ".encode() + message


def syslog_message(msgid: str, severity: int, body: str, host: str, time: str) -> bytes:
    """One RFC 5424 message: header, no structured data, a UTF-8 body (with its BOM)."""
    return (f"<{FACILITY * 8 + severity}>1 {time} {host} lamina {os.getpid()} {msgid} - "
            f"{BOM}{body}").encode()


class SyslogStream:
    """Sends what the trail holds after the cursor; one thread, owned by NodeContext."""

    def __init__(self, index: Index, checkpoint: HeadCheckpoint, settings: AuditSettings,
                 node_ae_title: str, cursor_path: Path, poll: float = 1.0) -> None:
        host, _, port = settings.syslog.rpartition(":")
        self.address = (host, int(port))
        self.index = index
        self.checkpoint = checkpoint
        self.node_ae_title = node_ae_title
        self.cursor_path = cursor_path
        self.poll = poll
        self.tls = ssl.create_default_context(ssl.Purpose.SERVER_AUTH,
                                              cafile=str(settings.syslog_ca))
        if settings.syslog_cert is not None:
            self.tls.load_cert_chain(settings.syslog_cert, settings.syslog_key)
        self.host = socket.gethostname()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._reachable = True

    @property
    def cursor(self) -> int:
        try:
            return int(self.cursor_path.read_text().strip() or 0)
        except FileNotFoundError:
            return 0

    def _move_cursor(self, seq: int) -> None:
        self.cursor_path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(self.cursor_path, str(seq).encode())

    def send_pending(self) -> int:
        """Send every event after the cursor (and a checkpoint per batch); how many went.
        An unreachable or unverifiable collector sends nothing and raises nothing."""
        sent = 0
        try:
            with socket.create_connection(self.address, timeout=10) as raw, \
                    self.tls.wrap_socket(raw, server_hostname=self.address[0]) as conn:
                while True:
                    with self.index.reader() as r:
                        rows = r.audit.after(self.cursor, BATCH)
                    if not rows:
                        break
                    payload = b"".join(frame(self._event(row)) for row in rows)
                    last = rows[-1]
                    conn.sendall(payload + frame(self._checkpoint(last.seq, last.hash)))
                    self._move_cursor(last.seq)
                    sent += len(rows)
        except (OSError, ssl.SSLError) as exc:
            if self._reachable:
                log.warning("syslog collector unreachable: events wait in the trail",
                            extra={"fields": {"collector": f"{self.address[0]}:{self.address[1]}",
                                              "error": type(exc).__name__,
                                              "waiting_after": self.cursor}})
            self._reachable = False
            return sent
        self._reachable = True
        return sent

    def _event(self, row: AuditRow) -> bytes:
        xml = to_message(row, self.node_ae_title, self.host)
        return syslog_message("IHE+RFC-3881", SEVERITY.get(row.outcome, 4),
                              ET.tostring(xml, encoding="unicode"), self.host, row.time)

    def _checkpoint(self, seq: int, hash_: str) -> bytes:
        signature = base64.b64encode(self.checkpoint.sign(seq, hash_)).decode()
        body = json.dumps({"seq": seq, "hash": hash_, "signature": signature},
                          separators=(",", ":"))
        now = datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
        return syslog_message("lamina-checkpoint", 6, body, self.host, now)

    def start(self) -> None:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="audit-syslog", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.poll):
            self.send_pending()

    def stop(self) -> None:
        """Send what is pending (if the collector is there) and end the thread."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join(timeout=30)
        self._thread = None
        self.send_pending()
