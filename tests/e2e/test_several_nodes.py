"""Three ``lamina serve`` nodes on one PostgreSQL index and one shared blob folder, behind
HAProxy (config/haproxy.cfg as it is): concurrent senders through the one address, every
acknowledged instance indexed exactly once, C-FIND through any node sees everything, one
audit chain written by all, and the background lease on exactly one node, taken over when
that node is killed. Bounded for a 2-core machine: 4 senders x 25 instances."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as FIND

from node.dimse.ae import associate
from node.phantom import Phantom
from tests import annotation_fixtures as fx
from tests.harness import (
    REPO,
    ProcessNode,
    echo,
    free_port,
    require,
    send,
    stop_process,
    write_config,
)

SENDERS, PER_SENDER = 4, 25


def haproxy(front: int, nodes: list[ProcessNode], folder: Path) -> subprocess.Popen:
    binary = require("haproxy", "haproxy")
    env = {**os.environ, "LAMINA_FRONT": f"127.0.0.1:{front}"}
    for k, node in enumerate(nodes, start=1):
        env[f"LAMINA_NODE{k}"] = f"127.0.0.1:{node.port}"
    proc = subprocess.Popen([binary, "-f", str(REPO / "config" / "haproxy.cfg"), "-db"],
                            env=env, cwd=folder, stdout=subprocess.DEVNULL,
                            stderr=open(folder / "haproxy.log", "wb"))
    deadline = time.monotonic() + 20
    while echo(front) != 0:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError((folder / "haproxy.log").read_text())
        time.sleep(0.2)
    return proc


def instances_seen(port: int) -> int:
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(FIND)
    assoc = associate(ae, "127.0.0.1", port, "LAMINA")
    assert assoc.is_established
    ds = Dataset()
    ds.QueryRetrieveLevel = "IMAGE"
    ds.SOPInstanceUID = ""
    try:
        return sum(1 for status, r in assoc.send_c_find(ds, FIND) if status.Status in (0xFF00,
                                                                                        0xFF01))
    finally:
        assoc.release()


def lease_holders(nodes: list[ProcessNode]) -> list[str]:
    return [n.config.settings().node.id for n in nodes
            if n.proc is not None and n.proc.poll() is None and '"lease taken' in n.log()]


@pytest.fixture
def cluster(tmp_path, pg_cluster):
    dsn = pg_cluster.database()
    shared = tmp_path / "shared"
    nodes = []
    for k in range(1, 4):
        config = write_config(tmp_path / f"node{k}", node={"id": f"node{k}"},
                              storage={"shared": str(shared)},
                              index={"backend": "postgresql", "dsn": dsn})
        if k > 1:  # one project key for all: the same pseudonyms whichever node receives
            config.key_file.write_bytes((tmp_path / "node1" / "keys" / "project.key")
                                        .read_bytes())
        nodes.append(config)
    running = [ProcessNode(c).start() for c in nodes]
    front = free_port()
    proxy = haproxy(front, running, tmp_path)
    try:
        yield running, front
    finally:
        stop_process(proxy)
        for node in running:
            node.stop()


def test_three_nodes_behind_haproxy(cluster, tmp_path):
    nodes, port = cluster
    studies = [Phantom(seed=f"several-{s}", slices_count=PER_SENDER, rows=16, columns=16)
               .write(tmp_path / f"study{s}") for s in range(SENDERS)]
    answers: list[list] = [[] for _ in range(SENDERS)]

    def sender(s: int) -> None:
        for i in range(0, PER_SENDER, 5):  # several associations per sender
            answers[s] += send(port, studies[s][i:i + 5])

    threads = [threading.Thread(target=sender, args=(s,)) for s in range(SENDERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    acknowledged = sum(1 for a in answers for status, _ in a if status == 0)
    assert acknowledged == SENDERS * PER_SENDER
    rows = nodes[0].rows("SELECT count(*), count(DISTINCT sop_instance_uid) FROM instance")
    assert rows == [(acknowledged, acknowledged)]
    # every node answers for everything, whichever node received it
    assert [instances_seen(n.port) for n in nodes] == [acknowledged] * 3
    received_by = {r[0] for r in nodes[0].rows(
        "SELECT actor FROM audit_event WHERE action LIKE ?", "instance.%")}
    assert sum(any(f'"node":"node{k}"' in a for a in received_by) for k in (1, 2, 3)) >= 2
    assert all(f'"node": "node{k}"' in n.log() for k, n in enumerate(nodes, start=1))
    # the background work runs on exactly one node; killed, another takes it over
    assert len(lease_holders(nodes)) == 1
    [holder] = [n for n in nodes if '"lease taken' in n.log()]
    holder.kill9()
    survivors = [n for n in nodes if n is not holder]
    deadline = time.monotonic() + 20
    while not any('"lease taken' in n.log() for n in survivors):
        assert time.monotonic() < deadline, "no node took the background lease over"
        time.sleep(0.2)
    for node in survivors:
        for command in (("fsck",), ("audit", "verify")):
            result = node.cli(*command)
            assert result.exit_code == 0, (command, result.output)


def send_until_acknowledged(port: int, files: list[Path], acknowledged: list[Path]) -> None:
    """Send in associations of 5 through the proxy; what is not acknowledged (a node died
    under it, or refused) is sent again, as a PACS resends."""
    pending = list(files)
    deadline = time.monotonic() + 120
    while pending and time.monotonic() < deadline:
        batch, pending = pending[:5], pending[5:]
        try:
            answers = send(port, batch)
        except (ConnectionError, OSError):
            answers = []
        failed = [f for f, a in zip(batch, answers, strict=False) if a.status != 0]
        failed += batch[len(answers):]
        acknowledged += [f for f in batch if f not in failed]
        if failed:
            time.sleep(0.2)
        pending = failed + pending


def test_a_node_killed_mid_transfer_loses_nothing_acknowledged(cluster, tmp_path):
    nodes, port = cluster
    studies = [Phantom(seed=f"kill-{s}", slices_count=PER_SENDER, rows=16, columns=16)
               .write(tmp_path / f"study{s}") for s in range(SENDERS)]
    acknowledged: list[Path] = []
    threads = [threading.Thread(target=send_until_acknowledged,
                                args=(port, studies[s], acknowledged)) for s in range(SENDERS)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while len(acknowledged) < SENDERS * PER_SENDER // 4:
        assert time.monotonic() < deadline, "nothing was acknowledged"
        time.sleep(0.05)
    victim = nodes[1]
    victim.kill9()  # mid-transfer: its open associations die with it
    for t in threads:
        t.join()
    survivors = [n for n in nodes if n is not victim]
    assert len(acknowledged) == SENDERS * PER_SENDER
    rows = survivors[0].rows("SELECT count(*), count(DISTINCT sop_instance_uid) FROM instance")
    assert rows == [(SENDERS * PER_SENDER, SENDERS * PER_SENDER)]
    assert [instances_seen(n.port) for n in survivors] == [SENDERS * PER_SENDER] * 2
    deadline = time.monotonic() + 20
    while len(lease_holders(survivors)) != 1:
        assert time.monotonic() < deadline, "the background lease is held by no live node"
        time.sleep(0.2)
    for node in survivors:
        for command in (("fsck",), ("audit", "verify")):
            result = node.cli(*command)
            assert result.exit_code == 0, (command, result.output)


def test_a_seg_pushed_to_one_node_is_checked_against_a_series_another_received(tmp_path,
                                                                               pg_cluster):
    dsn = pg_cluster.database()
    configs = []
    for k in (1, 2):
        config = fx.node_config(tmp_path / f"node{k}", settle_seconds=0.3,
                                node={"id": f"node{k}"},
                                storage={"shared": str(tmp_path / "shared")},
                                index={"backend": "postgresql", "dsn": dsn})
        if k == 2:
            config.key_file.write_bytes(configs[0].key_file.read_bytes())
        configs.append(config)
    with ProcessNode(configs[0]) as first, ProcessNode(configs[1]) as second:
        fx.store_phantom(first)  # the PACS's series reaches node1
        seg = fx.valid_seg(fx.served_by(first))
        assert fx.send(second, [seg]) == [(0, "")]  # the annotator's SEG reaches node2
        row = fx.seg_annotation(second, seg)
        assert (row["state"], row["verdict"], row["structures"]) == ("checked", "pass", 3)
        assert '"node":"node2"' in second.rows(
            "SELECT actor FROM audit_event WHERE action LIKE ? ORDER BY seq DESC",
            "annotation.%")[0][0]
