"""The admin client: `AsyncAdminClient` and its sync facade `AdminClient`.

Admin requests may go to any node (the node forwards them to the controller leader, DESIGN.md
§5); the client tries the nodes it knows in turn when one does not answer, and retries
retriable answers (NOT_CONTROLLER while the quorum elects, REQUEST_TIMED_OUT) until its timeout.
Each method raises `TidelogError` for the first topic that failed.

Group calls go to the group's coordinator (tidelog.client.group.GroupCoordinatorClient finds it
and follows it when it moves); `list_groups` asks every node, since each lists only the groups it
coordinates. Offsets for lag and reset plans are read from the partition leaders (ListOffsets,
and for a time, the exact first record at or after it) by a consumer without a group.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Awaitable, Callable, Iterable, Mapping, Sequence, TypeVar

import grpc

from tidelog.client._loop import LoopThread
from tidelog.client.connection import (
    ClusterUnreachableError,
    Connections,
    Metadata,
    describe_rpc_error,
)
from tidelog.client.consumer import AsyncConsumer
from tidelog.client.group import GroupCoordinatorClient
from tidelog.client.group_reset import (
    PartitionOffsets,
    ResetPlanEntry,
    ResetSpec,
    lookup_timestamp,
    plan_reset_offsets,
)
from tidelog.client.types import (
    BrokerNode,
    ClusterDescription,
    GroupDescription,
    GroupListing,
    GroupMemberDescription,
    GroupOffset,
    NewTopic,
    PartitionInfo,
    TopicDescription,
    TopicListing,
    TopicPartition,
)
from tidelog.proto import api_pb2
from tidelog.proto.common_pb2 import ErrorCode
from tidelog.proto.errors import TidelogError, error_name

T = TypeVar("T")

log = logging.getLogger(__name__)


# Answers that mean "ask again shortly": the metadata quorum is electing a controller. A timed-out
# change is not retried, since it may still commit (a retry would then fail with ALREADY_EXISTS).
_ADMIN_RETRY = frozenset(
    {ErrorCode.NOT_CONTROLLER, ErrorCode.COORDINATOR_NOT_AVAILABLE, ErrorCode.LEADER_NOT_AVAILABLE}
)


def _retry_code(codes: Iterable[int]) -> int:
    return next((c for c in codes if c in _ADMIN_RETRY), ErrorCode.NONE)


def _raise_for(result: api_pb2.TopicResult) -> None:
    if result.error != ErrorCode.NONE:
        raise TidelogError(result.error, result.error_message or f"topic {result.name!r}")


def _node(info: api_pb2.NodeInfo) -> BrokerNode:
    return BrokerNode(info.node_id, info.host, info.port, info.rack, info.alive)


def topic_description(description: api_pb2.TopicDescription) -> TopicDescription:
    meta = description.metadata
    if meta.error != ErrorCode.NONE:
        raise TidelogError(meta.error, meta.error_message or f"topic {meta.name!r}")
    partitions = tuple(
        PartitionInfo(
            p.partition,
            p.leader_id,
            p.leader_epoch,
            tuple(p.replicas),
            tuple(p.in_sync_replicas),
            tuple(p.offline_replicas),
            "" if p.error == ErrorCode.NONE else error_name(p.error),
        )
        for p in sorted(meta.partitions, key=lambda p: p.partition)
    )
    return TopicDescription(
        meta.name, meta.topic_id, meta.internal, partitions, dict(sorted(description.configs.items()))
    )


class AsyncAdminClient:
    """Topic and cluster administration from asyncio code.

    Defaults: request_timeout_ms=30000 (per attempt and the server-side timeout),
    default_api_timeout_ms=60000 (the whole call, retries included), retry_backoff_ms=100.
    """

    def __init__(
        self,
        bootstrap: str | Sequence[str] | None = None,
        *,
        request_timeout_ms: float = 30000,
        default_api_timeout_ms: float = 60000,
        retry_backoff_ms: float = 100,
    ) -> None:
        self.connections = Connections(bootstrap)
        self.metadata = Metadata(
            self.connections,
            request_timeout_ms=request_timeout_ms,
            retry_backoff_ms=retry_backoff_ms,
        )
        self.metadata.track_all_topics()
        self.request_timeout_ms = request_timeout_ms
        self.api_timeout = default_api_timeout_ms / 1000.0
        self.retry_backoff = retry_backoff_ms / 1000.0
        self._options = {
            "request_timeout_ms": request_timeout_ms,
            "default_api_timeout_ms": default_api_timeout_ms,
            "retry_backoff_ms": retry_backoff_ms,
        }
        self._offsets_reader: AsyncConsumer | None = None

    async def __aenter__(self) -> AsyncAdminClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._offsets_reader is not None:
            await self._offsets_reader.close()
        await self.connections.close()

    async def _call(
        self,
        call: Callable[[str], Awaitable[T]],
        check: Callable[[T], int],
        what: str,
    ) -> T:
        """``call`` on any node, again while ``check`` of the answer is a retriable code."""
        deadline = time.monotonic() + self.api_timeout
        backoff = self.retry_backoff
        while True:
            try:
                answer = await self.metadata.call_any(call, what=what)
            except ClusterUnreachableError:
                if time.monotonic() + backoff >= deadline:
                    raise
            else:
                if check(answer) not in _ADMIN_RETRY or time.monotonic() + backoff >= deadline:
                    return answer
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 1.0)

    @property
    def _rpc_timeout(self) -> float:
        return self.request_timeout_ms / 1000.0 + 5.0

    async def create_topics(
        self, topics: Iterable[NewTopic], *, validate_only: bool = False
    ) -> None:
        request = api_pb2.CreateTopicsRequest(
            topics=[
                api_pb2.NewTopic(
                    name=t.name,
                    num_partitions=t.num_partitions,
                    replication_factor=t.replication_factor,
                    configs={str(k): str(v) for k, v in t.configs.items()},
                )
                for t in topics
            ],
            timeout_ms=int(self.request_timeout_ms),
            validate_only=validate_only,
        )
        response = await self._call(
            lambda a: self.connections.admin(a).CreateTopics(request, timeout=self._rpc_timeout),
            lambda r: _retry_code(t.error for t in r.topics),
            "create-topics request",
        )
        for result in response.topics:
            _raise_for(result)

    async def create_topic(
        self,
        name: str,
        num_partitions: int = -1,
        replication_factor: int = -1,
        configs: Mapping[str, str] | None = None,
        *,
        validate_only: bool = False,
    ) -> None:
        await self.create_topics(
            [NewTopic(name, num_partitions, replication_factor, dict(configs or {}))],
            validate_only=validate_only,
        )

    async def delete_topics(self, names: Iterable[str]) -> None:
        request = api_pb2.DeleteTopicsRequest(names=list(names), timeout_ms=int(self.request_timeout_ms))
        response = await self._call(
            lambda a: self.connections.admin(a).DeleteTopics(request, timeout=self._rpc_timeout),
            lambda r: _retry_code(t.error for t in r.topics),
            "delete-topics request",
        )
        for result in response.topics:
            _raise_for(result)

    async def list_topics(self, include_internal: bool = False) -> list[TopicListing]:
        request = api_pb2.ListTopicsRequest(include_internal=include_internal)
        response = await self._call(
            lambda a: self.connections.admin(a).ListTopics(request, timeout=self._rpc_timeout),
            lambda r: ErrorCode.NONE,
            "list-topics request",
        )
        return [
            TopicListing(t.name, t.internal, t.partition_count, t.replication_factor)
            for t in response.topics
        ]

    async def describe_topics(
        self, names: Iterable[str] | None = None, *, include_configs: bool = True
    ) -> list[TopicDescription]:
        """Describe ``names`` (every topic when None), with each config's effective value."""
        request = api_pb2.DescribeTopicsRequest(names=list(names or ()), include_configs=include_configs)
        response = await self._call(
            lambda a: self.connections.admin(a).DescribeTopics(request, timeout=self._rpc_timeout),
            lambda r: ErrorCode.NONE,
            "describe-topics request",
        )
        return [topic_description(d) for d in response.topics]

    async def describe_topic(self, name: str, *, include_configs: bool = True) -> TopicDescription:
        return (await self.describe_topics([name], include_configs=include_configs))[0]

    async def alter_topic_configs(
        self,
        topic: str,
        set: Mapping[str, str] | None = None,
        delete: Iterable[str] = (),
        *,
        validate_only: bool = False,
    ) -> None:
        """Set keys of ``set`` and revert the keys in ``delete`` to their defaults."""
        request = api_pb2.AlterTopicConfigsRequest(
            topic=topic,
            set={str(k): str(v) for k, v in (set or {}).items()},
            delete=list(delete),
            validate_only=validate_only,
        )
        response = await self._call(
            lambda a: self.connections.admin(a).AlterTopicConfigs(request, timeout=self._rpc_timeout),
            lambda r: r.result.error,
            "alter-configs request",
        )
        _raise_for(response.result)

    async def create_partitions(
        self, topic: str, new_total_count: int, *, validate_only: bool = False
    ) -> None:
        """Grow ``topic`` to ``new_total_count`` partitions (Kafka's createPartitions)."""
        request = api_pb2.CreatePartitionsRequest(
            topic=topic, new_total_count=new_total_count, validate_only=validate_only
        )
        response = await self._call(
            lambda a: self.connections.admin(a).CreatePartitions(request, timeout=self._rpc_timeout),
            lambda r: r.result.error,
            "create-partitions request",
        )
        _raise_for(response.result)

    async def add_partitions(self, topic: str, count: int, *, validate_only: bool = False) -> int:
        """Add ``count`` partitions to ``topic``; returns the new total."""
        if count <= 0:
            raise ValueError("the number of partitions to add must be positive")
        current = len((await self.describe_topic(topic, include_configs=False)).partitions)
        await self.create_partitions(topic, current + count, validate_only=validate_only)
        return current + count

    async def describe_cluster(self) -> ClusterDescription:
        request = api_pb2.DescribeClusterRequest()
        response = await self._call(
            lambda a: self.connections.admin(a).DescribeCluster(request, timeout=self._rpc_timeout),
            lambda r: ErrorCode.NONE,
            "describe-cluster request",
        )
        return ClusterDescription(
            response.cluster_id,
            response.controller_id,
            tuple(_node(n) for n in sorted(response.nodes, key=lambda n: n.node_id)),
            tuple(response.controller_voters),
            response.metadata_epoch,
            response.metadata_offset,
        )

    # --- groups --------------------------------------------------------------------------------

    def _coordinator(self, group_id: str) -> GroupCoordinatorClient:
        if not group_id:
            raise ValueError("the group id must not be empty")
        return GroupCoordinatorClient(
            group_id,
            self.connections,
            self.metadata,
            request_timeout=self._rpc_timeout,
            retry_backoff=self.retry_backoff,
        )

    def _reader(self) -> AsyncConsumer:
        if self._offsets_reader is None:
            self._offsets_reader = AsyncConsumer(self.connections.bootstrap, **self._options)
        return self._offsets_reader

    async def list_groups(self) -> list[GroupListing]:
        """Every group of the cluster: each node lists the groups it coordinates."""
        snapshot = await self.metadata.refresh()
        nodes = sorted(snapshot.nodes.values(), key=lambda n: n.node_id)
        request = api_pb2.ListGroupsRequest()

        async def ask(node: BrokerNode) -> api_pb2.ListGroupsResponse | None:
            try:
                return await self.connections.groups(node.address).ListGroups(
                    request, timeout=self._rpc_timeout
                )
            except grpc.aio.AioRpcError as exc:
                log.info("listing groups: %s", describe_rpc_error(exc, node.address))
                return None

        answers = await asyncio.gather(*(ask(n) for n in nodes))
        if nodes and all(a is None for a in answers):
            raise ClusterUnreachableError("no node answered the list-groups request")
        groups: dict[str, GroupListing] = {}
        for node, answer in zip(nodes, answers):
            if answer is None:
                continue
            if answer.error != ErrorCode.NONE:
                log.info("listing groups on node %d: %s", node.node_id, error_name(answer.error))
                continue
            for g in answer.groups:
                # During a coordinator move two nodes may list a group; either answer will do.
                groups.setdefault(g.group_id, GroupListing(
                    g.group_id, g.state, g.coordinator_id if g.coordinator_id else node.node_id
                ))
        return [groups[name] for name in sorted(groups)]

    async def describe_group(self, group_id: str) -> GroupDescription:
        """The group's state, members, and per partition committed offset, log end and lag."""
        request = api_pb2.DescribeGroupRequest(group_id=group_id)
        response = await self._coordinator(group_id).call(
            "DescribeGroup", request, lambda r: r.error, self.api_timeout
        )
        if response.error != ErrorCode.NONE:
            raise TidelogError(response.error, response.error_message or f"group {group_id!r} does not exist")
        members = tuple(
            GroupMemberDescription(
                m.member_id,
                m.instance_id or None,
                m.member_epoch,
                m.state,
                tuple(m.subscribed_topics),
                tuple(sorted(TopicPartition(t.topic, t.partition) for t in m.assignment)),
                tuple(sorted(TopicPartition(t.topic, t.partition) for t in m.pending_revocation)),
                tuple(sorted(TopicPartition(t.topic, t.partition) for t in m.target_assignment)),
                m.client_id,
                m.client_host,
            )
            for m in response.members
        )
        committed = {
            TopicPartition(o.topic, o.partition): o.offset for o in response.offsets if o.offset >= 0
        }
        owner = {tp: m.member_id for m in members for tp in (*m.assignment, *m.pending_revocation)}
        partitions = sorted(set(committed) | set(owner))
        ends = await self._end_offsets(partitions)
        offsets = tuple(
            GroupOffset(
                tp.topic,
                tp.partition,
                committed.get(tp),
                ends.get(tp),
                None if committed.get(tp) is None or ends.get(tp) is None
                else max(0, ends[tp] - committed[tp]),
                owner.get(tp),
            )
            for tp in partitions
        )
        return GroupDescription(
            response.group_id or group_id,
            response.state,
            response.group_epoch,
            response.assignment_epoch,
            response.assignor,
            response.coordinator_id,
            members,
            offsets,
        )

    async def _end_offsets(self, partitions: Sequence[TopicPartition]) -> dict[TopicPartition, int]:
        """Log end offsets; a partition whose topic is gone (or has no leader) is left out,
        so a group's describe still works."""
        ends: dict[TopicPartition, int] = {}
        reader = self._reader()
        for topic in sorted({tp.topic for tp in partitions}):
            wanted = [tp for tp in partitions if tp.topic == topic]
            try:
                ends.update(await reader.end_offsets(wanted, min(self.api_timeout, 5.0)))
            except TidelogError as exc:
                log.info("no end offsets for topic %s: %s", topic, exc)
        return ends

    async def delete_group(self, group_id: str) -> None:
        """Delete an empty group and its committed offsets (NON_EMPTY_GROUP while it has members)."""
        request = api_pb2.DeleteGroupRequest(group_id=group_id)
        response = await self._coordinator(group_id).call(
            "DeleteGroup", request, lambda r: r.error, self.api_timeout
        )
        if response.error != ErrorCode.NONE:
            raise TidelogError(response.error, response.error_message or f"deleting group {group_id!r}")

    async def list_group_offsets(self, group_id: str) -> dict[TopicPartition, int]:
        """Every offset the group has committed."""
        found = await self._coordinator(group_id).fetch_committed(None, lambda: ("", -1), self.api_timeout)
        return {tp: offset for tp, offset in found.items() if offset is not None}

    async def alter_group_offsets(self, group_id: str, offsets: Mapping[TopicPartition, int]) -> None:
        """Commit ``offsets`` for the group as an admin (empty member id, epoch -1); refused
        while the group has live members, whose next commit would undo it."""
        await self._refuse_live_members(group_id)
        try:
            await self._coordinator(group_id).commit(offsets, lambda: ("", -1), self.api_timeout)
        except TidelogError as exc:
            if exc.code in (ErrorCode.UNKNOWN_MEMBER_ID, ErrorCode.NON_EMPTY_GROUP):
                raise TidelogError(
                    ErrorCode.NON_EMPTY_GROUP,
                    f"group {group_id!r} has live members; stop its consumers first",
                ) from None
            raise

    async def _refuse_live_members(self, group_id: str) -> None:
        description = await self._describe_or_none(group_id)
        if description is not None and description.members:
            raise TidelogError(
                ErrorCode.NON_EMPTY_GROUP,
                f"group {group_id!r} has {len(description.members)} live member(s) "
                f"(state {description.state}); stop its consumers first",
            )

    async def _describe_or_none(self, group_id: str) -> GroupDescription | None:
        try:
            return await self.describe_group(group_id)
        except TidelogError as exc:
            if exc.code == ErrorCode.GROUP_ID_NOT_FOUND:
                return None
            raise

    async def _resolve_partitions(
        self, group_id: str, partitions: Iterable[TopicPartition] | None, topics: Iterable[str]
    ) -> list[TopicPartition]:
        chosen = set(partitions or ())
        topics = list(topics)
        if topics:
            snapshot = await self.metadata.wait_for_topics(topics, self.api_timeout)
            for topic in topics:
                chosen.update(TopicPartition(topic, p) for p in range(snapshot.partition_count(topic) or 0))
        if not chosen and partitions is None and not topics:
            chosen = set(await self.list_group_offsets(group_id))
        return sorted(chosen)

    async def plan_reset_offsets(
        self,
        group_id: str,
        spec: ResetSpec,
        partitions: Iterable[TopicPartition] | None = None,
        topics: Iterable[str] = (),
        *,
        now_ms: int | None = None,
    ) -> list[ResetPlanEntry]:
        """What `reset_offsets` would commit (Kafka's --dry-run): ``partitions`` and every
        partition of ``topics``; neither means every partition the group has committed."""
        tps = await self._resolve_partitions(group_id, partitions, topics)
        if not tps:
            return []
        reader = self._reader()
        starts = await reader.beginning_offsets(tps, self.api_timeout)
        ends = await reader.end_offsets(tps, self.api_timeout)
        committed = await self._coordinator(group_id).fetch_committed(tps, lambda: ("", -1), self.api_timeout)
        at: dict[TopicPartition, int | None] = {}
        target = lookup_timestamp(spec, int(time.time() * 1000) if now_ms is None else now_ms)
        if target is not None:
            found = await reader.offsets_for_times({tp: max(0, target) for tp in tps}, self.api_timeout)
            at = {tp: (f.offset if f is not None else None) for tp, f in found.items()}
        return plan_reset_offsets(spec, {
            tp: PartitionOffsets(starts[tp], ends[tp], committed.get(tp), at.get(tp)) for tp in tps
        })

    async def reset_offsets(
        self,
        group_id: str,
        spec: ResetSpec,
        partitions: Iterable[TopicPartition] | None = None,
        topics: Iterable[str] = (),
        *,
        execute: bool = False,
    ) -> list[ResetPlanEntry]:
        """Plan a reset and, with ``execute``, commit it (refused while the group has live
        members). Returns the plan either way."""
        if execute:
            await self._refuse_live_members(group_id)  # before planning, even an empty plan
        plan = await self.plan_reset_offsets(group_id, spec, partitions, topics)
        if execute and plan:
            await self.alter_group_offsets(group_id, {e.topic_partition: e.new_offset for e in plan})
        return plan


