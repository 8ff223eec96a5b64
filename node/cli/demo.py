"""``lamina demo``: synthetic data for trying the node (no patient ever involved)."""

from __future__ import annotations

from pathlib import Path

import click


@click.command()
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--slices", default=40, show_default=True, type=click.IntRange(1, 2000))
@click.option("--seed", default="lamina-demo", show_default=True,
              help="Same seed, same UIDs: a resend of the same study.")
def demo(out: str, slices: int, seed: str) -> None:
    """Write a synthetic CT study (512×512 slices, spheres in water) to OUT."""
    from node.phantom import Phantom

    paths = Phantom(seed=seed, slices_count=slices).write(Path(out))
    click.echo(f"wrote {len(paths)} CT slices to {out}")
