"""`tidelog cluster up|status|kill|restart|stop|down` against real background node processes."""

from __future__ import annotations

import json
import os
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

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


def _three_free_ports() -> int:
    """A base port with base, base+1 and base+2 free (cluster up uses consecutive ports)."""
    for _ in range(50):
        base = free_port()
        if base + 2 > 65535:
            continue
        try:
            for port in (base + 1, base + 2):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base
    raise RuntimeError("no three consecutive free ports")


def test_up_status_kill_restart_down(cluster_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    port = _three_free_ports()
    data = ["--data-dir", str(cluster_dir)]
    code, out, _ = run(capsys, "cluster", "up", "--nodes", "3", "--base-port", str(port), *data)
    assert code == 0 and f"127.0.0.1:{port},127.0.0.1:{port + 1},127.0.0.1:{port + 2}" in out

    code, _, err = run(capsys, "cluster", "up", "--nodes", "3", "--base-port", str(port), *data)
    assert code == 1 and "already running" in err

    code, out, _ = run(capsys, "cluster", "status", "--output", "json", *data)
    state = json.loads(out)
    assert state["controller"] in (1, 2, 3)
    assert [n["id"] for n in state["nodes"]] == [1, 2, 3]
    assert all(n["alive"] and n["pid"] > 0 for n in state["nodes"])
    assert state["nodes"][1]["address"] == f"127.0.0.1:{port + 1}"
    assert "__cluster_metadata-0" in state["nodes"][state["controller"] - 1]["leader_of"]

    assert run(capsys, "cluster", "kill", "2", *data)[0] == 0
    nodes = json.loads(run(capsys, "cluster", "status", "--output", "json", *data)[1])["nodes"]
    assert [n["alive"] for n in nodes] == [True, False, True]

    code, out, _ = run(capsys, "cluster", "restart", "2", *data)
    assert code == 0 and "serving" in out
    nodes = json.loads(run(capsys, "cluster", "status", "--output", "json", *data)[1])["nodes"]
    assert all(n["alive"] for n in nodes)

    code, out, _ = run(capsys, "cluster", "down", *data)
    assert code == 0 and "stopped node(s) 1, 2, 3" in out
    assert all(node.pid() is None for node in launcher.load_nodes(cluster_dir))


def test_commands_on_a_missing_cluster_fail_with_a_hint(cluster_dir: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "cluster", "status", "--data-dir", str(cluster_dir))
    assert code == 1 and "tidelog cluster up" in err
