"""Settings: file, environment and flag overrides, and one-line refusals of bad values."""

from __future__ import annotations

from pathlib import Path

import pytest

from node.config import ConfigError, load
from tests.harness import lamina

REPO = Path(__file__).resolve().parents[1]


def test_shipped_default_config_loads():
    settings = load(REPO / "config" / "node.toml", environ={})
    assert settings.node.ae_title == "LAMINA" and settings.node.port == 11112
    assert settings.storage.data == Path("data")
    assert settings.index_path == Path("data/index.sqlite3")
    pacs, workstation = settings.peers
    assert (pacs.route, workstation.route) == ("clinical", "annotator")
    assert pacs.allows_address("127.0.0.1") and not pacs.allows_address("10.1.2.3")
    assert settings.deidentify.key_file == Path("keys/project.key")


def test_environment_then_flags_override_the_file():
    env = {"LAMINA__NODE__PORT": "11300", "LAMINA__NODE__AE_TITLE": "FROMENV",
           "LAMINA__PEERS__WORKSTATION__HOST": "10.0.0.0/8"}
    settings = load(REPO / "config" / "node.toml", environ=env,
                    overrides={"node.ae_title": "FROMFLAG", "storage.data": "/srv/lamina"})
    assert settings.node.port == 11300
    assert settings.node.ae_title == "FROMFLAG"
    assert settings.storage.data == Path("/srv/lamina")
    assert settings.peer_named("workstation").allows_address("10.20.30.40")


@pytest.mark.parametrize(("toml", "message"), [
    ("[node]\nport = 'eleven'", "node.port: must be an integer"),
    ("[node]\nport = 70000", "node.port: must be between"),
    ("[node]\nprot = 1", "node.prot: unknown key"),
    ("[node]\nae_title = 'A_VERY_LONG_AE_TITLE'", "node.ae_title: AE title must be"),
    ("[nodes]\nport = 1", "nodes: unknown section"),
    ("[peers.x]\nae_title = 'X'\nservices = ['store', 'delete']", "peers.x.services: unknown"),
    ("[peers.x]\nhost = '1.2.3.4'", "peers.x.ae_title: missing"),
    ("[index]\nbackend = 'postgres'", "index.backend: 'sqlite' or 'postgresql'"),
    ("[index]\nbackend = 'postgresql'", "index.dsn: backend 'postgresql' needs"),
    ("[node]\nid = 'node 1/a'", "node.id: 1-64 letters"),
    ("[storage]\nshared = '/srv/shared'", "storage.shared: several nodes share it"),
    ("[peers.x]\nae_title = 'X'\nroute = 'pacs'", "peers.x.route: must be one of"),
    ("[deidentify]\nretain_longitudinal = 'sometimes'", "deidentify.retain_longitudinal"),
    ("[http]\nprepare_metadata = 'yes'", "http.prepare_metadata: must be true or false"),
    ("[http.jwt]\nkeys = 'x'", "http.jwt.keys: unknown key"),
    ("[node\nport = 1", "not valid TOML"),
])
def test_bad_values_are_refused_naming_the_key(tmp_path, toml, message):
    path = tmp_path / "bad.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load(path, environ={})


def test_cli_refuses_a_bad_config_with_one_line_and_exit_2(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[node]\nworkers = 0\n")
    result = lamina("serve", config=path)
    assert result.exit_code == 2
    assert "node.workers: must be between 1 and 64, got 0" in result.stderr
    assert "Traceback" not in result.stderr
