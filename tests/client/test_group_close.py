"""Consumer.close(timeout): one deadline for the final commit and the leave heartbeat, as
Kafka's close(Duration); each step used to take a whole request timeout of its own."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from support.fake_groups import FakeGroupCluster
from support.nodes import start_cluster
from tidelog.client import AdminClient, AsyncConsumer, Consumer, NewTopic, Producer, TopicPartition

from tests.client.test_group_consumer import TOPIC, member, tps, wait_until

HANG = [60.0] * 100  # seconds: an unreachable coordinator, as far as any timeout here goes


@pytest.fixture
def groups() -> Iterator[FakeGroupCluster]:
    cluster = FakeGroupCluster(nodes=2, session_timeout_ms=30_000, heartbeat_interval_ms=100)
    try:
        yield cluster
    finally:
        cluster.close()


def closed_within(consumer: Consumer, timeout: float) -> float:
    started = time.monotonic()
    consumer.close(timeout=timeout)
    return time.monotonic() - started


def test_close_keeps_one_deadline_across_the_commit_and_the_leave(groups: FakeGroupCluster) -> None:
    groups.create_topic(TOPIC, 2)
    groups.append(TopicPartition(TOPIC, 0), [b"r0", b"r1"])
    consumer = member(groups)  # request_timeout_ms 30 s: each step alone would take that
    revoked: list[set[TopicPartition]] = []
    consumer.subscribe([TOPIC], on_revoke=revoked.append)
    got: list[Any] = []
    wait_until(lambda: len(got) >= 2, poll=lambda: got.extend(consumer.poll(10)))
    groups.delay("OffsetCommit", HANG)
    groups.delay("leave", HANG)
    elapsed = closed_within(consumer, 1.5)
    # Deadline plus scheduling slack, far below the 30 s one hung request would take.
    assert elapsed < 10, elapsed
    assert revoked == [tps(2)]  # the application still got its on_revoke
    assert groups.committed("g") == {}  # the commit never got through


def test_close_cuts_off_a_reconciliation_stuck_on_the_coordinator(groups: FakeGroupCluster) -> None:
    """A member whose assignment is still being taken on (its committed offsets fetched from a
    coordinator that does not answer, which may take default_api_timeout_ms) closes in time."""
    groups.create_topic(TOPIC, 2)
    groups.delay("OffsetFetch", HANG)
    consumer = member(groups)
    consumer.subscribe([TOPIC])
    wait_until(lambda: len(groups.owners("g")) == 2, poll=lambda: consumer.poll(10))
    groups.delay("leave", HANG)
    assert closed_within(consumer, 1.0) < 10


def test_close_returns_in_time_when_the_cluster_stops_answering(tmp_path: Path) -> None:
    """Real processes: the only node (the coordinator) is paused, so every call hangs."""
    local = start_cluster(tmp_path, nodes=1)
    consumer = None
    try:
        with AdminClient(local.bootstrap) as admin:
            admin.create_topics([NewTopic("closing", 2)])
        with Producer(local.bootstrap) as producer:
            for i in range(4):
                producer.send("closing", value=b"v%d" % i, partition=i % 2)
            producer.flush()
        consumer = Consumer(local.bootstrap, group_id="closing-group", auto_offset_reset="earliest",
                            fetch_max_wait_ms=50)
        consumer.subscribe(["closing"])
        got: list[Any] = []
        wait_until(lambda: len(got) >= 4, timeout=60, poll=lambda: got.extend(consumer.poll(50)))
        local.node(1).pause()
        started = time.monotonic()
        consumer.close(timeout=2.0)
        consumer = None
        assert time.monotonic() - started < 15
    finally:
        for node in local.running_nodes():
            node.resume()
        if consumer is not None:
            consumer.close(timeout=1.0)
        local.stop_all()


def test_a_close_past_its_deadline_does_not_revoke_twice_what_on_revoke_is_handling(
        groups: FakeGroupCluster) -> None:
    """A rebalance takes a partition away and its on_revoke (slower than close's timeout) runs
    inside close: the callback is the application's and is not cut short, and the partition
    is not handed to on_revoke a second time with the rest when the member leaves."""
    groups.create_topic(TOPIC, 2)
    a = member(groups)
    b = None
    revoked: list[set[TopicPartition]] = []

    def on_revoke(partitions: set[TopicPartition]) -> None:
        revoked.append(partitions)
        if len(revoked) == 1:
            time.sleep(1.5)  # the application's slow handler, longer than close's timeout

    try:
        a.subscribe([TOPIC], on_revoke=on_revoke)
        wait_until(lambda: a.assignment() == tps(2), poll=lambda: a.poll(10))
        b = member(groups)
        b.subscribe([TOPIC])
        b.poll(0)  # starts b's heartbeats: the coordinator asks a for one partition
        # a's revocation now waits for a's application thread, which next enters close().
        wait_until(lambda: a._core.pending_callbacks > 0)
        a.close(timeout=0.3)
        a = None
        assert len(revoked) == 2, revoked
        first, second = revoked
        assert len(first) == 1 and not (first & second) and first | second == tps(2), revoked
    finally:
        for consumer in (a, b):
            if consumer is not None:
                consumer.close(timeout=0)


def test_closing_an_async_consumer_that_is_unsubscribing_lets_its_on_revoke_finish(
        groups: FakeGroupCluster) -> None:
    """unsubscribe() leaves in the background (AsyncConsumer); a close right after, with a
    deadline shorter than the application's on_revoke, must not cancel that callback."""
    groups.create_topic(TOPIC, 2)

    async def scenario() -> list[str]:
        events: list[str] = []
        consumer = AsyncConsumer(groups.bootstrap, group_id="g", fetch_max_wait_ms=50)

        async def on_revoke(partitions: set[TopicPartition]) -> None:
            events.append("on_revoke started")
            try:
                await asyncio.sleep(1.0)  # the application's slow handler, longer than close's timeout
            except asyncio.CancelledError:
                events.append("on_revoke cancelled")
                raise
            events.append("on_revoke finished")

        try:
            consumer.subscribe([TOPIC], on_revoke=on_revoke)
            async with asyncio.timeout(15):
                while consumer.assignment() != tps(2):
                    await consumer.poll(10)
            consumer.unsubscribe()
            async with asyncio.timeout(15):
                while not events:
                    await asyncio.sleep(0.01)
            await consumer.close(timeout=0.2)
        finally:
            await consumer.close(timeout=0)
        return events

    assert asyncio.run(scenario()) == ["on_revoke started", "on_revoke finished"]
