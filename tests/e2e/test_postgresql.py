"""``lamina serve`` on a PostgreSQL index, end to end: C-STORE, C-FIND, the index checks and the
audit chain, through the same commands as on SQLite (the index is the session's throwaway
cluster, see tests/harness.py PostgresCluster)."""

from __future__ import annotations

import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

from node.dimse.ae import associate
from tests.harness import TEST_AET, ProcessNode, write_config


@pytest.fixture
def pg_node(tmp_path, pg_cluster):
    config = write_config(tmp_path / "node",
                          index={"backend": "postgresql", "dsn": pg_cluster.database()})
    with ProcessNode(config) as node:
        yield node


def find_series(node: ProcessNode, study_uid: str) -> list[tuple[str, int]]:
    ae = AE(ae_title=TEST_AET)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = associate(ae, "127.0.0.1", node.port, node.ae_title)
    assert assoc.is_established
    query = StudyRootQueryRetrieveInformationModelFind
    try:
        ds = Dataset()
        ds.QueryRetrieveLevel = "SERIES"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = ""
        ds.NumberOfSeriesRelatedInstances = ""
        return [(str(r.SeriesInstanceUID), int(r.NumberOfSeriesRelatedInstances))
                for status, r in assoc.send_c_find(ds, query) if status.Status in (0xFF00,
                                                                                   0xFF01)]
    finally:
        assoc.release()


def test_store_find_fsck_and_audit_verify_on_postgresql(pg_node, phantom_files):
    node = pg_node
    assert node.store(phantom_files) == [(0, "")] * len(phantom_files)
    assert node.rows("SELECT count(*) FROM instance") == [(len(phantom_files),)]
    [(study_uid, series_uid)] = node.rows(
        "SELECT st.study_instance_uid, se.series_instance_uid FROM series se"
        " JOIN study st ON st.id = se.study_fk")
    assert find_series(node, study_uid) == [(series_uid, len(phantom_files))]
    # a resend of the same bytes is acknowledged and indexed once
    assert node.store(phantom_files[:2]) == [(0, "")] * 2
    assert node.rows("SELECT count(*) FROM instance") == [(len(phantom_files),)]
    fsck = node.cli("fsck")
    assert fsck.exit_code == 0, fsck.output
    verify = node.cli("audit", "verify")
    assert verify.exit_code == 0, verify.output
    status = node.cli("status")
    assert status.exit_code == 0 and str(len(phantom_files)) in status.output, status.output
    assert node.rows("SELECT count(*) FROM audit_event WHERE action LIKE ?",
                     "instance.%")[0][0] >= 1
