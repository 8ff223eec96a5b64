"""Media types: what a client accepts (PS3.18 8.7), and multipart/related bodies both ways.

Accept headers are parsed here once: each alternative is a media type with
its parameters (``type`` quoted or not, ``transfer-syntax``), ordered by ``q``.
Written bodies are streamed part by part; read bodies (STOW-RS) are parsed
from a spooled file through ``mmap``, so a large upload is never held whole
in memory. The standard library's ``email`` parser would read the whole body
into memory and Starlette parses only ``multipart/form-data``, hence this
small parser.
"""

from __future__ import annotations

import mmap
import re
import secrets
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from node.web.errors import WebError

#: PS3.18 8.7.3.1: what a WADO-RS application/dicom part defaults to.
EXPLICIT_LE = "1.2.840.10008.1.2.1"
_PARAM = re.compile(r';\s*([!#$%&\'*+.^_`|~0-9A-Za-z-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;,\s]*)')


@dataclass(frozen=True)
class MediaRange:
    """One Accept alternative: ``multipart/related; type="application/dicom"; q=0.5``."""

    type: str  # lower case, e.g. "multipart/related"
    params: dict[str, str] = field(default_factory=dict)
    q: float = 1.0

    @property
    def part_type(self) -> str | None:
        """For multipart/related: the parts' media type (``type`` parameter), lower case."""
        value = self.params.get("type")
        return value.lower() if value else None

    @property
    def transfer_syntax(self) -> str | None:
        return self.params.get("transfer-syntax")

    def matches(self, media_type: str) -> bool:
        if self.type in ("*/*", media_type):
            return True
        major, _, minor = self.type.partition("/")
        return minor == "*" and media_type.startswith(major + "/")


def _split_alternatives(header: str) -> list[str]:
    """Split on commas outside quoted strings."""
    parts, current, quoted = [], [], False
    for ch in header:
        if ch == '"':
            quoted = not quoted
        if ch == "," and not quoted:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return [p.strip() for p in parts if p.strip()]


def parse_media(text: str) -> MediaRange:
    """One media type with parameters (a Content-Type, or an Accept alternative)."""
    head, _, rest = text.partition(";")
    media = head.strip().lower()
    if not re.fullmatch(r"[a-z0-9!#$&^_.+-]+/[a-z0-9!#$&^_.+*-]+|\*/\*", media):
        raise WebError(400, "malformed media type")
    params: dict[str, str] = {}
    for name, value in _PARAM.findall(";" + rest):
        if value.startswith('"'):
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        params.setdefault(name.lower(), value)  # a duplicate parameter: the first one counts
    q = 1.0
    if "q" in params:
        try:
            q = float(params.pop("q"))
        except ValueError:
            raise WebError(400, "malformed q value in Accept") from None
    return MediaRange(media, params, q)


def accepted(header: str | None, default: str) -> list[MediaRange]:
    """The Accept header's alternatives, best first (``default`` when there is none)."""
    alternatives = [parse_media(a) for a in _split_alternatives(header or "")] or [
        parse_media(default)]
    return sorted((a for a in alternatives if a.q > 0), key=lambda a: -a.q)


# --- writing multipart/related ------------------------------------------------


def new_boundary() -> str:
    return f"lamina-{secrets.token_hex(12)}"


def content_type(part_type: str, boundary: str) -> str:
    return f'multipart/related; type="{part_type}"; boundary={boundary}'


def part_head(boundary: str, part_content_type: str, location: str | None = None) -> bytes:
    head = f"--{boundary}\r\nContent-Type: {part_content_type}\r\n"
    if location:
        head += f"Content-Location: {location}\r\n"
    return (head + "\r\n").encode()


def closing(boundary: str) -> bytes:
    return f"--{boundary}--\r\n".encode()


def multipart(parts: Iterable[tuple[str, Iterable[bytes]]], boundary: str) -> Iterator[bytes]:
    """Stream ``(content type, chunks)`` parts as one multipart/related body."""
    for part_content_type, chunks in parts:
        yield part_head(boundary, part_content_type)
        yield from chunks
        yield b"\r\n"
    yield closing(boundary)


# --- reading multipart/related (STOW-RS) ----------------------------------------


@dataclass(frozen=True)
class Part:
    """One body part of a spooled request: its headers and where its bytes lie in the file."""

    headers: dict[str, str]
    start: int
    end: int

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "application/octet-stream")


#: Bound on one part's header block: a body that never ends its headers is refused.
MAX_PART_HEADERS = 16 << 10


def boundary_of(content_type: str | None) -> tuple[MediaRange, str]:
    """The request's multipart/related media range and boundary (415 / 400 otherwise)."""
    if not content_type:
        raise WebError(415, "Content-Type is missing; send multipart/related; "
                            'type="application/dicom"')
    media = parse_media(content_type)
    if media.type != "multipart/related":
        raise WebError(415, f"unsupported Content-Type {media.type}; send multipart/related; "
                            'type="application/dicom"')
    boundary = media.params.get("boundary", "")
    if not boundary or len(boundary) > 70:
        raise WebError(400, "multipart/related without a valid boundary parameter")
    return media, boundary


def split_parts(path: Path, boundary: str) -> list[Part]:
    """The parts of a multipart body spooled at ``path`` (RFC 2046 5.1.1).

    400 when the first delimiter, a part's header block or the closing
    delimiter is missing: a broken body is refused whole, before anything is ingested.
    """
    size = path.stat().st_size
    if size == 0:
        raise WebError(400, "the request body is empty")
    delimiter = b"--" + boundary.encode("ascii", "replace")
    parts: list[Part] = []
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as body:
        at = body.find(delimiter)
        if at < 0 or (at > 0 and body[at - 2:at] != b"\r\n"):
            raise WebError(400, "the body does not start with the boundary delimiter")
        while True:
            after = at + len(delimiter)
            if body[after:after + 2] == b"--":
                break  # the closing delimiter
            line_end = body.find(b"\r\n", after)
            if line_end < 0 or body[after:line_end].strip(b" \t"):
                raise WebError(400, "malformed boundary delimiter line")
            head_end = body.find(b"\r\n\r\n", line_end, line_end + MAX_PART_HEADERS)
            if head_end < 0:
                # A part without headers starts its content right after the delimiter line.
                if body[line_end + 2:line_end + 4] != b"\r\n":
                    raise WebError(400, "a body part's header block does not end")
                head_end = line_end
            headers = _headers(body[line_end + 2:head_end])
            start = head_end + 4
            nxt = body.find(b"\r\n" + delimiter, start)
            if nxt < 0:
                raise WebError(400, "the body ends without the closing boundary delimiter")
            parts.append(Part(headers, start, nxt))
            at = nxt + 2
    if not parts:
        raise WebError(400, "the body has no parts")
    return parts


def _headers(block: bytes) -> dict[str, str]:
    headers = {}
    for line in block.decode("latin-1").split("\r\n"):
        if not line.strip():
            continue
        name, sep, value = line.partition(":")
        if not sep:
            raise WebError(400, "malformed body part header")
        headers[name.strip().lower()] = value.strip()
    return headers
