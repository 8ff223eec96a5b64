"""``lamina qa report [--html FILE]``: is the labelling guideline holding up?"""

from __future__ import annotations

from pathlib import Path

import click

from node.cli.options import BadInput, node_context, node_options
from node.config import Settings


@click.group("qa")
def qa() -> None:
    """Quality of the labels: agreement, findings, double reads, adjudications."""


@qa.command("report")
@node_options
@click.option("--html", "html_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write the report as one self-contained HTML page.")
def report(settings: Settings, html_path: Path | None) -> None:
    """Per class kappa and Dice (flagged below the protocol's thresholds), counts,
    findings per rater, pending double reads, adjudications, approvals."""
    from node.qa import build_report, render_text
    from node.qa_html import render_html

    with node_context(settings) as ctx:
        result = build_report(ctx.index, ctx.annotations.protocol)
    click.echo(render_text(result), nl=False)
    if html_path is not None:
        try:
            html_path.write_text(render_html(result), encoding="utf-8")
        except OSError as exc:
            raise BadInput(f"{html_path}: {exc.strerror}") from None
        click.echo(f"HTML report: {html_path}")
