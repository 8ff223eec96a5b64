"""Forwarding rules: on approval of an annotation of class C (or any) → a destination peer.

Read from ``[forward]`` and ``[forward.rules.NAME]`` in the config (see
config/node.toml). A rule sends the annotation's SEG and, when
``source_series`` is on, every stored instance of the series it annotates;
either as stored (pseudonymous) or ``reidentify``-d onto the clinical
originals with the encrypted map. Checked when the config is read: a rule
naming an unknown peer, or a key the table does not know, is refused with one
line naming it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

ANY_CLASS = "*"
_RULE_KEYS = {"class", "destination", "source_series", "reidentify"}
_KEYS = {"rules", "max_attempts", "backoff_seconds", "backoff_max_seconds", "poll_seconds"}


class ForwardConfigError(ValueError):
    """A forwarding setting is wrong; the message names the key."""


@dataclass(frozen=True)
class ForwardRule:
    """One ``[forward.rules.NAME]``."""

    name: str
    destination: str  # a configured peer's name
    label_class: str = ANY_CLASS  # a protocol class key, or "*" for any annotation
    source_series: bool = False
    reidentify: bool = False

    @property
    def mode(self) -> str:
        return "reidentified" if self.reidentify else "stored"

    def applies_to(self, classes: Iterable[str]) -> bool:
        """Does an approved annotation with structures of these classes match?"""
        return self.label_class == ANY_CLASS or self.label_class in set(classes)


@dataclass(frozen=True)
class ForwardSettings:
    rules: tuple[ForwardRule, ...] = ()
    #: Attempts before a row is dead-lettered (its last error kept).
    max_attempts: int = 8
    #: First retry delay; doubled per attempt up to ``backoff_max_seconds``, with jitter.
    backoff_seconds: float = 5.0
    backoff_max_seconds: float = 900.0
    #: How often the worker looks for rows queued by other processes (workers, the CLI).
    poll_seconds: float = 2.0

    @classmethod
    def from_mapping(cls, raw: Any) -> ForwardSettings:
        """``[forward]`` as TOML gives it; raises :class:`ForwardConfigError`."""
        if not isinstance(raw, Mapping):
            raise ForwardConfigError("forward: must be a section")
        for key in raw:
            if key not in _KEYS:
                raise ForwardConfigError(f"forward.{key}: unknown key")
        d = cls()
        max_attempts = _number(raw, "max_attempts", d.max_attempts, 1, 1000, integer=True)
        backoff = _number(raw, "backoff_seconds", d.backoff_seconds, 0, 86400)
        backoff_max = _number(raw, "backoff_max_seconds", d.backoff_max_seconds, 0, 7 * 86400)
        poll = _number(raw, "poll_seconds", d.poll_seconds, 0.01, 3600)
        rules_raw = raw.get("rules", {})
        if not isinstance(rules_raw, Mapping):
            raise ForwardConfigError("forward.rules: must be [forward.rules.NAME] tables")
        rules = tuple(_rule(name, value) for name, value in rules_raw.items())
        return cls(rules, int(max_attempts), backoff, backoff_max, poll)

    def check(self, peers: Mapping[str, bool], classes: Iterable[str] | None) -> None:
        """Each rule names a peer we can connect to (``peers``: name → has a single host)
        and, when the protocol declares classes, one of them."""
        known = set(classes) if classes is not None else None
        for rule in self.rules:
            where = f"forward.rules.{rule.name}"
            if rule.destination not in peers:
                raise ForwardConfigError(f"{where}.destination: {rule.destination!r} is not a"
                                         " configured peer")
            if not peers[rule.destination]:
                raise ForwardConfigError(f"{where}.destination: peer {rule.destination!r} has"
                                         " no single host to connect to")
            if known is not None and rule.label_class != ANY_CLASS and \
                    rule.label_class not in known:
                raise ForwardConfigError(
                    f"{where}.class: {rule.label_class!r} is not a class of the protocol"
                    f" (known: {', '.join(sorted(known)) or 'none'}, or \"*\")")


def _rule(name: str, raw: Any) -> ForwardRule:
    where = f"forward.rules.{name}"
    if not isinstance(raw, Mapping):
        raise ForwardConfigError(f"{where}: must be a table")
    for key in raw:
        if key not in _RULE_KEYS:
            raise ForwardConfigError(f"{where}.{key}: unknown key")
    destination = raw.get("destination")
    if not isinstance(destination, str) or not destination:
        raise ForwardConfigError(f"{where}.destination: must name a configured peer")
    label_class = raw.get("class", ANY_CLASS)
    if not isinstance(label_class, str) or not label_class:
        raise ForwardConfigError(f"{where}.class: must be a protocol class key or \"*\"")
    flags = {}
    for key in ("source_series", "reidentify"):
        value = raw.get(key, False)
        if not isinstance(value, bool):
            raise ForwardConfigError(f"{where}.{key}: must be true or false, got {value!r}")
        flags[key] = value
    return ForwardRule(name, destination, label_class, **flags)


def _number(raw: Mapping[str, Any], key: str, default: float, lo: float, hi: float, *,
            integer: bool = False) -> float:
    value = raw.get(key, default)
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        raise ForwardConfigError(f"forward.{key}: must be {kind}, got {value!r}")
    if not lo <= value <= hi:
        raise ForwardConfigError(f"forward.{key}: must be between {lo} and {hi}, got {value}")
    return float(value)
