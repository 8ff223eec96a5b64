"""The storage interface on each backend (SQLite and PostgreSQL): the statements whose dialect
differs answer the same, and a refused write leaves the transaction usable."""

from __future__ import annotations

import pytest
from pydicom.dataset import Dataset

from node.storage.backend import open_index
from node.storage.interface import Index, NewQuarantine
from node.storage.query import Model, parse
from node.storage.records import (
    AgreementStructureRow,
    AnnotationFindingRow,
    FindingRow,
    InstanceGeometry,
    InstanceRecord,
    RatingRow,
    Receipt,
    RoiRow,
    SeriesFindingRow,
    StructureRow,
)


@pytest.fixture
def index(index_backend) -> Index:
    backend, path, dsn = index_backend
    idx = open_index(backend, path, 10_000, dsn=dsn)
    idx.migrate()
    yield idx
    idx.close()


def rec(study: int, series: int, n: int, modality: str) -> InstanceRecord:
    return InstanceRecord(
        patient_id="P1", issuer_of_patient_id="", patient_name="Doe^J",
        patient_birth_date=None, patient_sex="O", study_instance_uid=f"2.25.{study}",
        study_date="20240101", study_time=None, accession_number=None, study_id=None,
        study_description=None, referring_physician_name=None,
        series_instance_uid=f"2.25.{study}.{series}", modality=modality, series_number=series,
        series_description=None, sop_instance_uid=f"2.25.{study}.{series}.{n}",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2", instance_number=n)


def receipt(n: int) -> Receipt:
    return Receipt(f"{n:064x}", 10, "1.2.840.10008.1.2.1", "T", "a", "2026-01-01T00:00:00Z")


def test_modalities_in_study_by_insert_and_by_bulk_insert(index):
    with index.transaction() as tx:
        tx.instances.insert(rec(1, 1, 1, "MR"), receipt(1))
        tx.instances.insert(rec(1, 2, 1, "CT"), receipt(2))
        items = [(rec(2, s, n, m), receipt(100 + 10 * s + n))
                 for s, m in ((1, "PT"), (2, "CT"), (3, "PT")) for n in range(3)]
        assert tx.instances.bulk_insert(items) == 9
        assert tx.instances.bulk_insert(items) == 0  # already indexed: skipped
    with index.reader() as r:
        counts = r.reports.counts()
        assert r.reports.integrity() == "ok"
    assert (counts["study"], counts["series"], counts["instance"]) == (2, 5, 11)
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.StudyInstanceUID = ""
    ds.ModalitiesInStudy = ""
    found = sorted((str(m.dataset().StudyInstanceUID), list(m.dataset().ModalitiesInStudy))
                   for m in index.matcher("L").matches(parse(ds, Model.STUDY_ROOT)))
    assert found == [("2.25.1", ["CT", "MR"]), ("2.25.2", ["CT", "PT"])]


def test_a_used_user_id_is_refused_and_the_transaction_goes_on(index):
    with index.transaction() as tx:
        first = tx.users.insert("alice", "Alice A", ["ALICE"], b"k" * 32, b"s", "t")
        with pytest.raises(KeyError):
            tx.users.insert("alice", "Other", [], b"x" * 32, b"s", "t")
        tx.users.insert("bob", "Bob B", [], b"b" * 32, b"s", "t")
    with index.reader() as r:
        assert [u.user_id for u in r.users.list()] == ["alice", "bob"]
        assert r.users.get("alice").id == first and r.users.get("alice").rater_ids == ("ALICE",)
        assert r.users.get("alice").public_key == b"k" * 32


def test_reid_rows_count_only_new_lookups(index):
    with index.transaction() as tx:
        assert tx.reid.insert("uid", [(b"a", "k1", b"n" * 12, b"p"), (b"b", "k1", b"n" * 12,
                                                                      b"q")]) == 2
        assert tx.reid.insert("uid", [(b"a", "k1", b"m" * 12, b"z")]) == 0
    with index.reader() as r:
        assert r.reid.get("uid", b"a") == ("k1", b"n" * 12, b"p")
        assert r.reid.exists("uid", b"b") and not r.reid.exists("patient", b"b")
        assert r.reid.foreign_key_id("uid", "k1") is None
        assert r.reid.foreign_key_id("uid", "k2") == "k1"


def test_quarantine_found_by_received_bytes_waiting_then_released(index):
    entry = NewQuarantine("s" * 64, 5, "why", 0xA900, "AE", "127.0.0.1", "a1", "t0", "quarantine",
                          "1.2", "1.2.3", "9.9", "9.8", [{"rule": "x"}], False, "clinical",
                          received_sha256="r" * 64)
    with index.transaction() as tx:
        qid = tx.quarantine.insert(entry)
        assert tx.quarantine.seen_again(qid, "t1") == 2
    with index.reader() as r:
        assert r.quarantine.with_received("r" * 64, released=False).id == qid
        assert r.quarantine.with_received("r" * 64, released=True) is None
    with index.transaction() as tx:
        tx.quarantine.mark_released(qid, "t2", "me", "ok")
    with index.reader() as r:
        assert r.quarantine.with_received("r" * 64, released=True).id == qid
        assert r.quarantine.get(qid).findings == [{"rule": "x"}]
        assert r.reports.quarantined_blobs() == {"s" * 64}


def test_annotation_outbox_agreement_and_series_statements(index):
    """One pass through the repositories the annotation, review, forwarding and agreement
    services write: every statement runs on the backend and reads back the same."""
    receipt_seg = Receipt("e" * 64, 99, "1.2.840.10008.1.2.1", "ANN", "a2", "t1")
    with index.transaction() as tx:
        first = tx.instances.insert(rec(1, 1, 1, "CT"), receipt(1))
        tx.instances.insert(rec(1, 1, 2, "CT"), receipt(2))
        tx.instances.insert_geometry(first, InstanceGeometry(
            "0\\0\\0", "1\\0\\0\\0\\1\\0", "1\\1", 16, 16, "2.25.99", 1, 1, 2, 2))
        tx.instances.insert_findings(first, [FindingRow("rule-a", "warn", "m")], "t0")
        tx.series.mark_receiving("2.25.1.1", 100.0)
        ids = []
        for ae in ("R1", "R2"):
            aid, revision = tx.annotations.upsert("seg", f"seg|{ae}", "2.25.1.1", ae, "addr", "",
                                                  "t1", accepted=True)
            obj = tx.annotations.insert_object(aid, f"2.25.7.{ae}", "1.2.840.10008.5.1.4.1.1.66.4",
                                               receipt_seg)
            tx.annotations.insert_rois(obj, [RoiRow(0x6000, "lesion", 0, 1, 2, 3, 4, b"\x01")])
            check = tx.annotations.record_check(
                aid, revision, "default", "",
                [StructureRow("segment 1", "lesion", "lesion", None, None, 10, 1.5, 2.0, 1, 2, 2,
                              "e" * 64)],
                [AnnotationFindingRow("empty", "segment 1", "lesion", "[]", "d")], "t2")
            assert check is not None
            assert tx.annotations.set_state(aid, "received", "checked", "t2", "ok")
            tx.agreement.set_rater(aid, ae)
            ids.append(aid)
        assert not tx.annotations.set_state(ids[0], "received", "checked", "t2")  # CAS lost
        readings = tx.agreement.readings("2.25.1.1")
        agreement = tx.agreement.record("2.25.1.1", "2.25.1", (readings[0], readings[1]), "",
                                        ["differ"], [
            AgreementStructureRow("lesion", "segment 1", "segment 1", "a", "b", "q", True,
                                  0.5, 0.3, 1.0, 0.9, 10.0, 12.0),
            AgreementStructureRow("cyst", None, "segment 2", "(absent)", "c", "q", False,
                                  None, None, None, None, None, 3.0)], "t3")
        adjudication = tx.agreement.open_adjudication(agreement, "t3")
        assert tx.agreement.open_adjudication(agreement, "t3") == adjudication
        assert tx.agreement.decide(adjudication, "pick", ids[0], "me", "t4")
        assert not tx.agreement.decide(adjudication, "pick", ids[1], "me", "t4")
        assert tx.agreement.insert_ratings([RatingRow("q", "study:2.25.1", "2.25.1", "R1", "yes",
                                                      "csv:x")], "t4") == 1
        assert tx.agreement.choose("2.25.1", "t4") and not tx.agreement.choose("2.25.1", "t4")
        assert tx.outbox.enqueue_annotation(ids[0], "rule", "PACS", "stored", "t5", 5.0) == 1
        assert tx.outbox.enqueue_annotation(ids[0], "rule", "PACS", "stored", "t5", 5.0) == 0
        assert tx.outbox.enqueue_series(ids[0], "2.25.1.1", "rule", "PACS", "stored", "t5",
                                        5.0) == 2
        assert tx.outbox.enqueue_to_build(ids[1], "2.25.placeholder", "1.2.3", "rule", "PACS",
                                          "stored", "t5", 6.0) == 1
        tx.signatures.insert(ids[0], tx.users.insert("u", "U", [], b"k" * 32, b"s", "t"),
                             "approved", "m", "t6", "{}", b"sig")
        tx.evidence.put("2.25.1.1.1", "2.25.1", "clinical", '{"a":[2],"b":1}')
    with index.reader() as r:
        assert r.series.quiet(200.0) == ["2.25.1.1"] and r.series.quiet(50.0) == []
        rows = r.series.rows("2.25.1.1")
        assert [i[0] for i in rows.instances] == ["2.25.1.1.1", "2.25.1.1.2"]
        assert rows.instances[0][2].frame_of_reference_uid == "2.25.99"
        assert r.instances.holds_uid("2.25.99") and not r.instances.holds_uid("2.25.98")
        assert r.reports.instance_findings("2.25.1.1.1") == (True, [FindingRow("rule-a", "warn",
                                                                               "m")])
        assert [a["state"] for a in r.annotations.list()] == ["checked", "checked"]
        listed = r.annotations.list(state="checked")[0]
        assert (listed["structures"], listed["findings"], listed["objects"]) == (1, 1, 1)
        assert r.annotations.current_rois(ids[0]) == [(RoiRow(0x6000, "lesion", 0, 1, 2, 3, 4,
                                                              b"\x01"), "e" * 64)]
        assert r.annotations.object_with_blob("e" * 64)["annotation_id"] in ids
        structures = r.agreement.structures(agreement)
        assert [s["class_key"] for s in structures] == ["lesion", "cyst"]
        assert set(structures[0]) == set(r.agreement.structures()[0])
        assert r.agreement.adjudication(adjudication)["decision"] == "pick"
        assert r.agreement.rated("q", "study:2.25.1", "R1")
        assert r.agreement.raters_of_study("2.25.1") == ["R1", "R2"]
        assert [row["rater"] for row in r.agreement.finding_counts()] == ["R1", "R2"]
        due = r.outbox.due(10.0, 10)
        assert len(due) == 4 and {d["annotation_state"] for d in due} == {"checked"}
        assert r.outbox.next_due() == 5.0
        assert r.outbox.counts() == {"PACS": {"queued": 4}}
        assert r.outbox.annotation_classes(ids[0]) == {"lesion"}
        assert [s.decision for s in r.signatures.list(ids[0])] == ["approved"]
        assert r.evidence.for_study("2.25.1") == [{"a": [2], "b": 1}]
        assert "e" * 64 in r.reports.referenced_blobs()
    item = due[0]["id"]
    with index.transaction() as tx:
        assert tx.outbox.mark_failed(item, 0xA700, "busy", 20.0, 2, "t7") == "failed"
        assert tx.outbox.mark_failed(item, 0xA700, "busy", 30.0, 2, "t8") == "dead"
        assert tx.outbox.retry(item, 1.0, "t9")
        assert tx.outbox.mark_sent(item, 0, None, "t9")
        assert tx.outbox.cancel(due[1]["id"], "t9")
        check = tx.series.insert_check(rows.series_fk, "quiet-period", "complete", 2,
                                       {"spacing": 1.0}, [SeriesFindingRow("gap", "warn", "g",
                                                                           (1.0, 2.5))], 100.0,
                                       "t9")
    with index.reader() as r:
        assert r.outbox.get(item)["state"] == "sent"
        assert r.outbox.counts()["PACS"] == {"cancelled": 1, "queued": 2, "sent": 1}
        state = r.series.state("2.25.1.1")
        assert (state.state, state.instances, state.geometry) == ("complete", 2, {"spacing": 1.0})
        assert state.findings[0].positions == (1.0, 2.5)
        assert r.reports.series_states() == {"complete": 1}
        assert r.reports.series_rule_counts() == [("gap", 1)]
        assert check > 0


def test_evidence_is_stored_once_per_text_and_migration_0012_moves_version_11s_rows(
        index_backend, monkeypatch):
    """Rows written at schema version 11 (one evidence text per instance) become one text per
    distinct evidence, found by the same SHA-256 the repository computes: a later instance
    with the same evidence adds no text."""
    import importlib
    import json

    backend, path, dsn = index_backend
    module = importlib.import_module(f"node.storage.{backend}.index")
    shipped = module.migrations()
    monkeypatch.setattr(module, "migrations", lambda: [m for m in shipped if m[0] <= 11])
    index = open_index(backend, path, 10_000, dsn=dsn)
    try:
        assert index.migrate() == 11
        same, other = {"b": 1, "a": [2]}, {"a": [3]}
        with index.transaction() as tx:
            for sop, study, evidence in (("2.25.1.1.2", "2.25.1", same),
                                         ("2.25.1.1.1", "2.25.1", other),
                                         ("2.25.2.1.1", "2.25.2", same)):
                tx.conn.execute(  # as version 11's repository wrote them
                    "INSERT INTO deid_evidence (sop_instance_uid, study_instance_uid, route,"
                    " evidence) VALUES (?, ?, 'clinical', ?)",
                    (sop, study, json.dumps(evidence, sort_keys=True, separators=(",", ":"))))
        monkeypatch.setattr(module, "migrations", lambda: shipped)
        assert index.migrate() == shipped[-1][0] >= 12

        def texts() -> int:
            with index.reader() as r:
                return r.conn.execute("SELECT count(*) FROM deid_evidence_text").fetchone()[0]

        assert texts() == 2
        with index.reader() as r:
            assert r.evidence.for_study("2.25.1") == [other, same]  # by SOP Instance UID
            assert r.evidence.for_study("2.25.2") == [same]
        with index.transaction() as tx:
            tx.evidence.put("2.25.2.1.2", "2.25.2", "clinical", '{"a":[2],"b":1}')
            tx.evidence.put("2.25.2.1.1", "2.25.2", "annotator", '{"c":4}')  # again: replaced
        assert texts() == 3
        with index.reader() as r:
            assert r.evidence.for_study("2.25.2") == [{"c": 4}, same]
            assert r.conn.execute("SELECT route FROM deid_evidence WHERE sop_instance_uid = ?",
                                  ("2.25.2.1.1",)).fetchone()[0] == "annotator"
    finally:
        index.close()
