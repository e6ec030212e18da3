"""An in-process fake of the Broker service, for client logic the real node cannot stage on demand.

`FakeCluster` runs N gRPC servers (one per fake node) on one background event loop. They share
one state: topics with a leader per partition and a log of stored batches per partition. Tests
script failures (``cluster.script(tp, [ErrorCode...])`` answers the next produce/fetch attempts of
that partition with those codes) and move leaders (``cluster.move_leader(tp, node_id)``); a
produce sent to a node that does not lead the partition gets NOT_LEADER_OR_FOLLOWER with the
real leader as hint, as the node does.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field
from typing import Iterator

import grpc
import pytest

from tidelog.client._loop import LoopThread
from tidelog.client.types import TopicPartition
from tidelog.proto import api_pb2, api_pb2_grpc
from tidelog.proto import records as codec
from tidelog.proto.common_pb2 import ErrorCode


@dataclass
class FakePartition:
    leader: int
    epoch: int = 1
    batches: list[bytes] = field(default_factory=list)
    end_offset: int = 0
    produce_script: deque[int] = field(default_factory=deque)
    fetch_script: deque[int] = field(default_factory=deque)
    produce_requests: int = 0

    def values(self) -> list[bytes | None]:
        return [r.value for r in codec.decode_records(b"".join(self.batches))]


class _Broker(api_pb2_grpc.BrokerServicer):
    def __init__(self, cluster: FakeCluster, node_id: int) -> None:
        self.cluster = cluster
        self.node_id = node_id

    def _hint(self, part: FakePartition) -> api_pb2.LeaderHint:
        return api_pb2.LeaderHint(leader_id=part.leader, leader_epoch=part.epoch, host="127.0.0.1",
                                  port=self.cluster.ports[part.leader])

    async def Produce(self, request, context):
        if self.node_id in self.cluster.unresponsive:
            await asyncio.sleep(3600)  # a paused node: the request just hangs
        results = []
        for data in request.partitions:
            result = api_pb2.ProducePartitionResult(topic=data.topic, partition=data.partition,
                                                    base_offset=-1, log_append_time_ms=-1)
            results.append(result)
            part = self.cluster.partition(data.topic, data.partition)
            if part is None:
                result.error = ErrorCode.UNKNOWN_TOPIC_OR_PARTITION
                continue
            part.produce_requests += 1
            if part.leader != self.node_id:
                result.error = ErrorCode.NOT_LEADER_OR_FOLLOWER
                result.leader.CopyFrom(self._hint(part))
                continue
            if part.produce_script:
                result.error = part.produce_script.popleft()
                result.error_message = "scripted"
                continue
            buf = bytearray(data.records)
            codec.scan_batches(buf)
            result.base_offset = part.end_offset
            part.end_offset = codec.stamp_batches(buf, part.end_offset, part.epoch)
            part.batches.append(bytes(buf))
        return api_pb2.ProduceResponse(partitions=results)

    async def Fetch(self, request, context):
        if self.node_id in self.cluster.unresponsive:
            await asyncio.sleep(3600)  # a paused node: the request just hangs
        results = []
        for wanted in request.partitions:
            result = api_pb2.FetchPartitionResult(topic=wanted.topic, partition=wanted.partition)
            results.append(result)
            part = self.cluster.partition(wanted.topic, wanted.partition)
            if part is None:
                result.error = ErrorCode.UNKNOWN_TOPIC_OR_PARTITION
                continue
            if part.leader != self.node_id:
                result.error = ErrorCode.NOT_LEADER_OR_FOLLOWER
                result.leader.CopyFrom(self._hint(part))
                continue
            if part.fetch_script:
                result.error = part.fetch_script.popleft()
                continue
            if wanted.fetch_offset > part.end_offset:
                result.error = ErrorCode.OFFSET_OUT_OF_RANGE
                continue
            result.high_watermark = part.end_offset
            result.log_start_offset = 0
            # Whole batches: the first may start before fetch_offset, as the real node's may.
            out = [b for b in part.batches if codec.scan_batches(b)[0].next_offset > wanted.fetch_offset]
            result.records = b"".join(out)
        if not any(r.records for r in results):
            await asyncio.sleep(min(request.max_wait_ms, 50) / 1000)
        return api_pb2.FetchResponse(partitions=results)

    async def ListOffsets(self, request, context):
        results = []
        for wanted in request.partitions:
            part = self.cluster.partition(wanted.topic, wanted.partition)
            result = api_pb2.ListOffsetsPartitionResult(topic=wanted.topic, partition=wanted.partition,
                                                        offset=-1, timestamp=-1)
            if part is None:
                result.error = ErrorCode.UNKNOWN_TOPIC_OR_PARTITION
            elif part.leader != self.node_id:
                result.error = ErrorCode.NOT_LEADER_OR_FOLLOWER
                result.leader.CopyFrom(self._hint(part))
            else:
                result.offset = 0 if wanted.timestamp == -2 else part.end_offset
            results.append(result)
        return api_pb2.ListOffsetsResponse(partitions=results)

    async def Metadata(self, request, context):
        self.cluster.metadata_requests += 1
        names = list(request.topics) or sorted(self.cluster.topics)
        topics = []
        for name in names:
            parts = self.cluster.topics.get(name)
            if parts is None:
                topics.append(api_pb2.TopicMetadata(name=name, error=ErrorCode.UNKNOWN_TOPIC_OR_PARTITION))
                continue
            topics.append(api_pb2.TopicMetadata(name=name, partitions=[
                api_pb2.PartitionMetadata(partition=i, leader_id=p.leader, leader_epoch=p.epoch,
                                          replicas=sorted(self.cluster.ports))
                for i, p in enumerate(parts)
            ]))
        return api_pb2.MetadataResponse(
            cluster_id="fake", controller_id=1,
            nodes=[api_pb2.NodeInfo(node_id=n, host="127.0.0.1", port=port, alive=True)
                   for n, port in sorted(self.cluster.ports.items())],
            topics=topics)


class FakeCluster:
    def __init__(self, nodes: int) -> None:
        self.thread = LoopThread("fake-broker")
        self.topics: dict[str, list[FakePartition]] = {}
        self.ports: dict[int, int] = {}
        self.servers: list[grpc.aio.Server] = []
        self.metadata_requests = 0
        self.unresponsive: set[int] = set()
        for node_id in range(1, nodes + 1):
            self.thread.run(self._start(node_id))

    async def _start(self, node_id: int) -> None:
        server = grpc.aio.server()
        api_pb2_grpc.add_BrokerServicer_to_server(_Broker(self, node_id), server)
        self.ports[node_id] = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        self.servers.append(server)

    @property
    def bootstrap(self) -> str:
        return ",".join(f"127.0.0.1:{p}" for p in self.ports.values())

    def create_topic(self, name: str, partitions: int, leader: int = 1) -> None:
        self.topics[name] = [FakePartition(leader) for _ in range(partitions)]

    def partition(self, topic: str, index: int) -> FakePartition | None:
        parts = self.topics.get(topic)
        if parts is None or not 0 <= index < len(parts):
            return None
        return parts[index]

    def part(self, tp: TopicPartition) -> FakePartition:
        found = self.partition(tp.topic, tp.partition)
        assert found is not None
        return found

    def move_leader(self, tp: TopicPartition, node_id: int) -> None:
        part = self.part(tp)
        part.leader = node_id
        part.epoch += 1

    def append(self, tp: TopicPartition, batch: bytes) -> None:
        """Store an encoded batch (e.g. a control batch) as if produced."""
        part = self.part(tp)
        buf = bytearray(batch)
        part.end_offset = codec.stamp_batches(buf, part.end_offset, part.epoch)
        part.batches.append(bytes(buf))

    def close(self) -> None:
        async def stop() -> None:
            for server in self.servers:
                await server.stop(None)

        self.thread.run(stop())
        self.thread.stop()


@pytest.fixture
def fake_cluster() -> Iterator[FakeCluster]:
    cluster = FakeCluster(nodes=2)
    try:
        yield cluster
    finally:
        cluster.close()
