"""Accept headers and multipart/related bodies: parsed the way PS3.18 clients send them."""

from __future__ import annotations

from pathlib import Path

import pytest

from node.web.errors import WebError
from node.web.media import accepted, boundary_of, multipart, new_boundary, split_parts


def test_accept_type_quoted_or_not_duplicates_and_q():
    alts = accepted('multipart/related; type=application/dicom; transfer-syntax=*;'
                    ' type="image/jpeg", multipart/related; type="application/dicom"; q=0.9,'
                    ' application/json; q=0', "*/*")
    assert [(a.type, a.part_type, a.transfer_syntax) for a in alts] == [
        ("multipart/related", "application/dicom", "*"),
        ("multipart/related", "application/dicom", None)]
    assert accepted(None, "image/jpeg")[0].type == "image/jpeg"
    with pytest.raises(WebError) as bad:
        accepted("not a media type", "*/*")
    assert bad.value.status == 400


def test_multipart_round_trip(tmp_path: Path):
    boundary = new_boundary()
    parts = [("application/dicom", [b"first", b" part"]), ("application/dicom", [b"\r\n--x"])]
    body = tmp_path / "body"
    body.write_bytes(b"".join(multipart(parts, boundary)))
    found = split_parts(body, boundary)
    data = body.read_bytes()
    assert [data[p.start:p.end] for p in found] == [b"first part", b"\r\n--x"]
    assert all(p.content_type == "application/dicom" for p in found)


@pytest.mark.parametrize(("body", "status"), [
    (b"", 400),
    (b"no delimiter at all", 400),
    (b"--B\r\nContent-Type: application/dicom\r\n\r\nno end", 400),
    (b"--B\r\nbroken header line\r\n\r\nx\r\n--B--\r\n", 400),
])
def test_broken_bodies_are_refused_whole(tmp_path: Path, body: bytes, status: int):
    path = tmp_path / "body"
    path.write_bytes(body)
    with pytest.raises(WebError) as refused:
        split_parts(path, "B")
    assert refused.value.status == status and refused.value.reason


def test_request_content_type():
    media, boundary = boundary_of('multipart/related; type="application/dicom"; boundary="a b"')
    assert boundary == "a b" and media.part_type == "application/dicom"
    for header, status in ((None, 415), ("application/dicom", 415),
                           ("multipart/related; type=application/dicom", 400)):
        with pytest.raises(WebError) as refused:
            boundary_of(header)
        assert refused.value.status == status
