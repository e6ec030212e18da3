"""close() and the blocking unsubscribe() called from inside a rebalance callback: they wait
for the callback to return, so they raise RuntimeError there instead of hanging the poll (or
the reconciliation) that runs the callback."""

from __future__ import annotations

import asyncio
import threading

from support.fake_groups import FakeGroupCluster
from tidelog.client import AsyncConsumer, TopicPartition

from tests.client.test_group_consumer import TOPIC, groups, member, tps, wait_until  # noqa: F401 - a fixture


def test_close_or_unsubscribe_inside_a_callback_of_the_sync_consumer_raises(
        groups: FakeGroupCluster) -> None:
    groups.create_topic(TOPIC, 2)
    consumer = member(groups)
    raised: list[BaseException] = []

    def on_assign(partitions: set[TopicPartition]) -> None:
        for call in (consumer.close, consumer.unsubscribe):
            try:
                call()
            except RuntimeError as exc:
                raised.append(exc)

    def scenario() -> None:
        consumer.subscribe([TOPIC], on_assign=on_assign)
        wait_until(lambda: consumer.assignment() == tps(2) and raised, poll=lambda: consumer.poll(10))

    # Before the fix the poll running on_assign never returned: run it where a hang is seen.
    runner = threading.Thread(target=scenario, daemon=True)
    runner.start()
    runner.join(30)
    assert not runner.is_alive(), "poll() hung in a callback that called close()"
    assert [type(e) for e in raised] == [RuntimeError, RuntimeError], raised
    assert "rebalance callback" in str(raised[0])
    # The consumer is still open and a member; close works from outside the callback.
    assert consumer.assignment() == tps(2)
    consumer.close(timeout=5)
    wait_until(lambda: groups.owners("g") == {})


def test_close_awaited_inside_a_callback_of_the_async_consumer_raises(groups: FakeGroupCluster) -> None:
    groups.create_topic(TOPIC, 2)

    async def scenario() -> list[BaseException]:
        consumer = AsyncConsumer(groups.bootstrap, group_id="g", fetch_max_wait_ms=50)
        raised: list[BaseException] = []

        async def on_assign(partitions: set[TopicPartition]) -> None:
            for call in (consumer.close, consumer.unsubscribe_and_wait):
                try:
                    await call()
                except RuntimeError as exc:
                    raised.append(exc)

        try:
            consumer.subscribe([TOPIC], on_assign=on_assign)
            async with asyncio.timeout(20):
                while len(raised) < 2 or consumer.assignment() != tps(2):
                    await consumer.poll(10)
        finally:
            await consumer.close(timeout=5)
        return raised

    raised: list[BaseException] = []
    runner = threading.Thread(target=lambda: raised.extend(asyncio.run(scenario())), daemon=True)
    runner.start()
    runner.join(30)
    assert not runner.is_alive(), "a callback that awaited close() hung"
    assert [type(e) for e in raised] == [RuntimeError, RuntimeError], raised
    wait_until(lambda: groups.owners("g") == {})
