"""``lamina review approve | reject | verify``: electronic signatures on annotations."""

from __future__ import annotations

import sys

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


@click.group()
def review() -> None:
    """Approve or reject annotations with a signature, and verify the signatures."""


def _decide(settings: Settings, decision: str, annotation_id: int, user_id: str, meaning: str,
            reason: str, passphrase_fd: int | None) -> None:
    from node.audit.trail import Actor
    from node.review.service import ReviewRefused

    passphrase = read_passphrase(passphrase_fd)
    with node_context(settings) as ctx:
        try:
            signed = ctx.review.decide(annotation_id, decision, user_id, passphrase, meaning,
                                       Actor(user=user_name()), reason)
        except ReviewRefused as exc:
            raise BadInput(str(exc)) from None
    click.echo(f"annotation {signed.annotation_id} {signed.decision} by {user_id}"
               f" (signature {signed.signature_id}, manifest sha256 {signed.manifest_sha256})")


def _options(func):
    func = click.option("--meaning", required=True,
                        help="What the signature means, e.g. 'reviewed and approved'.")(func)
    func = click.option("--as", "user_id", required=True, help="The signing user's id.")(func)
    func = click.argument("annotation_id", type=int)(func)
    return passphrase_option(node_options(func))


@review.command("approve")
@click.option("--reason", default="", help="An optional note kept with the signature.")
@_options
def review_approve(settings: Settings, annotation_id: int, user_id: str, meaning: str,
                   reason: str, passphrase_fd: int | None) -> None:
    """Approve a checked (or adjudicated) annotation; asks for the passphrase."""
    _decide(settings, "approve", annotation_id, user_id, meaning, reason, passphrase_fd)


@review.command("reject")
@click.option("--reason", required=True, help="Why it is rejected (kept; nothing is deleted).")
@_options
def review_reject(settings: Settings, annotation_id: int, user_id: str, meaning: str,
                  reason: str, passphrase_fd: int | None) -> None:
    """Reject a checked (or adjudicated) annotation with a reason; asks for the passphrase."""
    _decide(settings, "reject", annotation_id, user_id, meaning, reason, passphrase_fd)


@review.command("show")
@click.argument("annotation_id", type=int)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per signature.")
@node_options
def review_show(settings: Settings, annotation_id: int, as_json: bool) -> None:
    """The signatures of an annotation as signed (printed name, UTC time, meaning), each
    verified."""
    import json

    from node.review.service import ReviewRefused

    with node_context(settings) as ctx:
        try:
            checks = {c.signature_id: c for c in ctx.review.verify(annotation_id)}
        except ReviewRefused as exc:
            raise BadInput(str(exc)) from None
        with ctx.index.reader() as r:
            rows = r.signatures.list(annotation_id)
    if not rows:
        click.echo(f"annotation {annotation_id}: no signatures")
    for row in rows:
        manifest = json.loads(row.manifest)
        verdict = "valid" if checks[row.id].ok else "INVALID: " + "; ".join(checks[row.id].problems)
        if as_json:
            click.echo(json.dumps({"signature_id": row.id, "manifest": manifest,
                                   "valid": checks[row.id].ok}))
            continue
        click.echo(f"signature {row.id}: {manifest['decision']} by {manifest['printed_name']}"
                   f" ({manifest['user_id']}) at {manifest['signed_at']}: "
                   f"\"{manifest['meaning']}\"" + (f", reason: {manifest['reason']}"
                                                   if manifest["reason"] else "")
                   + f" [{verdict}]")


@review.command("verify")
@click.argument("annotation_id", type=int, required=False)
@node_options
def review_verify(settings: Settings, annotation_id: int | None) -> None:
    """Check every signature (of one annotation): exit 1 naming each one that fails."""
    from node.review.service import ReviewRefused

    with node_context(settings) as ctx:
        try:
            checks = ctx.review.verify(annotation_id)
        except ReviewRefused as exc:
            raise BadInput(str(exc)) from None
    bad = [c for c in checks if not c.ok]
    for c in bad:
        click.echo(f"annotation {c.annotation_id} signature {c.signature_id} ({c.decision} by"
                   f" {c.user_id}) FAILS: {'; '.join(c.problems)}", err=True)
    if bad:
        sys.exit(1)
    click.echo(f"signatures valid: {len(checks)}")
