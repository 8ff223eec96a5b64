"""``lamina audit verify``: the tamper-evident trail, checked."""

from __future__ import annotations

import sys

import click

from node.cli.options import node_context, node_options
from node.config import Settings


@click.group()
def audit() -> None:
    """The audit trail."""


@audit.command("verify")
@node_options
def audit_verify(settings: Settings) -> None:
    """Check the hash chain and the signed head; exit 1 naming the first bad entry."""
    with node_context(settings) as ctx:
        report = ctx.audit.verify()
    if report.ok:
        click.echo(f"audit trail intact: {report.entries} entries")
        return
    click.echo(f"audit trail BROKEN at {report.problem}", err=True)
    sys.exit(1)
