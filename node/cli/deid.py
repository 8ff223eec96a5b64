"""``lamina keys init | anonymize | reidentify | deid report``: de-identification for people.

The commands only translate arguments into calls on the same engine the node
uses, so offline and online results are identical; ``anonymize`` reads the
same config (its ``[deidentify]`` options and ``key_file``) as the node.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import click
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from node.anonymize.anonymizer import (
    BurnedInTextRisk,
    DeidentificationError,
    Deidentifier,
    ReidEntry,
    encode,
)
from node.anonymize.keys import (
    ENV_VAR,
    ProjectKey,
    ProjectKeyError,
    create_key_file,
    default_key_path,
    load_project_key,
)
from node.anonymize.reidmap import ReidentificationMap
from node.cli.options import BadInput, config_option, node_context, node_options
from node.config import Settings
from node.logs import quiet_pydicom
from node.storage.backend import open_index


def _key(key_file: Path | None) -> ProjectKey:
    try:
        return load_project_key(key_file)
    except ProjectKeyError as exc:
        raise BadInput(str(exc)) from None


def _inputs(paths: tuple[Path, ...]) -> Iterator[Path]:
    seen: set[Path] = set()
    for path in paths:
        found = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        for file in found:
            resolved = file.resolve()
            if resolved not in seen:
                seen.add(resolved)
                yield file


def _write(out_dir: Path, data: bytes) -> None:
    """Content-addressed output name: never derived from input names or UIDs, which
    may carry PHI (folder names are often patient names)."""
    target = out_dir / f"{hashlib.sha256(data).hexdigest()}.dcm"
    if target.exists():
        return
    temporary = target.with_suffix(f".{os.getpid()}.tmp")  # workers may race on copies
    temporary.write_bytes(data)
    os.replace(temporary, target)


@click.group("keys")
def keys() -> None:
    """Manage the project key behind pseudonyms and the re-identification map."""


@keys.command("init")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Where to write the key (default: the user's config folder).")
def keys_init(out: Path | None) -> None:
    """Create a new project key file (mode 0600); never overwrites one."""
    path = (out or default_key_path()).expanduser()
    try:
        create_key_file(path)
    except ProjectKeyError as exc:
        raise BadInput(str(exc)) from None
    click.echo(f"Created project key {path} (mode 0600).")
    click.echo("Point the node at it in node.toml:")
    click.echo("  [deidentify]")
    click.echo(f'  key_file = "{path}"')
    click.echo(f'or export {ENV_VAR}="$(cat {path})".')
    click.echo("Keep it outside the data folder and back it up: without it the same "
               "pseudonyms cannot be made again and the re-identification map cannot be read.")


# The engine and output folder of this process, set by _start_worker before any file
# is handled: worker processes are forked with it, so nothing is pickled but paths,
# skip reasons and re-identification entries.
_worker: tuple[Deidentifier, Path] | None = None


def _start_worker(engine: Deidentifier, out_dir: Path) -> None:
    global _worker
    _worker = (engine, out_dir)


def _anonymize_file(path: Path) -> tuple[str | None, tuple[ReidEntry, ...]]:
    """De-identify and write one file; returns (why it was skipped, or None; entries)."""
    if _worker is None:
        raise RuntimeError("worker not started")
    engine, out_dir = _worker
    try:
        ds = dcmread(path)
    except (InvalidDicomError, OSError, ValueError, EOFError):
        return "not a readable DICOM file", ()
    try:
        result = engine.deidentify(ds)
    except BurnedInTextRisk as exc:
        return f"quarantine: {exc}", ()
    except DeidentificationError as exc:
        return str(exc), ()
    _write(out_dir, encode(result.dataset))
    return None, result.entries


@click.command("anonymize")
@config_option
@click.argument("inputs", nargs=-1, required=True,
                type=click.Path(exists=True, path_type=Path))
@click.option("--out", "out_dir", required=True,
              type=click.Path(file_okay=False, path_type=Path),
              help="Folder for the de-identified files (named by content hash).")
@click.option("--key-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help=f"Project key file (default: the config's deidentify.key_file, else ${ENV_VAR}).")
@click.option("--index", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="SQLite file to record the re-identification map in.")
@click.option("--jobs", type=click.IntRange(1, 64), default=None,
              help="Worker processes (default: the CPUs this process may use); files "
                   "are independent, the output is the same for any number.")
def anonymize(settings: Settings, inputs: tuple[Path, ...], out_dir: Path,
              key_file: Path | None, index: Path | None, jobs: int | None) -> None:
    """De-identify DICOM files and folders with the node's engine and the config's options."""
    quiet_pydicom()
    key = _key(key_file or settings.deidentify.key_file)
    engine = Deidentifier(settings.deidentify, key)
    resolved_out = out_dir.resolve()
    for path in inputs:
        if path.is_dir() and resolved_out.is_relative_to(path.resolve()):
            raise BadInput("--out must not be inside an input folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    files = list(_inputs(inputs))
    rmap = ReidentificationMap(key)
    written, skipped = 0, Counter()
    _start_worker(engine, out_dir)
    with ExitStack() as stack:
        tx = None
        if index is not None:
            # The node's own schema, so the file can become (or join) a node's index later;
            # one transaction for the whole run, as before: the map is written at the end.
            store = open_index("sqlite", index, 10_000)
            stack.callback(store.close)
            store.migrate()
            tx = stack.enter_context(store.transaction())
        if jobs is None:
            jobs = min(len(os.sched_getaffinity(0)), max(len(files), 1))
        if jobs == 1:
            results = map(_anonymize_file, files)
        else:
            pool = multiprocessing.get_context("fork").Pool(jobs)
            stack.callback(pool.join)
            stack.callback(pool.close)
            results = pool.imap(_anonymize_file, files, chunksize=8)
        for reason, entries in results:
            if reason is not None:
                skipped[reason] += 1
                continue
            if tx is not None:
                rmap.record(tx, entries)
            written += 1
    click.echo(f"De-identified {written} file(s) into {out_dir}.")
    if index is None and written:
        click.echo("No --index given: the re-identification map was not recorded.", err=True)
    for reason, count in sorted(skipped.items()):
        click.echo(f"Skipped {count}: {reason}", err=True)
    if skipped:
        raise SystemExit(1)


@click.command()
@node_options
@click.argument("target", metavar="UID_OR_FILE")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write a re-identified object (needed for a file).")
def reidentify(settings: Settings, target: str, out: Path | None) -> None:
    """Map a pseudonymous UID, or a whole object, back to the originals (audited)."""
    from node.anonymize.reidmap import ReidentificationError
    from node.reidentify import reidentify as run

    if Path(target).is_file() and (out is None or out.exists()):
        raise BadInput("--out NEW_FILE is required to re-identify a file")
    if not Path(target).is_file() and not target.replace(".", "").isdigit():
        raise BadInput(f"{target!r} is neither a file nor a UID")
    with node_context(settings, with_key=True) as ctx:  # it writes an audit event
        try:
            result = run(ctx, target)
        except ReidentificationError as exc:
            raise BadInput(str(exc)) from None
    if isinstance(result, Dataset):
        result.save_as(out, enforce_file_format=True)
        click.echo(f"re-identified object written to {out}")
    else:
        click.echo(result)


@click.group()
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

    with node_context(settings) as ctx, ctx.index.reader() as r:
        rows = r.evidence.for_study(study_uid)
    if not rows:
        raise BadInput(f"no de-identified instances stored for study {study_uid}")
    if as_json:
        click.echo(json.dumps(study_report_json(rows, study_uid=study_uid), indent=2))
    else:
        click.echo(study_report(rows, study_uid=study_uid))
