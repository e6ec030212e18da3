"""An altered topic config reaches the replicas that are already open, without a restart
(Kafka applies `kafka-configs --alter` to live logs the same way)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from tidelog.client import AdminClient, Consumer, Producer, TidelogError, TopicPartition
from tidelog.proto.common_pb2 import ErrorCode

from support.nodes import LocalCluster, start_cluster

DEADLINE_S = 30.0


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[LocalCluster]:
    local = start_cluster(tmp_path, nodes=3, retention_check_interval_ms=200)
    try:
        yield local
    finally:
        local.stop_all()


def test_a_raised_max_message_bytes_lets_larger_batches_into_every_replica(nodes: LocalCluster) -> None:
    value = b"v" * 20_000
    with AdminClient(nodes.bootstrap) as admin, Producer(nodes.bootstrap, compression=None) as producer:
        admin.create_topic("big", 1, 3, {"max.message.bytes": "4096"})
        with pytest.raises(TidelogError) as refused:
            producer.send("big", value).result(timeout=DEADLINE_S)
        assert refused.value.code == ErrorCode.MESSAGE_TOO_LARGE

        admin.alter_topic_configs("big", {"max.message.bytes": "65536"})
        deadline = time.monotonic() + DEADLINE_S
        while True:  # each node applies the new config when its metadata catches up
            try:
                metadata = producer.send("big", value).result(timeout=DEADLINE_S)
                break
            except TidelogError as exc:
                assert exc.code == ErrorCode.MESSAGE_TOO_LARGE and time.monotonic() < deadline, exc
        # acks=all: the batch is on every in-sync replica; read it back.
    with Consumer(nodes.bootstrap, auto_offset_reset="earliest") as consumer:
        tp = TopicPartition("big", 0)
        consumer.assign([tp])
        consumer.seek(tp, metadata.offset)
        records: list = []
        deadline = time.monotonic() + DEADLINE_S
        while not records and time.monotonic() < deadline:
            records = consumer.poll(timeout_ms=500)
        assert [r.value for r in records[:1]] == [value]


def test_a_lowered_retention_bytes_deletes_old_segments_of_an_open_log(nodes: LocalCluster) -> None:
    # retention.bytes rather than retention.ms: the first segment holds the leader's control
    # batch, stamped now, and time-based retention stops at the first segment it must keep.
    tp = TopicPartition("sized", 0)
    with AdminClient(nodes.bootstrap) as admin, Producer(nodes.bootstrap, compression=None, linger_ms=0) as producer:
        admin.create_topic("sized", 1, 3, {"retention.bytes": "-1", "segment.bytes": "1024"})
        for _ in range(20):  # one batch of ~370 bytes each: about ten segments
            producer.send("sized", b"x" * 300).result(timeout=DEADLINE_S)
        with Consumer(nodes.bootstrap) as consumer:
            assert consumer.beginning_offsets([tp]) == {tp: 0}
            admin.alter_topic_configs("sized", {"retention.bytes": "2000"})
            deadline = time.monotonic() + DEADLINE_S
            start = 0
            while start == 0 and time.monotonic() < deadline:
                start = consumer.beginning_offsets([tp])[tp]
                if start == 0:
                    time.sleep(0.1)  # polling a condition under a deadline
            assert start > 0, "the new retention.bytes never reached the open log"
