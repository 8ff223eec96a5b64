"""The front door: read-only commands on a wrong or damaged data folder, help texts,
config errors and the demo data, as a newcomer meets them.

Bad input is one line on stderr and exit status 2, never a traceback, and a
read-only command creates nothing: not in the folder it was pointed at, not in
the working directory, not the audit signing key.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import click
import numpy as np
import pytest
from click.testing import CliRunner
from pydicom import dcmread

from node import cli
from node.audit.trail import Actor
from node.cli import COMMANDS, main
from node.config import load
from node.context import NodeContext
from tests import harness
from tests.harness import write_config


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def lamina(cwd: Path, *args: str):
    """``lamina ARGS`` run from ``cwd`` (in-process; no LAMINA_* from the environment)."""
    previous = Path.cwd()
    os.chdir(cwd)
    try:
        return harness.lamina(*args)
    finally:
        os.chdir(previous)


def config_for(root: Path, data: Path) -> Path:
    """A node config with its data in ``data``: no project key, nothing else created."""
    return write_config(root, data=data, key=False).path


def _missing(folder: Path) -> None:
    pass


def _empty(folder: Path) -> None:
    folder.mkdir()


def _garbage(folder: Path) -> None:
    folder.mkdir()
    (folder / "index.sqlite3").write_bytes(bytes(range(256)) * 64)


def _zero_bytes(folder: Path) -> None:
    folder.mkdir()
    (folder / "index.sqlite3").write_bytes(b"")


BAD_FOLDERS = {
    "missing": (_missing, "no Lamina data in"),
    "empty": (_empty, "no Lamina data in"),
    "garbage": (_garbage, "is damaged or not an index"),
    "zero-bytes": (_zero_bytes, "is damaged or not an index"),
}


@pytest.mark.parametrize("command", [("status",), ("audit", "verify"), ("fsck",)])
@pytest.mark.parametrize("kind", sorted(BAD_FOLDERS))
def test_a_read_only_command_on_a_bad_folder_says_so_and_creates_nothing(tmp_path, kind,
                                                                          command):
    make, expected = BAD_FOLDERS[kind]
    data = tmp_path / "data"
    make(data)
    config = config_for(tmp_path, data)
    before = tree(tmp_path)
    done = lamina(tmp_path, *command, "--config", str(config))
    assert done.exit_code == 2, done.stderr
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), done.stderr
    assert expected in lines[0] and str(data) in lines[0]
    assert tree(tmp_path) == before  # no index, no blobs/, no run/, no signing key


def test_a_node_without_its_signing_key_gets_no_new_one(tmp_path):
    """A key made up now would sign what the node's own key did not: verify says so."""
    data = tmp_path / "data"
    config = config_for(tmp_path, data)
    ctx = NodeContext.open(load(config, environ={}), migrate=True)  # a real node, one event
    ctx.audit.record("node.started", Actor(user="test"), {})
    ctx.close()
    (tmp_path / "keys" / "audit-signing.pem").unlink()
    before = tree(tmp_path)
    status = CliRunner().invoke(main, ["status", "--config", str(config)])
    assert status.exit_code == 0, status.output
    verify = CliRunner().invoke(main, ["audit", "verify", "--config", str(config)])
    assert verify.exit_code == 1
    assert verify.stderr.strip() == ("audit trail BROKEN at head checkpoint cannot be checked:"
                                     f" no signing key at {tmp_path / 'keys' / 'audit-signing.pem'}")
    assert tree(tmp_path) == before


def test_a_good_node_still_reports(tmp_path):
    data = tmp_path / "data"
    config = config_for(tmp_path, data)
    NodeContext.open(load(config, environ={}), migrate=True).close()
    status = CliRunner().invoke(main, ["status", "--config", str(config)])
    assert status.exit_code == 0, status.output
    assert "instances" in status.output
    verify = CliRunner().invoke(main, ["audit", "verify", "--config", str(config)])
    assert verify.exit_code == 0 and "audit trail intact" in verify.output


def test_a_config_error_is_one_line_exit_2(tmp_path):
    config = tmp_path / "node.toml"
    config.write_text("[node]\nport = 70000\n")
    done = lamina(tmp_path, "status", "--config", str(config))
    assert done.exit_code == 2
    assert done.stderr.strip().splitlines() == [
        "Error: config error: node.port: must be between 0 and 65535, got 70000"]


def test_serve_help_says_what_serve_does():
    text = CliRunner().invoke(main, ["serve", "--help"]).output
    for words in ("node.lock", "one node per data folder", "listens on node.bind:node.port",
                  "migrates", "node.workers", "C-MOVE", "Exit 2"):
        assert words in text, words


