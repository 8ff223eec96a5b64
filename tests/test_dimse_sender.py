"""The one outgoing C-STORE (node.dimse.sender): its own sub-association's bytes equal
pynetdicom's, and it works against a real SCP."""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filereader import read_dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGBaseline8Bit
from pynetdicom import evt
from pynetdicom.dimse_messages import C_STORE_RQ, C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode, split_dataset
from pynetdicom.pdu import P_DATA_TF

from node.dimse.sender import (
    AssociationFailed,
    NoContext,
    Outgoing,
    StoreAssociation,
    StoreResponse,
    StoreSender,
    dataset_offset,
    error_comment,
    frame,
    response_status,
    store_command,
)
from node.phantom import Phantom
from node.storage.query import StoredInstance
from tests.harness import StorageSCP, free_port, stored_dataset_bytes

CT = "1.2.840.10008.5.1.4.1.1.2"


@pytest.mark.parametrize(("uid", "msg_id", "originator", "originator_id"), [
    ("1.2.3.4", 7, "MOVESCU", 3),       # even-length UID, originator present
    ("1.2.3.45", 65535, "ODD", None),   # odd lengths padded
    ("1.2", 1, None, None),             # a plain C-STORE
])
def test_store_command_equals_pynetdicoms(uid, msg_id, originator, originator_id):
    req = C_STORE()
    req.MessageID, req.AffectedSOPClassUID, req.AffectedSOPInstanceUID = msg_id, CT, uid
    req.Priority = 2
    req.MoveOriginatorApplicationEntityTitle = originator
    req.MoveOriginatorMessageID = originator_id
    req.DataSet = BytesIO(b"\0\0")
    message = C_STORE_RQ()
    message.primitive_to_message(req)
    assert store_command(CT, uid, msg_id, originator, originator_id) == \
        bytes(encode(message.command_set, True, True))


def _response_command(status: int, msg_id: int, comment: str | None = None) -> bytes:
    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo, rsp.AffectedSOPClassUID = msg_id, CT
    rsp.AffectedSOPInstanceUID, rsp.Status = "1.2.3", status
    rsp.ErrorComment = comment
    message = C_STORE_RSP()
    message.primitive_to_message(rsp)
    return bytes(encode(message.command_set, True, True))


def test_response_status_reads_a_c_store_rsp_and_nothing_else():
    assert response_status(_response_command(0xA700, 9)) == (0xA700, 9)
    assert response_status(store_command(CT, "1.2.3", 9)) is None  # a request, not a response
    assert response_status(_response_command(0, 9)[:-3]) is None  # truncated
    assert error_comment(_response_command(0xA900, 9, "Rows missing")) == "Rows missing"
    assert error_comment(_response_command(0, 9)) == ""


def _pdus(stream: bytes) -> list[P_DATA_TF]:
    pdus, at = [], 0
    while at < len(stream):
        length = int.from_bytes(stream[at + 2:at + 6], "big")
        pdu = P_DATA_TF()
        pdu.decode(stream[at:at + 6 + length])
        pdus.append(pdu)
        at += 6 + length
    return pdus


