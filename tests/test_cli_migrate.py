"""``lamina migrate`` on both backends: versions shown, pending applied once, ``--check`` for
deploy scripts, a bad DSN as one line with exit 2, and ``serve`` refusing a stale schema when
``[index] migrate_on_start = false``."""

from __future__ import annotations

from node.storage.backend import target_version
from tests.harness import lamina, write_config


def _config(tmp_path, index_backend, **index):
    backend, _path, dsn = index_backend
    values = {"backend": backend, **index}
    if dsn:
        values["dsn"] = dsn
    return write_config(tmp_path / "node", index=values)


def test_check_then_migrate_then_current(tmp_path, index_backend):
    config = _config(tmp_path, index_backend)
    target = target_version(index_backend[0])
    assert target > 0
    pending = lamina("migrate", "--check", config=config)
    assert pending.exit_code == 1, pending.output
    assert f"target {target}" in pending.output and "pending" in pending.output

    applied = lamina("migrate", config=config)
    assert applied.exit_code == 0, applied.output
    assert f"now at {target}" in applied.output

    again = lamina("migrate", config=config)
    assert again.exit_code == 0 and "up to date" in again.output
    checked = lamina("migrate", "--check", config=config)
    assert checked.exit_code == 0, checked.output
    assert f"schema version {target}, target {target}" in checked.output


def test_serve_refuses_a_stale_schema_without_migrate_on_start(tmp_path, index_backend):
    config = _config(tmp_path, index_backend, migrate_on_start=False)
    result = lamina("serve", config=config)
    assert result.exit_code == 2 and "lamina migrate" in result.output
    assert lamina("migrate", "--check", config=config).exit_code == 1  # nothing was applied


def test_bad_dsn_is_one_line_and_exit_2(tmp_path):
    config = write_config(tmp_path / "node", index={
        "backend": "postgresql", "dsn": f"host={tmp_path / 'nowhere'} port=1 dbname=x user=x"})
    result = lamina("migrate", config=config)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
