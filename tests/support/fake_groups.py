"""An in-process fake cluster whose `Groups` service wraps the real sans-IO GroupCoordinator.

For the client's group logic before (and besides) real nodes: every fake node serves Broker
(Metadata, Fetch, ListOffsets over in-memory logs) and Groups. One node is the coordinator of
every group; the others answer NOT_COORDINATOR, as real nodes do. `move_coordinator(node_id)`
builds a new coordinator by replaying every record the old one emitted (what a new leader of the
`__consumer_offsets` partition does), so failover is the real replay path. A ticker calls the
coordinator's `tick` so sessions expire. Tests may script error answers per Groups method.

Tests may import tidelog.node; the client under test never does.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import grpc

from tidelog.client._loop import LoopThread
from tidelog.client.types import TopicPartition
from tidelog.node.group_coordinator import (
    CommittedOffset,
    GroupCoordinator,
    GroupCoordinatorConfig,
    Result,
)
from tidelog.node.group_records import GroupRecord
from tidelog.node.group_records import TopicPartition as NodeTP
from tidelog.proto import api_pb2, api_pb2_grpc, common_pb2
from tidelog.proto import records as codec
from tidelog.proto.common_pb2 import ErrorCode


def now_ms() -> int:
    return int(time.monotonic() * 1000)


@dataclass
class FakeLog:
    batches: list[bytes] = field(default_factory=list)
    end_offset: int = 0
    timestamps: list[tuple[int, int]] = field(default_factory=list)  # (base offset, max ts)

    def append(self, values: list[bytes], timestamp_ms: int) -> int:
        records = [codec.Record(i, timestamp_ms, None, v, ()) for i, v in enumerate(values)]
        buf = bytearray(codec.encode_batch(records))
        base = self.end_offset
        self.end_offset = codec.stamp_batches(buf, self.end_offset, 1)
        self.batches.append(bytes(buf))
        self.timestamps.append((base, timestamp_ms))
        return base


class _Broker(api_pb2_grpc.BrokerServicer):
    def __init__(self, cluster: FakeGroupCluster) -> None:
        self.cluster = cluster

    async def Metadata(self, request: Any, context: Any) -> api_pb2.MetadataResponse:
        names = list(request.topics) or sorted(self.cluster.topics)
        topics = []
        for name in names:
            logs = self.cluster.topics.get(name)
            if logs is None:
                topics.append(api_pb2.TopicMetadata(name=name, error=ErrorCode.UNKNOWN_TOPIC_OR_PARTITION))
                continue
            topics.append(api_pb2.TopicMetadata(name=name, partitions=[
                api_pb2.PartitionMetadata(partition=i, leader_id=1, leader_epoch=1, replicas=[1])
                for i in range(len(logs))
            ]))
        return api_pb2.MetadataResponse(cluster_id="fake", controller_id=1, nodes=self.cluster.node_infos(),
                                        topics=topics)

    async def Fetch(self, request: Any, context: Any) -> api_pb2.FetchResponse:
        results = []
        for wanted in request.partitions:
            result = api_pb2.FetchPartitionResult(topic=wanted.topic, partition=wanted.partition)
            results.append(result)
            log = self.cluster.log(wanted.topic, wanted.partition)
            if log is None:
                result.error = ErrorCode.UNKNOWN_TOPIC_OR_PARTITION
                continue
            if wanted.fetch_offset > log.end_offset:
                result.error = ErrorCode.OFFSET_OUT_OF_RANGE
                continue
            result.high_watermark = log.end_offset
            out = [b for b in log.batches if codec.scan_batches(b)[0].next_offset > wanted.fetch_offset]
            result.records = b"".join(out)
        if not any(r.records for r in results):
            await asyncio.sleep(min(request.max_wait_ms, 50) / 1000)
        return api_pb2.FetchResponse(partitions=results)

    async def ListOffsets(self, request: Any, context: Any) -> api_pb2.ListOffsetsResponse:
        results = []
        for wanted in request.partitions:
            log = self.cluster.log(wanted.topic, wanted.partition)
            result = api_pb2.ListOffsetsPartitionResult(topic=wanted.topic, partition=wanted.partition,
                                                        offset=-1, timestamp=-1)
            if log is None:
                result.error = ErrorCode.UNKNOWN_TOPIC_OR_PARTITION
            elif wanted.timestamp == -2:
                result.offset = 0
            elif wanted.timestamp == -1:
                result.offset = log.end_offset
            else:
                found = [(b, ts) for b, ts in log.timestamps if ts >= wanted.timestamp]
                result.offset, result.timestamp = found[0] if found else (log.end_offset, -1)
            results.append(result)
        return api_pb2.ListOffsetsResponse(partitions=results)


def _node_tps(items: Any) -> list[NodeTP]:
    return [NodeTP(tp.topic, tp.partition) for tp in items]


def _proto_tps(items: Any) -> list[common_pb2.TopicPartition]:
    return [common_pb2.TopicPartition(topic=tp.topic, partition=tp.partition) for tp in sorted(items)]


class _Groups(api_pb2_grpc.GroupsServicer):
    def __init__(self, cluster: FakeGroupCluster, node_id: int) -> None:
        self.cluster = cluster
        self.node_id = node_id

    def _scripted(self, method: str) -> int | None:
        script = self.cluster.group_scripts.get(method)
        if script:
            return script.popleft()
        if self.node_id != self.cluster.coordinator_id:
            return ErrorCode.NOT_COORDINATOR
        return None

    async def FindCoordinator(self, request: Any, context: Any) -> api_pb2.FindCoordinatorResponse:
        self.cluster.calls["FindCoordinator"] += 1
        delays = self.cluster.delays.get("FindCoordinator")
        if delays:
            await asyncio.sleep(delays.popleft())
        cid = self.cluster.coordinator_id
        return api_pb2.FindCoordinatorResponse(node_id=cid, host="127.0.0.1", port=self.cluster.ports[cid],
                                               partition=0)

    async def ConsumerGroupHeartbeat(self, request: Any, context: Any) -> api_pb2.ConsumerGroupHeartbeatResponse:
        self.cluster.calls["ConsumerGroupHeartbeat"] += 1
        delays = self.cluster.delays.get("leave") if request.member_epoch < 0 else None
        if delays:
            await asyncio.sleep(delays.popleft())
        code = self._scripted("ConsumerGroupHeartbeat")
        if code is not None:
            return api_pb2.ConsumerGroupHeartbeatResponse(error=code)
        c = self.cluster
        result = c.apply(c.coordinator.heartbeat(
            request.group_id,
            request.member_id,
            request.member_epoch,
            request.instance_id or None,
            list(request.subscribed_topics) if request.has_subscription else None,
            _node_tps(request.owned_partitions) if request.has_owned_partitions else None,
            request.rebalance_timeout_ms if request.rebalance_timeout_ms > 0 else None,
            now_ms(),
            {name: len(logs) for name, logs in c.topics.items()},
            server_assignor=request.server_assignor or None,
            client_id=request.client_id or None,
        ))
        r = result.response
        out = api_pb2.ConsumerGroupHeartbeatResponse(
            error=int(r.error), error_message=r.message, member_id=r.member_id, member_epoch=r.member_epoch,
            heartbeat_interval_ms=r.heartbeat_interval_ms,
        )
        if r.assignment is not None:
            out.has_assignment = True
            out.assignment.extend(_proto_tps(r.assignment))
        return out

    async def OffsetCommit(self, request: Any, context: Any) -> api_pb2.OffsetCommitResponse:
        self.cluster.calls["OffsetCommit"] += 1
        delays = self.cluster.delays.get("OffsetCommit")
        if delays:
            await asyncio.sleep(delays.popleft())  # a slow answer: later requests overtake it
        code = self._scripted("OffsetCommit")
        if code is not None:
            return api_pb2.OffsetCommitResponse(error=code)
        offsets = {NodeTP(p.topic, p.partition): CommittedOffset(p.offset, p.leader_epoch, p.metadata)
                   for p in request.partitions}
        r = self.cluster.apply(self.cluster.coordinator.commit_offsets(
            request.group_id, request.member_id, request.member_epoch, offsets, now_ms())).response
        return api_pb2.OffsetCommitResponse(
            error=int(r.error), error_message=r.message,
            partitions=[api_pb2.OffsetCommitPartitionResult(topic=tp.topic, partition=tp.partition, error=int(e))
                        for tp, e in sorted(r.partition_errors.items())])

    async def OffsetFetch(self, request: Any, context: Any) -> api_pb2.OffsetFetchResponse:
        delays = self.cluster.delays.get("OffsetFetch")
        if delays:
            await asyncio.sleep(delays.popleft())
        code = self._scripted("OffsetFetch")
        if code is not None:
            return api_pb2.OffsetFetchResponse(error=code)
        r = self.cluster.coordinator.fetch_offsets(
            request.group_id, _node_tps(request.partitions) or None,
            member_id=request.member_id, member_epoch=request.member_epoch)
        return api_pb2.OffsetFetchResponse(error=int(r.error), error_message=r.message, offsets=[
            api_pb2.CommittedOffsetInfo(topic=tp.topic, partition=tp.partition,
                                        offset=-1 if v is None else v.offset)
            for tp, v in sorted(r.offsets.items())])

    async def ListGroups(self, request: Any, context: Any) -> api_pb2.ListGroupsResponse:
        if self.node_id != self.cluster.coordinator_id:
            return api_pb2.ListGroupsResponse()
        return api_pb2.ListGroupsResponse(groups=[
            api_pb2.GroupListing(group_id=g.group_id, state=g.state.value, coordinator_id=self.node_id)
            for g in self.cluster.coordinator.list_groups()])

    async def DescribeGroup(self, request: Any, context: Any) -> api_pb2.DescribeGroupResponse:
        code = self._scripted("DescribeGroup")
        if code is not None:
            return api_pb2.DescribeGroupResponse(error=code)
        d = self.cluster.coordinator.describe_group(request.group_id)
        return api_pb2.DescribeGroupResponse(
            error=int(d.error), group_id=d.group_id, state=d.state.value, group_epoch=d.group_epoch,
            assignment_epoch=d.assignment_epoch, assignor=d.assignor, coordinator_id=self.node_id,
            members=[api_pb2.GroupMemberDescription(
                member_id=m.member_id, instance_id=m.instance_id or "", member_epoch=m.member_epoch,
                state=m.state.name.lower(), subscribed_topics=list(m.subscribed_topics),
                assignment=_proto_tps(m.assignment),
                pending_revocation=_proto_tps(m.partitions_pending_revocation),
                target_assignment=_proto_tps(m.target_assignment), client_id=m.client_id)
                for m in d.members],
            offsets=[api_pb2.CommittedOffsetInfo(topic=tp.topic, partition=tp.partition, offset=v.offset)
                     for tp, v in sorted(d.offsets.items())])

    async def DeleteGroup(self, request: Any, context: Any) -> api_pb2.DeleteGroupResponse:
        r = self.cluster.apply(self.cluster.coordinator.delete_group(request.group_id)).response
        return api_pb2.DeleteGroupResponse(error=int(r.error), error_message=r.message)


class FakeGroupCluster:
    def __init__(self, nodes: int = 2, *, session_timeout_ms: int = 3000, heartbeat_interval_ms: int = 100) -> None:
        self.config = GroupCoordinatorConfig(session_timeout_ms=session_timeout_ms,
                                             heartbeat_interval_ms=heartbeat_interval_ms)
        self.thread = LoopThread("fake-groups")
        self.topics: dict[str, list[FakeLog]] = {}
        self.ports: dict[int, int] = {}
        self.servers: list[grpc.aio.Server] = []
        self.records: list[GroupRecord] = []  # everything the coordinators emitted, in order
        self.group_scripts: dict[str, deque[int]] = {}
        self.delays: dict[str, deque[float]] = {}  # seconds a method's next calls wait first
        self.calls: dict[str, int] = {k: 0 for k in ("FindCoordinator", "ConsumerGroupHeartbeat", "OffsetCommit")}
        self.coordinator_id = 1
        self.coordinator = GroupCoordinator(self.config)
        self.expired: list[str] = []
        for node_id in range(1, nodes + 1):
            self.thread.run(self._start(node_id))
        self._ticker = self.thread.run(self._start_ticker())

    async def _start(self, node_id: int) -> None:
        server = grpc.aio.server()
        api_pb2_grpc.add_BrokerServicer_to_server(_Broker(self), server)
        api_pb2_grpc.add_GroupsServicer_to_server(_Groups(self, node_id), server)
        self.ports[node_id] = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        self.servers.append(server)

    async def _start_ticker(self) -> asyncio.Task[None]:
        return asyncio.get_running_loop().create_task(self._tick_forever())

    async def _tick_forever(self) -> None:
        while True:
            await asyncio.sleep(0.05)
            result = self.apply(self.coordinator.tick(now_ms()))
            self.expired += [e.member_id for e in result.response]

    def apply(self, result: Result[Any]) -> Result[Any]:
        self.records.extend(result.records)  # "committed" at once: one in-memory log
        return result

    def node_infos(self) -> list[api_pb2.NodeInfo]:
        return [api_pb2.NodeInfo(node_id=n, host="127.0.0.1", port=p, alive=True) for n, p in sorted(self.ports.items())]

    @property
    def bootstrap(self) -> str:
        return ",".join(f"127.0.0.1:{p}" for p in self.ports.values())

    def create_topic(self, name: str, partitions: int) -> None:
        self.topics[name] = [FakeLog() for _ in range(partitions)]

    def log(self, topic: str, partition: int) -> FakeLog | None:
        logs = self.topics.get(topic)
        return logs[partition] if logs is not None and 0 <= partition < len(logs) else None

    def append(self, tp: TopicPartition, values: list[bytes], timestamp_ms: int = 1000) -> int:
        def run() -> int:
            log = self.log(tp.topic, tp.partition)
            assert log is not None
            return log.append(values, timestamp_ms)

        return self.call(run)

    def call(self, fn: Any) -> Any:
        """Run ``fn`` on the fake's loop (the coordinator is not thread-safe)."""
        async def run() -> Any:
            return fn()

        return self.thread.run(run())

    def owners(self, group_id: str) -> dict[TopicPartition, str]:
        return {TopicPartition(tp.topic, tp.partition): m
                for tp, m in self.call(lambda: self.coordinator.owners(group_id)).items()}

    def committed(self, group_id: str) -> dict[TopicPartition, int]:
        offsets = self.call(lambda: self.coordinator.fetch_offsets(group_id).offsets)
        return {TopicPartition(tp.topic, tp.partition): v.offset for tp, v in offsets.items() if v is not None}

    def script(self, method: str, codes: list[int]) -> None:
        self.call(lambda: self.group_scripts.setdefault(method, deque()).extend(codes))

    def delay(self, method: str, seconds: list[float]) -> None:
        """The next calls of ``method`` (FindCoordinator, OffsetCommit, OffsetFetch, or "leave": heartbeats
        with a negative epoch) wait this long before being answered."""
        self.call(lambda: self.delays.setdefault(method, deque()).extend(seconds))

    def move_coordinator(self, node_id: int) -> None:
        """A new coordinator on ``node_id``, rebuilt by replaying the log (a leader change)."""
        def run() -> None:
            fresh = GroupCoordinator(self.config)
            for record in self.records:
                fresh.replay(record.key, record.value)
            fresh.on_loaded(now_ms())
            self.coordinator = fresh
            self.coordinator_id = node_id

        self.call(run)

    def close(self) -> None:
        async def stop() -> None:
            self._ticker.cancel()
            for server in self.servers:
                await server.stop(None)

        self.thread.run(stop())
        self.thread.stop()
