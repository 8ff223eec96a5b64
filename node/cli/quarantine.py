"""``lamina quarantine list | show | release | export``: what the node refused, and why.

Nothing here is ever deleted; a release re-runs the ingest pipeline with an
audited override.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from node.cli.options import BadInput, node_context, node_options, user_name
from node.config import Settings


@click.group()
def quarantine() -> None:
    """Objects the node refused: list, show, release, export. Nothing here is ever deleted."""


@quarantine.command("list")
@node_options
@click.option("--all", "include_released", is_flag=True, help="Include released entries.")
def quarantine_list(settings: Settings, include_released: bool) -> None:
    """One line per entry: ID, time, sender, status, reason."""
    with node_context(settings, with_key=True) as ctx:
        entries = ctx.quarantine.list(include_released)
    for e in entries:
        released = f"  [released {e.released_at}]" if e.released_at else ""
        again = (f"  [received {e.times_received} times, last {e.last_received_at}]"
                 if e.times_received > 1 else "")
        click.echo(f"{e.id:>6}  {e.received_at}  {e.calling_ae:<16} 0x{e.status_code:04X}"
                   f"  {e.reason}{again}{released}")
    click.echo(f"{len(entries)} entr{'y' if len(entries) == 1 else 'ies'}")


@quarantine.command("show")
@node_options
@click.argument("quarantine_id", type=int)
def quarantine_show(settings: Settings, quarantine_id: int) -> None:
    """Everything kept about one entry, with every finding."""
    from node.ingest.quarantine import QuarantineError

    with node_context(settings, with_key=True) as ctx:
        try:
            entry = ctx.quarantine.show(quarantine_id)
        except QuarantineError as exc:
            raise BadInput(str(exc)) from None
    for key, value in entry.__dict__.items():
        if key == "findings":
            continue
        if key == "status_code":
            value = f"0x{value:04X}"
        click.echo(f"{key:<20} {value if value not in (None, '') else '-'}")
    click.echo(f"findings ({len(entry.findings)}):")
    for f in entry.findings:
        click.echo(f"  [{f['rule']}] {f['message']}" + (f" ({f['detail']})" if f.get("detail")
                                                       else ""))


@quarantine.command("release")
@node_options
@click.argument("quarantine_id", type=int)
@click.option("--reason", required=True, help="Why this object may be stored (audited).")
@click.option("--user", help="Who releases it (default: the login name).")
def quarantine_release(settings: Settings, quarantine_id: int, reason: str,
                       user: str | None) -> None:
    """Store a quarantined object despite its findings: the pipeline re-runs with an audited
    override, and the findings are recorded on the stored instance."""
    from node.audit.trail import Actor
    from node.ingest.quarantine import QuarantineError

    with node_context(settings, with_key=True) as ctx:
        try:
            result = ctx.quarantine.release(quarantine_id, reason, Actor(user=user_name(user)),
                                            ctx.ingest)
        except QuarantineError as exc:
            raise BadInput(str(exc)) from None
    outcome = result.outcome
    click.echo(f"quarantine {quarantine_id}: {result.action}"
               f" (0x{outcome.status.code:04X}{': ' + outcome.comment if outcome.comment else ''})")
    sys.exit(0 if outcome.status.is_success else 1)


@quarantine.command("export")
@node_options
@click.argument("quarantine_id", type=int)
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--user", help="Who exports it (default: the login name).")
def quarantine_export(settings: Settings, quarantine_id: int, path: Path,
                      user: str | None) -> None:
    """Copy an entry's bytes to PATH (a file, or a folder for <sha256>.dcm); the entry stays."""
    from node.audit.trail import Actor
    from node.ingest.quarantine import QuarantineError

    with node_context(settings, with_key=True) as ctx:
        try:
            target = ctx.quarantine.export(quarantine_id, path, Actor(user=user_name(user)))
        except QuarantineError as exc:
            raise BadInput(str(exc)) from None
    click.echo(f"exported quarantine {quarantine_id} to {target}")
