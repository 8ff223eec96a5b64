"""``lamina migrate``: bring the index schema to this version's, apart from ``serve``.

Deploy scripts run it once before starting the nodes (``[index] migrate_on_start = false``);
``--check`` only says whether migrations are pending (exit 1), for a pre-deploy gate.
The migrations themselves run under the backend's own lock (the advisory lock on
PostgreSQL, one exclusive transaction per migration on SQLite), so running it while
nodes start is safe.
"""

from __future__ import annotations

import sys

import click

from node.cli.options import BadInput, index_problem, node_options
from node.config import Settings


@click.command()
@node_options
@click.option("--check", "check_only", is_flag=True,
              help="Apply nothing; exit 1 when migrations are pending.")
def migrate(settings: Settings, check_only: bool) -> None:
    """Show the current and target schema versions and apply the pending migrations."""
    from node.storage.backend import open_index, target_version
    from node.storage.interface import IndexUnavailable

    backend = settings.index.backend
    target = target_version(backend)
    if check_only and backend == "sqlite" and not settings.index_path.is_file():
        _report(backend, 0, target)  # no index yet: everything is pending
        _pending(0, target)
    try:
        if backend == "sqlite":
            settings.storage.data.mkdir(parents=True, exist_ok=True)
        index = open_index(backend, settings.index_path, settings.index.busy_timeout_ms,
                           dsn=settings.index.dsn)
        try:
            current = index.schema_version()  # PostgreSQL connects here: a bad DSN fails here
            _report(backend, current, target)
            if check_only:
                _pending(current, target)
            if current < target:
                reached = index.migrate()
                click.echo(f"applied {reached - current} migration(s): now at {reached}")
            else:
                click.echo("up to date")
        finally:
            index.close()
    except IndexUnavailable as exc:
        raise index_problem(settings, exc) from None
    except Exception as exc:  # a bad DSN, a refused connection: one line, exit 2
        if type(exc).__module__.startswith("psycopg"):
            line = str(exc).strip().splitlines()
            raise BadInput(f"index.dsn: cannot use the database: {line[0] if line else exc}") \
                from None
        raise


def _report(backend: str, current: int, target: int) -> None:
    click.echo(f"backend {backend}: schema version {current}, target {target}")


def _pending(current: int, target: int) -> None:
    """--check: exit 1 when migrations are pending, 0 when the schema is current."""
    if current < target:
        click.echo(f"{target - current} migration(s) pending: run `lamina migrate`")
        sys.exit(1)
    click.echo("up to date")
    sys.exit(0)
