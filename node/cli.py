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
from node.anonymize import commands as anonymize_commands
from node.anonymize.keys import ProjectKeyError
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

    from node.serve import serve as run

    if workers:
        settings = replace(settings, node=replace(settings.node, workers=workers))
    try:
        run(settings)
    except (ValueError, ProjectKeyError) as exc:
        raise click.UsageError(str(exc)) from None


@main.command()
@node_options
@click.argument("peer")
@click.option("--aet", help="Calling AE title (default: node.ae_title).")
def echo(settings: Settings, peer: str, aet: str | None) -> None:
    """C-ECHO a PEER (a configured peer name, or AE@HOST:PORT)."""
    from node.dimse.scu import PeerError, resolve_peer
    from node.dimse.scu import echo as do_echo

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
    from node.dimse.scu import PeerError, find_dicom_files, resolve_peer, send_files

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
        raise click.UsageError(str(exc)) from None


def _target(settings: Settings, peer: str):
    from node.dimse.scu import PeerError, resolve_peer

    try:
        return resolve_peer(settings, peer)
    except PeerError as exc:
        raise click.UsageError(str(exc)) from None


@main.command()
@node_options
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


@main.command()
@node_options
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


main.add_command(anonymize_commands.keys)
main.add_command(anonymize_commands.anonymize)


@main.command()
@node_options
@click.argument("target", metavar="UID_OR_FILE")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write a re-identified object (needed for a file).")
def reidentify(settings: Settings, target: str, out: Path | None) -> None:
    """Map a pseudonymous UID, or a whole object, back to the originals (audited)."""
    from pydicom.dataset import Dataset

    from node.anonymize.reidmap import ReidentificationError
    from node.context import NodeContext
    from node.reidentify import reidentify as run

    if Path(target).is_file() and (out is None or out.exists()):
        raise click.UsageError("--out NEW_FILE is required to re-identify a file")
    if not Path(target).is_file() and not target.replace(".", "").isdigit():
        raise click.UsageError(f"{target!r} is neither a file nor a UID")
    try:
        ctx = NodeContext.open(settings, with_key=True)  # it writes an audit event
    except ProjectKeyError as exc:
        raise click.UsageError(str(exc)) from None
    try:
        result = run(ctx, target)
    except ReidentificationError as exc:
        raise click.UsageError(str(exc)) from None
    finally:
        ctx.close()
    if isinstance(result, Dataset):
        result.save_as(out, enforce_file_format=True)
        click.echo(f"re-identified object written to {out}")
    else:
        click.echo(result)


@main.group()
def deid() -> None:
    """De-identification evidence."""


@deid.command("report")
@node_options
@click.argument("study_uid")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable report.")
def deid_report(settings: Settings, study_uid: str, as_json: bool) -> None:
    """What de-identification did to each instance of a (pseudonymous) study."""
    import json

    from node.anonymize.report import study_report, study_report_json
    from node.context import NodeContext

    ctx = NodeContext.open(settings, migrate=False)
    try:
        with ctx.index.read() as conn:
            rows = [json.loads(r[0]) for r in conn.execute(
                "SELECT evidence FROM deid_evidence WHERE study_instance_uid = ?"
                " ORDER BY sop_instance_uid", (study_uid,))]
    finally:
        ctx.close()
    if not rows:
        raise click.UsageError(f"no de-identified instances stored for study {study_uid}")
    if as_json:
        click.echo(json.dumps(study_report_json(rows, study_uid=study_uid), indent=2))
    else:
        click.echo(study_report(rows, study_uid=study_uid))


def _user(user: str | None) -> str:
    import getpass

    return user or getpass.getuser()


@main.group()
def quarantine() -> None:
    """Objects the node refused: list, show, release, export. Nothing here is ever deleted."""


@quarantine.command("list")
@node_options
@click.option("--all", "include_released", is_flag=True, help="Include released entries.")
def quarantine_list(settings: Settings, include_released: bool) -> None:
    """One line per entry: ID, time, sender, status, reason."""
    from node.context import NodeContext

    ctx = NodeContext.open(settings, migrate=False, with_key=True)
    try:
        entries = ctx.quarantine.list(include_released)
    finally:
        ctx.close()
    for e in entries:
        released = f"  [released {e.released_at}]" if e.released_at else ""
        click.echo(f"{e.id:>6}  {e.received_at}  {e.calling_ae:<16} 0x{e.status_code:04X}"
                   f"  {e.reason}{released}")
    click.echo(f"{len(entries)} entr{'y' if len(entries) == 1 else 'ies'}")


