"""``lamina queue list | show | retry | cancel``: the forwarding outbox, row by row.

A row is one object for one destination: queued, failed (to be retried),
sent, dead (dead-lettered after the last attempt, its error kept),
cancelled or refused. Retry and cancel are audited; nothing is deleted.
"""

from __future__ import annotations

import click

from node.cli.options import BadInput, node_context, node_options, user_name
from node.config import Settings

_STATES = ("queued", "failed", "sent", "dead", "cancelled", "refused")


@click.group()
def queue() -> None:
    """Approved results waiting for, or done with, forwarding to their destinations."""


@queue.command("list")
@node_options
@click.option("--state", type=click.Choice(_STATES), help="Only rows in this state.")
@click.option("--destination", help="Only rows for this peer (by name).")
@click.option("--annotation", "annotation_id", type=int, help="Only rows of this annotation.")
def queue_list(settings: Settings, state: str | None, destination: str | None,
               annotation_id: int | None) -> None:
    """One line per row: ID, state, attempts, destination, annotation, kind, mode, last error."""
    with node_context(settings) as ctx:
        rows = ctx.outbox.list(state, destination, annotation_id)
    for r in rows:
        error = f"  {r['last_error'] or r['warning']}" if r["last_error"] or r["warning"] else ""
        click.echo(f"{r['id']:>6}  {r['state']:<9} {r['attempts']:>3}x  {r['destination']:<16}"
                   f" annotation {r['annotation_fk']:<5} {r['kind']:<6} {r['mode']:<12}"
                   f" {r['sop_instance_uid']}{error}")
    click.echo(f"{len(rows)} row{'' if len(rows) == 1 else 's'}")


@queue.command("show")
@node_options
@click.argument("item_id", type=int)
def queue_show(settings: Settings, item_id: int) -> None:
    """Everything kept about one row."""
    from node.forward.queue import QueueError

    with node_context(settings) as ctx:
        try:
            row = ctx.outbox.show(item_id)
        except QueueError as exc:
            raise BadInput(str(exc)) from None
    for key, value in row.items():
        if key == "last_status" and value is not None:
            value = f"0x{value:04X}"
        click.echo(f"{key:<20} {value if value not in (None, '') else '-'}")


@queue.command("retry")
@node_options
@click.argument("item_id", type=int)
@click.option("--user", help="Who asks (default: the login name).")
def queue_retry(settings: Settings, item_id: int, user: str | None) -> None:
    """Queue a failed, dead-lettered or cancelled row again, with fresh attempts."""
    _change(settings, "retry", item_id, user)


@queue.command("cancel")
@node_options
@click.argument("item_id", type=int)
@click.option("--user", help="Who asks (default: the login name).")
def queue_cancel(settings: Settings, item_id: int, user: str | None) -> None:
    """Never send a row that is queued or failed."""
    _change(settings, "cancel", item_id, user)


def _change(settings: Settings, what: str, item_id: int, user: str | None) -> None:
    from node.audit.trail import Actor
    from node.forward.queue import QueueError

    with node_context(settings) as ctx:
        try:
            getattr(ctx.outbox, what)(item_id, Actor(user=user_name(user)))
        except QueueError as exc:
            raise BadInput(str(exc)) from None
    click.echo(f"queue entry {item_id}: {'queued again' if what == 'retry' else 'cancelled'}")
