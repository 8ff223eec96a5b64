"""De-identification on the way in, by peer route (node.ingest.routes), over real
associations into a node in this process."""

from __future__ import annotations

import json

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import SecondaryCaptureImageStorage

from node import status
from node.storage.sealed import MAGIC
from tests import annotation_fixtures as fx
from tests.harness import TEST_AET, InProcessNode, NodeConfig, lamina, write_config

ANNOTATOR_AET = "ANNOTATOR"


def peers() -> dict[str, dict]:
    return {
        "pacs": {"ae_title": TEST_AET, "host": "127.0.0.1", "port": 1, "route": "clinical"},
        "annotator": {"ae_title": ANNOTATOR_AET, "host": "127.0.0.1", "port": 1,
                      "route": "annotator"},
    }


def config(tmp_path) -> NodeConfig:
    return write_config(tmp_path / "n", peers=peers())


def test_clinical_route_stores_no_phi_and_can_be_reidentified(tmp_path, phantom):
    with InProcessNode(config(tmp_path)) as node:
        slices = [phantom.slice(i) for i in range(3)]
        assert node.store(slices) == [(0, "")] * 3
        key = node.project_key()
        [(study_uid,)] = node.rows("SELECT study_instance_uid FROM study")
        assert study_uid == key.uid(phantom.study_uid)
        # The keyed pseudonyms are 38-39 random decimal digits: one may hold any 8-digit
        # string, the birth date too (about 3 in 10^7 per UID; it happened once in CI,
        # 2026-12-07). They are taken out before the date is looked for; nothing else is.
        pseudonyms = [key.uid(uid).encode() for uid in (
            phantom.study_uid, phantom.series_uid, phantom.uid("frame-of-reference"),
            *(phantom.sop_uid(i) for i in range(3)))]
        blobs = [p for p in (node.data / "blobs").rglob("*") if p.is_file()]
        assert len(blobs) == 3
        for path in blobs:
            data = path.read_bytes()
            for phi in (phantom.patient_name, phantom.patient_id, "REFERRER",
                        phantom.study_uid):
                assert phi.encode() not in data, f"{phi} left in a stored blob"
            for pseudonym in pseudonyms:
                data = data.replace(pseudonym, b"")
            assert b"19700101" not in data, "the birth date left in a stored blob"
            assert dcmread(path).PatientBirthDate == ""

        back = node.cli("reidentify", study_uid)
        assert back.exit_code == 0, back.stderr
        assert back.stdout.strip() == phantom.study_uid
        [(obj,)] = node.rows("SELECT object FROM audit_event"
                             " WHERE action = 'patient-record.reidentify'")
        assert study_uid in obj and phantom.study_uid not in obj  # the answer is not audited

        report = node.cli("deid", "report", study_uid)
        assert report.exit_code == 0, report.stderr
        assert "PatientName" in report.stdout and phantom.patient_name not in report.stdout
        as_json = json.loads(node.cli("deid", "report", study_uid, "--json").stdout)
        assert as_json  # machine-readable twin


def test_burned_in_risk_is_quarantined_sealed(tmp_path, phantom):
    capture = phantom.slice(0)
    capture.SOPClassUID = SecondaryCaptureImageStorage
    capture.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    capture.Modality = "OT"
    capture.ConversionType = "WSD"
    with InProcessNode(config(tmp_path)) as node:
        [(code, comment)] = node.store([capture])
        assert code == status.DOES_NOT_MATCH_SOP_CLASS.code
        assert "burned-in" in comment
        [(sha, sealed)] = node.rows("SELECT blob_sha256, sealed FROM quarantine")
        assert sealed == 1
        data = node.blob_path(sha, "quarantine").read_bytes()
        assert data.startswith(MAGIC) and phantom.patient_name.encode() not in data
        assert node.rows("SELECT count(*) FROM instance") == [(0,)]


