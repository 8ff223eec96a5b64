"""Why no association: ``lamina echo | find | move | send`` say it in one line.

pynetdicom reports a refused connection, a host that never answers and a peer
that takes the connection but stays silent all as "aborted"; node.dimse.scu
tells them apart (a plain TCP connect) and passes on a rejection's reason. The
node runs in-process on port 0; the silent peer is a listening socket that never
accepts; nothing-listening is a port that was free a moment ago.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from node.cli import main
from node.config import load
from node.dimse import scu
from node.dimse.ae import connect_failure
from node.phantom import Phantom
from tests.harness import InProcessNode, free_port, peer, write_config

REJECTED = ("rejected the association: Calling AE title not recognised"
            " (Rejected Permanent, Service User)")


@pytest.fixture(scope="module")
def node_port(tmp_path_factory) -> Iterator[int]:
    """A node in this process admitting only KNOWN from 127.0.0.1."""
    config = write_config(tmp_path_factory.mktemp("node"),
                          peers={"known": peer("KNOWN", "store", "find", port=104)})
    with InProcessNode(config) as node:
        yield node.port


@pytest.fixture(scope="module")
def scu_config(tmp_path_factory) -> Path:
    """The config the SCU commands read: our AE title (an ACSE timeout a loaded machine's
    node answers well within)."""
    path = tmp_path_factory.mktemp("scu") / "scu.toml"
    path.write_text('[node]\nae_title = "STRANGER"\nacse_timeout = 15\n')
    return path


@pytest.fixture(scope="module")
def impatient_config(tmp_path_factory) -> Path:
    """As scu_config with a one-second ACSE timeout, for peers that never answer."""
    path = tmp_path_factory.mktemp("scu") / "scu.toml"
    path.write_text('[node]\nae_title = "STRANGER"\nacse_timeout = 1\n')
    return path


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A socket that listens (the kernel completes connections) but never answers."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        yield listener.getsockname()[1]


@pytest.fixture
def hanging_up_port() -> Iterator[int]:
    """A server that accepts each connection and closes it at once (not a DICOM node)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    stop = threading.Event()

    def serve() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    stop.set()
    thread.join()
    listener.close()


def lamina(config: Path, *args: str):
    return CliRunner().invoke(main, [*args, "--config", str(config)])


def stderr_line(result, after: str = "") -> str:
    """The one line on stderr (after the line ``after`` starts, e.g. a progress label)."""
    lines = result.stderr.strip().splitlines()
    if after and lines and lines[0].startswith(after):
        lines = lines[1:]
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_echo_refused_by_the_node_gives_its_reason(node_port, scu_config):
    result = lamina(scu_config, "echo", f"LAMINA@127.0.0.1:{node_port}")
    assert result.exit_code == 1
    assert stderr_line(result) == f"echo LAMINA@127.0.0.1:{node_port}: LAMINA@127.0.0.1:" \
        f"{node_port} {REJECTED}"
    ok = lamina(scu_config, "echo", f"LAMINA@127.0.0.1:{node_port}", "--aet", "KNOWN")
    assert ok.exit_code == 0 and "status 0x0000" in ok.stdout


def test_echo_with_nothing_listening(scu_config):
    port = free_port()
    result = lamina(scu_config, "echo", f"LAMINA@127.0.0.1:{port}")
    assert result.exit_code == 1
    assert stderr_line(result) == (f"echo LAMINA@127.0.0.1:{port}: connection refused by"
                                   f" 127.0.0.1:{port} (is a DICOM node listening?)")


def test_echo_to_a_socket_that_never_answers(silent_port, impatient_config):
    result = lamina(impatient_config, "echo", f"LAMINA@127.0.0.1:{silent_port}")
    assert result.exit_code == 1
    assert stderr_line(result) == (
        f"echo LAMINA@127.0.0.1:{silent_port}: 127.0.0.1:{silent_port} accepted the connection"
        f" but did not answer the association within 1 s")


def test_echo_to_a_server_that_hangs_up(hanging_up_port, scu_config):
    result = lamina(scu_config, "echo", f"LAMINA@127.0.0.1:{hanging_up_port}")
    assert result.exit_code == 1
    assert "accepted the connection but ended it without answering" in stderr_line(result)


def test_a_host_that_never_answers_the_connection(monkeypatch):
    """A dropped SYN (firewall) cannot be staged on loopback: the probe's answer is."""
    settings = load(None, environ={}, overrides={"node.acse_timeout": 3})
    target = scu.Target("PACS", "192.0.2.1", 104)

    class Aborted:
        is_rejected = False

    monkeypatch.setattr(scu, "probe_connect", lambda host, port, timeout: TimeoutError())
    assert scu.why_no_association(Aborted(), target, settings.node.acse_timeout, 3.0) == \
        "no answer from 192.0.2.1:104 within 3 s"
    assert connect_failure(socket.gaierror(), "pacs.invalid", 104, 3) == \
        "host 'pacs.invalid' does not resolve"


def test_find_and_move_say_why(node_port, scu_config):
    refused = lamina(scu_config, "find", f"LAMINA@127.0.0.1:{node_port}", "-k",
                     "StudyInstanceUID")
    assert refused.exit_code == 1
    assert stderr_line(refused) == f"find failed: LAMINA@127.0.0.1:{node_port} {REJECTED}"
    port = free_port()
    moved = lamina(scu_config, "move", f"LAMINA@127.0.0.1:{port}", "--dest", "X", "-k",
                   "StudyInstanceUID=1.2.3")
    assert moved.exit_code == 1
    assert stderr_line(moved) == (f"move failed: connection refused by 127.0.0.1:{port}"
                                  f" (is a DICOM node listening?)")


def test_send_says_why_once(node_port, scu_config, tmp_path):
    files = Phantom(seed="scu-failures", slices_count=3, rows=32, columns=32).write(tmp_path)
    refused = lamina(scu_config, "send", *map(str, files), "--to",
                     f"LAMINA@127.0.0.1:{node_port}")
    assert refused.exit_code == 1
    assert refused.stdout.split() == ["3", "not", "sent"]
    assert stderr_line(refused, "sending to") == \
        f"send failed: LAMINA@127.0.0.1:{node_port} {REJECTED}"
    port = free_port()
    nowhere = lamina(scu_config, "send", str(tmp_path), "--to", f"LAMINA@127.0.0.1:{port}")
    assert nowhere.exit_code == 1
    assert stderr_line(nowhere, "sending to") == (f"send failed: connection refused by 127.0.0.1:{port}"
                                    f" (is a DICOM node listening?)")
