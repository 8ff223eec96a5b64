"""DCMTK's findscu, movescu and getscu against ``lamina serve`` in a subprocess (and storescp
as destination).

Every matching type at every level, in both information models, as DCMTK
encodes it; C-MOVE to a DCMTK storescp; C-GET into getscu; refusals as DCMTK
reports them. Skips when the DCMTK tools are not installed.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from pydicom import dcmread

from node.phantom import index_records
from tests.harness import ProcessNode, free_port, require, stop_process, storescp, write_config
from tests.studies import QR_VALIDATION, StudySpec, qr_peer, write_study

TOOLS = ("findscu", "movescu", "getscu", "storescp")


@pytest.fixture(scope="module", autouse=True)
def dcmtk() -> None:
    """Every test here runs DCMTK tools: skip the module, naming the package, without them."""
    for tool in TOOLS:
        require(tool)

SPECS = {
    "E1": StudySpec("e2e-1", "Doe^John", "E2E-1", "20240105", "091500", "E-100", "CT",
                    description="Chest", birth_date="19600101", slices=2),
    "E2": StudySpec("e2e-2", "Müller^Jürgen", "E2E-2", "20240210", "131500", "E-200", "MR",
                    description="Brain", birth_date="19750505", slices=2),
    "E3": StudySpec("e2e-3", "Smith^Anna", "E2E-3", "20231120", "230000", "E-300", "CT",
                    description="", birth_date="19900909", slices=2),
}
ENV = {**os.environ, "TCP_NODELAY": "1"}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    folder: Path = tmp_path_factory.mktemp("dcmtk")
    dest_port = free_port()
    peers = {
        "client": qr_peer("CLIENT", "store", "find", "move", "get", port=104,
                          move_destinations=["storescp"]),
        "storeonly": {"ae_title": "STOREONLY", "host": "127.0.0.1", "services": ["store"],
                      "route": "deidentified"},
        "storescp": {"ae_title": "STORESCP", "host": "127.0.0.1", "port": dest_port,
                     "route": "deidentified"},
    }
    node = ProcessNode(write_config(folder / "node", peers=peers, validation=QR_VALIDATION))
    try:
        node.start()
        uids: dict[str, dict] = {}
        for key, spec in SPECS.items():
            files = write_study(folder / spec.seed, spec)
            assert node.store(files, "CLIENT") == [(0, "")] * len(files)
            first = dcmread(files[0])
            uids[key] = {"study": str(first.StudyInstanceUID),
                         "series": str(first.SeriesInstanceUID),
                         "images": [str(dcmread(f).SOPInstanceUID) for f in files]}
        yield node, uids, dest_port, folder
    finally:
        node.stop()


def findscu(node, cwd: Path, model: str, keys: list, calling: str = "CLIENT",
            extra: tuple = ()) -> tuple[list, str]:
    """Run findscu; the extracted responses (parsed) and its log."""
    for old in cwd.glob("rsp*.dcm"):
        old.unlink()
    args: list = [require("findscu"), "-v", "-X", "-aet", calling, "-aec", node.ae_title,
                  model, *extra]
    for key in keys:
        args += ["-k", key]
    result = subprocess.run([*args, "127.0.0.1", str(node.port)], cwd=cwd, env=ENV,
                            capture_output=True, timeout=60, check=False)
    log = result.stdout.decode(errors="replace") + result.stderr.decode(errors="replace")
    return [dcmread(p) for p in sorted(cwd.glob("rsp*.dcm"))], log


# (information models, level, keys, the returned key to collect, expected) — expected values
# are written in terms of SPECS and filled in from the stored UIDs by `resolve`.
MATRIX = [
    # PATIENT (Patient Root only)
    ("P", "PATIENT", ["PatientID"], "PatientID", ["E2E-1", "E2E-2", "E2E-3"]),
    ("P", "PATIENT", ["PatientID=E2E-2"], "PatientID", ["E2E-2"]),
    ("P", "PATIENT", ["PatientName=D*^J?hn", "PatientID"], "PatientID", ["E2E-1"]),
    ("P", "PATIENT", ["PatientName=muller^jurgen", "PatientID"], "PatientID", ["E2E-2"]),
    ("P", "PATIENT", ["PatientBirthDate=19700101-", "PatientID"], "PatientID",
     ["E2E-2", "E2E-3"]),
    # STUDY
    ("PS", "STUDY", ["StudyDate=20240101-20240131", "PatientID"], "PatientID", ["E2E-1"]),
    ("PS", "STUDY", ["StudyDate=-20231231", "PatientID"], "PatientID", ["E2E-3"]),
    ("PS", "STUDY", ["StudyTime=1200-", "PatientID"], "PatientID", ["E2E-2", "E2E-3"]),
    ("PS", "STUDY", ["AccessionNumber=E-?00", "PatientID"], "PatientID",
     ["E2E-1", "E2E-2", "E2E-3"]),
    ("PS", "STUDY", ["AccessionNumber=E-300", "PatientID"], "PatientID", ["E2E-3"]),
    ("PS", "STUDY", ["StudyInstanceUID={E1.study}\\{E3.study}"], "StudyInstanceUID",
     ["{E1.study}", "{E3.study}"]),
    ("PS", "STUDY", ["ModalitiesInStudy=MR", "PatientID"], "PatientID", ["E2E-2"]),
    ("PS", "STUDY", ['StudyDescription=""', "PatientID"], "PatientID", ["E2E-3"]),
    ("PS", "STUDY", ["StudyDescription=*a*", "PatientID"], "PatientID", ["E2E-2"]),
    # SERIES
    ("PS", "SERIES", ["StudyInstanceUID={E1.study}", "SeriesInstanceUID"], "SeriesInstanceUID",
     ["{E1.series}"]),
    ("PS", "SERIES", ["Modality=CT", "SeriesInstanceUID"], "SeriesInstanceUID",
     ["{E1.series}", "{E3.series}"]),
    ("PS", "SERIES", ["SeriesDate=20240201-", "Modality"], "Modality", ["MR"]),
    # IMAGE
    ("PS", "IMAGE", ["StudyInstanceUID={E2.study}", "InstanceNumber=2", "SOPInstanceUID"],
     "SOPInstanceUID", ["{E2.images.1}"]),
    ("PS", "IMAGE", ["AcquisitionDateTime=20240105-20240106", "SOPInstanceUID"],
     "SOPInstanceUID", ["{E1.images.0}", "{E1.images.1}"]),
    ("PS", "IMAGE", ["SOPInstanceUID={E3.images.0}\\{E1.images.1}"], "SOPInstanceUID",
     ["{E1.images.1}", "{E3.images.0}"]),
    ("PS", "IMAGE", ["SOPClassUID=1.2.840.10008.5.1.4.1.1.2", "PatientName=SMITH*",
                     "SOPInstanceUID"], "SOPInstanceUID", ["{E3.images.0}", "{E3.images.1}"]),
]


def resolve(text: str, uids: dict) -> str:
    """Replace ``{E1.study}``, ``{E2.images.1}`` with the stored UIDs."""
    while "{" in text:
        start, end = text.index("{"), text.index("}")
        key, field, *index = text[start + 1:end].split(".")
        value = uids[key][field]
        text = text[:start] + (value[int(index[0])] if index else value) + text[end + 1:]
    return text


CASES = [pytest.param(model, level, keys, ret, want,
                      id=f"{'patient' if model == 'P' else 'study'}-root-{level}-{n}")
         for n, (models, level, keys, ret, want) in enumerate(MATRIX) for model in models]


@pytest.mark.parametrize(("model", "level", "keys", "returned", "expected"), CASES)
def test_findscu_matching(env, tmp_path, model, level, keys, returned, expected):
    node, uids, _, _ = env
    # The same keys in both models: Lamina does not insist on the higher-level
    # unique keys a strictly hierarchical Patient Root query would carry.
    responses, log = findscu(node, tmp_path, f"-{model}",
                             [f"QueryRetrieveLevel={level}", *[resolve(k, uids) for k in keys]])
    got = sorted(str(ds.get(returned, "")) for ds in responses)
    assert got == sorted(resolve(e, uids) for e in expected), log[-2000:]
    assert "Final Find Response (Success)" in log


@pytest.mark.parametrize(("charset", "name"), [("ISO_IR 100", "MÜLLER*".encode("latin-1")),
                                               ("ISO_IR 192", "müller^jü*".encode())])
def test_findscu_specific_character_set(env, tmp_path, charset, name):
    node, _, _, _ = env
    responses, log = findscu(node, tmp_path, "-S", [
        "QueryRetrieveLevel=STUDY", f"SpecificCharacterSet={charset}",
        b"PatientName=" + name, "PatientID"])
    assert [str(ds.PatientName) for ds in responses] == ["Müller^Jürgen"], log[-1500:]
    assert responses[0].SpecificCharacterSet == charset


def test_findscu_peer_without_permission_is_refused(env, tmp_path):
    node, _, _, _ = env
    responses, log = findscu(node, tmp_path, "-S", ["QueryRetrieveLevel=STUDY"],
                             calling="STOREONLY")
    assert responses == []
    assert "0x124" in log


@pytest.fixture(scope="module")
def bulk_node(tmp_path_factory):
    """A node with 4000 instances indexed in bulk (no files): for long result streams."""
    node = ProcessNode(write_config(tmp_path_factory.mktemp("bulk") / "node", peers={
        "client": {"ae_title": "CLIENT", "host": "127.0.0.1", "services": ["find"],
                   "route": "deidentified"}}, validation=QR_VALIDATION))
    try:
        node.start()
        with node.index() as index, index.transaction() as tx:
            tx.instances.bulk_insert(index_records(50, 200, 20))
        yield node
    finally:
        node.stop()


def test_findscu_streams_a_large_result_and_cancels(bulk_node, tmp_path):
    responses, log = findscu(bulk_node, tmp_path, "-S", ["QueryRetrieveLevel=IMAGE",
                                                         "SOPInstanceUID"])
    assert len(responses) == 4000, log[-1500:]
    responses, log = findscu(bulk_node, tmp_path, "-S", ["QueryRetrieveLevel=IMAGE",
                                                         "SOPInstanceUID"],
                             extra=("--cancel", "2"))
    assert "Final Find Response (Cancel: MatchingTerminatedDueToCancelRequest)" in log, log[-500:]
    assert 2 <= len(responses) < 4000


def test_movescu_to_storescp(env, tmp_path):
    node, uids, dest_port, _ = env
    receiver = storescp(dest_port, tmp_path / "received")
    try:
        result = subprocess.run(
            [require("movescu"), "-v", "-aet", "CLIENT", "-aec", node.ae_title,
             "-aem", "STORESCP", "-S",
             "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={uids['E2']['study']}",
             "127.0.0.1", str(node.port)], env=ENV, capture_output=True, timeout=60,
            check=False)
    finally:
        stop_process(receiver)
    log = result.stdout.decode(errors="replace") + result.stderr.decode(errors="replace")
    received = {str(dcmread(p).SOPInstanceUID): p for p in (tmp_path / "received").iterdir()}
    assert sorted(received) == sorted(uids["E2"]["images"]), log[-2000:]
    for uid, path in received.items():
        stored = dcmread(node.instance_path(uid))
        assert dcmread(path).PixelData == stored.PixelData
    assert result.returncode == 0, log[-2000:]


def test_movescu_unknown_destination(env):
    node, uids, _, _ = env
    result = subprocess.run(
        [require("movescu"), "-aet", "CLIENT", "-aec", node.ae_title, "-aem", "NOWHERE",
         "-S",
         "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={uids['E1']['study']}",
         "127.0.0.1", str(node.port)], env=ENV, capture_output=True, timeout=60, check=False)
    assert "MoveDestinationUnknown" in result.stderr.decode() + result.stdout.decode()


def test_getscu(env, tmp_path):
    node, uids, _, _ = env
    out = tmp_path / "got"
    out.mkdir()
    result = subprocess.run(
        [require("getscu"), "-v", "-aet", "CLIENT", "-aec", node.ae_title, "-S",
         "-od", str(out),
         "-k", "QueryRetrieveLevel=SERIES", "-k", f"StudyInstanceUID={uids['E3']['study']}",
         "-k", f"SeriesInstanceUID={uids['E3']['series']}", "127.0.0.1", str(node.port)],
        env=ENV, capture_output=True, timeout=60, check=False)
    log = result.stdout.decode(errors="replace") + result.stderr.decode(errors="replace")
    got = sorted(str(dcmread(p).SOPInstanceUID) for p in out.iterdir())
    assert got == sorted(uids["E3"]["images"]), log[-2000:]
    assert result.returncode == 0, log[-2000:]
