"""`tidelog group ...` and `tidelog consume --group` as a user runs them (in process), against
the fake cluster whose Groups service is the real GroupCoordinator."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import time
from typing import Iterator

import pytest

from support.fake_groups import FakeGroupCluster
from tidelog.cluster.cli import main
from tidelog.client import Consumer, TopicPartition

TOPIC = "events"
TP0, TP1 = TopicPartition(TOPIC, 0), TopicPartition(TOPIC, 1)


@pytest.fixture
def groups() -> Iterator[FakeGroupCluster]:
    cluster = FakeGroupCluster(nodes=2, session_timeout_ms=30_000, heartbeat_interval_ms=100)
    cluster.create_topic(TOPIC, 2)
    try:
        yield cluster
    finally:
        cluster.close()


def tidelog(cluster: FakeGroupCluster, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the command line in this process (a subprocess per call would cost seconds of
    imports each; test_group_members_process.py runs it as real subprocesses)."""
    argv = [*args, "--bootstrap", cluster.bootstrap]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse's usage errors
            code = int(exc.code or 0)
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


def ok_json(result: subprocess.CompletedProcess[str]) -> object:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def one_line_error(result: subprocess.CompletedProcess[str], code: int = 1) -> str:
    assert result.returncode == code, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_consume_with_a_group_commits_and_describe_reset_round_trip(groups: FakeGroupCluster) -> None:
    groups.append(TP0, [b"a0", b"a1", b"a2"], timestamp_ms=1_000)
    groups.append(TP1, [b"b0", b"b1"], timestamp_ms=5_000)
    consumed = tidelog(groups, "consume", TOPIC, "--group", "g", "-n", "5")
    assert consumed.returncode == 0, consumed.stderr
    assert sorted(json.loads(line)["value"] for line in consumed.stdout.splitlines()) == [
        "a0", "a1", "a2", "b0", "b1"]
    assert groups.committed("g") == {TP0: 3, TP1: 2}

    groups.append(TP0, [b"a3"], timestamp_ms=9_000)
    described = ok_json(tidelog(groups, "group", "describe", "g", "--output", "json"))
    assert described == {
        "group": "g", "state": "empty", "coordinator": 1, "assignor": described["assignor"],
        "group_epoch": described["group_epoch"], "members": [],
        "offsets": [
            {"topic": TOPIC, "partition": 0, "committed": 3, "end": 4, "lag": 1, "member_id": None},
            {"topic": TOPIC, "partition": 1, "committed": 2, "end": 2, "lag": 0, "member_id": None},
        ],
    }
    table = tidelog(groups, "group", "describe", "g")
    assert table.returncode == 0 and "LOG-END-OFFSET" in table.stdout and "TOTAL-LAG" in table.stdout

    # A plan without --execute changes nothing.
    plan = tidelog(groups, "group", "reset-offsets", "g", "--topic", TOPIC, "--to-datetime",
                   "1970-01-01T00:00:04Z", "--output", "json")
    assert ok_json(plan) == {"group": "g", "executed": False, "offsets": [
        {"topic": TOPIC, "partition": 0, "current": 3, "new": 3},
        {"topic": TOPIC, "partition": 1, "current": 2, "new": 0},
    ]}
    assert "--execute" in plan.stderr
    assert groups.committed("g") == {TP0: 3, TP1: 2}
    executed = tidelog(groups, "group", "reset-offsets", "g", "--topic", f"{TOPIC}:0", "--to-earliest", "--execute")
    assert executed.returncode == 0, executed.stderr
    assert "NEW-OFFSET" in executed.stdout
    assert groups.committed("g") == {TP0: 0, TP1: 2}

    # -o applies only where the group has nothing committed: a new group from 1 before the end,
    # while the existing group (below) goes on from its commits.
    fresh = tidelog(groups, "consume", TOPIC, "--group", "fresh", "-o", "-1", "-n", "2", "--output", "text")
    assert fresh.returncode == 0, fresh.stderr
    assert sorted(fresh.stdout.split()) == ["a3", "b1"]

    # The group replays from the reset offsets.
    again = tidelog(groups, "consume", TOPIC, "--group", "g", "-n", "4", "--output", "text")
    assert sorted(again.stdout.split()) == ["a0", "a1", "a2", "a3"]

    assert ok_json(tidelog(groups, "group", "list", "--output", "json")) == [
        {"group": "fresh", "state": "empty", "coordinator": 1}, {"group": "g", "state": "empty", "coordinator": 1}]
    assert tidelog(groups, "group", "delete", "g").returncode == 0
    assert "hint: list groups" in one_line_error(tidelog(groups, "group", "describe", "g"))


def test_reset_is_refused_while_members_live_and_bad_arguments_fail_in_one_line(groups: FakeGroupCluster) -> None:
    groups.append(TP0, [b"x"])
    with Consumer(groups.bootstrap, group_id="g") as consumer:
        consumer.subscribe([TOPIC])
        deadline = time.monotonic() + 15
        while not consumer.assignment():
            consumer.poll(20)
            assert time.monotonic() < deadline
        refused = one_line_error(tidelog(groups, "group", "reset-offsets", "g", "--all-topics", "--to-latest", "--execute"))
        assert "NON_EMPTY_GROUP" in refused and "stop the group's consumers" in refused
        refused = one_line_error(tidelog(groups, "group", "delete", "g"))
        assert "NON_EMPTY_GROUP" in refused
    one_line_error(tidelog(groups, "consume", TOPIC, "--group", "g", "-o", "0:5"), code=2)
    one_line_error(tidelog(groups, "group", "reset-offsets", "g", "--topic", TOPIC, "--by-duration", "15m"), code=2)
    one_line_error(tidelog(groups, "group", "reset-offsets", "g", "--topic", f"{TOPIC}:", "--to-earliest"), code=2)
