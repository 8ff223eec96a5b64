"""The ``lamina`` command: one module per group of commands, registered here.

Every command module imports only :mod:`node.cli.options` from this package,
so the command modules never import each other or this one.

A command's module is imported only when that command runs (or when the help
lists every command): importing all of them costs more than half a second of
interpreter start-up, most of it libraries the command at hand never uses, and
for a short ``lamina anonymize`` or ``lamina echo`` that is most of the run.
"""

from __future__ import annotations

import sys
from importlib import import_module

import click

# Command name -> (module, attribute). Kept by hand because the point is not to import
# the modules to find their commands; tests/test_cli_front_door.py checks it.
COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("node.cli.serve", "serve"),
    "echo": ("node.cli.scu", "echo"),
    "send": ("node.cli.scu", "send"),
    "find": ("node.cli.scu", "find"),
    "move": ("node.cli.scu", "move"),
    "status": ("node.cli.status", "status"),
    "audit": ("node.cli.audit", "audit"),
    "fsck": ("node.cli.status", "fsck"),
    "check": ("node.cli.status", "check"),
    "demo": ("node.cli.demo", "demo"),
    "keys": ("node.cli.deid", "keys"),
    "anonymize": ("node.cli.deid", "anonymize"),
    "reidentify": ("node.cli.deid", "reidentify"),
    "deid": ("node.cli.deid", "deid"),
    "quarantine": ("node.cli.quarantine", "quarantine"),
    "annotations": ("node.cli.annotations", "annotations"),
    "overlays": ("node.cli.annotations", "overlays"),
    "import-labels": ("node.cli.annotations", "import_labels"),
    "review": ("node.cli.review", "review"),
    "users": ("node.cli.users", "users"),
    "queue": ("node.cli.queue", "queue"),
    "export": ("node.cli.export", "export"),
    "adjudicate": ("node.cli.adjudicate", "adjudicate"),
    "labels": ("node.cli.labels", "labels"),
    "qa": ("node.cli.qa", "qa"),
    "identity": ("node.cli.identity", "identity"),
    "migrate": ("node.cli.migrate", "migrate"),
}

# Libraries pydicom imports when it is first imported, if they are installed, that a
# command never uses: requests and tqdm (pydicom's test-data download) and Pillow (its
# JPEG codecs; the command never decodes pixels). Marked as absent for that command's
# process, which pydicom handles as "not installed" (a third of its import time). Only
# when pydicom is not imported yet: never in a process where it already runs.
UNUSED_BY: dict[str, tuple[str, ...]] = {
    "anonymize": ("requests", "tqdm", "PIL"),
}


class LazyGroup(click.Group):
    """A group that imports a command's module the first time the command is asked for."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(COMMANDS) | set(self.commands))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands and cmd_name in COMMANDS:
            module, attribute = COMMANDS[cmd_name]
            if "pydicom" not in sys.modules:
                for name in UNUSED_BY.get(cmd_name, ()):
                    sys.modules.setdefault(name, None)  # type: ignore[assignment]
            self.add_command(getattr(import_module(module), attribute), cmd_name)
        return self.commands.get(cmd_name)


@click.group(cls=LazyGroup)
@click.version_option(package_name="lamina")
def main() -> None:
    """Lamina: a DICOM node for annotated imaging datasets."""
