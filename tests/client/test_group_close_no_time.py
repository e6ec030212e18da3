"""close(timeout=0): the leave heartbeat is still sent, without waiting for its answer (as
Kafka's consumer does), so the group moves the partitions on at once instead of after a whole
session timeout; a negative timeout is a ValueError, as Kafka's close(Duration)."""

from __future__ import annotations

import asyncio
import time
from typing import Iterator

import pytest

from support.fake_groups import FakeGroupCluster
from tidelog.client import AsyncConsumer

from tests.client.test_group_consumer import TOPIC, member, tps, wait_until

SESSION_MS = 60_000  # what removing a member that did not leave would take


@pytest.fixture
def groups() -> Iterator[FakeGroupCluster]:
    cluster = FakeGroupCluster(nodes=2, session_timeout_ms=SESSION_MS, heartbeat_interval_ms=100)
    try:
        yield cluster
    finally:
        cluster.close()


def test_close_with_no_time_left_still_leaves_the_group(groups: FakeGroupCluster) -> None:
    groups.create_topic(TOPIC, 2)
    consumer = member(groups)
    consumer.subscribe([TOPIC])
    wait_until(lambda: len(groups.owners("g")) == 2, poll=lambda: consumer.poll(10))
    consumer.close(timeout=0)
    # Half the session timeout: only the leave heartbeat frees the partitions this soon.
    wait_until(lambda: groups.owners("g") == {}, timeout=SESSION_MS / 2000)


def test_close_with_no_time_left_does_not_wait_for_the_leave_answer(groups: FakeGroupCluster) -> None:
    groups.create_topic(TOPIC, 2)
    consumer = member(groups)
    consumer.subscribe([TOPIC])
    wait_until(lambda: consumer.assignment() == tps(2), poll=lambda: consumer.poll(10))
    groups.delay("leave", [SESSION_MS / 1000])  # a coordinator that answers the leave late
    started = time.monotonic()
    consumer.close(timeout=0)
    assert time.monotonic() - started < SESSION_MS / 4000


def test_a_negative_close_timeout_is_refused_and_the_consumer_stays_open(groups: FakeGroupCluster) -> None:
    groups.create_topic(TOPIC, 2)
    consumer = member(groups)
    consumer.subscribe([TOPIC])
    wait_until(lambda: consumer.assignment() == tps(2), poll=lambda: consumer.poll(10))
    with pytest.raises(ValueError, match="timeout"):
        consumer.close(timeout=-1)
    consumer.poll(10)  # still open, still a member
    assert consumer.assignment() == tps(2)
    consumer.close(timeout=5)

    async def scenario() -> None:
        async_consumer = AsyncConsumer(groups.bootstrap, group_id="g2")
        with pytest.raises(ValueError, match="timeout"):
            await async_consumer.close(timeout=-0.5)
        await async_consumer.close(timeout=0)

    asyncio.run(scenario())
