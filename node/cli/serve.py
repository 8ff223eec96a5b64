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
    """Run the node until Ctrl-C or SIGTERM.

    \b
    Before serving it:
    - takes the data folder (an flock on DATA/run/node.lock, holding its pid):
      one node per data folder;
    - refuses to start when another process listens on node.bind:node.port;
    - creates the data folder on first start, migrates the index, clears stale
      spool files, loads the project key (deidentify.key_file).

    \b
    Then node.workers receiving processes share the port (one worker: this
    process): C-ECHO, C-STORE (validated, de-identified on the clinical route,
    stored and indexed), C-FIND, C-MOVE and C-GET for the configured peers, with
    annotation checks, the series sweep and the audit trail (node.started /
    node.stopped, every association). With http.enabled each process also
    serves HTTP on http.port: DICOMweb (QIDO-RS, WADO-RS, STOW-RS) under
    http.base_path for the clients of [http.clients], /livez, /readyz, /metrics.

    Exit 2 with one line when the config, the project key, the port or the data
    folder cannot be used.
    """
    from node.serve import ServeRefused
    from node.serve import serve as run

    if workers:
        settings = replace(settings, node=replace(settings.node, workers=workers))
    try:
        run(settings)
    except (ValueError, ProjectKeyError, ServeRefused) as exc:
        raise BadInput(str(exc)) from None
