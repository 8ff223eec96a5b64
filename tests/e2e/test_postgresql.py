"""``lamina serve`` on a PostgreSQL index, end to end: C-STORE, C-FIND, the index checks and the
audit chain, through the same commands as on SQLite (the index is the session's throwaway
cluster, see tests/harness.py PostgresCluster)."""

from __future__ import annotations

import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

from node.dimse.ae import associate
from node.phantom import Phantom
from tests.harness import (
    TEST_AET,
    InProcessNode,
    PostgresCluster,
    ProcessNode,
    postgres_bindir,
    write_config,
)


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


def test_a_stopped_database_is_0xa700_with_a_reason_and_the_node_recovers(tmp_path):
    """PostgreSQL stopped under a running node: C-STORE is refused with 0xA700 and a reason
    (never a false success), and once it is back the same node stores again, no restart."""
    bindir = postgres_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL server not installed (Debian package postgresql)")
    cluster = PostgresCluster(bindir).start()  # its own: this test stops it
    try:
        config = write_config(tmp_path / "node",
                              index={"backend": "postgresql", "dsn": cluster.database()})
        files = Phantom(seed="pg-restart", slices_count=3, rows=16, columns=16).write(
            tmp_path / "study")
        with InProcessNode(config) as node:
            assert node.store(files[:1]) == [(0, "")]
            cluster.stop(remove=False)
            [(status, comment)] = node.store(files[1:2])
            assert status == 0xA700 and comment, comment
            cluster.start()
            assert node.store(files[1:]) == [(0, ""), (0, "")]
            assert node.rows("SELECT count(*) FROM instance") == [(3,)]
            verify = node.cli("audit", "verify")
            assert verify.exit_code == 0, verify.output
    finally:
        cluster.stop()