@quarantine.command("show")
@node_options
@click.argument("quarantine_id", type=int)
def quarantine_show(settings: Settings, quarantine_id: int) -> None:
    """Everything kept about one entry, with every finding."""
    from node.context import NodeContext
    from node.ingest.quarantine import QuarantineError

    ctx = NodeContext.open(settings, migrate=False, with_key=True)
    try:
        entry = ctx.quarantine.show(quarantine_id)
    except QuarantineError as exc:
        raise click.UsageError(str(exc)) from None
    finally:
        ctx.close()
    for key, value in entry.__dict__.items():
        if key == "findings":
            continue
        if key == "status_code":
            value = f"0x{value:04X}"
        click.echo(f"{key:<20} {value if value not in (None, '') else '-'}")
    click.echo(f"findings ({len(entry.findings)}):")
    for f in entry.findings:
        click.echo(f"  [{f['rule']}] {f['message']}" + (f" ({f['detail']})" if f.get("detail")
                                                       else ""))


@quarantine.command("release")
@node_options
@click.argument("quarantine_id", type=int)
@click.option("--reason", required=True, help="Why this object may be stored (audited).")
@click.option("--user", help="Who releases it (default: the login name).")
def quarantine_release(settings: Settings, quarantine_id: int, reason: str,
                       user: str | None) -> None:
    """Store a quarantined object despite its findings: the pipeline re-runs with an audited
    override, and the findings are recorded on the stored instance."""
    from node.audit.trail import Actor
    from node.context import NodeContext
    from node.ingest.quarantine import QuarantineError

    ctx = NodeContext.open(settings, migrate=False, with_key=True)
    try:
        result = ctx.quarantine.release(quarantine_id, reason, Actor(user=_user(user)),
                                        ctx.ingest)
    except QuarantineError as exc:
        raise click.UsageError(str(exc)) from None
    finally:
        ctx.close()
    outcome = result.outcome
    click.echo(f"quarantine {quarantine_id}: {result.action}"
               f" (0x{outcome.status.code:04X}{': ' + outcome.comment if outcome.comment else ''})")
    sys.exit(0 if outcome.status.is_success else 1)


@quarantine.command("export")
@node_options
@click.argument("quarantine_id", type=int)
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--user", help="Who exports it (default: the login name).")
def quarantine_export(settings: Settings, quarantine_id: int, path: Path,
                      user: str | None) -> None:
    """Copy an entry's bytes to PATH (a file, or a folder for <sha256>.dcm); the entry stays."""
    from node.audit.trail import Actor
    from node.context import NodeContext
    from node.ingest.quarantine import QuarantineError

    ctx = NodeContext.open(settings, migrate=False, with_key=True)
    try:
        target = ctx.quarantine.export(quarantine_id, path, Actor(user=_user(user)))
    except QuarantineError as exc:
        raise click.UsageError(str(exc)) from None
    finally:
        ctx.close()
    click.echo(f"exported quarantine {quarantine_id} to {target}")


@main.group()
def check() -> None:
    """Checks on stored data."""


@check.command("series")
@node_options
@click.argument("series_uid")
@click.option("--user", help="Who asks (default: the login name).")
def check_series(settings: Settings, series_uid: str, user: str | None) -> None:
    """Check a series' geometry and completeness now; exit 1 when it is incomplete."""
    from node.audit.trail import Actor
    from node.context import NodeContext

    ctx = NodeContext.open(settings, migrate=False)
    try:
        state = ctx.series.check(series_uid, "on-demand", Actor(user=_user(user)))
    finally:
        ctx.close()
    if state is None:
        raise click.UsageError(f"series {series_uid} is not in the index")
    click.echo(f"series {series_uid}: {state.state} ({state.instances} instances)")
    for finding, severity in state.findings:
        click.echo(f"  {severity:<6} [{finding.rule}] {finding.message}")
    if state.geometry:
        g = state.geometry
        click.echo(f"  grid {g.size[0]} slices x {g.size[1]} x {g.size[2]},"
                   f" spacing {', '.join(f'{v:.4g}' for v in g.spacing)} mm"
                   f" (slice, row, column), {'regular' if g.regular else 'NOT regular'}")
    sys.exit(0 if state.state == "complete" else 1)


@check.command("instance")
@node_options
@click.argument("sop_instance_uid")
def check_instance(settings: Settings, sop_instance_uid: str) -> None:
    """The findings recorded for an instance, stored or quarantined; exit 1 when any."""
    from node.reports import instance_findings

    lines = instance_findings(settings, sop_instance_uid)
    for line in lines:
        click.echo(line)
    sys.exit(1 if len(lines) > 1 else 0)


# Commands defined beside their services, registered once node_options exists.
from node.annotations.commands import annotations, import_labels, overlays  # noqa: E402

main.add_command(annotations)
main.add_command(overlays)
main.add_command(import_labels)