@pytest.mark.parametrize("command", ["echo", "send", "find", "move"])
def test_scu_commands_show_no_node_only_flags(command):
    text = CliRunner().invoke(main, [command, "--help"]).output
    assert "--config" in text and "--aet" in text
    for flag in ("--port", "--data", "--ae-title", "--workers"):
        assert flag not in text, (command, flag)


def test_the_lazy_table_names_every_command_of_every_command_module():
    """``lamina`` imports a command's module only when it runs, from a table: the table
    must name each top-level command of each module, under its own name."""
    found = {}
    for info in pkgutil.iter_modules(cli.__path__):
        module = importlib.import_module(f"node.cli.{info.name}")
        commands = {attr: value for attr, value in vars(module).items()
                    if isinstance(value, click.Command)
                    and value.callback.__module__ == module.__name__}
        inside = {id(sub) for value in commands.values() if isinstance(value, click.Group)
                  for sub in value.commands.values()}
        found.update({value.name: (module.__name__, attr) for attr, value in commands.items()
                      if id(value) not in inside})
    assert found == COMMANDS
    assert main.list_commands(click.Context(main)) == sorted(COMMANDS)


def test_a_command_imports_only_its_own_module(tmp_path):
    """``lamina anonymize`` in its own process: no other command's module, no DIMSE or
    web stack, none of pydicom's optional downloads."""
    code = ("import sys\nfrom node.cli import main\n"
            "main(['anonymize', '--help'], standalone_mode=False)\n"
            "print(' '.join(sorted(m for m, v in sys.modules.items() if v is not None)))\n")
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                         text=True, check=False)
    assert run.returncode == 0, run.stderr
    assert "--jobs" in run.stdout
    modules = set(run.stdout.strip().splitlines()[-1].split())
    assert {m for m in modules if m.startswith("node.cli.")} == {"node.cli.deid",
                                                                "node.cli.options"}
    for absent in ("pynetdicom", "starlette", "uvicorn", "requests", "tqdm", "PIL",
                   "sqlite3", "highdicom", "SimpleITK"):
        assert absent not in modules, absent


def test_demo_ct_then_seg_plays_the_annotator(tmp_path):
    runner = CliRunner()
    ct = runner.invoke(main, ["demo", "ct", str(tmp_path / "study"), "--slices", "40"])
    assert ct.exit_code == 0, ct.output
    (tmp_path / "study" / "notes.txt").write_text("not DICOM")  # ignored
    out = tmp_path / "nodule-seg.dcm"
    seg = runner.invoke(main, ["demo", "seg", str(tmp_path / "study"), str(out)])
    assert seg.exit_code == 0, seg.output
    assert "'Lung nodule'" in seg.output
    ds = dcmread(out)
    assert ds.Modality == "SEG" and ds.SegmentSequence[0].SegmentLabel == "Lung nodule"
    referenced = {str(item.ReferencedSOPInstanceUID)
                  for item in ds.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    slices = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID)
              for p in (tmp_path / "study").glob("*.dcm")}
    assert referenced <= slices and 5 <= int(ds.NumberOfFrames) <= 9


def test_demo_seg_plays_a_second_reader_who_disagrees(tmp_path):
    runner = CliRunner()
    assert runner.invoke(main, ["demo", "ct", str(tmp_path / "study")]).exit_code == 0
    first, second = tmp_path / "first.dcm", tmp_path / "second.dcm"
    assert runner.invoke(main, ["demo", "seg", str(tmp_path / "study"), str(first)]).exit_code == 0
    run = runner.invoke(main, ["demo", "seg", str(tmp_path / "study"), str(second),
                               "--rater", "Reader^Two", "--shift-mm", "4.2"])
    assert run.exit_code == 0, run.output
    a, b = dcmread(first), dcmread(second)
    assert (str(a.ContentCreatorName), str(b.ContentCreatorName)) == ("Annotator^Demo",
                                                                       "Reader^Two")
    assert a.SOPInstanceUID != b.SOPInstanceUID
    # 4.2 mm at the demo's 0.7 mm pixels: the same nodule six columns further along the rows
    assert (b.pixel_array == np.roll(a.pixel_array, 6, axis=2)).all()
    assert b.pixel_array.sum() == a.pixel_array.sum() > 0


def test_demo_seg_on_something_else_is_bad_input(tmp_path):
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(main, ["demo", "seg", str(tmp_path / "empty"),
                                       str(tmp_path / "out.dcm")])
    assert result.exit_code == 2
    assert result.output.strip() == f"Error: no CT slices in {tmp_path / 'empty'}"
    assert not (tmp_path / "out.dcm").exists()
