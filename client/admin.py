"""The admin client: `AsyncAdminClient` and its sync facade `AdminClient`.

Admin requests may go to any node (the node forwards them to the controller leader, DESIGN.md
§5); the client tries the nodes it knows in turn when one does not answer, and retries
retriable answers (NOT_CONTROLLER while the quorum elects, REQUEST_TIMED_OUT) until its timeout.
Each method raises `TidelogError` for the first topic that failed.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Awaitable, Callable, Iterable, Mapping, Sequence, TypeVar

from tidelog.client._loop import LoopThread
from tidelog.client.connection import ClusterUnreachableError, Connections, Metadata
from tidelog.client.types import (
    BrokerNode,
    ClusterDescription,
    NewTopic,
    PartitionInfo,
    TopicDescription,
    TopicListing,
)
from tidelog.proto import api_pb2
from tidelog.proto.common_pb2 import ErrorCode
from tidelog.proto.errors import TidelogError, error_name

T = TypeVar("T")


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

    async def __aenter__(self) -> AsyncAdminClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
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
            self._thread.stop()

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
