"""C-FIND response identifiers straight to bytes, for the flat identifiers the engine returns.

Why not pydicom's writer here: building and writing a pydicom Dataset costs
about half a millisecond per response, more than finding the match in the
index, and a study query can answer hundreds of matches. A response
identifier is a short, flat list of text, UID, date and integer-string values
(PS3.5 7.1.2 / 7.1.3 encodings are a tag, a VR, a length and the padded value),
so the bytes are written directly. Anything beyond that — a character set
with ISO 2022 code extensions, a value the chosen character set cannot carry
— is handed to pydicom, and tests check this encoder against pydicom byte
for byte.
"""

from __future__ import annotations

import struct
from functools import lru_cache

from pydicom.charset import convert_encodings
from pynetdicom.dsutils import encode

from node.storage.query import Match

#: Explicit VR values with a 4-byte length (PS3.5 Table 7.1-1).
_LONG_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR",
                       "UT", "UV"})
_TAG = struct.Struct("<HH")
_LEN32 = struct.Struct("<I")
_LEN16 = struct.Struct("<H")


def encode_match(match: Match, implicit_vr: bool) -> bytes:
    """The match as a little-endian data set, implicit or explicit VR."""
    charset = match.charset
    if len(charset) > 1:
        return _with_pydicom(match, implicit_vr)
    codec = _codec(charset)
    parts: list[bytes] = []
    try:
        for tag, vr, value in match.elements:
            data = _value(vr, value, codec)
            head, long_length = _head(tag, vr, implicit_vr)
            parts += (head, (_LEN32 if long_length else _LEN16).pack(len(data)), data)
    except UnicodeEncodeError:
        return _with_pydicom(match, implicit_vr)
    return b"".join(parts)


@lru_cache(maxsize=16)  # bounded: the character set comes from the request
def _codec(charset: tuple[str, ...]) -> str:
    """Python's codec for a single Specific Character Set (a handful per node: cached)."""
    return convert_encodings(list(charset))[0] if charset else "ascii"


def _with_pydicom(match: Match, implicit_vr: bool) -> bytes:
    return bytes(encode(match.dataset(), implicit_vr, True))


@lru_cache(maxsize=1024)  # bounded: unsupported keys' tags come from the request
def _head(tag: int, vr: str, implicit_vr: bool) -> tuple[bytes, bool]:
    """An element's fixed start (tag, and VR with its reserved bytes when explicit) and
    whether its length takes 4 bytes: the same for every match, so encoded once."""
    head = _TAG.pack(tag >> 16, tag & 0xFFFF)
    if implicit_vr:
        return head, True
    if vr in _LONG_VRS:
        return head + vr.encode() + b"\0\0", True
    return head + vr.encode(), False


def _value(vr: str, value: object, codec: str) -> bytes:
    if value is None or value == "" or vr == "SQ":
        return b""
    text = "\\".join(str(v) for v in value) if isinstance(value, (list, tuple)) else str(value)
    data = text.encode("ascii" if vr == "UI" else codec)
    if len(data) % 2:
        data += b"\0" if vr == "UI" else b" "
    return data
