"""Metadata sidecars: each stored instance's DICOM JSON kept beside its blob, written after
the commit (or on the first request), served by WADO-RS series metadata, rebuilt when lost,
never taken for a blob."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
from pydicom import dcmread

from node.metadata import MetadataSidecars, metadata
from node.reports import fsck
from tests.harness import InProcessNode, http_root, write_config
from tests.studies import QR_VALIDATION, StudySpec, qr_peer, write_study

TOKEN = "metadata-token-0123456789"
SPEC = StudySpec("sidecars", "Doe^Jane", "SIDE-1", "20240105", "091500", "SC-1", "CT",
                 description="Chest CT", slices=3)


def _node(folder: Path, **http) -> InProcessNode:
    return InProcessNode(write_config(
        folder / "node", peers={"client": qr_peer("CLIENT", "store", "find", "get")},
        validation=QR_VALIDATION,
        http={"clients": {"c": {"token": TOKEN, "peer": "client"}}, **http}))


def _series_metadata(node: InProcessNode, files: list[Path]) -> bytes:
    """The series' metadata through a fresh app (nothing in its memory cache), its
    BulkDataURIs' root (the port differs per server) written as ROOT."""
    ds = dcmread(files[0], stop_before_pixels=True)
    with http_root(node.ctx) as served:
        root = f"{served}/dicom-web"
        response = httpx.get(
            f"{root}/studies/{ds.StudyInstanceUID}"
            f"/series/{ds.SeriesInstanceUID}/metadata",
            headers={"Authorization": f"Bearer {TOKEN}", "Accept": "application/dicom+json"},
            timeout=30)
    assert response.status_code == 200, response.text
    assert response.content.count(f'"BulkDataURI":"{root}/studies/'.encode()) == len(files)
    return response.content.replace(root.encode(), b"ROOT")


def _stored(node: InProcessNode, files: list[Path]) -> list[str]:
    """The blobs the files were stored as (the deidentified route keeps their UIDs)."""
    with node.ctx.index.reader() as r:
        return sorted(r.instances.blob_of(dcmread(f, stop_before_pixels=True).SOPInstanceUID)
                      for f in files)


def test_sidecar_written_after_commit_equal_to_the_blob_json(tmp_path: Path):
    files = write_study(tmp_path / "study", SPEC)
    with _node(tmp_path, prepare_metadata=True) as node:
        assert node.store(files, "CLIENT") == [(0, "")] * len(files)
        blobs = node.ctx.blobs
        hashes = _stored(node, files)
        assert len(hashes) == 3
        for sha in hashes:
            kept = blobs.read_sidecar(sha)
            assert kept is not None, "written right after the commit, before the answer"
            assert kept == metadata(blobs.local_path(sha), "")
            assert b'"BulkDataURI":"/studies/' in kept  # completed per request
        with_sidecars = _series_metadata(node, files)
        # Lost and damaged sidecars are built again from the blob (and kept), same bytes.
        blobs.local_path(hashes[0]).with_name(hashes[0] + ".json").unlink()
        blobs.put_sidecar(hashes[1], b"not json at all")
        assert _series_metadata(node, files) == with_sidecars
        for sha in hashes[:2]:
            assert blobs.read_sidecar(sha) == metadata(blobs.local_path(sha), "")
        # Sidecars are not blobs: not listed, not verified, not "unreferenced".
        assert sorted(blobs.iter_hashes()) == hashes
    report = fsck(node.settings)
    assert report.unreferenced == [] and report.corrupt == [] and report.checked == 3


def test_lazy_sidecars_give_the_same_answer(tmp_path: Path):
    files = write_study(tmp_path / "study", SPEC)
    with _node(tmp_path / "prepared", prepare_metadata=True) as prepared:
        prepared.store(files, "CLIENT")
        prepared.ctx.drain()
        expected = _series_metadata(prepared, files)
    with _node(tmp_path / "lazy") as lazy:  # the default: on the first request
        lazy.store(files, "CLIENT")
        lazy.ctx.drain()
        hashes = _stored(lazy, files)
        assert [lazy.ctx.blobs.read_sidecar(sha) for sha in hashes] == [None] * 3
        first = _series_metadata(lazy, files)
        assert all(lazy.ctx.blobs.read_sidecar(sha) is not None for sha in hashes), "kept"
        assert _series_metadata(lazy, files) == first
    # Same instances (same UIDs: the deidentified route keeps them), same bytes either way.
    assert first == expected


def test_sidecars_read_builds_without_a_sidecar(tmp_path: Path):
    files = write_study(tmp_path / "study", SPEC)
    with _node(tmp_path, prepare_metadata=False) as node:
        node.store(files, "CLIENT")
        sha = _stored(node, files)[0]
        sidecars = MetadataSidecars(node.ctx.blobs)
        assert sidecars.read(sha) == sidecars.build(sha) == node.ctx.blobs.read_sidecar(sha)


def test_sidecars_of_the_clinical_route_hold_no_phi(tmp_path: Path, phantom):
    """Made from the stored (de-identified) blob: nothing the sender identified survives."""
    slices = [phantom.slice(k) for k in range(2)]
    with InProcessNode(write_config(tmp_path / "node", http={"prepare_metadata": True})) as node:
        # the default peer's route: clinical
        assert node.store(slices) == [(0, "")] * 2
        node.ctx.drain()
        blobs = node.ctx.blobs
        kept = [blobs.read_sidecar(sha) for sha in blobs.iter_hashes()]
    assert len(kept) == 2 and all(kept), "written after each commit"
    for data in kept:
        for phi in (phantom.patient_name, phantom.patient_id, phantom.study_uid):
            assert str(phi).encode() not in data


def test_remembered_element_texts_give_a_fresh_builds_bytes(tmp_path: Path):
    """Element texts remembered from other instances (another series, another character
    set, the same values in other elements) never change an instance's JSON: each is
    byte for byte what a fresh build writes, and what json.dumps writes of the object."""
    from node.phantom import Phantom
    from tests.annotation_fixtures import PHANTOM, valid_seg

    latin = Phantom(seed="latin", slices_count=2, rows=16, columns=16).slice(1)
    latin.SpecificCharacterSet = "ISO_IR 100"
    latin.StudyDescription = "Thorax/Abdomen \u00e9t\u00e9"
    latin.ImageComments = "x" * 3000  # longer than the bulk threshold: deferred, inline
    implicit = Phantom(seed="implicit", slices_count=1, rows=16, columns=16).slice(0)
    objects = [Phantom(seed="ct", slices_count=3, rows=16, columns=16).slice(k)
               for k in range(3)] + [latin, valid_seg(PHANTOM), implicit]
    paths = []
    for k, ds in enumerate(objects):
        path = tmp_path / f"{k}.dcm"
        if ds is implicit:
            ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2"
            ds.save_as(path, implicit_vr=True, little_endian=True, enforce_file_format=True)
        else:
            ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    shared: dict = {}
    for _ in range(2):  # the second round is answered mostly from memory
        for path in paths:
            warm = metadata(path, "R", shared)
            assert warm == metadata(path, "R", {}), path.name
            assert warm == json.dumps(json.loads(warm), separators=(",", ":")).encode()
    assert shared, "element texts were remembered"
    [latin_json] = [json.loads(metadata(p, "")) for p in paths[3:4]]
    assert latin_json["00081030"]["Value"] == ["Thorax/Abdomen \u00e9t\u00e9"]
    assert latin_json["00204000"]["Value"] == ["x" * 3000]
