"""``lamina serve``: run the node."""

from __future__ import annotations

from dataclasses import replace

import click

from node.anonymize.keys import ProjectKeyError
from node.cli.options import BadInput, node_options
from node.config import Settings


@click.command()
@node_options
@click.option("--workers", type=click.IntRange(1, 64), help="Override node.workers.")
def serve(settings: Settings, workers: int | None) -> None:
    """Run the node until Ctrl-C or SIGTERM: C-ECHO, C-STORE (validated, de-identified on
    the clinical route, stored and indexed), C-FIND, C-MOVE and C-GET for the configured
    peers, with annotation checks, the series sweep and the audit trail."""
    from node.serve import serve as run

    if workers:
        settings = replace(settings, node=replace(settings.node, workers=workers))
    try:
        run(settings)
    except (ValueError, ProjectKeyError) as exc:
        raise BadInput(str(exc)) from None