class AdminClient:
    """Topic and cluster administration from ordinary code; see `AsyncAdminClient`."""

    def __init__(self, bootstrap: str | Sequence[str] | None = None, **options: Any) -> None:
        self._thread = LoopThread("tidelog-admin")
        try:
            self._core: AsyncAdminClient = self._thread.run(self._create(bootstrap, options))
        except BaseException:
            self._thread.stop()
            raise
        self._closed = False

    @staticmethod
    async def _create(bootstrap: Any, options: dict[str, Any]) -> AsyncAdminClient:
        return AsyncAdminClient(bootstrap, **options)

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._thread.run(self._core.close())
        finally:
            self._thread.stop(self._core.connections.close)

    def create_topics(self, topics: Iterable[NewTopic], *, validate_only: bool = False) -> None:
        self._thread.run(self._core.create_topics(list(topics), validate_only=validate_only))

    def create_topic(
        self,
        name: str,
        num_partitions: int = -1,
        replication_factor: int = -1,
        configs: Mapping[str, str] | None = None,
        *,
        validate_only: bool = False,
    ) -> None:
        self._thread.run(
            self._core.create_topic(
                name, num_partitions, replication_factor, configs, validate_only=validate_only
            )
        )

    def delete_topics(self, names: Iterable[str]) -> None:
        self._thread.run(self._core.delete_topics(list(names)))

    def list_topics(self, include_internal: bool = False) -> list[TopicListing]:
        return self._thread.run(self._core.list_topics(include_internal))

    def describe_topics(
        self, names: Iterable[str] | None = None, *, include_configs: bool = True
    ) -> list[TopicDescription]:
        names = None if names is None else list(names)
        return self._thread.run(self._core.describe_topics(names, include_configs=include_configs))

    def describe_topic(self, name: str, *, include_configs: bool = True) -> TopicDescription:
        return self._thread.run(self._core.describe_topic(name, include_configs=include_configs))

    def alter_topic_configs(
        self,
        topic: str,
        set: Mapping[str, str] | None = None,
        delete: Iterable[str] = (),
        *,
        validate_only: bool = False,
    ) -> None:
        self._thread.run(
            self._core.alter_topic_configs(topic, set, list(delete), validate_only=validate_only)
        )

    def create_partitions(self, topic: str, new_total_count: int, *, validate_only: bool = False) -> None:
        self._thread.run(self._core.create_partitions(topic, new_total_count, validate_only=validate_only))

    def add_partitions(self, topic: str, count: int, *, validate_only: bool = False) -> int:
        return self._thread.run(self._core.add_partitions(topic, count, validate_only=validate_only))

    def describe_cluster(self) -> ClusterDescription:
        return self._thread.run(self._core.describe_cluster())

    def list_groups(self) -> list[GroupListing]:
        return self._thread.run(self._core.list_groups())

    def describe_group(self, group_id: str) -> GroupDescription:
        return self._thread.run(self._core.describe_group(group_id))

    def delete_group(self, group_id: str) -> None:
        self._thread.run(self._core.delete_group(group_id))

    def list_group_offsets(self, group_id: str) -> dict[TopicPartition, int]:
        return self._thread.run(self._core.list_group_offsets(group_id))

    def alter_group_offsets(self, group_id: str, offsets: Mapping[TopicPartition, int]) -> None:
        self._thread.run(self._core.alter_group_offsets(group_id, dict(offsets)))

    def plan_reset_offsets(
        self,
        group_id: str,
        spec: ResetSpec,
        partitions: Iterable[TopicPartition] | None = None,
        topics: Iterable[str] = (),
    ) -> list[ResetPlanEntry]:
        partitions = None if partitions is None else list(partitions)
        return self._thread.run(self._core.plan_reset_offsets(group_id, spec, partitions, list(topics)))

    def reset_offsets(
        self,
        group_id: str,
        spec: ResetSpec,
        partitions: Iterable[TopicPartition] | None = None,
        topics: Iterable[str] = (),
        *,
        execute: bool = False,
    ) -> list[ResetPlanEntry]:
        partitions = None if partitions is None else list(partitions)
        return self._thread.run(
            self._core.reset_offsets(group_id, spec, partitions, list(topics), execute=execute)
        )
