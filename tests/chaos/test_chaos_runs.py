"""Short chaos schedules against real nodes (marker `chaos`, about 2.5 minutes in all).

They are part of the default run, so CI runs them; `pytest -m chaos` runs only them. Each run
starts its own three nodes, injects every fault kind at least once (the nemesis draws kinds
without replacement), heals, drains and checks the history. The producers are idempotent, so
every anomaly fails the run, duplicates included.
The seed is printed, so a failure replays with
``tidelog cluster chaos --seed N --duration S --faults ...``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from tidelog.cluster import launcher
from tidelog.cluster.chaos import ChaosConfig, peer_address_supported, run_chaos
from tidelog.cluster.checker import AnomalyKind
from tidelog.cluster.faults import FaultKind, faketime_library

pytestmark = pytest.mark.chaos

SEED = 20261126


def _kinds() -> tuple[FaultKind, ...]:
    kinds = [FaultKind.KILL, FaultKind.PAUSE, FaultKind.DISK]
    if peer_address_supported():
        kinds.append(FaultKind.PARTITION)
    if faketime_library() is not None:
        kinds.append(FaultKind.CLOCK)
    return tuple(kinds)


def test_short_schedule_of_every_fault_kind(tmp_path: Path) -> None:
    kinds = _kinds()
    config = ChaosConfig(duration_s=12.0 * len(kinds), seed=SEED, faults=kinds,
                         history=tmp_path / "history.jsonl", work_dir=tmp_path / "nodes",
                         quiet_s=(1.0, 3.0), keep=True)
    report = run_chaos(config)
    summary = report.to_dict(limit=5)
    print(json.dumps(summary)[:4000])
    assert report.verdict is not None, summary["problems"]
    assert not report.problems, f"seed {SEED}: {report.problems}"
    assert report.valid, f"seed {SEED}: {summary['failing_kinds']}; history {config.history}"
    assert {f["kind"] for f in summary["faults"]} == {k.value for k in kinds}
    stats = summary["checker"]["stats"]
    assert stats["acknowledged"] > 100 and stats["partitions_final_read"] == 6
    assert stats["commits_ok"] > 0, "the group members committed nothing"


def test_cli_against_a_cluster_up_data_dir(tmp_path: Path) -> None:
    """`tidelog cluster chaos --data-dir` acts on a launcher cluster and leaves it running."""
    data_dir = tmp_path / "cluster"
    nodes = launcher.up(data_dir, 3, base_port=_free_base_port())
    try:
        history = tmp_path / "history.jsonl"
        result = subprocess.run(
            [sys.executable, "-m", "tidelog.cluster.chaos", "--data-dir", str(data_dir),
             "--duration", "10", "--seed", str(SEED), "--faults", "kill,pause,partition,clock",
             "--history", str(history), "--output", "json"],
            capture_output=True, text=True, timeout=240, check=False)
        assert result.stdout.strip(), result.stderr[-3000:]
        verdict = json.loads(result.stdout.strip().splitlines()[-1])
        assert result.returncode == 0, (verdict["failing_kinds"], verdict["problems"])
        assert verdict["valid"] and history.exists()
        assert set(verdict["unavailable_faults"]) == {"partition", "clock"}
        assert all(node.pid() is not None for node in nodes)  # left running
    finally:
        launcher.down(data_dir)


def _free_base_port() -> int:
    """A base port with three free ports after it (launcher nodes use base..base+2)."""
    import socket
    for base in range(20000, 60000, 97):
        socks = []
        try:
            for port in range(base, base + 3):
                sock = socket.socket()
                sock.bind(("127.0.0.1", port))
                socks.append(sock)
            return base
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise RuntimeError("no three consecutive free ports")


def test_the_harness_sees_acknowledged_writes_lost_by_every_replica(tmp_path: Path) -> None:
    """A positive control: cut the same acknowledged batches off every replica (a fault no
    replication can survive) and the run's own machinery must report lost writes."""
    import itertools
    import random
    import threading
    import time

    from tidelog.client import AdminClient
    from tidelog.cluster.chaos import (
        OwnedCluster,
        ProducerWorker,
        final_read,
        wait_recovery,
        wait_serving,
    )
    from tidelog.cluster.checker import check_file
    from tidelog.cluster.faults import DiskMode, damage_segment, newest_segment
    from tidelog.cluster.history import HistoryWriter

    cluster = OwnedCluster(tmp_path / "nodes", 3, proxies=False, election_timeout_ms=1000,
                           segment_bytes=262144)
    history_path = tmp_path / "history.jsonl"
    history = HistoryWriter(history_path)
    try:
        cluster.start()
        assert not wait_serving(cluster.nodes, 60)
        topics = [("control", 1)]
        with AdminClient(cluster.bootstrap) as admin:
            admin.create_topic("control", num_partitions=1, replication_factor=3)
        t0 = time.monotonic()
        numbers = itertools.count(1)
        assert wait_recovery(cluster.bootstrap, topics, history, t0, 60, numbers)[0]
        stop = threading.Event()
        producer = ProducerWorker(1, cluster.bootstrap, topics, history, random.Random(1), 200.0,
                                  stop, t0)
        producer.start()
        deadline = time.monotonic() + 60
        while producer.sent < 300 and time.monotonic() < deadline:
            time.sleep(0.1)
        stop.set()
        producer.join(60)
        for node in cluster.nodes:
            node.kill()
        for node in cluster.nodes:
            segment = newest_segment(node.data_dir / "control-0")
            assert segment is not None
            # The same whole batches off every replica: their last three.
            damage = damage_segment(segment, DiskMode.TRUNCATE, random.Random(0), max_batches=1)
            assert damage is not None
            for _ in range(2):
                damage_segment(segment, DiskMode.TRUNCATE, random.Random(0), max_batches=1)
        cluster.start()
        assert not wait_serving(cluster.nodes, 60)
        final_read(cluster.bootstrap, topics, history, t0, 60)
    finally:
        history.close()
        cluster.close()
    verdict = check_file(history_path)
    # Lost when the final read reached the high watermark; unseen if the damaged replicas kept
    # the partition from being read to the end: either way, not valid.
    assert verdict.anomaly_kinds & {AnomalyKind.LOST_WRITE, AnomalyKind.UNSEEN}, verdict.to_json(limit=3)


def test_an_owned_cluster_whose_port_is_taken_before_it_binds_starts_on_other_ports(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A port picked free can be taken before the node binds it (tests beside the harness did
    that and voided a run): the harness places the cluster again instead of giving up."""
    import socket

    from tidelog.cluster import chaos, launcher

    squatter = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    squatter.bind(("127.0.0.1", 0))
    squatter.listen()
    taken = squatter.getsockname()[1]
    real_free_ports = launcher.free_ports
    placements: list[list[int]] = []

    def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
        ports = real_free_ports(count, host)
        if not placements:
            ports[0] = taken
        placements.append(ports)
        return ports

    monkeypatch.setattr(launcher, "free_ports", free_ports)
    cluster = chaos.OwnedCluster(tmp_path / "nodes", 1, proxies=False, election_timeout_ms=1000,
                                 segment_bytes=262144)
    try:
        assert cluster.start_serving(60) == []
        assert len(placements) == 2 and cluster.nodes[0].port != taken
    finally:
        cluster.close()
        squatter.close()
