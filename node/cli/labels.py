"""``lamina labels import FILE --rater ID``: one rater's categorical labels from a CSV."""

from __future__ import annotations

from pathlib import Path

import click

from node.cli.options import BadInput, node_context, node_options, user_name
from node.config import Settings


@click.group("labels")
def labels() -> None:
    """Categorical labels per study or slice (kappa in `lamina qa report`)."""


@labels.command("import")
@node_options
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--rater", required=True, help="The rater id the labels are recorded under.")
def import_labels_csv(settings: Settings, file: Path, rater: str) -> None:
    """Import FILE: a CSV (columns study_instance_uid, sop_instance_uid, question, answer)
    or a DICOM SR measurement report (TID 1500) whose qualitative evaluations are read."""
    from node.annotations.ratings import RatingsRefused, import_ratings
    from node.audit.trail import Actor

    try:
        data = file.read_bytes()
    except OSError as exc:
        raise BadInput(f"{file}: {exc.strerror}") from None
    with node_context(settings) as ctx:
        try:
            done = import_ratings(ctx.index, ctx.audit, ctx.annotations.protocol, data, rater,
                                  Actor(user=user_name()))
        except RatingsRefused as exc:
            raise BadInput(f"{file.name}: {exc}; nothing was recorded") from None
    click.echo(f"{done.rows} label(s) recorded for {', '.join(done.questions)}")