def test_annotator_route_moves_original_references_onto_pseudonyms(tmp_path, phantom):
    with InProcessNode(config(tmp_path)) as node:
        assert node.store([phantom.slice(0)]) == [(0, "")]
        key = node.project_key()
        stored = dcmread(node.blob_path(node.rows("SELECT blob_sha256 FROM instance")[0][0]))

        # An annotator's derived image built on the pseudonymous study, but
        # referencing the ORIGINAL image UID (its tool had the study from the PACS).
        note = dcmread(node.blob_path(node.rows("SELECT blob_sha256 FROM instance")[0][0]))
        note.SOPInstanceUID = note.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4.5.6.7.8.9"
        note.SeriesInstanceUID = "1.2.3.4.5.6.7.8.10"
        ref = Dataset()
        ref.ReferencedSOPClassUID = phantom.slice(0).SOPClassUID
        ref.ReferencedSOPInstanceUID = phantom.sop_uid(0)  # original clinical UID
        note.SourceImageSequence = Sequence([ref])

        assert node.store([note], aet=ANNOTATOR_AET) == [(0, "")]
        [(sha,)] = node.rows("SELECT blob_sha256 FROM instance WHERE sop_instance_uid = ?",
                             "1.2.3.4.5.6.7.8.9")  # already pseudonymous-looking: kept
        kept = dcmread(node.blob_path(sha))
        assert kept.SourceImageSequence[0].ReferencedSOPInstanceUID == key.uid(phantom.sop_uid(0))
        assert kept.StudyInstanceUID == stored.StudyInstanceUID


def test_serve_refuses_to_start_without_a_key(tmp_path):
    node = write_config(tmp_path / "n")
    node.key_file.unlink()
    result = lamina("serve", config=node)
    assert result.exit_code == 2
    assert "lamina keys init" in result.stderr


def test_annotation_with_identity_typed_back_is_quarantined(tmp_path, phantom):
    with InProcessNode(config(tmp_path)) as node:
        assert node.store([phantom.slice(0)]) == [(0, "")]
        note = dcmread(node.blob_path(node.rows("SELECT blob_sha256 FROM instance")[0][0]))
        note.SOPInstanceUID = note.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4.5.6.7.8.11"
        note.OtherPatientNames = "SMITH^JOHN"  # identity back on our pseudonymous patient
        [(code, comment)] = node.store([note], aet=ANNOTATOR_AET)
        assert code == status.DOES_NOT_MATCH_SOP_CLASS.code
        assert comment.startswith("cannot de-identify: annotation still carries identity")
        [(sha, sealed)] = node.rows("SELECT blob_sha256, sealed FROM quarantine")
        assert sealed == 1 and b"SMITH" not in node.blob_path(sha, "quarantine").read_bytes()
        assert node.rows("SELECT count(*) FROM instance") == [(1,)]


def test_annotations_on_a_study_that_arrived_deidentified_match_it_as_stored(tmp_path):
    """Source series through a ``deidentified`` peer, a SEG and Horos-style overlay copies
    through an ``annotator`` peer: both are matched to the series as it is stored (no
    second pseudonymisation of their references) and checked against it."""
    archive = fx.archived("collection")
    config = fx.node_config(tmp_path / "node", settle_seconds=0.3, peers=fx.ARCHIVE_PEERS)
    with InProcessNode(config) as node:
        slices = [archive.slice(k) for k in range(archive.slices_count)]
        assert node.store(slices, aet=fx.ARCHIVE_AET) == [(0, "")] * len(slices)
        seg = fx.valid_seg(archive)
        copies = fx.rotating_overlays(fx.truth(), fx.LABELS, person="Reader^Archive",
                                      series=archive)
        assert fx.send(node, [seg, *copies]) == [(0, "")] * (1 + len(copies))

        seg_row = fx.seg_annotation(node, seg)
        assert (seg_row["state"], seg_row["verdict"], seg_row["structures"]) == \
            ("checked", "pass", 3)
        assert seg_row["source_series_uid"] == archive.series_uid
        overlays = fx.settled(node, f"overlay|{archive.series_uid}|{fx.ANNOTATOR_AET}"
                                    "|Reader^Archive")
        assert (overlays["state"], overlays["verdict"], overlays["objects"],
                overlays["structures"]) == ("checked", "pass", len(copies), 3)
        # Nothing was pseudonymised a second time: one patient, one study, one image series
        # plus the SEG's; the SEG is stored with the collection's IDs and references.
        assert node.rows("SELECT patient_id FROM patient") == [("LIDC-collection",)]
        assert node.rows("SELECT study_instance_uid FROM study") == [(archive.study_uid,)]
        assert node.rows("SELECT count(*) FROM instance") == [(len(slices) + 1,)]
        stored_seg = dcmread(node.instance_path(str(seg.SOPInstanceUID)))
        assert stored_seg.ReferencedSeriesSequence[0].SeriesInstanceUID == archive.series_uid
        assert stored_seg.FrameOfReferenceUID == slices[0].FrameOfReferenceUID
        assert node.rows("SELECT count(*) FROM quarantine") == [(0,)]
