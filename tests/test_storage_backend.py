"""The storage interface on each backend (SQLite and PostgreSQL): the statements whose dialect
differs answer the same, and a refused write leaves the transaction usable."""

from __future__ import annotations

import pytest
from pydicom.dataset import Dataset

from node.storage.backend import open_index
from node.storage.interface import Index, NewQuarantine
from node.storage.query import Model, parse
from node.storage.records import InstanceRecord, Receipt


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
