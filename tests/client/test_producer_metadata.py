"""The RecordMetadata each produced record's future resolves to (fake broker)."""

from __future__ import annotations

import asyncio
import time

import pytest

from tidelog.client import AsyncProducer, Producer, RecordMetadata, TopicPartition


@pytest.mark.parametrize("acks", ["all", 0])
def test_each_future_gets_its_partition_offset_and_timestamp(fake_cluster, acks) -> None:
    fake_cluster.create_topic("t", 2)
    before = time.time_ns() // 1_000_000
    with Producer(fake_cluster.bootstrap, acks=acks, batch_size=200, linger_ms=0) as producer:
        futures = [producer.send("t", b"x" * 20, partition=1, timestamp=1000 + i) for i in range(10)]
        futures.append(producer.send("t", b"now", partition=1))
        producer.flush(30)
        results = [f.result(30) for f in futures]
    after = time.time_ns() // 1_000_000
    assert all(type(m) is RecordMetadata for m in results)
    assert all(m.topic_partition == TopicPartition("t", 1) for m in results)
    offsets = [m.offset for m in results]
    assert offsets == (list(range(11)) if acks == "all" else [-1] * 11)  # several batches
    assert [m.timestamp for m in results[:10]] == list(range(1000, 1010))
    assert before <= results[10].timestamp <= after


def test_the_async_producer_resolves_its_asyncio_futures_the_same_way(fake_cluster) -> None:
    fake_cluster.create_topic("t", 1)

    async def run() -> list[RecordMetadata]:
        async with AsyncProducer(fake_cluster.bootstrap, batch_size=200, linger_ms=0) as producer:
            futures = [await producer.send("t", b"y" * 20, timestamp=5 + i) for i in range(6)]
            return list(await asyncio.wait_for(asyncio.gather(*futures), 30))

    results = asyncio.run(run())
    assert results == [RecordMetadata("t", 0, i, 5 + i) for i in range(6)]
