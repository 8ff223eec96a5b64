"""One node per port and per data folder: a second ``lamina serve`` refuses to start.

Without the check a second node on the same port would start silently beside the
first (SO_REUSEPORT) and the kernel would split associations between two data
folders. Two real ``lamina serve`` subprocesses on an ephemeral port; every
process is stopped by its PID.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from node.serve import NodeLock, ServeRefused, check_port_free
from tests.harness import ProcessNode, write_config


def second_serve(node: ProcessNode) -> subprocess.CompletedProcess:
    """``lamina serve`` on ``node``'s config: it must refuse, and quickly."""
    try:
        return subprocess.run([sys.executable, "-m", "node", "serve", "--config",
                               str(node.config.path)], capture_output=True, text=True,
                              env=ProcessNode.env(), cwd=node.config.root, timeout=60)
    except subprocess.TimeoutExpired:  # it started: the very thing under test
        pytest.fail("the second node started instead of refusing")


def one_error_line(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 2, done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if not line.startswith("{")]
    assert len(lines) == 1, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    return lines[0]


def test_a_second_node_on_the_same_data_folder_names_the_first(tmp_path):
    with ProcessNode(write_config(tmp_path / "first")) as first:
        second = ProcessNode(write_config(tmp_path / "second", data=first.data))  # port 0
        line = one_error_line(second_serve(second))
        assert line == (f"Error: data folder {first.data} is already served by"
                        f" lamina pid {first.pid}")
        assert first.echo() == 0  # the first is untouched
    # Once the first has stopped, the folder can be served again.
    with ProcessNode(write_config(tmp_path / "second", data=first.data)) as again:
        assert again.echo() == 0


def test_a_second_node_on_the_same_port_is_refused(tmp_path):
    with ProcessNode.with_workers(tmp_path / "first", 2) as first:
        second = ProcessNode(write_config(tmp_path / "second", node={"port": first.port}))
        line = one_error_line(second_serve(second))
        assert line == f"Error: port {first.port} is already in use by another process"
        assert not second.data.exists()  # refused before anything was created
        assert first.echo() == 0


def test_the_same_node_started_twice_names_its_data_folder(tmp_path):
    """Same config, same port and folder (make run twice): the data folder is named."""
    with ProcessNode(write_config(tmp_path / "node")) as first:
        line = one_error_line(second_serve(first))
        assert line == (f"Error: data folder {first.data} is already served by"
                        f" lamina pid {first.pid}")
        assert first.echo() == 0


def test_one_worker_serves_in_the_supervisor_itself(tmp_path):
    with ProcessNode(write_config(tmp_path / "node")) as node:
        listening = [json.loads(line) for line in node.log().splitlines()
                     if '"msg": "listening"' in line]
        assert len(listening) == 1
        assert listening[0]["pid"] == node.pid
        lock = node.data / "run" / "node.lock"
        assert lock.read_text().strip() == str(node.pid)


def test_another_listener_on_the_port_is_found_by_the_probe():
    with socket.socket() as other:
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        with pytest.raises(ServeRefused, match=f"port {port} is already in use"):
            check_port_free("127.0.0.1", port)
        with pytest.raises(ServeRefused, match=f"port {port} is already in use"):
            check_port_free("0.0.0.0", port)
    check_port_free("127.0.0.1", 0)  # port 0: a free port is picked at bind, nothing to check


def test_the_node_lock_is_exclusive_and_released(tmp_path):
    NodeLock(tmp_path / "nowhere").check_free()
    assert not (tmp_path / "nowhere").exists()
    first = NodeLock(tmp_path).acquire()
    with pytest.raises(ServeRefused, match=r"already served by lamina pid \d+"):
        NodeLock(tmp_path).acquire()
    with pytest.raises(ServeRefused, match=rf"already served by lamina pid {os.getpid()}$"):
        NodeLock(tmp_path).check_free()
    first.release()
    NodeLock(tmp_path).check_free()
    NodeLock(tmp_path).acquire().release()
