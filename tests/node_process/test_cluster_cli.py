"""`tidelog cluster up|status|kill|restart|stop|down` against real background node processes."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Iterator

import pytest

from support.nodes import free_port
from tidelog.cluster import launcher
from tidelog.cluster.cli import main


@pytest.fixture
def cluster_dir(tmp_path: Path) -> Iterator[Path]:
    directory = tmp_path / "tidelog-data"
    yield directory
    # Whatever the test did, no node outlives it.
    for pid_file in directory.glob("node-*.pid"):
        try:
            os.kill(int(pid_file.read_text()), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_up_status_kill_restart_down(cluster_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    port = free_port()
    data = ["--data-dir", str(cluster_dir)]
    code, out, _ = run(capsys, "cluster", "up", "--nodes", "1", "--base-port", str(port), *data)
    assert code == 0 and f"127.0.0.1:{port}" in out

    code, _, err = run(capsys, "cluster", "up", "--nodes", "1", "--base-port", str(port), *data)
    assert code == 1 and "already running" in err

    code, out, _ = run(capsys, "cluster", "status", "--output", "json", *data)
    state = json.loads(out)
    assert state["controller"] == 1
    [node] = state["nodes"]
    assert node["id"] == 1 and node["alive"] and node["address"] == f"127.0.0.1:{port}" and node["pid"] > 0

    assert run(capsys, "cluster", "kill", "1", *data)[0] == 0
    assert json.loads(run(capsys, "cluster", "status", "--output", "json", *data)[1])["nodes"][0]["alive"] is False

    code, out, _ = run(capsys, "cluster", "restart", "1", *data)
    assert code == 0 and "serving" in out
    assert json.loads(run(capsys, "cluster", "status", "--output", "json", *data)[1])["nodes"][0]["alive"] is True

    code, out, _ = run(capsys, "cluster", "down", *data)
    assert code == 0 and "stopped node(s) 1" in out
    assert launcher.load_nodes(cluster_dir)[0].pid() is None


def test_up_refuses_several_nodes_until_replication_lands(cluster_dir: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "cluster", "up", "--nodes", "3", "--data-dir", str(cluster_dir))
    assert code == 1 and "--nodes 1" in err


def test_commands_on_a_missing_cluster_fail_with_a_hint(cluster_dir: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "cluster", "status", "--data-dir", str(cluster_dir))
    assert code == 1 and "tidelog cluster up" in err
