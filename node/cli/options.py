"""What every ``lamina`` command shares: the settings, the node's context, and bad input.

Exit codes follow the project's rule: 0 done, 1 the check or transfer found
problems, 2 bad input (a bad config, an unknown peer, a missing file, a data
folder that holds no node), always with one line saying which.
"""

from __future__ import annotations

import functools
import getpass
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from node import config as config_mod
from node.config import ConfigError, Settings

DEFAULT_CONFIG = Path("config/node.toml")


class BadInput(click.ClickException):
    """A problem the user can fix: one line on stderr, exit status 2."""

    exit_code = 2


def load_settings(config: str | None, overrides: dict[str, Any] | None = None) -> Settings:
    """Config file (flag, $LAMINA_CONFIG, ./config/node.toml, or defaults) + env + flags."""
    path = config or os.environ.get("LAMINA_CONFIG")
    if path is None and DEFAULT_CONFIG.is_file():
        path = str(DEFAULT_CONFIG)
    try:
        return config_mod.load(Path(path) if path else None, overrides=overrides or {})
    except ConfigError as exc:
        raise BadInput(f"config error: {exc}") from None


def config_option(func: Callable) -> Callable:
    """``--config`` alone: for commands that act on other nodes or files, not on this node's
    port or data (echo, send, find, move, anonymize)."""

    @click.option("--config", "config", type=click.Path(dir_okay=False),
                  help="Config file (default: $LAMINA_CONFIG or ./config/node.toml).")
    @functools.wraps(func)
    def wrapper(config: str | None, **kwargs: Any):
        return func(load_settings(config), **kwargs)

    return wrapper


def node_options(func: Callable) -> Callable:
    """--config/--port/--ae-title/--data on every command that acts on this node."""

    @click.option("--config", "config", type=click.Path(dir_okay=False),
                  help="Config file (default: $LAMINA_CONFIG or ./config/node.toml).")
    @click.option("--port", type=int, help="Override node.port.")
    @click.option("--ae-title", help="Override node.ae_title.")
    @click.option("--data", type=click.Path(file_okay=False), help="Override storage.data.")
    @functools.wraps(func)
    def wrapper(config, port, ae_title, data, **kwargs: Any):
        overrides = {"node.port": port, "node.ae_title": ae_title, "storage.data": data}
        return func(load_settings(config, overrides), **kwargs)

    return wrapper


@contextmanager
def node_context(settings: Settings, *, with_key: bool = False,
                 must_exist: bool = True, migrate: bool = False) -> Iterator:
    """The node's context for one command, closed afterwards.

    ``must_exist``: the command reads or changes a node's data, so a data folder
    without an index is bad input (said in one line), never silently created.
    ``with_key``: load the project key (to ingest, seal or unseal).
    ``migrate``: bring the schema up to date first (commands that write new tables).
    """
    from node.anonymize.keys import ProjectKeyError
    from node.checks.protocol import ProtocolError
    from node.context import NodeContext
    from node.storage.interface import IndexUnavailable

    try:
        ctx = NodeContext.open(settings, migrate=migrate, with_key=with_key,
                               must_exist=must_exist)
    except IndexUnavailable as exc:
        raise index_problem(settings, exc) from None
    except (ProtocolError, ProjectKeyError, ConfigError) as exc:
        raise BadInput(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None
    try:
        yield ctx
    except IndexUnavailable as exc:  # e.g. a damaged page met while reading
        raise index_problem(settings, exc) from None
    finally:
        ctx.close()


def index_problem(settings: Settings, exc: Exception) -> BadInput:
    """An unusable index as one line that names it (SQLite's own words do not)."""
    message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if str(settings.index_path) not in message and str(settings.storage.data) not in message:
        message = f"index {settings.index_path}: {message}"
    return BadInput(message)


def user_name(user: str | None = None) -> str:
    """Who runs the command, for the audit trail (a login name, never a patient)."""
    if user:
        return user
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid:{os.getuid()}"


def passphrase_option(func: Callable) -> Callable:
    """``--passphrase-fd N``: read the passphrase from file descriptor N (one line) instead of
    asking for it; a passphrase is never taken on the command line."""
    return click.option("--passphrase-fd", "passphrase_fd", type=int, default=None,
                        help="Read the passphrase from this file descriptor (scripts).")(func)


def read_passphrase(fd: int | None, *, confirm: bool = False) -> str:
    """The passphrase: the first line of ``fd``, or asked for without echo."""
    if fd is None:
        return click.prompt("Passphrase", hide_input=True, confirmation_prompt=confirm)
    data = b""
    try:
        while not data.endswith(b"\n"):
            chunk = os.read(fd, 1)  # byte by byte: nothing after the line is consumed
            if not chunk:
                break
            data += chunk
    except OSError as exc:
        raise BadInput(f"--passphrase-fd {fd}: {exc.strerror}") from None
    return data.decode("utf-8", "replace").rstrip("\r\n")
