"""Forwarding rules as the config gives them: what matches, and one line per mistake."""

from __future__ import annotations

import pytest

from node.config import ConfigError, load
from node.forward.rules import ForwardRule, ForwardSettings
from tests.harness import peer, write_config

PEERS = {"pacs": peer("PACS", port=104), "anywhere": peer("ANY", host="*")}


def settings(tmp_path, forward: dict):
    return load(write_config(tmp_path, peers=PEERS, forward=forward, key=False).path,
                environ={})


def test_rules_are_read_with_their_defaults(tmp_path) -> None:
    got = settings(tmp_path, {"max_attempts": 4, "rules": {
        "all": {"destination": "pacs"},
        "nodules": {"class": "nodule", "destination": "pacs", "source_series": True,
                    "reidentify": True}}}).forward
    assert got.max_attempts == 4 and got.backoff_seconds == ForwardSettings.backoff_seconds
    assert got.rules == (ForwardRule("all", "pacs"),
                         ForwardRule("nodules", "pacs", "nodule", True, True))
    assert [r.mode for r in got.rules] == ["stored", "reidentified"]


def test_a_rule_matches_its_class_or_any() -> None:
    assert ForwardRule("r", "pacs").applies_to([])
    assert ForwardRule("r", "pacs", "nodule").applies_to({"bone", "nodule"})
    assert not ForwardRule("r", "pacs", "nodule").applies_to({"bone"})


@pytest.mark.parametrize("forward,message", [
    ({"retries": 3}, "forward.retries: unknown key"),
    ({"max_attempts": 0}, "forward.max_attempts: must be between 1 and 1000, got 0"),
    ({"max_attempts": 2.5}, "forward.max_attempts: must be an integer, got 2.5"),
    ({"backoff_seconds": "soon"}, "forward.backoff_seconds: must be a number"),
    ({"rules": {"r": {"destination": "nowhere"}}},
     "forward.rules.r.destination: 'nowhere' is not a configured peer"),
    ({"rules": {"r": {"destination": "anywhere"}}},
     "forward.rules.r.destination: peer 'anywhere' has no single host to connect to"),
    ({"rules": {"r": {"class": "nodule"}}}, "forward.rules.r.destination: must name"),
    ({"rules": {"r": {"destination": "pacs", "reidentify": "yes"}}},
     "forward.rules.r.reidentify: must be true or false, got 'yes'"),
    ({"rules": {"r": {"destination": "pacs", "to": "x"}}}, "forward.rules.r.to: unknown key"),
])
def test_a_mistake_is_one_line_naming_the_key(tmp_path, forward, message) -> None:
    with pytest.raises(ConfigError) as caught:
        settings(tmp_path, forward)
    assert message in str(caught.value) and "\n" not in str(caught.value)
