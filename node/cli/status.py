"""``lamina status | fsck | check``: what a node holds, whether it is whole, and its findings.

Read-only: a data folder without a node is bad input (exit 2), never created.
"""

from __future__ import annotations

import sys

import click

from node.cli.options import BadInput, index_problem, node_context, node_options, user_name
from node.config import Settings


@click.command()
@node_options
def status(settings: Settings) -> None:
    """Counts per level, disk used, quarantine and conflicts."""
    from node.reports import node_status

    for key, value in _report(node_status, settings).items():
        click.echo(f"{key:<22} {value}")


@click.command()
@node_options
def fsck(settings: Settings) -> None:
    """Check the blob store against the index; exit 1 when anything indexed is missing or bad."""
    from node.reports import fsck as run_fsck

    report = _report(run_fsck, settings)
    for line in report.lines():
        click.echo(line)
    sys.exit(0 if report.clean else 1)


@click.group()
def check() -> None:
    """Checks on stored data."""


@check.command("series")
@node_options
@click.argument("series_uid")
@click.option("--user", help="Who asks (default: the login name).")
def check_series(settings: Settings, series_uid: str, user: str | None) -> None:
    """Check a series' geometry and completeness now; exit 1 when it is incomplete."""
    from node.audit.trail import Actor

    with node_context(settings) as ctx:
        state = ctx.series.check(series_uid, "on-demand", Actor(user=user_name(user)))
    if state is None:
        raise BadInput(f"series {series_uid} is not in the index")
    click.echo(f"series {series_uid}: {state.state} ({state.instances} instances)")
    for finding, severity in state.findings:
        click.echo(f"  {severity:<6} [{finding.rule}] {finding.message}")
    if state.geometry:
        g = state.geometry
        click.echo(f"  grid {g.size[0]} slices x {g.size[1]} x {g.size[2]},"
                   f" spacing {', '.join(f'{v:.4g}' for v in g.spacing)} mm"
                   f" (slice, row, column), {'regular' if g.regular else 'NOT regular'}")
    sys.exit(0 if state.state == "complete" else 1)


@check.command("instance")
@node_options
@click.argument("sop_instance_uid")
def check_instance(settings: Settings, sop_instance_uid: str) -> None:
    """The findings recorded for an instance, stored or quarantined; exit 1 when any."""
    from node.reports import instance_findings

    lines = _report(instance_findings, settings, sop_instance_uid)
    for line in lines:
        click.echo(line)
    sys.exit(1 if len(lines) > 1 else 0)


def _report(run, settings: Settings, *args):
    """A read-only report; a data folder without a node is bad input, said in one line."""
    from node.storage.interface import IndexUnavailable

    try:
        return run(settings, *args)
    except IndexUnavailable as exc:
        raise index_problem(settings, exc) from None