@pytest.mark.parametrize("size", [1, 16_378, 16_379, 100_000])
def test_frames_fit_the_peers_pdu_and_reassemble(size):
    data = bytes(range(256)) * (size // 256) + bytes(size % 256)
    pdus = _pdus(frame(data, 3, 16_384 - 6, is_command=False, last=True))
    items = [item for pdu in pdus for item in pdu.presentation_data_value_items]
    assert all(pdu.pdu_length <= 16_384 for pdu in pdus)
    assert b"".join(item.presentation_data_value[1:] for item in items) == data
    headers = [item.presentation_data_value[0] for item in items]
    assert headers == [0x00] * (len(items) - 1) + [0x02]  # data set; last fragment marked
    assert {item.presentation_context_id for item in items} == {3}
    command = _pdus(frame(b"\x01" * 10, 3, 16_378, is_command=True, last=True))
    assert command[0].presentation_data_value_items[0].presentation_data_value[0] == 0x03
    middle = _pdus(frame(data, 3, 16_378, is_command=False, last=False))
    assert middle[-1].presentation_data_value_items[-1].presentation_data_value[0] == 0x00


def test_dataset_offset_agrees_with_pynetdicom(tmp_path):
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CT
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3"
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID, ds.PatientID = CT, "1.2.3", "X"
    path = tmp_path / "a.dcm"
    ds.save_as(path, enforce_file_format=True)
    assert dataset_offset(path) == split_dataset(path)[1]
    assert path.read_bytes()[dataset_offset(path):][:4] == b"\x08\x00\x16\x00"  # SOPClassUID


@pytest.fixture
def study(tmp_path) -> list[tuple[StoredInstance, Path]]:
    files = Phantom(seed="stored-send", slices_count=4, rows=64, columns=64).write(tmp_path)
    return [(StoredInstance(CT, str(dcmread(f).SOPInstanceUID), ExplicitVRLittleEndian,
                            "0" * 64), f) for f in files]


def _open(port: int, contexts=((CT, ExplicitVRLittleEndian),), called="DEST",
          max_pdu: int = 16_384) -> StoreAssociation:
    return StoreAssociation.open("LAMINA", "127.0.0.1", port, called, list(contexts), max_pdu,
                                 5, 5)


def _items(study) -> list[Outgoing]:
    return [Outgoing.file(path, i.sop_class_uid, i.sop_instance_uid, i.transfer_syntax_uid)
            for i, path in study]


def test_sends_stored_bytes_to_a_pynetdicom_scp_and_reads_each_status(study):
    scp = StorageSCP("DEST", fail_uids={study[2][0].sop_instance_uid}).start()
    try:
        sender = StoreSender("LAMINA", 16_384, 5, 5)
        sent = list(sender.send(_items(study), "127.0.0.1", scp.port, "DEST",
                                originator=("MOVESCU", 1)))
    finally:
        scp.stop()
    codes = [s.status for s in sent]
    assert codes == [0x0000, 0x0000, 0xA700, 0x0000]
    assert {s.syntax for s in sent} == {ExplicitVRLittleEndian} and not any(s.transcoded for s in sent)
    for instance, path in study:
        if instance.sop_instance_uid in scp.received:
            assert scp.received[instance.sop_instance_uid] == stored_dataset_bytes(path)
    assert scp.originators == {"MOVESCU"}


def test_a_context_the_peer_rejected_is_no_context(study):
    scp = StorageSCP("DEST").start()
    try:
        assoc = _open(scp.port, contexts=[(CT, ExplicitVRLittleEndian), ("1.2.3.4", JPEGBaseline8Bit)])
        with pytest.raises(NoContext):
            assoc.send("1.2.3.4", "9.9", JPEGBaseline8Bit, b"\0\0", 1)
        instance, path = study[0]
        response = assoc.send(CT, instance.sop_instance_uid, ExplicitVRLittleEndian,
                              stored_dataset_bytes(path), 2)
        assert response == StoreResponse(0x0000)  # the association is still usable
        assoc.release()
        assert not assoc.is_established
    finally:
        scp.stop()


def test_unreachable_or_refusing_destinations_raise(study):
    with pytest.raises(AssociationFailed, match=r"connection refused by 127\.0\.0\.1"):
        _open(free_port())
    scp = StorageSCP("DEST")
    scp.start()
    scp.server.ae.require_called_aet = True
    try:
        with pytest.raises(AssociationFailed, match="rejected"):
            _open(scp.port, called="SOMEONE")
        sent = list(StoreSender("LAMINA", 16_384, 5, 5).send(_items(study), "127.0.0.1",
                                                             scp.port, "SOMEONE"))
    finally:
        scp.stop()
    assert [(s.status, s.association) for s in sent] == [(None, "refused")] * len(study)
    assert all("rejected" in s.reason for s in sent)


def test_a_peer_that_goes_away_ends_the_association(study):
    scp = StorageSCP("DEST").start()
    try:
        assoc = _open(scp.port)
        for server_assoc in scp.server.active_associations:
            server_assoc.abort()
        instance, path = study[0]
        assert assoc.send(CT, instance.sop_instance_uid, ExplicitVRLittleEndian,
                          stored_dataset_bytes(path), 1) is None
        assert not assoc.is_established
    finally:
        scp.stop()


def test_a_peer_that_goes_away_mid_batch_fails_the_rest_of_it(study):
    scp = StorageSCP("DEST")
    scp.start()

    def abort_on_second(event):
        if event.request.MessageID == 2:
            event.assoc.abort()
            return 0xC000
        return 0x0000

    scp.server.bind(evt.EVT_C_STORE, abort_on_second)
    try:
        sent = list(StoreSender("LAMINA", 16_384, 5, 5).send(_items(study), "127.0.0.1",
                                                             scp.port, "DEST"))
    finally:
        scp.stop()
    assert [s.status for s in sent] == [0x0000, None, None, None]
    assert [s.association for s in sent] == ["", "", "lost", "lost"]


def test_a_peer_without_the_stored_syntax_gets_each_instance_re_encoded(study):
    with StorageSCP("DEST", syntaxes={CT: [ImplicitVRLittleEndian]}) as scp:
        sent = list(StoreSender("LAMINA", 16_384, 5, 5).send(
            _items(study), "127.0.0.1", scp.port, "DEST"))
    assert [(s.status, s.syntax, s.transcoded) for s in sent] == \
        [(0x0000, ImplicitVRLittleEndian, True)] * len(study)
    for instance, path in study:
        syntax, data = scp.got(instance.sop_instance_uid)
        ds = read_dataset(BytesIO(data), True, True)
        assert syntax == ImplicitVRLittleEndian
        assert ds.SOPInstanceUID == instance.sop_instance_uid
        assert ds.PixelData == dcmread(path).PixelData
