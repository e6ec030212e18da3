"""The client library against a real node process (tests/support/nodes.py).

One node serves the whole module (each test uses its own topics); the failover test starts its
own, since it kills it.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Iterator

import pytest

from support.nodes import LocalCluster, start_cluster
from tidelog.client import (
    AdminClient,
    AsyncAdminClient,
    AsyncConsumer,
    AsyncProducer,
    ClusterUnreachableError,
    Consumer,
    NewTopic,
    Producer,
    TidelogError,
    TopicPartition,
)
from tidelog.client.partitioner import partition_for_key
from tidelog.proto.common_pb2 import ErrorCode


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    local = start_cluster(Path(tmp_path_factory.mktemp("client-node")), nodes=1)
    try:
        yield local
    finally:
        local.stop_all()


@pytest.fixture(scope="module")
def admin(node: LocalCluster) -> Iterator[AdminClient]:
    with AdminClient(node.bootstrap) as client:
        yield client


def consume_all(bootstrap: str, topic: str, count: int, timeout: float = 30.0) -> list:
    with Consumer(bootstrap, topics=[topic], auto_offset_reset="earliest") as consumer:
        got: list = []
        deadline = time.monotonic() + timeout
        while len(got) < count and time.monotonic() < deadline:
            got += consumer.poll(500)
        return got


def test_produce_consume_round_trip_keeps_keys_values_headers_and_order(node, admin) -> None:
    admin.create_topic("roundtrip", num_partitions=3)
    sent = []
    with Producer(node.bootstrap, batch_size=4096) as producer:
        futures = []
        for i in range(600):
            key = None if i % 10 == 0 else f"user-{i % 37}".encode()
            value = None if i == 7 else f"event-{i}".encode() * (1 + i % 5)
            headers = [("seq", str(i).encode()), ("empty", None)] if i % 3 == 0 else []
            sent.append((key, value, tuple(headers)))
            futures.append(producer.send("roundtrip", value, key=key, headers=headers))
        producer.flush(30)
        metadata = [f.result(30) for f in futures]
    for (key, _, _), meta in zip(sent, metadata):
        if key is not None:
            assert meta.partition == partition_for_key(key, 3)
    records = consume_all(node.bootstrap, "roundtrip", len(sent))
    assert len(records) == len(sent)
    by_offset = {(r.partition, r.offset): r for r in records}
    for (key, value, headers), meta in zip(sent, metadata):
        record = by_offset[(meta.partition, meta.offset)]
        assert (record.key, record.value, record.headers) == (key, value, headers)
        assert record.timestamp == meta.timestamp
    # Nothing lost, nothing twice (offsets need not start at 0: the leader's control batch
    # takes an offset of its own).
    assert sorted((r.partition, r.offset) for r in records) == sorted(
        (m.partition, m.offset) for m in metadata
    )


def test_async_clients_round_trip(node) -> None:
    async def main() -> list[bytes]:
        async with AsyncAdminClient(node.bootstrap) as admin:
            await admin.create_topics([NewTopic("async-rt", 2, 1)])
        async with AsyncProducer(node.bootstrap, compression="gzip") as producer:
            futures = [await producer.send("async-rt", f"m{i}", key=b"same") for i in range(50)]
            await producer.flush()
            offsets = [(await f).offset for f in futures]
            assert offsets == list(range(offsets[0], offsets[0] + 50))
        async with AsyncConsumer(node.bootstrap, auto_offset_reset="earliest",
                                 consumer_timeout_ms=2000) as consumer:
            consumer.subscribe(["async-rt"])
            values = []
            async for record in consumer:
                values.append(record.value)
                if len(values) == 50:
                    break
            return values

    assert asyncio.run(main()) == [f"m{i}".encode() for i in range(50)]


def test_seek_offsets_for_times_and_offset_queries(node, admin) -> None:
    admin.create_topic("timed", num_partitions=1)
    tp = TopicPartition("timed", 0)
    # Old timestamps, so the leader's control batch (stamped with the node's clock) comes first
    # in offsets but last in time: offsets_for_times must look past it.
    stamps = [1000, 2000, 3000, 4000, 5000, 6000]
    with Producer(node.bootstrap, linger_ms=0) as producer:
        offsets = [
            producer.send("timed", f"at-{ts}", partition=0, timestamp=ts).result(30).offset
            for ts in stamps[:2]
        ]
    with Producer(node.bootstrap, linger_ms=60_000) as producer:  # one batch for the rest
        futures = [producer.send("timed", f"at-{ts}", partition=0, timestamp=ts) for ts in stamps[2:]]
        producer.flush(30)
        offsets += [f.result(30).offset for f in futures]
    first = offsets[0]
    assert offsets == list(range(first, first + 6))
    with Consumer(node.bootstrap) as consumer:
        assert consumer.beginning_offsets([tp]) == {tp: 0}
        assert consumer.end_offsets([tp]) == {tp: first + 6}
        for target, index in ((0, 0), (1500, 1), (2000, 1), (3500, 3), (6000, 5)):
            found = consumer.offsets_for_times({tp: target})[tp]
            assert found is not None
            assert (found.offset, found.timestamp) == (offsets[index], stamps[index]), target
        assert consumer.offsets_for_times({tp: 6001}) == {tp: None}
        consumer.assign([tp])
        assert consumer.position(tp) == first + 6  # auto_offset_reset="latest" by default, as Kafka
        consumer.seek(tp, offsets[4])
        got = []
        deadline = time.monotonic() + 20
        while len(got) < 2 and time.monotonic() < deadline:
            got += consumer.poll(500)
        assert [(r.offset, r.timestamp, r.value) for r in got] == [
            (offsets[4], 5000, b"at-5000"), (offsets[5], 6000, b"at-6000")
        ]
        consumer.seek_to_beginning()
        assert consumer.position(tp) == 0
        consumer.seek(tp, 0)  # a control batch at the start is skipped, not returned
        got = []
        deadline = time.monotonic() + 20
        while len(got) < 6 and time.monotonic() < deadline:
            got += consumer.poll(500)
        assert [r.offset for r in got] == offsets
        consumer.seek_to_end(tp)
        assert consumer.position(tp) == first + 6


def test_admin_operations(node, admin) -> None:
    admin.create_topics([NewTopic("adm", 2, 1, {"retention.ms": "3600000"})])
    assert {t.name: t.partition_count for t in admin.list_topics()}["adm"] == 2
    description = admin.describe_topic("adm")
    assert description.configs["retention.ms"] == "3600000"
    assert [p.partition for p in description.partitions] == [0, 1]
    assert all(p.leader == 1 and p.replicas == (1,) for p in description.partitions)

    admin.alter_topic_configs("adm", {"retention.ms": "60000", "segment.ms": "120000"})
    assert admin.describe_topic("adm").configs["retention.ms"] == "60000"
    admin.alter_topic_configs("adm", delete=["retention.ms"])
    assert admin.describe_topic("adm").configs["retention.ms"] != "60000"

    assert admin.add_partitions("adm", 3) == 5
    assert len(admin.describe_topic("adm", include_configs=False).partitions) == 5

    with pytest.raises(TidelogError) as info:
        admin.create_topic("adm", 1)
    assert info.value.code == ErrorCode.TOPIC_ALREADY_EXISTS
    with pytest.raises(TidelogError) as info:
        admin.create_topic("bad name!", 1)
    assert info.value.code == ErrorCode.INVALID_TOPIC_EXCEPTION
    with pytest.raises(TidelogError) as info:
        admin.create_partitions("adm", 2)
    assert info.value.code == ErrorCode.INVALID_PARTITIONS
    with pytest.raises(TidelogError) as info:
        admin.alter_topic_configs("adm", {"no.such.key": "1"})
    assert info.value.code == ErrorCode.INVALID_CONFIG

    admin.create_topic("dry", 1, validate_only=True)
    assert "dry" not in {t.name for t in admin.list_topics()}

    cluster = admin.describe_cluster()
    assert [n.node_id for n in cluster.nodes] == [1] and cluster.controller_id == 1

    admin.delete_topics(["adm"])
    assert "adm" not in {t.name for t in admin.list_topics()}
    with pytest.raises(TidelogError) as info:
        admin.describe_topic("adm")
    assert info.value.code == ErrorCode.UNKNOWN_TOPIC_OR_PARTITION


def test_errors_from_the_node_reach_the_caller(node, admin) -> None:
    admin.create_topic("small", 1, configs={"max.message.bytes": "2000"})
    with Producer(node.bootstrap, compression="none", linger_ms=0) as producer:
        error = producer.send("small", bytes(5000)).exception(30)
        assert isinstance(error, TidelogError) and error.code == ErrorCode.MESSAGE_TOO_LARGE
        assert producer.send("small", b"fits").result(30).offset >= 0
    with Consumer(node.bootstrap, default_api_timeout_ms=1000) as consumer:
        with pytest.raises(TidelogError) as info:
            consumer.partitions_for_topic("no-such-topic", timeout=0.5)
        assert info.value.code == ErrorCode.UNKNOWN_TOPIC_OR_PARTITION


def test_an_unreachable_cluster_is_a_clear_error() -> None:
    with AdminClient("127.0.0.1:1", default_api_timeout_ms=300) as admin:
        with pytest.raises(ClusterUnreachableError) as info:
            admin.list_topics()
    assert "127.0.0.1:1" in str(info.value)


def test_producer_and_consumer_ride_out_a_node_restart(tmp_path: Path) -> None:
    local = start_cluster(tmp_path, nodes=1)
    try:
        with AdminClient(local.bootstrap) as admin:
            admin.create_topic("restart", 1)
        with Producer(local.bootstrap, linger_ms=1, retry_backoff_ms=50) as producer, \
                Consumer(local.bootstrap, topics=["restart"], auto_offset_reset="earliest",
                         retry_backoff_ms=50) as consumer:
            before = [producer.send("restart", f"a{i}") for i in range(100)]
            producer.flush(30)
            got = []
            deadline = time.monotonic() + 30
            while len(got) < 100 and time.monotonic() < deadline:
                got += consumer.poll(200)
            local.nodes[0].kill()
            during = [producer.send("restart", f"b{i}") for i in range(100)]
            local.nodes[0].start()
            acked = [f.result(60) for f in before + during]
            while len(got) < 200 and time.monotonic() < deadline + 30:
                got += consumer.poll(200)
        values = [r.value for r in got]
        # Every acknowledged record is read back, in order per partition (duplicates are
        # possible without idempotence, losses are not).
        assert {f"a{i}".encode() for i in range(100)} | {f"b{i}".encode() for i in range(100)} <= set(values)
        assert len(acked) == 200
        offsets = [r.offset for r in got]
        assert offsets == sorted(offsets) and len(set(offsets)) == len(offsets)
    finally:
        local.stop_all()
