"""`tidelog topic|produce|consume|perf` as a user runs them: subprocesses against a real node."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from support.nodes import LocalCluster, start_cluster
from tidelog.client import Producer


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    local = start_cluster(Path(tmp_path_factory.mktemp("cli-node")), nodes=1)
    try:
        yield local
    finally:
        local.stop_all()


def tidelog(node: LocalCluster | None, *args: str, stdin: str | bytes | None = None,
            env_bootstrap: bool = True) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.pop("TIDELOG_BOOTSTRAP", None)
    if node is not None and env_bootstrap:
        env["TIDELOG_BOOTSTRAP"] = node.bootstrap  # the environment variable is honoured
    data = stdin.encode() if isinstance(stdin, str) else stdin
    result = subprocess.run(
        [sys.executable, "-m", "tidelog.cluster.cli", *args],
        input=data, capture_output=True, timeout=60, env=env,
    )
    return subprocess.CompletedProcess(result.args, result.returncode,
                                       result.stdout.decode(), result.stderr.decode())


def ok_json(result: subprocess.CompletedProcess[str]):
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def json_lines(result: subprocess.CompletedProcess[str]) -> list[dict]:
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def assert_one_line_error(result: subprocess.CompletedProcess[str], code: int, *words: str) -> None:
    assert result.returncode == code, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for word in words:
        assert word in lines[0]


def test_topic_commands(node) -> None:
    created = ok_json(tidelog(node, "topic", "create", "orders", "audit", "-p", "3", "-r", "1",
                              "-c", "retention.ms=3600000", "--output", "json"))
    assert [(r["topic"], r["status"]) for r in created] == [("orders", "OK"), ("audit", "OK")]
    listing = ok_json(tidelog(node, "topic", "list", "--output", "json"))
    assert {t["name"]: t["partitions"] for t in listing}.items() >= {"orders": 3, "audit": 3}.items()

    [described] = ok_json(tidelog(node, "topic", "describe", "orders", "--output", "json"))
    assert described["configs"]["retention.ms"] == "3600000"
    assert [p["partition"] for p in described["partitions"]] == [0, 1, 2]
    assert all(p["leader"] == 1 and p["high_watermark"] is not None for p in described["partitions"])

    table = tidelog(node, "topic", "describe", "orders")
    assert table.returncode == 0 and "PARTITIONS" in table.stdout and "retention.ms" in table.stdout

    ok_json(tidelog(node, "topic", "alter-config", "orders", "--set", "retention.ms=60000",
                    "--output", "json"))
    [described] = ok_json(tidelog(node, "topic", "describe", "orders", "--output", "json"))
    assert described["configs"]["retention.ms"] == "60000"

    grown = ok_json(tidelog(node, "topic", "add-partitions", "orders", "-n", "2", "--output", "json"))
    assert grown["partitions"] == 5

    deleted = ok_json(tidelog(node, "topic", "delete", "audit", "--output", "json"))
    assert deleted == [{"topic": "audit", "status": "OK", "error": None}]
    assert "audit" not in {t["name"] for t in ok_json(tidelog(node, "topic", "list", "--output", "json"))}

    assert_one_line_error(tidelog(node, "topic", "create", "orders"), 1, "TOPIC_ALREADY_EXISTS")
    assert_one_line_error(tidelog(node, "topic", "create", "bad name!"), 1, "INVALID_TOPIC_EXCEPTION")
    assert_one_line_error(tidelog(node, "topic", "describe", "ghost"), 1, "UNKNOWN_TOPIC_OR_PARTITION", "hint")


def test_produce_then_consume_round_trip(node) -> None:
    ok_json(tidelog(node, "topic", "create", "lines", "-p", "2", "--output", "json"))
    produced = json_lines(tidelog(node, "produce", "lines", "--key-separator", "=", "-H", "src=cli",
                                  "--output", "json", stdin="alice=1\nbob=2\nno key here\nalice=3\n"))
    assert len(produced) == 4 and all(r["topic"] == "lines" for r in produced)
    with Producer(node.bootstrap) as producer:  # bytes that are not UTF-8
        producer.send("lines", b"\xff\xfe", key=b"bin", partition=0).result(30)

    records = json_lines(tidelog(node, "consume", "lines", "-o", ":end", "--output", "json"))
    assert len(records) == 5
    by_value = {json.dumps(r["value"]): r for r in records}
    alice = [r for r in records if r["key"] == "alice"]
    assert [r["value"] for r in alice] == ["1", "3"]  # same key, same partition, in order
    assert by_value['"no key here"']["key"] is None
    assert by_value['"2"']["headers"] == [{"key": "src", "value": "cli"}]
    binary = next(r for r in records if r["key"] == "bin")
    assert binary["value"] == {"base64": base64.b64encode(b"\xff\xfe").decode()}
    assert set(records[0]) == {"topic", "partition", "offset", "timestamp", "key", "value", "headers"}

    # Offsets, ranges, counts and partitions.
    p0 = [r for r in records if r["partition"] == 0]
    first, last = p0[0]["offset"], p0[-1]["offset"]
    one = json_lines(tidelog(node, "consume", "lines", "-p", "0", "-o", f"{first}:{first + 1}"))
    assert [r["offset"] for r in one] == [first]
    tail = json_lines(tidelog(node, "consume", "lines", "-p", "0", "-o", "-1", "-n", "1"))
    assert [r["offset"] for r in tail] == [last]
    timed = json_lines(tidelog(node, "consume", "lines", "-o", f"@{records[0]['timestamp']}:end"))
    assert len(timed) == 5
    none_after = json_lines(tidelog(node, "consume", "lines", "-o", "@2099-01-01:end"))
    assert none_after == []
    text = tidelog(node, "consume", "lines", "-p", "1", "-o", ":end", "--output", "text")
    assert text.returncode == 0 and all(line for line in text.stdout.splitlines())


def test_errors_are_one_line_with_a_non_zero_status(node) -> None:
    assert_one_line_error(tidelog(node, "consume", "ghost", "-o", ":end"), 1, "UNKNOWN_TOPIC_OR_PARTITION")
    assert_one_line_error(tidelog(node, "produce", "ghost", stdin="x\n"), 1, "UNKNOWN_TOPIC_OR_PARTITION")
    assert_one_line_error(tidelog(node, "consume", "lines", "-o", "sideways"), 2, "invalid offset")
    unreachable = tidelog(None, "topic", "list", "--bootstrap", "127.0.0.1:1", "--timeout", "0.5")
    assert_one_line_error(unreachable, 1, "cannot reach", "127.0.0.1:1", "hint")


def test_perf_commands_report_throughput_and_latency(node) -> None:
    ok_json(tidelog(node, "topic", "create", "perf", "-p", "2", "--output", "json"))
    produce = ok_json(tidelog(node, "perf", "produce", "perf", "--num-records", "300",
                              "--record-size", "100", "--output", "json"))
    assert produce["records"] == 300 and produce["errors"] == 0
    assert produce["records_per_sec"] > 0 and produce["mb_per_sec"] > 0
    assert set(produce["latency_ms"]) == {"p50", "p95", "p99", "p999", "max"}
    consume = ok_json(tidelog(node, "perf", "consume", "perf", "--num-records", "300", "--output", "json"))
    assert consume["records"] == 300 and consume["latency_ms"]["p50"] is not None
    e2e = ok_json(tidelog(node, "perf", "e2e", "perf", "--num-records", "200", "--record-size", "50",
                          "--output", "json"))
    assert e2e["records"] == 200 and e2e["latency_ms"]["max"] is not None
    human = tidelog(node, "perf", "produce", "perf", "--num-records", "50", "--throughput", "500")
    assert human.returncode == 0 and "records/s" in human.stdout and "p99" in human.stdout


def test_produce_flags_and_relative_offsets(node) -> None:
    ok_json(tidelog(node, "topic", "create", "flags", "-p", "3", "--output", "json"))
    fixed = json_lines(tidelog(node, "produce", "flags", "--key", "k", "--acks", "1",
                               "--compression", "gzip", "--output", "json", stdin="a\nb\nc\n"))
    assert len({r["partition"] for r in fixed}) == 1  # one key, one partition
    key_partition = fixed[0]["partition"]
    other = (key_partition + 1) % 3
    pinned = json_lines(tidelog(node, "produce", "flags", "--partition", str(other), "--acks", "0",
                                "--output", "json", stdin="x\ny\n"))
    assert [r["partition"] for r in pinned] == [other, other]
    assert {r["offset"] for r in pinned} == {-1}  # acks=0: no offsets
    skipped = json_lines(tidelog(node, "consume", "flags", "-p", str(key_partition), "-o", "+2:end"))
    # +2 from the log start: offset 0 holds the leader's control batch, so 2 is the second record.
    assert [r["value"] for r in skipped] == ["b", "c"]
    table = tidelog(node, "produce", "flags", stdin="z\n")
    assert table.returncode == 0 and "produced 1 record(s) to flags" in table.stdout
    bad = tidelog(node, "produce", "flags", "--partition", "9", stdin="z\n")
    assert_one_line_error(bad, 1, "UNKNOWN_TOPIC_OR_PARTITION")


def test_cluster_info_command(node, capsys) -> None:
    import argparse

    from tidelog.client.cli import register_cluster_info

    parser = argparse.ArgumentParser()
    register_cluster_info(parser.add_subparsers())
    args = parser.parse_args(["info", "--bootstrap", node.bootstrap, "--output", "json"])
    assert args.handler(args) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["controller_id"] == 1 and [n["id"] for n in info["nodes"]] == [1]
    assert all({"topic", "partition", "leader", "leader_epoch", "replicas"} <= set(p)
               for p in info["partitions"])
    args = parser.parse_args(["info", "--bootstrap", node.bootstrap])
    assert args.handler(args) == 0
    assert "CONTROLLER" in capsys.readouterr().out
