"""The PostgreSQL backend: migrations under a lock, writers of several nodes, one audit chain,
and a database that is away answered as IndexUnavailable."""

from __future__ import annotations

import threading
from dataclasses import replace
from pathlib import Path

import pytest

from node.audit.trail import Actor, AuditTrail, HeadCheckpoint
from node.config import ConfigError, load
from node.storage.backend import open_index
from node.storage.interface import IndexUnavailable
from node.storage.postgresql.index import PASSWORD_ENV, PostgresIndex, migrations
from node.storage.records import AuditRow
from node.storage.sqlite.index import migrations as sqlite_migrations
from tests.test_storage_sqlite import receipt, record


@pytest.fixture
def dsn(pg_cluster) -> str:
    return pg_cluster.database()


@pytest.fixture
def index(dsn):
    idx = PostgresIndex(dsn)
    idx.migrate()
    yield idx
    idx.close()


def test_migrations_reach_sqlites_version_once_even_when_nodes_start_together(dsn):
    assert migrations()[-1][0] == sqlite_migrations()[-1][0]
    nodes = [PostgresIndex(dsn) for _ in range(3)]
    reached: list[int] = []
    threads = [threading.Thread(target=lambda n=n: reached.append(n.migrate())) for n in nodes]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert reached == [migrations()[-1][0]] * 3
    with nodes[0].connection() as conn:
        applied = conn.execute("SELECT version FROM lamina_migration ORDER BY version").fetchall()
    assert [r[0] for r in applied] == [n for n, _, _ in migrations()]
    for n in nodes:
        n.close()


def test_writers_of_several_nodes_lose_nothing(dsn):
    nodes = [PostgresIndex(dsn) for _ in range(3)]
    nodes[0].migrate()

    def writer(node: PostgresIndex, n: int) -> None:
        for i in range(40):  # two writers per study: its patient/study/series rows are raced
            rec = replace(record(i, n % 2), sop_instance_uid=f"1.2.3.{n}.9.{i}")
            with node.transaction() as tx:
                tx.instances.insert(rec, receipt(n * 1000 + i))

    threads = [threading.Thread(target=writer, args=(nodes[n % 3], n)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with nodes[0].reader() as r:
        counts = r.reports.counts()
        assert r.reports.integrity() == "ok"
    assert (counts["instance"], counts["series"], counts["study"], counts["patient"]) == \
        (160, 2, 2, 2)
    for n in nodes:
        n.close()


def test_a_failed_transaction_leaves_nothing(index):
    with pytest.raises(IndexUnavailable), index.transaction() as tx:
        tx.instances.insert(record(1), receipt(1))
        tx.instances.insert(record(1), receipt(2))  # same SOP UID: unique violation
    with index.reader() as r:
        counts = r.reports.counts()
    assert counts["instance"] == 0 and counts["patient"] == 0


def test_audit_events_of_several_nodes_form_one_verifiable_chain(dsn, tmp_path):
    nodes = [PostgresIndex(dsn) for _ in range(3)]
    nodes[0].migrate()
    trails = [AuditTrail(n, HeadCheckpoint(tmp_path / f"head{k}", tmp_path / "audit.pem"))
              for k, n in enumerate(nodes)]

    def events(trail: AuditTrail, k: int) -> None:
        for i in range(25):
            trail.record("test.event", Actor(user=f"node{k}"), {"i": i})

    threads = [threading.Thread(target=events, args=(trails[k % 3], k)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with nodes[1].reader() as r:
        seqs = [row.seq for row in r.audit.rows()]
    assert seqs == list(range(1, 151))
    report = trails[0].verify()
    assert report.ok, report
    for trail, n in zip(trails, nodes, strict=True):
        trail.close()
        n.close()


def test_the_audit_trail_is_append_only(index):
    with index.transaction() as tx:
        tx.audit.insert(AuditRow(1, "t", "{}", "a", "{}", "success", "0" * 64, "1" * 64))
    with pytest.raises(IndexUnavailable, match="append-only"), index.transaction() as tx:
        tx.conn.execute("UPDATE audit_event SET outcome = 'x'")
    with pytest.raises(IndexUnavailable, match="append-only"), index.transaction() as tx:
        tx.conn.execute("DELETE FROM audit_event")


def test_an_empty_database_is_not_an_index_and_nothing_is_created(dsn):
    with pytest.raises(IndexUnavailable, match="no Lamina index"):
        open_index("postgresql", Path("unused"), 1000, must_exist=True, dsn=dsn)
    assert PostgresIndex(dsn).schema_version() == 0


def test_an_unreachable_server_is_index_unavailable(tmp_path):
    index = PostgresIndex(f"host={tmp_path} port=1 user=lamina dbname=none")
    with pytest.raises(IndexUnavailable, match="PostgreSQL"), index.reader() as r:
        r.reports.counts()


def test_the_password_comes_from_the_environment(pg_cluster, monkeypatch):
    """The cluster trusts its socket, so any password is accepted: what is checked is that
    the variable reaches the connection (libpq reports the one it used)."""
    monkeypatch.setenv(PASSWORD_ENV, "s3cret")
    index = PostgresIndex(pg_cluster.database())
    with index.connection() as conn:
        assert conn.info.password == "s3cret"
    index.close()


def test_config_selects_postgresql_and_needs_a_dsn(tmp_path):
    path = tmp_path / "node.toml"
    path.write_text('[index]\nbackend = "postgresql"\n', encoding="utf-8")
    with pytest.raises(ConfigError, match=r"index\.dsn"):
        load(path, environ={})
    path.write_text('[index]\nbackend = "postgresql"\ndsn = "host=db dbname=lamina"\n',
                    encoding="utf-8")
    settings = load(path, environ={})
    assert (settings.index.backend, settings.index.dsn) == ("postgresql", "host=db dbname=lamina")
