"""``lamina export``: approved annotations as a training set (nnU-Net v2, or MONAI-style NIfTI)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from node.cli.options import BadInput, node_context, node_options, user_name
from node.config import Settings


@click.command("export")
@node_options
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["nnunet", "nifti"]), default="nnunet",
              show_default=True, help="nnU-Net v2 layout, or image/label pairs with a"
              " MONAI datalist.json.")
@click.option("--split", "holdout", type=click.FloatRange(0, 1, max_open=True), default=0.0,
              show_default=True, help="Fraction of the patients held out as the test set.")
@click.option("--user", help="Who exports (default: the login name).")
def export(settings: Settings, out: Path, fmt: str, holdout: float, user: str | None) -> None:
    """Write every approved annotation and its series as NIfTI into OUT (new or empty), with
    a manifest tracing each case to its approval. Held out by patient, deterministically."""
    from node.audit.trail import Actor
    from node.forward.export import ExportError, TrainingExport

    with node_context(settings) as ctx:
        exporter = TrainingExport(ctx.index, ctx.annotations, ctx.audit)
        try:
            cases = exporter.plan(holdout)
            # click draws the bar only on a terminal
            with click.progressbar(length=len(cases), label="exporting", file=sys.stderr) as bar:
                exporter.write(out, fmt, cases, holdout, Actor(user=user_name(user)),
                               progress=bar.update)
        except ExportError as exc:
            raise BadInput(str(exc)) from None
    test = sum(c.split == "test" for c in cases)
    click.echo(f"exported {len(cases)} case(s) ({len(cases) - test} train, {test} test)"
               f" to {out}; manifest {out / 'manifest.json'}")
