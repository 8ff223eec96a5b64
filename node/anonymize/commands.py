"""Command-line front end of de-identification: ``keys init``, ``anonymize`` and
``reidentify``, registered by the node on the ``lamina`` group (and runnable alone as
``python -m node.anonymize.commands``). The commands only translate arguments into
calls on the same engine the node uses, so offline and online results are identical.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import tomllib
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
from node.anonymize.reidmap import (
    ReidentificationMap,
    reidentify_dataset,
    reidentify_uid,
)
from node.anonymize.settings import DeidConfigError, DeidSettings
from node.logs import quiet_pydicom
from node.storage.backend import open_index
from node.storage.interface import Reader


class BadInput(click.ClickException):
    """A usage problem the user can fix: reported by click, exit status 2."""

    exit_code = 2


def _key(key_file: Path | None) -> ProjectKey:
    try:
        return load_project_key(key_file)
    except ProjectKeyError as exc:
        raise BadInput(str(exc)) from None


def _settings(config_file: Path | None) -> DeidSettings:
    if config_file is None:
        return DeidSettings()
    try:
        table = tomllib.loads(config_file.read_text(encoding="utf-8")).get("deidentify", {})
        return DeidSettings.from_mapping(table)
    except (tomllib.TOMLDecodeError, DeidConfigError) as exc:
        raise BadInput(f"{config_file}: {exc}") from None


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
@click.argument("inputs", nargs=-1, required=True,
                type=click.Path(exists=True, path_type=Path))
@click.option("--out", "out_dir", required=True,
              type=click.Path(file_okay=False, path_type=Path),
              help="Folder for the de-identified files (named by content hash).")
@click.option("--key-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help=f"Project key file (default: ${ENV_VAR}).")
@click.option("--config", "config_file", default=None,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="TOML file whose [deidentify] table sets the options.")
@click.option("--index", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="SQLite file to record the re-identification map in.")
@click.option("--jobs", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Worker processes; files are independent, output is the same.")
def anonymize(inputs: tuple[Path, ...], out_dir: Path, key_file: Path | None,
              config_file: Path | None, index: Path | None, jobs: int) -> None:
    """De-identify DICOM files and folders with the node's engine."""
    quiet_pydicom()
    key = _key(key_file)
    engine = Deidentifier(_settings(config_file), key)
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


def reidentify_target(target: str, *, key: ProjectKey, reader: Reader) -> str | Dataset:
    """Map a pseudonymous UID back to the original UID (returns ``str``), or a Part
    10 file back onto the original identifiers (returns the ``Dataset``).

    This is the call the node wraps in its audited re-identification service: the
    service records who asked for which target before handing the result on. Raises
    ``ReidentificationError`` for an unknown UID or a map written under another key."""
    rmap = ReidentificationMap(key)
    path = Path(target)
    if path.is_file():
        return reidentify_dataset(reader, rmap, dcmread(path))
    return reidentify_uid(reader, rmap, target)


@click.group()
def cli() -> None:
    """De-identification commands (the node registers them on ``lamina``)."""


cli.add_command(keys)
cli.add_command(anonymize)

if __name__ == "__main__":
    cli()
