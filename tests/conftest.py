"""Shared fixtures: the synthetic CT phantom on disk, and nodes (see tests/harness.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import config

from node.phantom import Phantom
from tests.harness import (
    InProcessNode,
    PostgresCluster,
    ProcessNode,
    postgres_bindir,
    write_config,
)
from tests.phi_corpus import Corpus, build_corpus


@pytest.fixture(scope="session")
def phantom() -> Phantom:
    return Phantom(seed="tests", slices_count=12)


@pytest.fixture(scope="session")
def phantom_files(phantom: Phantom, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """A 12-slice 512×512 CT series written once per test session."""
    return phantom.write(tmp_path_factory.mktemp("phantom"))


@pytest.fixture
def node(tmp_path: Path) -> Iterator[InProcessNode]:
    """A fresh node in this process on port 0, with one permitted peer (TESTSCU at
    127.0.0.1, every service, clinical route)."""
    with InProcessNode(write_config(tmp_path / "node")) as n:
        yield n


@pytest.fixture
def node_process(tmp_path: Path) -> Iterator[ProcessNode]:
    """The same node as ``lamina serve`` in a subprocess: for DCMTK end-to-end tests."""
    with ProcessNode(write_config(tmp_path / "node")) as n:
        yield n


@pytest.fixture(scope="module")
def quiet_pydicom_validation() -> Iterator[None]:
    """pydicom would warn (quoting values) about the planted invalid TM; restored after."""
    previous = config.settings.reading_validation_mode
    config.settings.reading_validation_mode = config.IGNORE
    yield
    config.settings.reading_validation_mode = previous


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    """The planted-PHI corpus, built once per test module."""
    return build_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PostgresCluster]:
    """One throwaway PostgreSQL cluster per test session (see PostgresCluster); skipped when
    the server is not installed."""
    bindir = postgres_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL server not installed (Debian package postgresql): initdb/pg_ctl"
                    " not found")
    cluster = PostgresCluster(bindir)
    try:
        yield cluster.start()
    finally:
        cluster.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def index_backend(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, Path, str]:
    """(backend, SQLite path, PostgreSQL DSN) for a test run on each backend: a fresh
    SQLite file, or a fresh database on the session's cluster."""
    if request.param == "postgresql":
        cluster = request.getfixturevalue("pg_cluster")
        return "postgresql", tmp_path / "index.sqlite3", cluster.database()
    return "sqlite", tmp_path / "index.sqlite3", ""
