"""The container's configuration, without Docker: config/docker.toml and the Dockerfile.

No Docker engine here, so the image is never built. What can be checked is: the
Dockerfile runs ``lamina`` under ``tini`` with config/docker.toml, its
HEALTHCHECK command (run exactly as written, through ``sh -c``) C-ECHOes a node
started with that config, and that config's workstation may C-MOVE to itself.
``host.docker.internal`` (what ``docker run --add-host=host.docker.internal:host-gateway``
maps to the Docker host) is overridden to 127.0.0.1 with ``LAMINA__PEERS__...``,
the container paths (/data, /keys, /opt/lamina) to temporary ones.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from node.anonymize.keys import create_key_file
from node.config import load
from node.phantom import Phantom
from node.policy import admit
from tests.harness import REPO, StorageSCP, free_port

DOCKER_CONFIG = REPO / "config" / "docker.toml"
#: Where the image has the repository's files (WORKDIR + COPY in the Dockerfile).
IMAGE_ROOT = "/opt/lamina"
HOSTS_ON_LOOPBACK = {"LAMINA__PEERS__PACS__HOST": "127.0.0.1",
                     "LAMINA__PEERS__WORKSTATION__HOST": "127.0.0.1"}


def instructions() -> list[tuple[str, str]]:
    """The Dockerfile as (INSTRUCTION, arguments), continuation lines joined."""
    found, pending = [], ""
    for line in (REPO / "Dockerfile").read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        text = (pending + line).strip()
        pending = ""
        keyword, _, rest = text.partition(" ")
        found.append((keyword.upper(), rest.strip()))
    return found


def instruction(name: str) -> list[str]:
    return [rest for keyword, rest in instructions() if keyword == name]


def healthcheck_command() -> str:
    (check,) = instruction("HEALTHCHECK")
    _options, _, command = check.partition(" CMD ")
    return command.strip()


def test_the_image_runs_lamina_under_tini_with_the_docker_config():
    assert json.loads(instruction("ENTRYPOINT")[-1]) == ["tini", "--", "lamina"]
    assert json.loads(instruction("CMD")[-1]) == ["serve"]
    assert any("apt-get install" in run and " tini" in run for run in instruction("RUN"))
    assert instruction("WORKDIR") == [IMAGE_ROOT]
    assert "config ./config" in instruction("COPY")
    (env,) = instruction("ENV")
    assert env == f"LAMINA_CONFIG={IMAGE_ROOT}/config/docker.toml"
    assert "lamina echo" in healthcheck_command() and "--aet HEALTHCHECK" in healthcheck_command()


def test_the_docker_config_reaches_the_host_and_keeps_data_and_keys_on_volumes():
    raw = tomllib.loads(DOCKER_CONFIG.read_text())
    assert raw["peers"]["pacs"]["host"] == "host.docker.internal"
    assert raw["peers"]["workstation"]["host"] == "host.docker.internal"
    protocol = Path(raw["annotations"]["protocol"])  # the image's copy of config/
    assert (REPO / protocol.relative_to(IMAGE_ROOT)).is_file()
    settings = load(DOCKER_CONFIG, environ={
        **HOSTS_ON_LOOPBACK,
        "LAMINA__ANNOTATIONS__PROTOCOL": str(REPO / protocol.relative_to(IMAGE_ROOT))})
    assert settings.storage.data == Path("/data")
    assert settings.audit.signing_key.parent == Path("/keys")
    assert settings.deidentify.key_file == Path("/keys/project.key")
    workstation = settings.peer_named("workstation")
    assert workstation.move_destinations == ("workstation",)  # a C-MOVE to itself
    assert workstation.port == 11113
    healthcheck = admit(settings, "HEALTHCHECK", "LAMINA", "127.0.0.1").peer
    assert healthcheck is not None and healthcheck.services == frozenset()
    assert admit(settings, "HEALTHCHECK", "LAMINA", "10.0.0.1").peer is None


@pytest.fixture
def container(tmp_path) -> Iterator[dict[str, str]]:
    """``lamina serve`` as the image runs it ($LAMINA_CONFIG, no flags); its environment."""
    keys = tmp_path / "keys"
    create_key_file(keys / "project.key")
    bin_dir = tmp_path / "bin"  # `lamina` on PATH, as in the image
    bin_dir.mkdir()
    (bin_dir / "lamina").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m node "$@"\n')
    (bin_dir / "lamina").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAMINA")}
    env.update({
        "PATH": f"{bin_dir}{os.pathsep}{env.get('PATH', '')}",
        "PYTHONPATH": str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
        "LAMINA_CONFIG": str(DOCKER_CONFIG),
        **HOSTS_ON_LOOPBACK,
        "LAMINA__NODE__BIND": "127.0.0.1",
        "LAMINA__NODE__PORT": str(free_port()),
        "LAMINA__PEERS__WORKSTATION__PORT": str(free_port()),
        "LAMINA__STORAGE__DATA": str(tmp_path / "data"),
        "LAMINA__AUDIT__SIGNING_KEY": str(keys / "audit-signing.pem"),
        "LAMINA__DEIDENTIFY__KEY_FILE": str(keys / "project.key"),
        "LAMINA__ANNOTATIONS__PROTOCOL": str(REPO / "config" / "protocol.toml"),
    })
    log_path = tmp_path / "node.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "node", "serve"], stdout=log,
                                stderr=log, env=env, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 60
        workers = load(DOCKER_CONFIG, environ=env).node.workers
        while log_path.read_text().count('"msg": "listening"') < workers:
            assert proc.poll() is None, log_path.read_text()[-2000:]
            assert time.monotonic() < deadline, log_path.read_text()[-2000:]
            time.sleep(0.2)
        yield env
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=120)


def test_the_healthcheck_command_echoes_the_node(container):
    done = run(container, "sh", "-c", healthcheck_command())
    assert done.returncode == 0, done.stderr
    assert "status 0x0000" in done.stdout
    # The same command against a port where nothing listens: unhealthy (1, never 2).
    elsewhere = {**container, "LAMINA__NODE__PORT": str(free_port())}
    failed = run(elsewhere, "sh", "-c", healthcheck_command())
    assert failed.returncode == 1 and "connection refused" in failed.stderr


def test_the_workstation_moves_a_study_to_itself(container, tmp_path):
    node = f"LAMINA@127.0.0.1:{container['LAMINA__NODE__PORT']}"
    study = Phantom(seed="docker", slices_count=3, rows=32, columns=32).write(tmp_path / "ct")
    sent = run(container, "lamina", "send", str(tmp_path / "ct"), "--to", node, "--aet", "PACS")
    assert sent.returncode == 0, sent.stdout + sent.stderr
    found = run(container, "lamina", "find", node, "--aet", "WORKSTATION", "-L", "STUDY",
                "-k", "StudyInstanceUID")
    assert found.returncode == 0, found.stderr
    study_uid = found.stdout.splitlines()[1]
    workstation = StorageSCP("WORKSTATION", int(container["LAMINA__PEERS__WORKSTATION__PORT"]))
    workstation.start()
    try:
        moved = run(container, "lamina", "move", node, "--aet", "WORKSTATION", "--dest",
                    "WORKSTATION", "-k", f"StudyInstanceUID={study_uid}")
    finally:
        workstation.stop()
    assert moved.returncode == 0, moved.stdout + moved.stderr
    assert "completed 3, failed 0" in moved.stdout
    assert len(workstation.received) == len(study)

