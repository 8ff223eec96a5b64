"""Three ``lamina serve`` nodes on one PostgreSQL index and one shared blob folder, behind
HAProxy (config/haproxy.cfg as it is: send-proxy-v2, check-send-proxy): concurrent senders
through the one address, every acknowledged instance indexed exactly once, C-FIND through any
node sees everything, one audit chain written by all naming the senders' real address (not
HAProxy's), health checks dropped without an error line, the background lease on exactly one
node, taken over when that node is killed, and PostgreSQL restarted under ingest.

The ingest test runs the issue's 8 senders x 200 (about a minute here); the kill and restart
tests, bounded for a 2-core machine, 4 senders x 25 (``LAMINA_FULL_SIZE=1``: 8 x 200)."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
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
    TEST_AET,
    PostgresCluster,
    ProcessNode,
    Response,
    echo,
    free_port,
    peer,
    postgres_bindir,
    proxy_relay,
    proxy_v1,
    require,
    send,
    stop_process,
    write_config,
)

SENDERS, PER_SENDER = (8, 200) if os.environ.get("LAMINA_FULL_SIZE") == "1" else (4, 25)
INGEST_SENDERS, INGEST_PER_SENDER = 8, 200  # the size, always
#: The senders connect from this loopback address, HAProxy from 127.0.0.1: the nodes admit
#: TESTSCU only from CLIENT, so an association seen from HAProxy's address would be refused.
CLIENT = "127.0.0.2"
PROXIED = {"proxy_protocol": True, "proxy_trusted": ["127.0.0.1/32"]}
PEERS = {"tests": peer(TEST_AET, "store", "find", host=CLIENT),
         # readiness checks (tests/harness.py Node.echo) name 127.0.0.1 in their PROXY line
         "probe": peer("PROBE", "find")}


def haproxy(front: int, nodes: list[ProcessNode], folder: Path) -> subprocess.Popen:
    binary = require("haproxy", "haproxy")
    env = {**os.environ, "LAMINA_FRONT": f"127.0.0.1:{front}"}
    for k, node in enumerate(nodes, start=1):
        env[f"LAMINA_NODE{k}"] = f"127.0.0.1:{node.port}"
    proc = subprocess.Popen([binary, "-f", str(REPO / "config" / "haproxy.cfg"), "-db"],
                            env=env, cwd=folder, stdout=subprocess.DEVNULL,
                            stderr=open(folder / "haproxy.log", "wb"))
    deadline = time.monotonic() + 20
    while echo(front, source=CLIENT) != 0:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError((folder / "haproxy.log").read_text())
        time.sleep(0.2)
    return proc


def instances_seen(node: ProcessNode) -> int:
    """C-FIND at IMAGE level through this one node (a relay writes the PROXY line)."""
    ae = AE(ae_title=TEST_AET)
    ae.add_requested_context(FIND)
    assoc = associate(ae, "127.0.0.1", proxy_relay(node.port, proxy_v1(CLIENT)), "LAMINA")
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


@contextmanager
def three_nodes(tmp_path: Path, dsn: str) -> Iterator[tuple[list[ProcessNode], int]]:
    """Three proxied nodes on ``dsn`` and one shared blob folder, HAProxy in front: the nodes
    and the front port."""
    shared = tmp_path / "shared"
    nodes = []
    for k in range(1, 4):
        config = write_config(tmp_path / f"node{k}", node={"id": f"node{k}"}, peers=PEERS,
                              storage={"shared": str(shared)}, dimse=PROXIED,
                              index={"backend": "postgresql", "dsn": dsn})
        if k > 1:  # one project key for all: the same pseudonyms whichever node receives
            config.key_file.write_bytes((tmp_path / "node1" / "keys" / "project.key")
                                        .read_bytes())
        nodes.append(config)
    running: list[ProcessNode] = []
    proxy = None
    try:
        running += [ProcessNode(c).start() for c in nodes]
        front = free_port()
        proxy = haproxy(front, running, tmp_path)
        yield running, front
    finally:
        if proxy is not None:
            stop_process(proxy)
        for node in running:
            node.stop()


@pytest.fixture
def cluster(tmp_path, pg_cluster):
    with three_nodes(tmp_path, pg_cluster.database()) as nodes_and_front:
        yield nodes_and_front


def test_three_nodes_behind_haproxy(cluster, tmp_path):
    nodes, port = cluster
    studies = [Phantom(seed=f"several-{s}", slices_count=INGEST_PER_SENDER, rows=16, columns=16)
               .write(tmp_path / f"study{s}") for s in range(INGEST_SENDERS)]
    answers: list[list] = [[] for _ in range(INGEST_SENDERS)]

    def sender(s: int) -> None:
        for i in range(0, INGEST_PER_SENDER, 5):  # several associations per sender
            answers[s] += send(port, studies[s][i:i + 5], source=CLIENT)

    threads = [threading.Thread(target=sender, args=(s,)) for s in range(INGEST_SENDERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    acknowledged = sum(1 for a in answers for status, _ in a if status == 0)
    assert acknowledged == INGEST_SENDERS * INGEST_PER_SENDER
    rows = nodes[0].rows("SELECT count(*), count(DISTINCT sop_instance_uid) FROM instance")
    assert rows == [(acknowledged, acknowledged)]
    # every node answers for everything, whichever node received it
    assert [instances_seen(n) for n in nodes] == [acknowledged] * 3
    received_by = {r[0] for r in nodes[0].rows(
        "SELECT actor FROM audit_event WHERE action LIKE ?", "instance.%")}
    assert sum(any(f'"node":"node{k}"' in a for a in received_by) for k in (1, 2, 3)) >= 2
    # the trail names the sender's address from the PROXY header, never HAProxy's
    assert received_by and all(f'"address":"{CLIENT}"' in a for a in received_by), received_by
    assert all(f'"node": "node{k}"' in n.log() for k, n in enumerate(nodes, start=1))
    # HAProxy's health checks (a LOCAL header, then a close, each second) left no error line
    assert all('"level": "error"' not in n.log() for n in nodes), [
        line for n in nodes for line in n.log().splitlines() if '"level": "error"' in line][:5]
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


def send_until_acknowledged(port: int, files: list[Path], acknowledged: list[Path],
                            refusals: list[Response] | None = None) -> None:
    """Send in associations of 5 through the proxy; what is not acknowledged (a node died
    under it, or refused) is sent again, as a PACS resends. Failure answers go to
    ``refusals``."""
    pending = list(files)
    deadline = time.monotonic() + 600
    while pending and time.monotonic() < deadline:
        batch, pending = pending[:5], pending[5:]
        try:
            answers = send(port, batch, source=CLIENT)
        except (ConnectionError, OSError):
            answers = []
        if refusals is not None:
            refusals += [a for a in answers if a.status != 0]
        failed = [f for f, a in zip(batch, answers, strict=False) if a.status != 0]
        failed += batch[len(answers):]
        acknowledged += [f for f in batch if f not in failed]
        if failed:
            time.sleep(0.2)
        pending = failed + pending


def senders_a_quarter_in(port: int, seed: str, folder: Path, acknowledged: list[Path],
                         refusals: list[Response] | None = None) -> list[threading.Thread]:
    """SENDERS threads each resending its own study until acknowledged, returned once a
    quarter of all instances is acknowledged: the moment to break something."""
    studies = [Phantom(seed=f"{seed}-{s}", slices_count=PER_SENDER, rows=16, columns=16)
               .write(folder / f"study{s}") for s in range(SENDERS)]
    threads = [threading.Thread(target=send_until_acknowledged,
                                args=(port, study, acknowledged, refusals))
               for study in studies]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while len(acknowledged) < SENDERS * PER_SENDER // 4:
        assert time.monotonic() < deadline, "nothing was acknowledged"
        time.sleep(0.05)
    return threads


def test_a_node_killed_mid_transfer_loses_nothing_acknowledged(cluster, tmp_path):
    nodes, port = cluster
    acknowledged: list[Path] = []
    threads = senders_a_quarter_in(port, "kill", tmp_path, acknowledged)
    victim = nodes[1]
    victim.kill9()  # mid-transfer: its open associations die with it
    for t in threads:
        t.join()
    survivors = [n for n in nodes if n is not victim]
    assert len(acknowledged) == SENDERS * PER_SENDER
    rows = survivors[0].rows("SELECT count(*), count(DISTINCT sop_instance_uid) FROM instance")
    assert rows == [(SENDERS * PER_SENDER, SENDERS * PER_SENDER)]
    assert [instances_seen(n) for n in survivors] == [SENDERS * PER_SENDER] * 2
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


def test_postgresql_restarted_during_ingest_with_three_nodes(tmp_path):
    """The index goes away under three nodes mid-ingest: senders get 0xA700 with a reason
    while it is down (never a false success), every node stores again once it is back
    without being restarted, and every acknowledged instance is indexed exactly once."""
    bindir = postgres_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL server not installed (Debian package postgresql)")
    database = PostgresCluster(bindir).start()  # its own: this test stops it
    try:
        with three_nodes(tmp_path, database.database()) as (nodes, port):
            pids = [n.pid for n in nodes]
            acknowledged: list[Path] = []
            refusals: list[Response] = []
            threads = senders_a_quarter_in(port, "pg-restart", tmp_path, acknowledged,
                                           refusals)
            database.stop(remove=False)  # mid-ingest
            deadline = time.monotonic() + 60
            while not any(r.status == 0xA700 for r in refusals):
                assert time.monotonic() < deadline, "no sender was refused while it was down"
                time.sleep(0.05)
            acknowledged_while_down = len(acknowledged)
            time.sleep(1)  # the senders keep sending into the outage
            # nothing is acknowledged while the index is down (what was, had committed)
            assert len(acknowledged) - acknowledged_while_down <= SENDERS * 5
            database.start()
            for t in threads:
                t.join()
            # while it was down: 0xA700 with a reason, and no other failure status
            assert {r.status for r in refusals} <= {0xA700, -1}, {r.status for r in refusals}
            assert all(r.comment for r in refusals if r.status == 0xA700), refusals[:3]
            total = SENDERS * PER_SENDER
            assert len(acknowledged) == total
            rows = nodes[0].rows("SELECT count(*), count(DISTINCT sop_instance_uid)"
                                 " FROM instance")
            assert rows == [(total, total)]
            # the same processes, each storing and answering again (no restart)
            assert [n.pid for n in nodes] == pids and all(n.proc.poll() is None for n in nodes)
            extra = Phantom(seed="pg-restart-after", slices_count=3, rows=16,
                            columns=16).write(tmp_path / "after")
            for node, path in zip(nodes, extra, strict=True):
                relay = proxy_relay(node.port, proxy_v1(CLIENT))
                assert [a.status for a in send(relay, [path])] == [0]
            assert [instances_seen(n) for n in nodes] == [total + 3] * 3
            verify = nodes[0].cli("audit", "verify")
            assert verify.exit_code == 0, verify.output
    finally:
        database.stop()
