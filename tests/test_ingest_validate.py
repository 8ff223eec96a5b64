"""Per-instance validation (node.ingest.validate): the rules on their own, then over real
associations into a node in this process.

Broken variants of a synthetic CT slice each get 0xA900 with an ErrorComment
naming the problem and a quarantine entry; malformed bytes (truncated, wrong
lengths, garbage, a 2 GB length, deep nesting) each get a clean status, land in
quarantine, and the node goes on serving the next association.
"""

from __future__ import annotations

import hashlib
import random
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import MRImageStorage, RLELossless

from node.config import ValidationSettings
from node.context import NodeContext
from node.ingest.iod import IODTables
from node.ingest.validate import Validator, read_received
from node.phantom import Phantom
from tests.harness import TEST_AET, InProcessNode, as_file, peer, write_config

A900, C000 = 0xA900, 0xC000


def encoded(ds: Dataset) -> bytes:
    return as_file(ds)


def good_slice(seed: str = "validate", index: int = 0) -> Dataset:
    return Phantom(seed=seed, slices_count=4, rows=16, columns=16).slice(index)


@pytest.fixture(scope="module")
def validator(tmp_path_factory) -> Validator:
    return Validator(ValidationSettings(), IODTables.load(tmp_path_factory.mktemp("cache")))


def findings_of(validator: Validator, ds: Dataset, tmp_path: Path) -> list:
    path = tmp_path / "x.dcm"
    path.write_bytes(encoded(ds))
    return validator.check(read_received(path))


# --- the rules ----------------------------------------------------------------


def test_clean_phantom_slice_has_no_findings(validator, tmp_path):
    assert findings_of(validator, good_slice(), tmp_path) == []


def test_requirements_come_from_the_standard_tables(validator):
    ct = validator.tables.for_sop_class("1.2.840.10008.5.1.4.1.1.2")
    top = {r.keyword: r.type for r in ct.top_level}
    assert ct.name == "ct-image"
    assert top["Rows"] == "1" and top["KVP"] == "2" and top["RescaleIntercept"] == "1"
    assert "SliceLocation" not in top  # Type 3: not required
    seg = validator.tables.for_sop_class("1.2.840.10008.5.1.4.1.1.66.4")
    assert {"SegmentSequence", "NumberOfFrames"} <= {r.keyword for r in seg.top_level}
    # Inside a present SegmentSequence item, its Type 1 attributes are required.
    assert "SegmentNumber" in {r.keyword for r in seg.requirements[("SegmentSequence",)]}
    for uid in ("1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.5.1.4.1.1.128",
                "1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.5.1.4.1.1.1.1",
                "1.2.840.10008.5.1.4.1.1.7"):
        assert validator.tables.for_sop_class(uid) is not None, uid


@pytest.mark.parametrize(("uid", "problem"), [
    ("1.2.840.10008.1", ""),
    ("0.1.2", ""),
    ("1.2.03.4", "leading zero"),
    ("1.2..4", "empty component"),
    ("1.2.a.4", "not digits/dots"),
    ("1." + "2" * 63, "65 chars, max 64"),
])
def test_uid_rules(validator, tmp_path, uid, problem):
    ds = good_slice()
    ds.SeriesInstanceUID = uid
    messages = [f.message for f in findings_of(validator, ds, tmp_path)]
    if problem:
        assert messages == [f"SeriesInstanceUID (0020,000E) bad UID: {problem}"]
    else:
        assert messages == []


def test_pixel_length_is_checked_without_loading_pixels(validator, tmp_path):
    ds = good_slice()
    ds.PixelData = ds.PixelData[:-64]
    [finding] = findings_of(validator, ds, tmp_path)
    assert finding.message == "PixelData (7FE0,0010) length 448, expected 512"
    assert "16 x Columns 16" in finding.detail


def test_encapsulated_frames_are_counted(validator, tmp_path):
    ds = good_slice()
    ds.compress(RLELossless)
    assert findings_of(validator, ds, tmp_path) == []
    ds.NumberOfFrames = 3  # one fragment, three frames claimed
    messages = [f.message for f in findings_of(validator, ds, tmp_path)]
    assert "PixelData (7FE0,0010) 1 fragments for 3 frames" in messages


