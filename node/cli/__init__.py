"""The ``lamina`` command: one module per group of commands, registered here.

Every command module imports only :mod:`node.cli.options` from this package,
so the command modules never import each other or this one.
"""

from __future__ import annotations

import click

from node.cli.adjudicate import adjudicate
from node.cli.annotations import annotations, import_labels, overlays
from node.cli.audit import audit
from node.cli.deid import anonymize, deid, keys, reidentify
from node.cli.demo import demo
from node.cli.export import export
from node.cli.identity import identity
from node.cli.labels import labels
from node.cli.migrate import migrate
from node.cli.qa import qa
from node.cli.quarantine import quarantine
from node.cli.queue import queue
from node.cli.review import review
from node.cli.scu import echo, find, move, send
from node.cli.serve import serve
from node.cli.status import check, fsck, status
from node.cli.users import users


@click.group()
@click.version_option(package_name="lamina")
def main() -> None:
    """Lamina: a DICOM node for annotated imaging datasets."""


for command in (serve, echo, send, find, move, status, audit, fsck, check, demo, keys,
                anonymize, reidentify, deid, quarantine, annotations, overlays, import_labels,
                review, users, queue, export, adjudicate, labels, qa, identity, migrate):
    main.add_command(command)
