"""`tidelog consume --pattern REGEX --group G` as a user runs it, against a real node: the
matching topics are read (a topic created while it runs too), the others never are, and the
argument mistakes are one-line errors with exit status 2."""

from __future__ import annotations

import contextlib
import io
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from support.nodes import LocalCluster, start_cluster
from tidelog.client import AdminClient, Producer
from tidelog.cluster.cli import main


@pytest.fixture
def node(tmp_path: Path) -> Iterator[LocalCluster]:
    # A short heartbeat interval: the widened subscription reaches the coordinator with the
    # next heartbeat (the test's patience does not depend on it).
    local = start_cluster(tmp_path, nodes=1, group_consumer_heartbeat_interval_ms=300)
    try:
        yield local
    finally:
        local.stop_all()


def run_in_process(*argv: str) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(list(argv))
        except SystemExit as exc:
            code = int(exc.code or 0)
    return code, err.getvalue()


@pytest.mark.parametrize("argv, words", [
    (["consume", "t", "--pattern", "t.*", "--group", "g"], "not both"),
    (["consume", "--pattern", "t.*"], "needs --group"),
    (["consume", "--group", "g"], "at least one TOPIC"),
    (["consume", "--pattern", "t(", "--group", "g"], "invalid subscription pattern"),
    (["consume", "--pattern", "t.*", "--group", "g", "--metadata-max-age-ms", "0"], "at least 1"),
    (["consume", "t", "--fetch-max-wait-ms", "-1"], "0 or more"),
    (["consume", "t", "-n", "-2"], "0 or more"),
])
def test_pattern_argument_mistakes_are_one_line_errors(argv: list[str], words: str) -> None:
    # Checked before connecting: nothing listens on this address.
    code, err = run_in_process(*argv, "--bootstrap", "127.0.0.1:1", "--timeout", "1")
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], err


def produce(bootstrap: str, topic: str, values: list[str]) -> None:
    with Producer(bootstrap) as producer:
        for value in values:
            producer.send(topic, value.encode())
        producer.flush()


def test_consume_pattern_against_an_unreachable_cluster_is_a_one_line_error() -> None:
    # A pattern names no topic to look up, so the cluster is reached before subscribing;
    # without that the member waited for ever in silence.
    code, err = run_in_process("consume", "--pattern", "t.*", "--group", "g",
                               "--bootstrap", "127.0.0.1:1", "--timeout", "5")
    lines = err.strip().splitlines()
    assert code == 1, err
    assert len(lines) == 1 and "cannot reach the cluster" in lines[0], err


def test_consume_pattern_reads_matching_topics_including_one_created_later(node: LocalCluster) -> None:
    with AdminClient(node.bootstrap) as admin:
        admin.create_topic("orders-eu", 2, 1)
        admin.create_topic("payments", 1, 1)
    produce(node.bootstrap, "orders-eu", ["eu-1", "eu-2"])
    produce(node.bootstrap, "payments", ["pay-1"])

    process = subprocess.Popen(
        [sys.executable, "-m", "tidelog.cluster.cli", "consume", "--pattern", "orders-.*", "--group", "g",
         "-n", "4", "--output", "text", "--metadata-max-age-ms", "300", "--bootstrap", node.bootstrap],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue[str] = queue.Queue()

    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.put(line.strip())

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    seen: list[str] = []

    def wait_for(count: int) -> None:
        deadline = time.monotonic() + 60
        while len(seen) < count:
            try:
                seen.append(lines.get(timeout=0.2))
                continue
            except queue.Empty:
                pass
            if process.poll() is not None and lines.empty():
                raise AssertionError(f"consume exited {process.returncode} after {seen}: "
                                     f"{process.stderr.read() if process.stderr else ''}")
            assert time.monotonic() < deadline, f"only {seen} arrived"

    try:
        wait_for(2)
        assert sorted(seen) == ["eu-1", "eu-2"]
        # Created while the consumer runs: it matches, so the running consumer reads it too.
        with AdminClient(node.bootstrap) as admin:
            admin.create_topic("orders-us", 1, 1)
        produce(node.bootstrap, "orders-us", ["us-1", "us-2"])
        wait_for(4)
        assert process.wait(timeout=60) == 0, process.stderr.read() if process.stderr else ""
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    reader.join(timeout=10)
    assert sorted(seen) == ["eu-1", "eu-2", "us-1", "us-2"]  # never "payments"