def test_orientation_and_spacing(validator, tmp_path):
    ds = good_slice()
    ds.ImageOrientationPatient = [1, 0, 0, 0, 0.8, 0]
    ds.PixelSpacing = [0.7, 0]
    ds.SliceThickness = "-1"
    findings = findings_of(validator, ds, tmp_path)
    assert [f.message for f in findings] == [
        "ImageOrientationPatient (0020,0037) column norm 0.8, not 1",
        "PixelSpacing (0028,0030) not 2 positive numbers: 0.7\\0",
        "SliceThickness (0018,0050) not positive: -1",
    ]
    # A Type 1 geometry attribute refuses; the Type 2 SliceThickness only warns.
    assert [(f.rule, validator.settings.action(f.rule)) for f in findings] == [
        ("orientation", "reject"), ("spacing", "reject"), ("slice_thickness", "warn")]


def test_modality_must_fit_the_sop_class(validator, tmp_path):
    ds = good_slice()
    ds.Modality = "MR"
    assert [f.message for f in findings_of(validator, ds, tmp_path)] == [
        "Modality (0008,0060) MR, expected CT for the SOP class"]


def test_file_meta_must_match_the_dataset(validator, tmp_path):
    ds = good_slice()
    ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
    [finding] = findings_of(validator, ds, tmp_path)
    assert finding.message == "MediaStorageSOPClassUID (0002,0002) does not match dataset"
    assert finding.detail.endswith(f"found {MRImageStorage}")


def test_nested_requirements_apply_inside_present_items(validator, tmp_path):
    ds = good_slice()
    code = Dataset()
    code.CodeValue = "T-D0050"  # CodeMeaning (Type 1 in the Code Sequence macro) left out
    code.CodingSchemeDesignator = "SRT"
    ds.AnatomicRegionSequence = [code]
    messages = [f.message for f in findings_of(validator, ds, tmp_path)]
    assert messages == ["CodeMeaning (0008,0104) missing (Type 1) in AnatomicRegionSequence"]


def test_finding_messages_fit_an_error_comment(validator, tmp_path):
    ds = good_slice()
    del ds.Rows
    ds.Modality = ""
    ds.ImageOrientationPatient = [1, 0, 0, 0.6, 0.8, 0]
    ds.SeriesInstanceUID = "1.02"
    for finding in findings_of(validator, ds, tmp_path):
        assert len(finding.message) <= 64, finding.message


def test_patient_values_never_appear_in_findings(validator, tmp_path):
    ds = good_slice()
    ds.PatientName = ""
    del ds.PatientSex
    text = repr(findings_of(validator, ds, tmp_path))
    assert "PatientSex (0010,0040) missing (Type 2)" in text
    assert ds.PatientID not in text and "PHANTOM" not in text


# --- over real associations ---------------------------------------------------


#: A pynetdicom sender and a DCMTK one, both clinical.
PEERS = {"scu": peer(TEST_AET, "store", port=11113), "dcmtk": peer("STORESCU", "store", port=11114)}


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    with InProcessNode(write_config(tmp_path_factory.mktemp("validate-node"),
                                    peers=PEERS)) as running:
        yield running


def quarantine_of(node: InProcessNode) -> list:
    return node.ctx.quarantine.list()


def pseudonym(node: InProcessNode, uid: str) -> str:
    """The UID the clinical route gives ``uid``: quarantine rows name pseudonyms."""
    return node.project_key().uid(uid)


def mutate(change: Callable[[Dataset], None], seed: str) -> Dataset:
    ds = good_slice(seed)
    change(ds)
    return ds


def _del(keyword: str) -> Callable[[Dataset], None]:
    return lambda ds: delattr(ds, keyword)


def _set(keyword: str, value) -> Callable[[Dataset], None]:
    return lambda ds: setattr(ds, keyword, value)


def _meta_uid(ds: Dataset) -> None:
    uid = ds.SOPInstanceUID
    ds.file_meta.MediaStorageSOPInstanceUID = uid[:-1] + ("2" if uid[-1] == "1" else "1")


def _short_pixels(ds: Dataset) -> None:
    ds.PixelData = ds.PixelData[:256]


BROKEN = [
    ("missing-type1", _del("Rows"), "Rows (0028,0010) missing (Type 1)"),
    ("empty-type1", _set("Modality", ""), "Modality (0008,0060) empty (Type 1)"),
    ("bad-uid", _set("SeriesInstanceUID", "1.2..3"),
     "SeriesInstanceUID (0020,000E) bad UID: empty component"),
    ("truncated-pixels", _short_pixels, "PixelData (7FE0,0010) length 256, expected 512"),
    ("not-orthogonal", _set("ImageOrientationPatient", [1, 0, 0, 0.6, 0.8, 0]),
     "ImageOrientationPatient (0020,0037) not orthogonal: dot 0.6"),
    ("file-meta", _meta_uid, "MediaStorageSOPInstanceUID (0002,0003) does not match dataset"),
]


