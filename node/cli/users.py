"""``lamina users add | list | disable``: the reviewers who sign."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING

import click

from node.cli.options import (
    BadInput,
    node_context,
    node_options,
    passphrase_option,
    read_passphrase,
    user_name,
)
from node.config import Settings

if TYPE_CHECKING:
    from node.audit.trail import Actor
    from node.review.users import UserDirectory


def _actor():
    from node.audit.trail import Actor
    return Actor(user=user_name())


@click.group()
def users() -> None:
    """Reviewers: user ids (never reused), each with a key pair under a passphrase.

    ``lamina users unlock ID`` lifts a lockout after repeated wrong passphrases."""


@users.command("add")
@click.argument("user_id")
@click.option("--name", "printed_name", required=True,
              help="Printed name, as it appears in every signature.")
@click.option("--rater", "raters", multiple=True,
              help="A name this person annotates under (rater id, ContentCreatorName); "
                   "repeatable. Self-approval is checked against these.")
@passphrase_option
@node_options
def users_add(settings: Settings, user_id: str, printed_name: str, raters: tuple[str, ...],
              passphrase_fd: int | None) -> None:
    """Add a user with a new Ed25519 key pair; asks for the passphrase twice."""
    from node.review.users import UserRefused

    passphrase = read_passphrase(passphrase_fd, confirm=True)
    with node_context(settings, migrate=True) as ctx:
        try:
            user = ctx.review.users.add(user_id, printed_name, passphrase, _actor(),
                                        list(raters))
        except UserRefused as exc:
            raise BadInput(str(exc)) from None
    click.echo(f"user {user.user_id} added (#{user.id})")


@users.command("list")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@node_options
def users_list(settings: Settings, as_json: bool) -> None:
    """Every user ever added, disabled and locked ones included."""
    with node_context(settings) as ctx:
        rows = ctx.review.users.list()
    for u in rows:
        status = "disabled" if u.disabled_at else "locked" if u.locked_at else "active"
        if as_json:
            click.echo(json.dumps({"id": u.id, "user_id": u.user_id, "name": u.printed_name,
                                   "raters": list(u.rater_ids), "status": status,
                                   "created_at": u.created_at}))
        else:
            click.echo(f"#{u.id}  {u.user_id:<16} {status:<9} {u.printed_name}")


def _change_user(settings: Settings, user_id: str,
                 change: Callable[[UserDirectory], Callable[[str, Actor], None]],
                 done: str) -> None:
    """One audited change to a user (``change`` picks the directory's method); a refusal
    such as an unknown user is bad input, and ``done`` is the line printed on success."""
    from node.review.users import UserRefused

    with node_context(settings) as ctx:
        try:
            change(ctx.review.users)(user_id, _actor())
        except UserRefused as exc:
            raise BadInput(str(exc)) from None
    click.echo(f"user {user_id} {done}")


@users.command("disable")
@click.argument("user_id")
@node_options
def users_disable(settings: Settings, user_id: str) -> None:
    """Disable a user: they can no longer sign; their id is never given out again."""
    _change_user(settings, user_id, lambda directory: directory.disable, "disabled")


@users.command("unlock")
@click.argument("user_id")
@node_options
def users_unlock(settings: Settings, user_id: str) -> None:
    """Lift the lockout that repeated wrong passphrases put on a user (audited)."""
    _change_user(settings, user_id, lambda directory: directory.unlock_user, "unlocked")
