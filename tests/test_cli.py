from __future__ import annotations

import subprocess
import sys

from tidelog.cluster.cli import main


def test_version_is_printed(capsys) -> None:
    try:
        main(["--version"])
    except SystemExit as exit_:
        assert exit_.code == 0
    assert capsys.readouterr().out.startswith("tidelog ")


def test_console_script_prints_help() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "tidelog.cluster.cli", "--help"],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout
    assert "usage: tidelog" in out


def test_cluster_info_is_reachable_through_the_tidelog_command(cluster) -> None:
    import json

    out = subprocess.run(
        [sys.executable, "-m", "tidelog.cluster.cli", "cluster", "info",
         "--bootstrap", cluster.bootstrap, "--output", "json"],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout
    info = json.loads(out)
    assert [node["id"] for node in info["nodes"]] == [1]


def test_perf_produce_can_force_idempotence_on_or_off() -> None:
    from tidelog.cluster.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["perf", "produce", "t"]).idempotence == "default"
    assert parser.parse_args(["perf", "produce", "t", "--idempotence", "off"]).idempotence == "off"
