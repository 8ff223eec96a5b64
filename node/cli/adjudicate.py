"""``lamina adjudicate list | pick``: the queue of double readings that disagree.

Thin: the decision and its state changes are :meth:`DoubleReading.pick`; a
refused pick is audited and said in one line (exit 2).
"""

from __future__ import annotations

import json

import click

from node.cli.options import BadInput, node_context, node_options, user_name
from node.config import Settings


@click.group("adjudicate")
def adjudicate() -> None:
    """Adjudicate double readings that disagree."""


@adjudicate.command("list")
@node_options
@click.option("--all", "everything", is_flag=True, help="Decided ones too.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def list_adjudications(settings: Settings, everything: bool, as_json: bool) -> None:
    """The open adjudications: which readings, and why they disagree."""
    with node_context(settings) as ctx, ctx.index.reader() as r:
        rows = r.agreement.adjudications(None if everything else "open")
    for row in rows:
        if as_json:
            click.echo(json.dumps(row, sort_keys=True))
            continue
        reasons = "; ".join(json.loads(row["reasons"]))
        decided = (f" → {row['decision']} annotation {row['chosen_annotation']}"
                   if row["state"] == "decided" else "")
        click.echo(f"{row['id']}\t{row['state']}\tseries {row['series_uid']}\treadings "
                   f"{row['annotation_a']} / {row['annotation_b']}\t{reasons}{decided}")


@adjudicate.command("pick")
@node_options
@click.argument("adjudication_id", type=int)
@click.option("--reading", "annotation_id", type=int, required=True,
              help="The annotation chosen: one of the two readings, or a consensus SEG "
                   "pushed for the same series.")
@click.option("--as", "user", help="Who decides (default: the login name).")
def pick(settings: Settings, adjudication_id: int, annotation_id: int,
         user: str | None) -> None:
    """Settle an adjudication with one reading; the other becomes rejected (kept)."""
    from node.annotations.reading import AdjudicationError
    from node.audit.trail import Actor

    who = user_name(user)
    actor = Actor(user=who)
    with node_context(settings) as ctx:
        try:
            row = ctx.reading.pick(adjudication_id, annotation_id, actor, who)
        except AdjudicationError as exc:
            ctx.audit.record("adjudication.refused", actor, {
                "adjudication_id": adjudication_id, "annotation_id": annotation_id,
                "reason": str(exc)}, outcome="minor-failure")
            raise BadInput(str(exc)) from None
    click.echo(f"adjudication {row['id']}: {row['decision']} annotation "
               f"{row['chosen_annotation']} (adjudicated)")
