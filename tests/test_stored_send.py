"""The direct C-STORE writer produces exactly the bytes pynetdicom would."""

from __future__ import annotations

from io import BytesIO
from types import SimpleNamespace

import pytest
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode
from pynetdicom.pdu import P_DATA_TF

from node.handlers.stored_send import StoredSender, store_command

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
    sender = StoredSender.__new__(StoredSender)
    sender.fragment = 16_384 - 6  # a peer accepting 16 KB PDUs (storescp's default)
    data = bytes(range(256)) * (size // 256) + bytes(size % 256)
    pdus = _pdus(sender._frame(3, data, is_command=False, last=True))
    items = [item for pdu in pdus for item in pdu.presentation_data_value_items]
    assert all(pdu.pdu_length <= 16_384 for pdu in pdus)
    assert b"".join(item.presentation_data_value[1:] for item in items) == data
    headers = [item.presentation_data_value[0] for item in items]
    assert headers == [0x00] * (len(items) - 1) + [0x02]  # data set; last fragment marked
    assert {item.presentation_context_id for item in items} == {3}
    command = _pdus(sender._frame(3, b"\x01" * 10, is_command=True, last=True))
    assert command[0].presentation_data_value_items[0].presentation_data_value[0] == 0x03
    middle = _pdus(sender._frame(3, data, is_command=False, last=False))
    assert middle[-1].presentation_data_value_items[-1].presentation_data_value[0] == 0x00


def test_sender_refuses_an_instance_without_an_accepted_context(tmp_path):
    from node.handlers.stored_send import NoContext
    from node.storage.query import StoredInstance

    sender = StoredSender.__new__(StoredSender)
    sender.contexts = {(CT, "1.2.840.10008.1.2.1"): 1}
    sender.assoc = SimpleNamespace()
    with pytest.raises(NoContext):
        sender.send(StoredInstance(CT, "1.2.3", "1.2.840.10008.1.2.4.50", "0" * 64),
                    tmp_path / "x.dcm", 1)


def test_dataset_offset_agrees_with_pynetdicom(tmp_path):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pynetdicom.dsutils import split_dataset

    from node.handlers.stored_send import dataset_offset

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CT
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3"
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
    ds.SOPClassUID, ds.SOPInstanceUID, ds.PatientID = CT, "1.2.3", "X"
    path = tmp_path / "a.dcm"
    ds.save_as(path, enforce_file_format=True)
    assert dataset_offset(path) == split_dataset(path)[1]
    assert path.read_bytes()[dataset_offset(path):][:4] == b"\x08\x00\x16\x00"  # SOPClassUID
