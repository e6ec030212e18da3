"""Issue 7: an idempotent producer's state survives a full-cluster restart, clean (SIGTERM: the
producer-state snapshot written on close) and crashed (SIGKILL: the newest snapshot plus the log
tail), seen from the client: the same producer, with the same id and its sequences continuing,
resends its last batch and is answered with the original offsets, and goes on with no gap."""

from __future__ import annotations

import time
from typing import Callable

import grpc
from support.nodes import LocalCluster, produce_following_leader
from tidelog.client import Producer
from tidelog.client.producer import AsyncProducer
from tidelog.proto import api_pb2, api_pb2_grpc
from tidelog.proto import records as codec
from tidelog.proto.common_pb2 import ErrorCode

DEADLINE_S = 60.0
TOPIC = "restart"


def _produce_raw(cluster: LocalCluster, records: bytes) -> api_pb2.ProducePartitionResult:
    """acks=all to partition 0's leader of bytes as they are."""
    return produce_following_leader(
        cluster, TOPIC, records, deadline_s=DEADLINE_S,
        retry_on=(ErrorCode.NOT_LEADER_OR_FOLLOWER, ErrorCode.LEADER_NOT_AVAILABLE))


def _read_values(cluster: LocalCluster) -> list[bytes | None]:
    """Every committed record of partition 0 (control batches skipped), from its leader."""
    deadline = time.monotonic() + DEADLINE_S
    while True:
        for node in cluster.running_nodes():
            with grpc.insecure_channel(node.address) as channel:
                stub = api_pb2_grpc.BrokerStub(channel)
                values: list[bytes | None] = []
                offset = 0
                while True:
                    result = stub.Fetch(api_pb2.FetchRequest(max_wait_ms=0, max_bytes=1 << 20, partitions=[
                        api_pb2.FetchPartition(topic=TOPIC, partition=0, fetch_offset=offset,
                                               current_leader_epoch=-1)]), timeout=30).partitions[0]
                    if result.error != ErrorCode.NONE:
                        break
                    batches = [b for b in codec.decode_batches(result.records) if b.next_offset > offset]
                    if not batches:
                        return values
                    for batch in batches:
                        if not batch.attributes & codec.CONTROL_FLAG_MASK:
                            values.extend(r.value for r in batch.records() if r.offset >= offset)
                    offset = batches[-1].next_offset
        assert time.monotonic() < deadline
        time.sleep(0.1)


class _LastRun:
    """Remembers the bytes and the answer of the last run of batches the producer got acknowledged."""

    def __init__(self, core: AsyncProducer) -> None:
        self.records = b""
        self.base_offset = -1
        original: Callable = core._complete

        def spy(run, result) -> None:  # type: ignore[no-untyped-def]
            self.records = b"".join(batch.encoded for batch in run)
            self.base_offset = result.base_offset
            original(run, result)

        core._complete = spy  # type: ignore[method-assign]


def _send(producer: Producer, values: list[bytes]) -> list[int]:
    futures = [producer.send(TOPIC, v, partition=0) for v in values]
    return [f.result(DEADLINE_S).offset for f in futures]


def _restart_all(cluster: LocalCluster, crash: bool) -> None:
    if crash:
        cluster.kill_all()
    else:
        cluster.stop_all()
    for node in cluster.nodes:
        node.start(wait=False)
    cluster.wait_ready()


def test_an_idempotent_producer_continues_across_full_cluster_restarts(cluster3: LocalCluster) -> None:
    with grpc.insecure_channel(cluster3.nodes[0].address) as channel:
        created = api_pb2_grpc.AdminStub(channel).CreateTopics(api_pb2.CreateTopicsRequest(topics=[
            api_pb2.NewTopic(name=TOPIC, num_partitions=1, replication_factor=3)]), timeout=60)
        assert created.topics[0].error == ErrorCode.NONE, created
    sent: list[bytes] = []
    # Small batches, so a round is several batches and the last run is a real part of the log.
    with Producer(cluster3.bootstrap, batch_size=2048, linger_ms=1, retry_backoff_ms=20) as producer:
        core = producer._core
        last = _LastRun(core)
        for round_, crash in enumerate((False, True)):
            values = [b"r%d-%04d" % (round_, i) + bytes(100) for i in range(200)]
            offsets = _send(producer, values)
            sent += values
            producer_id = core._producer_id
            assert producer_id >= 0 and last.base_offset >= 0
            resend, original_base = last.records, last.base_offset

            _restart_all(cluster3, crash)

            # The producer's last batches again, byte for byte (same id, epoch and sequences): a
            # retry whose first answer was lost. Answered with the original offsets, not stored.
            again = _produce_raw(cluster3, resend)
            assert (again.error, again.base_offset) == (ErrorCode.NONE, original_base), again
            assert original_base in offsets
            # The same producer goes on: same id, the next sequence accepted, nothing missing.
            more = [b"after-%d-%04d" % (round_, i) for i in range(50)]
            _send(producer, more)
            sent += more
            assert core._producer_id == producer_id, "the producer had to take a new id"
    assert _read_values(cluster3) == sent  # each record once, in order, no gap
