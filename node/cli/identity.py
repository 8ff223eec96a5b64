"""``lamina identity hash``: the config value for a DICOM user's passcode (never the passcode)."""

from __future__ import annotations

import click


@click.group()
def identity() -> None:
    """DICOM User Identity Negotiation: users in [identity] users (see config/node.toml)."""


@identity.command("hash")
@click.option("--passcode", prompt=True, hide_input=True, confirmation_prompt=True,
              help="The passcode (prompted for when not given).")
def hash_command(passcode: str) -> None:
    """Print the scrypt hash to put in [identity] users.NAME.passcode."""
    from node.identity import hash_passcode

    click.echo(hash_passcode(passcode))
