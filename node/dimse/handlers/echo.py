"""C-ECHO: Verification answers success to any admitted peer."""

from __future__ import annotations

from pynetdicom import evt

from node import status


def handle_echo(event: evt.Event) -> int:
    return status.SUCCESS.code