@pytest.mark.parametrize(("name", "change", "comment"), BROKEN, ids=[b[0] for b in BROKEN])
def test_broken_instance_is_refused_named_and_quarantined(node, tmp_path, name, change, comment):
    ds = mutate(change, f"broken-{name}")
    [response] = node.store([ds])
    assert (response.status, response.comment) == (A900, comment)
    entries = [e for e in quarantine_of(node)
               if e.sop_instance_uid == pseudonym(node, ds.SOPInstanceUID)]
    assert len(entries) == 1
    assert entries[0].status_code == A900 and entries[0].reason == comment
    assert entries[0].calling_ae == "TESTSCU" and entries[0].address == "127.0.0.1"


def test_known_study_under_another_patient_is_a_conflict(node, tmp_path):
    first, second = good_slice("conflict", 0), good_slice("conflict", 1)
    second.PatientID = "SOMEONE-ELSE"
    responses = node.store([first, second])
    assert responses[0].status == 0x0000
    assert (responses[1].status, responses[1].comment) == (
        A900, "PatientID (0010,0020) differs from the study's stored one")
    [entry] = [e for e in quarantine_of(node)
               if e.sop_instance_uid == pseudonym(node, second.SOPInstanceUID)]
    assert entry.findings[0]["rule"] == "patient_conflict"
    assert "SOMEONE-ELSE" not in repr(entry) and first.PatientID not in repr(entry)


# --- malformed bytes ----------------------------------------------------------


def _split(data: bytes) -> tuple[bytes, bytes]:
    """(preamble + meta, dataset) of an Explicit VR Little Endian file."""
    group_length = struct.unpack("<I", data[140:144])[0]
    return data[:144 + group_length], data[144 + group_length:]


def _nested(depth: int) -> bytes:
    """ContentSequence items nested ``depth`` deep, all of undefined length."""
    opening = (b"\x40\x00\x30\xa7SQ\x00\x00\xff\xff\xff\xff"
               b"\xfe\xff\x00\xe0\xff\xff\xff\xff") * depth
    closing = (b"\xfe\xff\x0d\xe0\x00\x00\x00\x00\xfe\xff\xdd\xe0\x00\x00\x00\x00") * depth
    return opening + closing


def malformed(name: str) -> bytes:
    head, body = _split(encoded(good_slice(f"malformed-{name}")))
    pixels = body.index(b"\xe0\x7f\x10\x00OW")
    if name == "truncated-dataset":
        return head + body[:300]
    if name == "wrong-element-length":
        at = body.index(b"Synthetic phantom")
        return head + body[:at - 2] + struct.pack("<H", 0xFFF0) + body[at:]
    if name == "garbage-after-preamble":
        return head + random.Random(3).randbytes(4096)
    if name == "2gb-element":
        text_value = b"\x40\x00\x60\xa1UT\x00\x00" + struct.pack("<I", 0x80000000) + b"x" * 8
        return head + body[:pixels] + text_value + body[pixels:]
    if name == "2gb-pixel-data":
        return head + body[:pixels + 8] + struct.pack("<I", 0x80000000) + body[pixels + 12:]
    if name == "deeply-nested":
        return head + body[:pixels] + _nested(5000) + body[pixels:]
    raise ValueError(name)


MALFORMED = [
    ("truncated-dataset", C000, "cannot parse: element (0008,0090) declares 18 bytes, 10"),
    ("wrong-element-length", C000, "cannot parse: element (0008,1030) declares 65520 bytes"),
    ("garbage-after-preamble", C000, "cannot parse: "),
    ("2gb-element", C000, "cannot parse: element (0040,A160) declares 2147483648 bytes"),
    ("2gb-pixel-data", A900, "PixelData (7FE0,0010) truncated: 512 of 2147483648 bytes"),
    ("deeply-nested", C000, "cannot parse: sequences nested too deeply"),
]


