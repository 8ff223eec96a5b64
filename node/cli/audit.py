"""``lamina audit verify``: the tamper-evident trail, checked."""

from __future__ import annotations

import sys

import click

from node.cli.options import BadInput, node_context, node_options, user_name
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


@audit.command("export")
@click.option("--format", "fmt", type=click.Choice(["atna"]), required=True,
              help="atna: one DICOM audit message (PS3.15 A.5 XML) per line.")
@click.option("--since", default="", help="Only events at or after this ISO 8601 time (UTC "
                                          "unless it names its zone).")
@click.option("--output", type=click.Path(dir_okay=False, writable=True), default="-",
              help="File to write (default: standard output).")
@node_options
def audit_export(settings: Settings, fmt: str, since: str, output: str) -> None:
    """Export the audit trail for an ATNA audit record repository."""
    from datetime import UTC, datetime

    from node.audit.atna import export
    from node.audit.trail import Actor

    if since:
        try:
            moment = datetime.fromisoformat(since.replace("Z", "+00:00"))
        except ValueError:
            raise BadInput(f"--since {since!r}: not an ISO 8601 date or time") from None
        moment = moment.replace(tzinfo=moment.tzinfo or UTC).astimezone(UTC)
        since = moment.isoformat(timespec="microseconds").replace("+00:00", "Z")
    count = 0
    with node_context(settings) as ctx:
        with click.open_file(output, "wb") as out, ctx.index.reader() as r:
            for message in export(r.audit.rows(), settings.node.ae_title, since):
                out.write(message + b"\n")
                count += 1
        # Reading the trail out is itself an event (DICOM 110101 Audit Log Used).
        ctx.audit.record("audit.exported", Actor(user=user_name()),
                         {"format": fmt, "messages": count, **({"since": since} if since else {})})
    if output != "-":
        click.echo(f"{count} audit messages written to {output}")
