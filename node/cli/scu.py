"""``lamina echo | send | find | move``: the node's DIMSE tools for people, as an SCU.

The arguments follow DCMTK's echoscu/storescu/findscu/movescu (``-k KEY=VALUE``,
``-P``/``-S``), so a person who knows those tools knows these. These commands act
on another node, so they take only ``--config`` (for the peers and our AE title),
not the node's own ``--port`` or ``--data``.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import click

from node.cli.options import BadInput, config_option
from node.config import Settings


@click.command()
@config_option
@click.argument("peer")
@click.option("--aet", help="Calling AE title (default: node.ae_title).")
def echo(settings: Settings, peer: str, aet: str | None) -> None:
    """C-ECHO a PEER (a configured peer name, or AE@HOST:PORT); exit 1 with the reason when
    it does not answer success (refused by the peer, connection refused, no answer)."""
    from node.dimse.scu import NoAssociation, PeerError, resolve_peer
    from node.dimse.scu import echo as do_echo

    try:
        target = resolve_peer(settings, peer)
    except PeerError as exc:
        raise BadInput(str(exc)) from None
    try:
        code = do_echo(settings, target, aet)
    except NoAssociation as exc:
        click.echo(f"echo {peer}: {exc}", err=True)
        sys.exit(1)
    if code is None:
        click.echo(f"echo {peer}: no C-ECHO response (the association ended)", err=True)
        sys.exit(1)
    click.echo(f"echo {peer}: status 0x{code:04X}")
    sys.exit(0 if code == 0 else 1)


@click.command()
@config_option
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--to", "peer", required=True, help="A configured peer name, or AE@HOST:PORT.")
@click.option("--aet", help="Calling AE title (default: node.ae_title).")
def send(settings: Settings, paths: tuple[str, ...], peer: str, aet: str | None) -> None:
    """C-STORE files and folders (recursively) to a peer, with a progress bar."""
    from node.dimse.scu import PeerError, find_dicom_files, resolve_peer, send_files

    try:
        target = resolve_peer(settings, peer)
    except PeerError as exc:
        raise BadInput(str(exc)) from None
    files = find_dicom_files([Path(p) for p in paths])
    if not files:
        raise BadInput("no DICOM files found in the given paths")
    with click.progressbar(length=len(files), label=f"sending to {target.ae_title}",
                           file=sys.stderr) as bar:
        results = send_files(settings, target, files, aet, progress=bar.update)
    summary = Counter(r.status_text for r in results)
    for text, count in sorted(summary.items()):
        click.echo(f"{count:6d}  {text}")
    failed = [r for r in results if r.status != 0x0000]
    reasons = {r.comment for r in failed if r.status < 0}
    if failed and len(reasons) == 1 and all(r.status < 0 for r in failed):
        click.echo(f"send failed: {reasons.pop()}", err=True)  # e.g. no association at all
        sys.exit(1)
    for r in failed[:10]:
        click.echo(f"failed: {r.path}: {r.status_text}{': ' + r.comment if r.comment else ''}",
                   err=True)
    sys.exit(1 if failed else 0)


def _qr_options(func):
    """findscu-like options shared by ``find`` and ``move``."""
    func = click.option("--aet", help="Calling AE title (default: node.ae_title).")(func)
    func = click.option("-k", "--key", "keys", multiple=True,
                        help="KEY=VALUE to match (KEY alone: return it). Repeatable.")(func)
    func = click.option("-L", "--level", default="STUDY", show_default=True,
                        type=click.Choice(["PATIENT", "STUDY", "SERIES", "IMAGE"],
                                          case_sensitive=False))(func)
    func = click.option("-P", "--patient", "model", flag_value="patient",
                        help="Patient Root information model.")(func)
    return click.option("-S", "--study", "model", flag_value="study", default=True,
                        help="Study Root information model (default).")(func)


def _identifier(level: str, keys: tuple[str, ...], charset: str | None):
    from node.dimse.scu import UnknownKey, build_identifier

    try:
        return build_identifier(level, list(keys), charset)
    except UnknownKey as exc:
        raise BadInput(str(exc)) from None


def _target(settings: Settings, peer: str):
    from node.dimse.scu import PeerError, resolve_peer

    try:
        return resolve_peer(settings, peer)
    except PeerError as exc:
        raise BadInput(str(exc)) from None


@click.command()
@config_option
@click.argument("peer")
@_qr_options
@click.option("--charset", help="SpecificCharacterSet of the query, e.g. 'ISO_IR 192'.")
def find(settings: Settings, peer: str, model: str, level: str, keys: tuple[str, ...],
         aet: str | None, charset: str | None) -> None:
    """C-FIND at PEER: one tab-separated line per match (the -k keys, in order)."""
    from node.dimse.scu import find as do_find
    from node.dimse.scu import key_names

    identifier = _identifier(level, keys, charset)
    columns = key_names(list(keys))
    click.echo("\t".join(columns))
    matches, final = 0, None
    for reply in do_find(settings, _target(settings, peer), model, identifier, aet):
        if reply.status in (0xFF00, 0xFF01) and reply.identifier is not None:
            matches += 1
            click.echo("\t".join(_text(reply.identifier.get(c)) for c in columns))
        else:
            final = reply
    if final is None or final.status != 0x0000:
        why = f"0x{final.status:04X} {final.comment}" if final and final.status >= 0 else \
            (final.comment if final else "no final response")
        click.echo(f"find failed: {why}", err=True)
        sys.exit(1)
    click.echo(f"{matches} match{'es' if matches != 1 else ''}", err=True)


def _text(value: object) -> str:
    from pydicom.multival import MultiValue

    if value is None:
        return ""
    if isinstance(value, (list, tuple, MultiValue)):
        return "\\".join(str(v) for v in value)
    return str(value)


@click.command()
@config_option
@click.argument("peer")
@_qr_options
@click.option("--dest", "destination", required=True,
              help="Move destination AE title (a peer configured at PEER).")
def move(settings: Settings, peer: str, model: str, level: str, keys: tuple[str, ...],
         aet: str | None, destination: str) -> None:
    """C-MOVE from PEER to --dest: progress on stderr, exit 1 unless all sub-operations succeed."""
    from node.dimse.scu import move as do_move

    identifier = _identifier(level, keys, None)

    def progress(reply) -> None:
        click.echo(f"remaining {reply.remaining}  completed {reply.completed}"
                   f"  failed {reply.failed}  warning {reply.warning}", err=True)

    final = do_move(settings, _target(settings, peer), model, identifier, destination, aet,
                    progress)
    if final.status < 0:
        click.echo(f"move failed: {final.comment}", err=True)
        sys.exit(1)
    click.echo(f"status 0x{final.status:04X}{' ' + final.comment if final.comment else ''}:"
               f" completed {final.completed or 0}, failed {final.failed or 0},"
               f" warning {final.warning or 0}")
    if final.identifier is not None and "FailedSOPInstanceUIDList" in final.identifier:
        for uid in _text(final.identifier.FailedSOPInstanceUIDList).split("\\"):
            click.echo(f"failed: {uid}", err=True)
    sys.exit(0 if final.status == 0x0000 else 1)
