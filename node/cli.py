"""The ``lamina`` command: serve, echo, send, status, audit verify, fsck.

Exit codes follow the project's rule: 0 done, 1 the check or transfer found
problems, 2 bad input (a bad config, an unknown peer, a missing file).
"""

from __future__ import annotations

import functools
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import click

from node import config as config_mod
from node.config import ConfigError, Settings

DEFAULT_CONFIG = Path("config/node.toml")


def _settings(config: str | None, port: int | None, ae_title: str | None,
              data: str | None) -> Settings:
    """Config file (flag, $LAMINA_CONFIG, ./config/node.toml, or defaults) + env + flags."""
    path = config or os.environ.get("LAMINA_CONFIG")
    if path is None and DEFAULT_CONFIG.is_file():
        path = str(DEFAULT_CONFIG)
    try:
        return config_mod.load(
            Path(path) if path else None,
            overrides={"node.port": port, "node.ae_title": ae_title, "storage.data": data},
        )
    except ConfigError as exc:
        raise click.UsageError(f"config error: {exc}") from None


def node_options(func):
    """--config/--port/--ae-title/--data on every command that needs the node's settings."""

    @click.option("--config", "config", type=click.Path(dir_okay=False),
                  help="Config file (default: $LAMINA_CONFIG or ./config/node.toml).")
    @click.option("--port", type=int, help="Override node.port.")
    @click.option("--ae-title", help="Override node.ae_title.")
    @click.option("--data", type=click.Path(file_okay=False), help="Override storage.data.")
    @functools.wraps(func)
    def wrapper(config, port, ae_title, data, **kwargs: Any):
        return func(_settings(config, port, ae_title, data), **kwargs)

    return wrapper


@click.group()
@click.version_option(package_name="lamina")
def main() -> None:
    """Lamina: a DICOM node for annotated imaging datasets."""


@main.command()
@node_options
@click.option("--workers", type=click.IntRange(1, 64), help="Override node.workers.")
def serve(settings: Settings, workers: int | None) -> None:
    """Receive DICOM (C-ECHO, C-STORE) until stopped with Ctrl-C or SIGTERM."""
    from dataclasses import replace

    from node.server import serve as run

    if workers:
        settings = replace(settings, node=replace(settings.node, workers=workers))
    try:
        run(settings)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None


@main.command()
@node_options
@click.argument("peer")
@click.option("--aet", help="Calling AE title (default: node.ae_title).")
def echo(settings: Settings, peer: str, aet: str | None) -> None:
    """C-ECHO a PEER (a configured peer name, or AE@HOST:PORT)."""
    from node.scu import PeerError, resolve_peer
    from node.scu import echo as do_echo

    try:
        target = resolve_peer(settings, peer)
    except PeerError as exc:
        raise click.UsageError(str(exc)) from None
    code = do_echo(settings, target, aet)
    if code is None:
        click.echo(f"echo {peer}: no association", err=True)
        sys.exit(1)
    click.echo(f"echo {peer}: status 0x{code:04X}")
    sys.exit(0 if code == 0 else 1)


@main.command()
@node_options
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--to", "peer", required=True, help="A configured peer name, or AE@HOST:PORT.")
@click.option("--aet", help="Calling AE title (default: node.ae_title).")
def send(settings: Settings, paths: tuple[str, ...], peer: str, aet: str | None) -> None:
    """C-STORE files and folders (recursively) to a peer, with a progress bar."""
    from node.scu import PeerError, find_dicom_files, resolve_peer, send_files

    try:
        target = resolve_peer(settings, peer)
    except PeerError as exc:
        raise click.UsageError(str(exc)) from None
    files = find_dicom_files([Path(p) for p in paths])
    if not files:
        raise click.UsageError("no DICOM files found in the given paths")
    with click.progressbar(length=len(files), label=f"sending to {target.ae_title}",
                           file=sys.stderr) as bar:
        results = send_files(settings, target, files, aet, progress=bar.update)
    summary = Counter(r.status_text for r in results)
    for text, count in sorted(summary.items()):
        click.echo(f"{count:6d}  {text}")
    failed = [r for r in results if r.status != 0x0000]
    for r in failed[:10]:
        click.echo(f"failed: {r.path}: {r.status_text}{': ' + r.comment if r.comment else ''}",
                   err=True)
    sys.exit(1 if failed else 0)


@main.command()
@node_options
def status(settings: Settings) -> None:
    """Counts per level, disk used, quarantine and conflicts."""
    from node.reports import node_status

    for key, value in node_status(settings).items():
        click.echo(f"{key:<22} {value}")


@main.group()
def audit() -> None:
    """The audit trail."""


@audit.command("verify")
@node_options
def audit_verify(settings: Settings) -> None:
    """Check the hash chain and the signed head; exit 1 naming the first bad entry."""
    from node.context import NodeContext

    ctx = NodeContext.open(settings, migrate=False)
    report = ctx.audit.verify()
    if report.ok:
        click.echo(f"audit trail intact: {report.entries} entries")
        return
    click.echo(f"audit trail BROKEN at {report.problem}", err=True)
    sys.exit(1)


@main.command()
@node_options
def fsck(settings: Settings) -> None:
    """Check the blob store against the index; exit 1 when anything indexed is missing or bad."""
    from node.reports import fsck as run_fsck

    report = run_fsck(settings)
    for line in report.lines():
        click.echo(line)
    sys.exit(0 if report.clean else 1)


@main.command()
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--slices", default=40, show_default=True, type=click.IntRange(1, 2000))
@click.option("--seed", default="lamina-demo", show_default=True,
              help="Same seed, same UIDs: a resend of the same study.")
def demo(out: str, slices: int, seed: str) -> None:
    """Write a synthetic CT study (512×512 slices, spheres in water) to OUT."""
    from node.phantom import Phantom

    paths = Phantom(seed=seed, slices_count=slices).write(Path(out))
    click.echo(f"wrote {len(paths)} CT slices to {out}")


# Commands defined beside their services, registered once node_options exists.
from node.annotations.commands import annotations, import_labels, overlays  # noqa: E402

main.add_command(annotations)
main.add_command(overlays)
main.add_command(import_labels)
