"""C-MOVE and C-GET over real sockets into a node in this process, the retrieve permissions,
and move_destinations config."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import (
    CTImageStorage,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from node.config import ConfigError, load
from node.dimse.ae import associate
from tests.harness import (
    InProcessNode,
    StorageSCP,
    free_port,
    received_dataset,
    stored_dataset_bytes,
    write_config,
)
from tests.studies import QR_VALIDATION, StudySpec, identifier, qr_peer, write_study

MOVE = StudyRootQueryRetrieveInformationModelMove
GET = StudyRootQueryRetrieveInformationModelGet
SMALL = StudySpec("move-a", "Roe^Rita", "MOV-A", "20240301", "080000", "MA-1", "CT", slices=3)
LARGER = StudySpec("move-b", "Poe^Paul", "MOV-B", "20240302", "080000", "MA-2", "CT", slices=12)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    folder: Path = tmp_path_factory.mktemp("retrieve")
    scps = {"dest": StorageSCP("DEST").start(),
            "flaky": StorageSCP("FLAKY").start(),
            "slow": StorageSCP("SLOW", delay=0.25).start()}
    # Nothing listens on "down" (and "other" is never reached).
    ports = {**{name: scp.port for name, scp in scps.items()},
             **{name: free_port() for name in ("down", "other")}}
    peers = {
        "client": qr_peer("CLIENT", "store", "find", "move", "get", port=104,
                          move_destinations=["dest", "flaky", "slow", "down"]),
        "findonly": qr_peer("FINDONLY", "find", port=104),
        **{name: qr_peer(name.upper(), port=port) for name, port in ports.items()},
    }
    node = InProcessNode(write_config(folder / "node", peers=peers, validation=QR_VALIDATION))
    try:
        node.start()
        uids = {}
        for spec in (SMALL, LARGER):
            files = write_study(folder / spec.seed, spec)
            assert node.store(files, "CLIENT") == [(0, "")] * len(files)
            uids[spec.seed] = [str(dcmread(f).SOPInstanceUID) for f in files]
            uids[spec.seed + "/study"] = str(dcmread(files[0]).StudyInstanceUID)
        scps["flaky"].fail_uids.add(uids["move-a"][1])
        yield node, scps, uids
    finally:
        for scp in scps.values():
            scp.stop()
        node.stop()


def open_assoc(node, calling="CLIENT", get_syntaxes=None, on_store=None):
    ae = AE(ae_title=calling)
    ae.add_requested_context(MOVE)
    ae.add_requested_context(PatientRootQueryRetrieveInformationModelMove)
    ext_neg, handlers = [], []
    if get_syntaxes:
        ae.add_requested_context(GET)
        ae.add_requested_context(CTImageStorage, get_syntaxes)
        ext_neg = [build_role(CTImageStorage, scp_role=True)]
        handlers = [(evt.EVT_C_STORE, on_store)]
    if ext_neg:
        assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title, ext_neg=ext_neg,
                             evt_handlers=handlers)
    else:
        assoc = associate(ae, "127.0.0.1", node.port, node.ae_title)
    assert assoc.is_established
    return assoc


def move(node, destination, query, calling="CLIENT", model=MOVE):
    assoc = open_assoc(node, calling)
    try:
        return [(int(s.Status), s, ds) for s, ds in assoc.send_c_move(query, destination, model)]
    finally:
        assoc.release()


def _consistent_progress(responses, total):
    """Pending responses: counts add up to the total and Remaining only goes down."""
    pending = [s for code, s, _ in responses if code == 0xFF00]
    remaining = [s.NumberOfRemainingSuboperations for s in pending]
    assert remaining == sorted(remaining, reverse=True)
    for s in pending:
        assert (s.NumberOfRemainingSuboperations + s.NumberOfCompletedSuboperations
                + s.NumberOfFailedSuboperations + s.NumberOfWarningSuboperations) == total
    return pending


def test_move_sends_the_stored_bytes(env):
    node, scps, uids = env
    responses = move(node, "DEST", identifier("STUDY", StudyInstanceUID=uids["move-a/study"]))
    _consistent_progress(responses, 3)
    code, final, ds = responses[-1]
    assert code == 0x0000 and ds is None
    assert (final.NumberOfCompletedSuboperations, final.NumberOfFailedSuboperations) == (3, 0)
    assert "NumberOfRemainingSuboperations" not in final or \
        final.NumberOfRemainingSuboperations is None
    for uid in uids["move-a"]:
        assert scps["dest"].received[uid] == stored_dataset_bytes(node.instance_path(uid))
    assert scps["dest"].originators == {"CLIENT"}
    def to_dest(events):
        return [e for e in events if e["object"].get("destination") == "DEST"]

    event = to_dest(node.audit_events("retrieve.move", until=to_dest))[0]
    assert event["object"] == {"model": "study-root", "level": "STUDY", "matches": 3,
                               "completed": 3, "failed": 0, "warning": 0, "status": "0x0000",
                               "destination": "DEST"}


def test_slow_move_reports_progress_with_pending_responses(env):
    node, _scps, uids = env
    responses = move(node, "SLOW", identifier("STUDY", StudyInstanceUID=uids["move-a/study"]))
    pending = _consistent_progress(responses, 3)
    assert len(pending) >= 2  # one per 0.1 s at most; each store takes 0.25 s
    assert responses[-1][0] == 0x0000


def test_move_by_instance_uid_list_in_patient_root(env):
    node, scps, uids = env
    wanted = uids["move-b"][:2]
    responses = move(node, "DEST", identifier("IMAGE", PatientID="MOV-B",
                                              StudyInstanceUID=uids["move-b/study"],
                                              SOPInstanceUID=wanted),
                     model=PatientRootQueryRetrieveInformationModelMove)
    assert responses[-1][0] == 0x0000
    assert responses[-1][1].NumberOfCompletedSuboperations == 2
    assert set(wanted) <= set(scps["dest"].received)


def test_partial_failure_names_the_failed_instances(env):
    node, _scps, uids = env
    responses = move(node, "FLAKY", identifier("STUDY", StudyInstanceUID=uids["move-a/study"]))
    code, final, ds = responses[-1]
    assert code == 0xB000
    assert (final.NumberOfCompletedSuboperations, final.NumberOfFailedSuboperations) == (2, 1)
    assert ds.FailedSOPInstanceUIDList == uids["move-a"][1]


def test_unknown_destination_is_0xa801(env):
    node, _, uids = env
    [(code, status, _)] = move(node, "NOWHERE",
                               identifier("STUDY", StudyInstanceUID=uids["move-a/study"]))
    assert code == 0xA801 and "NOWHERE" in status.ErrorComment


def test_destination_not_allowed_for_this_peer_is_refused(env):
    node, _, uids = env
    [(code, status, _)] = move(node, "OTHER",
                               identifier("STUDY", StudyInstanceUID=uids["move-a/study"]))
    assert code == 0x0124 and "may not move to OTHER" in status.ErrorComment


def test_unreachable_destination_fails_every_sub_operation(env):
    node, _, uids = env
    responses = move(node, "DOWN", identifier("STUDY", StudyInstanceUID=uids["move-a/study"]))
    code, final, ds = responses[-1]
    assert code == 0xA702 and "did not accept" in final.ErrorComment
    assert final.NumberOfFailedSuboperations == 3
    assert sorted(ds.FailedSOPInstanceUIDList) == sorted(uids["move-a"])


def test_peer_without_move_or_get_permission_is_refused(env):
    node, _, uids = env
    query = identifier("STUDY", StudyInstanceUID=uids["move-a/study"])
    [(code, status, _)] = move(node, "DEST", query, calling="FINDONLY")
    assert code == 0x0124 and "may not move" in status.ErrorComment
    ae = AE(ae_title="FINDONLY")
    ae.add_requested_context(GET)
    assoc = associate(ae, "127.0.0.1", node.port, node.ae_title)
    try:
        [(status, _)] = list(assoc.send_c_get(query, GET))
    finally:
        assoc.release()
    assert status.Status == 0x0124 and "may not get" in status.ErrorComment
    def findonly(events):
        return [e["object"]["status"] for e in events if e["actor"]["ae_title"] == "FINDONLY"]

    refusals = findonly(node.audit_events("retrieve.", until=lambda ev: len(findonly(ev)) >= 2))
    assert refusals == ["0x0124", "0x0124"]


def test_retrieve_without_the_level_unique_key_is_refused(env):
    node, _, _ = env
    [(code, status, _)] = move(node, "DEST", identifier("STUDY", PatientName="ROE*",
                                                        StudyInstanceUID=""))
    assert code == 0xA900 and "StudyInstanceUID" in status.ErrorComment


def test_cancel_stops_a_move(env):
    node, scps, uids = env
    assoc = open_assoc(node)
    context_id = next(cx.context_id for cx in assoc.accepted_contexts
                      if cx.abstract_syntax == MOVE)
    responses = []
    try:
        for status, _ds in assoc.send_c_move(
                identifier("STUDY", StudyInstanceUID=uids["move-b/study"]), "SLOW", MOVE,
                msg_id=9):
            responses.append((int(status.Status), status))
            if len(responses) == 1:
                assoc.send_c_cancel(9, context_id)
    finally:
        assoc.release()
    code, final = responses[-1]
    assert code == 0xFE00
    assert final.NumberOfRemainingSuboperations > 0
    assert final.NumberOfCompletedSuboperations < len(uids["move-b"])
    moved = [uid for uid in scps["slow"].received if uid in uids["move-b"]]
    assert len(moved) == final.NumberOfCompletedSuboperations


def test_get_returns_stored_bytes_on_the_same_association(env):
    node, _, uids = env
    received = {}

    def on_store(event):
        received[str(event.request.AffectedSOPInstanceUID)] = received_dataset(event)
        return 0x0000

    assoc = open_assoc(node, get_syntaxes=[ExplicitVRLittleEndian], on_store=on_store)
    try:
        responses = [(int(s.Status), s) for s, _ in assoc.send_c_get(
            identifier("SERIES", StudyInstanceUID=uids["move-a/study"],
                       SeriesInstanceUID=str(dcmread(node.instance_path(uids["move-a"][0]))
                                             .SeriesInstanceUID)), GET)]
    finally:
        assoc.release()
    assert responses[-1][0] == 0x0000
    assert responses[-1][1].NumberOfCompletedSuboperations == 3
    _consistent_progress([(c, s, None) for c, s in responses], 3)
    assert received == {uid: stored_dataset_bytes(node.instance_path(uid))
                        for uid in uids["move-a"]}
    def whole(events):
        return [e for e in events if e["action"] == "retrieve.get"
                and e["object"]["completed"] == 3]

    assert whole(node.audit_events("retrieve.get", until=whole))


def test_cancel_stops_a_get(env):
    node, _, uids = env

    def slow_store(event):
        time.sleep(0.2)
        return 0x0000

    assoc = open_assoc(node, get_syntaxes=[ExplicitVRLittleEndian], on_store=slow_store)
    context_id = next(cx.context_id for cx in assoc.accepted_contexts
                      if cx.abstract_syntax == GET)
    responses = []
    try:
        for status, _ in assoc.send_c_get(
                identifier("STUDY", StudyInstanceUID=uids["move-b/study"]), GET, msg_id=11):
            responses.append(status)
            if len(responses) == 1:
                assoc.send_c_cancel(11, context_id)
    finally:
        assoc.release()
    final = responses[-1]
    assert final.Status == 0xFE00
    assert 0 < final.NumberOfRemainingSuboperations < len(uids["move-b"])


def test_get_without_a_usable_context_for_the_stored_instances_fails_cleanly(env):
    """The requester takes CT only as JPEG Baseline: nothing the node can send (an
    uncompressed instance is re-encoded only into an uncompressed syntax)."""
    node, _, uids = env
    assoc = open_assoc(node, get_syntaxes=[JPEGBaseline8Bit], on_store=lambda event: 0x0000)
    try:
        responses = [(int(s.Status), s, ds) for s, ds in assoc.send_c_get(
            identifier("STUDY", StudyInstanceUID=uids["move-a/study"]), GET)]
        still_open = assoc.is_established
    finally:
        assoc.release()
    code, final, ds = responses[-1]
    assert code == 0xA702 and final.NumberOfFailedSuboperations == 3
    assert len(ds.FailedSOPInstanceUIDList) == 3
    assert still_open
    log = node.log()
    assert "sub-operation not sent" in log
    assert ("CT Image Storage (1.2.840.10008.5.1.4.1.1.2) stored as Explicit VR Little Endian:"
            " the C-GET requester accepted JPEG Baseline (Process 1)") in log


def test_lamina_move_command(env):
    node, _scps, uids = env
    args = ["move", f"{node.ae_title}@127.0.0.1:{node.port}",
            "--aet", "CLIENT", "-k", f"StudyInstanceUID={uids['move-a/study']}"]
    ok = node.cli(*args, "--dest", "DEST")
    assert ok.exit_code == 0, ok.output
    assert "status 0x0000: completed 3, failed 0" in ok.stdout
    partial = node.cli(*args, "--dest", "FLAKY")
    assert partial.exit_code == 1
    assert f"failed: {uids['move-a'][1]}" in partial.stderr


# --- configuration ----------------------------------------------------------------------


def _config(tmp_path: Path, peers: str) -> Path:
    path = tmp_path / "node.toml"
    path.write_text(peers, encoding="utf-8")
    return path


def test_move_destinations_default_to_the_peer_itself(tmp_path):
    settings = load(_config(tmp_path, '[peers.ws]\nae_title = "WS"\nhost = "127.0.0.1"\n'
                                      '[peers.any]\nae_title = "ANY"\nhost = "*"\n'), environ={})
    assert settings.peer_named("ws").move_destinations == ("ws",)
    assert settings.peer_named("any").move_destinations == ()


@pytest.mark.parametrize(("peers", "message"), [
    ('[peers.a]\nae_title = "A"\nmove_destinations = ["b"]\n', "'b' is not a configured peer"),
    (('[peers.a]\nae_title = "A"\nmove_destinations = ["b"]\n'
     '[peers.b]\nae_title = "B"\nhost = "10.0.0.0/8"\n'), "no single host"),
    (('[peers.a]\nae_title = "A"\nmove_destinations = ["b", "c"]\n'
     '[peers.b]\nae_title = "X"\n[peers.c]\nae_title = "X"\nhost = "127.0.0.2"\n'),
     "share AE title 'X'"),
    ('[peers.a]\nae_title = "A"\nmove_destinations = "b"\n', "must be a list"),
])
def test_bad_move_destinations_are_refused_naming_the_key(tmp_path, peers, message):
    with pytest.raises(ConfigError) as err:
        load(_config(tmp_path, peers), environ={})
    assert "peers.a.move_destinations" in str(err.value) and message in str(err.value)