@pytest.mark.parametrize(("name", "code", "comment"), MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_bytes_get_a_clean_status_and_quarantine(node, tmp_path, name, code, comment):
    data = malformed(name)
    path = tmp_path / f"{name}.dcm"
    path.write_bytes(data)
    [response] = node.store([path])
    assert response.status == code
    assert response.comment.startswith(comment)
    # The quarantine holds exactly the dataset bytes that crossed the wire.
    _, dataset = _split(data)
    entries = [e for e in quarantine_of(node) if e.status_code == code
               and (e.reason.startswith(comment.rstrip("~")))]
    assert entries, f"no quarantine entry for {name}"
    ctx = node.ctx
    sealed = ctx.quarantine.store_of(entries[-1]).local_path(entries[-1].sha256).read_bytes()
    kept = ctx.quarantine.bytes_of(entries[-1])
    assert kept.endswith(dataset) and hashlib.sha256(sealed).hexdigest() == entries[-1].sha256
    # ... and the node serves the next association.
    follow_up = good_slice(f"after-{name}")
    assert [r.status for r in node.store([follow_up])] == [0]


def test_moderate_nesting_is_accepted(node, tmp_path):
    head, body = _split(encoded(good_slice("nested-50")))
    pixels = body.index(b"\xe0\x7f\x10\x00OW")
    path = tmp_path / "nested.dcm"
    path.write_bytes(head + body[:pixels] + _nested(50) + body[pixels:])
    assert [r.status for r in node.store([path])] == [0]


def test_reject_rule_refuses_a_missing_type2_attribute(tmp_path):
    """A strict archive sets type2_missing = "reject": the default (warn) is one setting away."""
    settings = write_config(tmp_path, validation={"rules": {"type2_missing": "reject"}}).settings()
    assert settings.validation.rules == {**ValidationSettings().rules, "type2_missing": "reject"}
    ctx = NodeContext.open(settings, with_key=True)
    try:
        from node.ingest.types import Source

        ds = good_slice("strict")
        del ds.PatientSex
        result = ctx.ingest.ingest_bytes(encoded(ds), Source("TESTSCU", "127.0.0.1", "a"))
        assert result.action == "quarantined" and result.outcome.status.code == A900
        assert result.outcome.comment == "PatientSex (0010,0040) missing (Type 2)"
        with ctx.index.connection() as conn:
            assert conn.execute("SELECT COUNT(*) FROM instance").fetchone()[0] == 0
    finally:
        ctx.close()


def scanner_mr(seed: str) -> Dataset:
    """An MR slice shaped like scanner output: the MR Image module's Type 1 attributes,
    EchoTrainLength and PositionReferenceIndicator (Type 2) left out."""
    ds = good_slice(seed)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
    ds.Modality = "MR"
    for keyword in ("KVP", "RescaleIntercept", "RescaleSlope", "RescaleType",
                    "PositionReferenceIndicator", "EchoTrainLength"):
        if keyword in ds:
            delattr(ds, keyword)
    ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions = "SE", "NONE", ""
    ds.MRAcquisitionType, ds.EchoTime, ds.RepetitionTime = "2D", 15, 500
    return ds


def test_routine_scanner_output_missing_type2_is_stored_with_findings(node):
    """The default: an MR without EchoTrainLength / PositionReferenceIndicator and a CT
    without AcquisitionNumber / SliceThickness are stored (0x0000) over a real
    association, each finding recorded and shown by `check instance` and `status`."""
    mr = scanner_mr("scanner-mr")
    ct = good_slice("scanner-ct")
    del ct.AcquisitionNumber, ct.SliceThickness
    responses = node.store([mr, ct])
    assert [(r.status, r.comment) for r in responses] == [(0, ""), (0, "")]
    expected = [
        (mr, ["EchoTrainLength (0018,0091) missing (Type 2)",
             "PositionReferenceIndicator (0020,1040) missing (Type 2)"]),
        (ct, ["AcquisitionNumber (0020,0012) missing (Type 2)",
             "SliceThickness (0018,0050) missing (Type 2)"]),
    ]
    for ds, messages in expected:
        uid = pseudonym(node, ds.SOPInstanceUID)
        rows = node.rows("SELECT f.rule, f.severity, f.message FROM finding f JOIN instance i"
                         " ON i.id = f.instance_fk WHERE i.sop_instance_uid = ?"
                         " ORDER BY f.message", uid)
        assert rows == [("type2_missing", "warn", m) for m in messages]
        shown = node.cli("check", "instance", uid)
        assert shown.exit_code == 1, shown.output
        assert f"instance {uid}: stored" in shown.stdout
        for message in messages:
            assert f"warn   [type2_missing] {message}" in shown.stdout
        assert not [e for e in quarantine_of(node) if e.sop_instance_uid == uid]
    status = node.cli("status")
    assert status.exit_code == 0, status.output
    [line] = [x for x in status.stdout.splitlines() if x.startswith("instance_findings")]
    assert "type2_missing" in line
