"""``lamina demo ct | seg``: synthetic data for trying the node (no patient ever involved)."""

from __future__ import annotations

from pathlib import Path

import click

from node.cli.options import BadInput


@click.group()
def demo() -> None:
    """Synthetic data for trying the node: a CT study, and an annotator's SEG on it."""


@demo.command("ct")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--slices", default=40, show_default=True, type=click.IntRange(1, 2000))
@click.option("--seed", default="lamina-demo", show_default=True,
              help="Same seed, same UIDs: a resend of the same study.")
def demo_ct(out: str, slices: int, seed: str) -> None:
    """Write a synthetic CT study (512×512 slices, spheres in water, a made-up patient) to OUT."""
    from node.phantom import Phantom

    paths = Phantom(seed=seed, slices_count=slices).write(Path(out))
    click.echo(f"wrote {len(paths)} CT slices to {out}")


@demo.command("seg")
@click.argument("slices", metavar="IN", type=click.Path(exists=True, file_okay=False,
                                                        path_type=Path))
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--rater", default="Annotator^Demo", show_default=True,
              help="Who drew it (ContentCreatorName, a DICOM person name): another name is "
                   "another reader.")
@click.option("--shift-mm", default=0.0, show_default=True, type=click.FloatRange(-50, 50),
              help="Draw the nodule this far off along the rows: a reader who disagrees.")
def demo_seg(slices: Path, out: Path, rater: str, shift_mm: float) -> None:
    """Play the annotator's tool: label the demo study's 16 mm sphere as a lung nodule and
    write a DICOM-SEG on the CT slices in IN (e.g. the study retrieved from the node) to OUT."""
    from node.phantom import NotTheDemoStudy, demo_nodule_seg

    try:
        seg, voxels, on_slices = demo_nodule_seg(slices, rater, shift_mm)
    except NotTheDemoStudy as exc:
        raise BadInput(str(exc)) from None
    seg.save_as(out)
    click.echo(f"wrote {out}: a SEG of 'Lung nodule', {voxels} voxels on {on_slices} slices")
