"""The SQLite backend: migrations, WAL, and concurrent writers that neither corrupt nor lose rows."""

from __future__ import annotations

import threading

import pytest

from node.storage.interface import IndexUnavailable
from node.storage.records import InstanceRecord, Receipt
from node.storage.sqlite.index import SqliteIndex, migrations


@pytest.fixture
def index(tmp_path):
    idx = SqliteIndex(tmp_path / "index.sqlite3")
    idx.migrate()
    yield idx
    idx.close()


def record(i: int, study: int = 0) -> InstanceRecord:
    return InstanceRecord(
        patient_id=f"P{study}", issuer_of_patient_id="", patient_name="X^Y",
        patient_birth_date=None, patient_sex="O", study_instance_uid=f"1.2.3.{study}",
        study_date="20260101", study_time=None, accession_number=None, study_id=None,
        study_description=None, referring_physician_name=None,
        series_instance_uid=f"1.2.3.{study}.1", modality="MR" if i % 2 else "CT",
        series_number=1, series_description=None, sop_instance_uid=f"1.2.3.{study}.1.{i}",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2", instance_number=i)


def receipt(i: int) -> Receipt:
    return Receipt(f"{i:064x}", 10, "1.2.840.10008.1.2.1", "T", "a", "2026-01-01T00:00:00Z")


def test_migrations_are_applied_once_and_wal_is_on(index):
    newest = migrations()[-1][0]
    assert index.schema_version() == newest
    assert index.migrate() == newest  # idempotent
    with index.connection() as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_concurrent_writers_lose_nothing(index):
    def writer(study: int) -> None:
        for i in range(50):
            with index.transaction() as tx:
                tx.instances.insert(record(i, study), receipt(study * 1000 + i))

    threads = [threading.Thread(target=writer, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with index.connection() as conn:
        assert conn.execute("SELECT count(*) FROM instance").fetchone()[0] == 200
        assert conn.execute("SELECT count(*) FROM study").fetchone()[0] == 4
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        modalities = {r[0] for r in conn.execute("SELECT modalities_in_study FROM study")}
    assert modalities == {"CT"}  # the series took the modality of its first instance


def test_a_failed_transaction_leaves_nothing(index):
    with pytest.raises(IndexUnavailable), index.transaction() as tx:
        tx.instances.insert(record(1), receipt(1))
        tx.instances.insert(record(1), receipt(2))  # same SOP UID: unique violation
    with index.connection() as conn:
        assert conn.execute("SELECT count(*) FROM instance").fetchone()[0] == 0
        assert conn.execute("SELECT count(*) FROM patient").fetchone()[0] == 0


def _rows(index: SqliteIndex) -> dict[str, list[tuple]]:
    with index.connection() as conn:
        return {table: conn.execute(f"SELECT * FROM {table} ORDER BY id").fetchall()
                for table in ("patient", "study", "series", "instance")}


def test_a_known_series_under_another_study_or_patient_adds_their_rows(index):
    """The one-query lookup of a known series (repos.insert) applies only where the series,
    its study and patient all match: a series UID arriving under another study, or a study
    under another patient, still adds the rows the patient, study and series lookups add."""
    from dataclasses import replace
    first = record(0)
    with index.transaction() as tx:
        tx.instances.insert(first, receipt(0))
        tx.instances.insert(record(1), receipt(1))  # the same series: no new parent rows
    assert [len(v) for v in _rows(index).values()] == [1, 1, 1, 2]
    other_study = replace(record(2), study_instance_uid="1.2.3.9")
    other_patient = replace(record(3), patient_id="Q", patient_name="Q^Q")
    with index.transaction() as tx:
        tx.instances.insert(other_study, receipt(2))
        tx.instances.insert(other_patient, receipt(3))
    rows = _rows(index)
    assert [r[1:3] for r in rows["patient"]] == [("P0", ""), ("Q", "")]
    assert [r[2] for r in rows["study"]] == ["1.2.3.0", "1.2.3.9"]
    assert len(rows["series"]) == 1  # the series keeps its first study
    assert {r[1] for r in rows["instance"]} == {rows["series"][0][0]}
    assert len(rows["instance"]) == 4


def test_the_connection_returned_last_is_handed_out_next(index):
    """A transaction takes the connection used last, whose page cache holds the pages
    it left (in WAL mode a connection another one wrote past drops its whole cache)."""
    with index.connection() as first, index.connection() as second:
        assert second is not first
    with index.transaction() as tx:
        assert tx.conn is first
    with index.reader() as reader:
        assert reader.conn is first
