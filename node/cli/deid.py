"""``lamina keys init | anonymize | reidentify | deid report``: de-identification for people.

The commands only translate arguments into calls on the same engine the node
uses, so offline and online results are identical; ``anonymize`` reads the
same config (its ``[deidentify]`` options and ``key_file``) as the node.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import ExitStack
from pathlib import Path

import click
from pydicom.dataset import Dataset

from node.anonymize.anonymizer import Deidentifier
from node.anonymize.bulk import BulkAnonymizer, Outcome
from node.anonymize.keys import (
    ENV_VAR,
    ProjectKey,
    ProjectKeyError,
    create_key_file,
    default_key_path,
    load_project_key,
)
from node.cli.options import BadInput, config_option, node_context, node_options
from node.config import Settings
from node.logs import quiet_pydicom


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


# The runner of this process, set before any file is handled: worker processes are
# forked with it (engine, output folder), so nothing is pickled but paths and outcomes.
_runner: BulkAnonymizer | None = None


def _anonymize_file(path: Path) -> Outcome:
    if _runner is None:
        raise RuntimeError("runner not set")
    return _runner.run(path)


def _outcomes(files: list[Path], jobs: int, stack: ExitStack) -> Iterable[Outcome]:
    """Each file's outcome, in the order of ``files``: in this process, or from ``jobs``
    forked workers (fork, not spawn: they start with everything imported and the engine
    built, and no start-up of their own)."""
    if jobs == 1:
        return map(_anonymize_file, files)
    import multiprocessing  # only a run with workers needs it

    pool = multiprocessing.get_context("fork").Pool(jobs)
    stack.callback(pool.join)
    stack.callback(pool.close)
    # Chunks of a few dozen files: little messaging per file, and still several chunks
    # per worker so that one slow chunk does not leave the other workers idle at the end.
    chunk = max(1, min(64, len(files) // (jobs * 4)))
    return pool.imap(_anonymize_file, files, chunksize=chunk)


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
    global _runner
    quiet_pydicom()
    key = _key(key_file or settings.deidentify.key_file)
    engine = Deidentifier(settings.deidentify, key)
    resolved_out = out_dir.resolve()
    for path in inputs:
        if path.is_dir() and resolved_out.is_relative_to(path.resolve()):
            raise BadInput("--out must not be inside an input folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    files = list(_inputs(inputs))
    written, skipped = 0, Counter()
    _runner = BulkAnonymizer(engine, out_dir, with_entries=index is not None)
    with ExitStack() as stack:
        tx = rmap = None
        if index is not None:
            # Imported here: only a run that records the map needs the index backend.
            from node.anonymize.reidmap import ReidentificationMap
            from node.storage.backend import open_index

            # The node's own schema, so the file can become (or join) a node's index later;
            # one transaction for the whole run, as before: the map is written at the end.
            store = open_index("sqlite", index, 10_000)
            stack.callback(store.close)
            store.migrate()
            tx = stack.enter_context(store.transaction())
            rmap = ReidentificationMap(key)
        if jobs is None:
            jobs = min(len(os.sched_getaffinity(0)), max(len(files), 1))
        for outcome in _outcomes(files, min(jobs, max(len(files), 1)), stack):
            if outcome.skipped is not None:
                skipped[outcome.skipped] += 1
                continue
            if rmap is not None:
                rmap.record(tx, outcome.entries)
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
