"""Short chaos schedules against real nodes (`pytest -m chaos`, about 2-3 minutes in all).

Each run starts its own three nodes, injects every available fault kind at least once (the
nemesis draws kinds without replacement), heals, drains and checks the history. Duplicates are
allowed while the producer is not idempotent (docs/VERIFICATION.md); every other anomaly fails.
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
                         allow=frozenset({AnomalyKind.DUPLICATE}), quiet_s=(1.0, 3.0), keep=True)
    report = run_chaos(config)
    summary = report.to_dict(limit=5)
    print(json.dumps(summary)[:4000])
    assert report.verdict is not None, summary["problems"]
    assert not report.problems, f"seed {SEED}: {report.problems}"
    assert report.valid, f"seed {SEED}: {summary['failing_kinds']}; history {config.history}"
    assert {f["kind"] for f in summary["faults"]} == {k.value for k in kinds}
    stats = summary["checker"]["stats"]
    assert stats["acknowledged"] > 100 and stats["partitions_final_read"] == 6


def test_cli_against_a_cluster_up_data_dir(tmp_path: Path) -> None:
    """`tidelog cluster chaos --data-dir` acts on a launcher cluster and leaves it running."""
    data_dir = tmp_path / "cluster"
    nodes = launcher.up(data_dir, 3, base_port=_free_base_port())
    try:
        history = tmp_path / "history.jsonl"
        result = subprocess.run(
            [sys.executable, "-m", "tidelog.cluster.chaos", "--data-dir", str(data_dir),
             "--duration", "15", "--seed", str(SEED), "--faults", "kill,pause,partition,clock",
             "--history", str(history), "--allow", "duplicate", "--output", "json"],
            capture_output=True, text=True, timeout=240)
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
