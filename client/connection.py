"""gRPC channels to the nodes and the client's view of cluster metadata.

One `grpc.aio` channel per node address, shared by every request of a client object. The
metadata cache is an immutable `ClusterSnapshot` swapped whole on refresh, so the sync facade's
threads can read partition counts and leaders without locks.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass, field, replace
from typing import Awaitable, Callable, Iterable, Mapping, Sequence, TypeVar

import grpc

from tidelog.client.types import BrokerNode, TopicPartition
from tidelog.proto import api_pb2, api_pb2_grpc
from tidelog.proto.common_pb2 import ErrorCode
from tidelog.proto.errors import TidelogError

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_BOOTSTRAP = "127.0.0.1:9192"

# Reconnect quickly after a node restarts: gRPC's defaults back off up to two minutes.
_CHANNEL_OPTIONS = (
    ("grpc.max_receive_message_length", 256 * 1024 * 1024),
    ("grpc.max_send_message_length", 256 * 1024 * 1024),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.enable_retries", 0),
)

# Transport failures after which another node, or the same one later, may well answer.
_RETRIABLE_STATUS = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.INTERNAL,
    }
)


class ClusterUnreachableError(TidelogError):
    """No node answered (connection refused, timed out): a transport-level failure.

    Carries REQUEST_TIMED_OUT, Kafka's code for a request that got no answer, so retry logic and
    `is_retriable` treat it like any other retriable error.
    """

    def __init__(self, message: str) -> None:
        super().__init__(ErrorCode.REQUEST_TIMED_OUT, message)


def parse_bootstrap(bootstrap: str | Sequence[str] | None) -> list[str]:
    if bootstrap is None:
        bootstrap = DEFAULT_BOOTSTRAP
    items = bootstrap.split(",") if isinstance(bootstrap, str) else list(bootstrap)
    addresses = []
    for item in items:
        item = item.strip()
        if not item:
            continue
        host, sep, port = item.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"invalid bootstrap address {item!r}: expected HOST:PORT")
        addresses.append(item)
    if not addresses:
        raise ValueError("no bootstrap address given: expected HOST:PORT[,HOST:PORT...]")
    return addresses


def describe_rpc_error(exc: grpc.aio.AioRpcError, address: str) -> str:
    details = exc.details() or ""
    # gRPC's connection failure details are long; keep the part that names the cause.
    if "Connection refused" in details or "connection refused" in details:
        details = "connection refused"
    elif len(details) > 160:
        details = details[:160] + "…"
    return f"{address}: {exc.code().name.lower()} ({details})"


def is_retriable_rpc_error(exc: BaseException) -> bool:
    return isinstance(exc, grpc.aio.AioRpcError) and exc.code() in _RETRIABLE_STATUS


# The most bytes of calls a CommitStream puts in one message (a single larger call goes alone).
_STREAM_MESSAGE_BYTES = 256 << 10


class CommitStream:
    """OffsetCommit calls to one node multiplexed over one long-lived OffsetCommitStream.

    A message on an open stream costs the coordinator about a third of what a unary call does
    (grpc.aio's per-call setup is most of a commit's CPU), and the calls made while a message is
    being written share the next one, as the node's answers ready together share one; so a busy
    coordinator keeps up with more commits at a lower latency. Each call carries an id its
    answer echoes; answers may come in any order. A failure is reported as the unary call would report it (an
    `AioRpcError`), so callers treat both alike; a broken stream fails the calls it carried
    and the next commit opens a new one. A node without the method (UNIMPLEMENTED: an older
    version) is sent unary calls from then on."""

    def __init__(self, stub: api_pb2_grpc.GroupsStub) -> None:
        self._stub = stub
        self._call: grpc.aio.StreamStreamCall | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._waiting: dict[int, asyncio.Future[api_pb2.OffsetCommitResponse]] = {}
        self._outbox: list[api_pb2.OffsetCommitCall] = []
        self._wakeup = asyncio.Event()
        self._last_id = 0
        self._unary = False

    async def commit(self, request: api_pb2.OffsetCommitRequest, timeout: float) -> api_pb2.OffsetCommitResponse:
        if self._unary:
            return await self._stub.OffsetCommit(request, timeout=timeout)
        if self._call is None:
            self._open()
        self._last_id += 1
        call_id = self._last_id
        future: asyncio.Future[api_pb2.OffsetCommitResponse] = asyncio.get_running_loop().create_future()
        self._waiting[call_id] = future
        self._outbox.append(api_pb2.OffsetCommitCall(id=call_id, commit=request))
        self._wakeup.set()
        try:
            async with asyncio.timeout(timeout):
                return await future
        except TimeoutError:
            raise _rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED,
                             f"no answer to the offset commit within {timeout:.3g} s") from None
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.UNIMPLEMENTED:
                raise
            self._unary = True
        finally:
            self._waiting.pop(call_id, None)
        return await self._stub.OffsetCommit(request, timeout=timeout)

    def _open(self) -> None:
        call = self._call = self._stub.OffsetCommitStream()
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._write(call)), loop.create_task(self._read(call))]

    async def _write(self, call: grpc.aio.StreamStreamCall) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            # Calls made while the last message was being written share the next one, up to
            # a size well under any node's request limit.
            outbox, size = self._outbox, 0
            for index, message in enumerate(outbox):
                size += message.ByteSize()
                if size > _STREAM_MESSAGE_BYTES and index > 0:
                    outbox, self._outbox = outbox[:index], outbox[index:]
                    self._wakeup.set()
                    break
            else:
                self._outbox = []
            if not outbox:
                continue
            try:
                await call.write(api_pb2.OffsetCommitStreamRequest(calls=outbox))
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
                return  # the stream broke: _read fails the calls it carried

    async def _read(self, call: grpc.aio.StreamStreamCall) -> None:
        error: grpc.aio.AioRpcError = _rpc_error(grpc.StatusCode.UNAVAILABLE, "the commit stream ended")
        try:
            async for response in call:
                for answer in response.answers:
                    future = self._waiting.get(answer.id)
                    if future is not None and not future.done():
                        future.set_result(answer.commit)
        except grpc.aio.AioRpcError as exc:
            error = exc
        finally:
            if self._call is call:
                self._call = None
                self._tasks[0].cancel()
            for future in self._waiting.values():
                if not future.done():
                    future.set_exception(error)

    async def close(self) -> None:
        if self._call is not None:
            self._call.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def _rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


class Connections:
    """The gRPC channels of one client object, one per node address, created lazily."""

    def __init__(self, bootstrap: str | Sequence[str] | None) -> None:
        self.bootstrap = parse_bootstrap(bootstrap)
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._brokers: dict[str, api_pb2_grpc.BrokerStub] = {}
        self._admins: dict[str, api_pb2_grpc.AdminStub] = {}
        self._groups: dict[str, api_pb2_grpc.GroupsStub] = {}
        self._commit_streams: dict[str, CommitStream] = {}

    def _channel(self, address: str) -> grpc.aio.Channel:
        channel = self._channels.get(address)
        if channel is None:
            channel = grpc.aio.insecure_channel(address, options=_CHANNEL_OPTIONS)
            self._channels[address] = channel
        return channel

    def broker(self, address: str) -> api_pb2_grpc.BrokerStub:
        stub = self._brokers.get(address)
        if stub is None:
            stub = self._brokers[address] = api_pb2_grpc.BrokerStub(self._channel(address))
        return stub

    def admin(self, address: str) -> api_pb2_grpc.AdminStub:
        stub = self._admins.get(address)
        if stub is None:
            stub = self._admins[address] = api_pb2_grpc.AdminStub(self._channel(address))
        return stub

    def groups(self, address: str) -> api_pb2_grpc.GroupsStub:
        stub = self._groups.get(address)
        if stub is None:
            stub = self._groups[address] = api_pb2_grpc.GroupsStub(self._channel(address))
        return stub

    def commit_stream(self, address: str) -> CommitStream:
        stream = self._commit_streams.get(address)
        if stream is None:
            stream = self._commit_streams[address] = CommitStream(self.groups(address))
        return stream

    async def close(self) -> None:
        streams = list(self._commit_streams.values())
        self._commit_streams.clear()
        for stream in streams:
            await stream.close()
        channels = list(self._channels.values())
        self._channels.clear()
        self._brokers.clear()
        self._admins.clear()
        self._groups.clear()
        for channel in channels:
            await channel.close(grace=None)


@dataclass(frozen=True, slots=True)
class PartitionLeader:
    leader_id: int  # -1 = unknown
    leader_epoch: int
    replicas: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class ClusterSnapshot:
    cluster_id: str = ""
    controller_id: int = -1
    nodes: Mapping[int, BrokerNode] = field(default_factory=dict)
    topics: Mapping[str, tuple[PartitionLeader, ...]] = field(default_factory=dict)
    topic_errors: Mapping[str, tuple[int, str]] = field(default_factory=dict)
    fetched_at: float = 0.0

    def partition_count(self, topic: str) -> int | None:
        partitions = self.topics.get(topic)
        return len(partitions) if partitions else None

    def leader(self, tp: TopicPartition) -> PartitionLeader | None:
        partitions = self.topics.get(tp.topic)
        if partitions is None or not 0 <= tp.partition < len(partitions):
            return None
        return partitions[tp.partition]

    def leader_id(self, tp: TopicPartition) -> int | None:
        """The leader's node id when both it and its address are known."""
        leader = self.leader(tp)
        if leader is None or leader.leader_id < 0 or leader.leader_id not in self.nodes:
            return None
        return leader.leader_id

    def available_partitions(self, topic: str) -> list[int]:
        partitions = self.topics.get(topic) or ()
        return [
            i for i, p in enumerate(partitions) if p.leader_id >= 0 and p.leader_id in self.nodes
        ]

    def address(self, node_id: int) -> str | None:
        node = self.nodes.get(node_id)
        return node.address if node else None


def snapshot_from_response(response: api_pb2.MetadataResponse, now: float) -> ClusterSnapshot:
    nodes = {
        n.node_id: BrokerNode(n.node_id, n.host, n.port, n.rack, n.alive) for n in response.nodes
    }
    topics: dict[str, tuple[PartitionLeader, ...]] = {}
    errors: dict[str, tuple[int, str]] = {}
    for topic in response.topics:
        if topic.error != ErrorCode.NONE:
            errors[topic.name] = (topic.error, topic.error_message)
            continue
        ordered = sorted(topic.partitions, key=lambda p: p.partition)
        if [p.partition for p in ordered] != list(range(len(ordered))):
            errors[topic.name] = (ErrorCode.LEADER_NOT_AVAILABLE, "partition list has gaps")
            continue
        topics[topic.name] = tuple(
            PartitionLeader(
                p.leader_id if p.error == ErrorCode.NONE or p.leader_id >= 0 else -1,
                p.leader_epoch,
                tuple(p.replicas),
            )
            for p in ordered
        )
    return ClusterSnapshot(
        response.cluster_id, response.controller_id, nodes, topics, errors, now
    )


class Metadata:
    """The cluster's topics, partition leaders and node addresses, as this client knows them."""

    def __init__(
        self,
        connections: Connections,
        *,
        request_timeout_ms: float = 30_000,
        retry_backoff_ms: float = 100,
        metadata_max_age_ms: float = 300_000,
    ) -> None:
        self.connections = connections
        self.snapshot = ClusterSnapshot()
        self._request_timeout = request_timeout_ms / 1000.0
        self._retry_backoff = retry_backoff_ms / 1000.0
        self.max_age = metadata_max_age_ms / 1000.0
        self._topics: set[str] = set()
        self._all_topics = False
        self._refreshing: asyncio.Task[ClusterSnapshot] | None = None
        self._scheduled: asyncio.Task[None] | None = None
        self._last_attempt = 0.0
        self._listeners: list[Callable[[], None]] = []

    def add_listener(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)

    def add_topics(self, topics: Iterable[str]) -> bool:
        """Track ``topics``; True when any was new."""
        before = len(self._topics)
        self._topics.update(topics)
        return len(self._topics) != before

    def track_all_topics(self) -> None:
        self._all_topics = True

    def _addresses(self) -> list[str]:
        known = [n.address for n in self.snapshot.nodes.values() if n.alive]
        random.shuffle(known)
        rest = [a for a in self.connections.bootstrap if a not in known]
        random.shuffle(rest)
        return known + rest

    async def call_any(
        self,
        call: Callable[[str], Awaitable[T]],
        *,
        what: str = "request",
    ) -> T:
        """Run ``call(address)`` on the first node that answers at the transport level."""
        failures = []
        for address in self._addresses():
            try:
                return await call(address)
            except grpc.aio.AioRpcError as exc:
                if not is_retriable_rpc_error(exc):
                    raise TidelogError(
                        ErrorCode.UNKNOWN_SERVER_ERROR, describe_rpc_error(exc, address)
                    ) from None
                failures.append(describe_rpc_error(exc, address))
        raise ClusterUnreachableError(f"no node answered the {what} ({'; '.join(failures)})")

    async def refresh(self) -> ClusterSnapshot:
        """Fetch metadata now (concurrent callers share one request)."""
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.get_running_loop().create_task(self._refresh())
        return await asyncio.shield(self._refreshing)

    async def _refresh(self) -> ClusterSnapshot:
        self._last_attempt = time.monotonic()
        topics = [] if self._all_topics else sorted(self._topics)
        request = api_pb2.MetadataRequest(topics=topics)

        async def ask(address: str) -> api_pb2.MetadataResponse:
            return await self.connections.broker(address).Metadata(
                request, timeout=self._request_timeout
            )

        response = await self.call_any(ask, what="metadata request")
        snapshot = snapshot_from_response(response, time.monotonic())
        if not self._all_topics and self.snapshot.topics:
            # Keep what we knew of topics this request did not ask about.
            merged = dict(self.snapshot.topics)
            for name in snapshot.topic_errors:
                merged.pop(name, None)
            merged.update(snapshot.topics)
            snapshot = replace(snapshot, topics=merged)
        self.snapshot = snapshot
        for listener in self._listeners:
            listener()
        return snapshot

    def request_update(self) -> None:
        """Refresh soon in the background, at most once per retry backoff."""
        if self._scheduled is not None and not self._scheduled.done():
            return
        self._scheduled = asyncio.get_running_loop().create_task(self._update_soon())

    async def _update_soon(self) -> None:
        delay = self._last_attempt + self._retry_backoff - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        try:
            await self.refresh()
        except TidelogError as exc:
            log.debug("metadata refresh failed: %s", exc)

    def maybe_expired(self) -> bool:
        return time.monotonic() - self.snapshot.fetched_at > self.max_age

    def apply_leader_hint(self, tp: TopicPartition, hint: api_pb2.LeaderHint) -> None:
        """Take a NOT_LEADER_OR_FOLLOWER answer's hint as the new leader without a round trip."""
        snapshot = self.snapshot
        partitions = snapshot.topics.get(tp.topic)
        if partitions is None or not 0 <= tp.partition < len(partitions):
            return
        current = partitions[tp.partition]
        if hint.leader_id < 0:
            new = PartitionLeader(-1, current.leader_epoch, current.replicas)
        elif hint.leader_epoch < current.leader_epoch:
            return  # older than what we know
        else:
            new = PartitionLeader(hint.leader_id, hint.leader_epoch, current.replicas)
        nodes = snapshot.nodes
        if hint.leader_id >= 0 and hint.host and hint.leader_id not in nodes:
            nodes = dict(nodes)
            nodes[hint.leader_id] = BrokerNode(hint.leader_id, hint.host, hint.port)
        topics = dict(snapshot.topics)
        topics[tp.topic] = partitions[: tp.partition] + (new,) + partitions[tp.partition + 1 :]
        self.snapshot = replace(snapshot, nodes=nodes, topics=topics)
        for listener in self._listeners:
            listener()

    def mark_leader_unknown(self, tp: TopicPartition) -> None:
        self.apply_leader_hint(tp, api_pb2.LeaderHint(leader_id=-1))

    async def wait_for_topics(self, topics: Sequence[str], timeout: float) -> ClusterSnapshot:
        """Metadata that knows every topic in ``topics``, refreshing until ``timeout`` seconds.

        An unknown topic is retried briefly (metadata may still be propagating after a create),
        then reported as UNKNOWN_TOPIC_OR_PARTITION.
        """
        self.add_topics(topics)
        if all(t in self.snapshot.topics for t in topics) and not self.maybe_expired():
            return self.snapshot
        deadline = time.monotonic() + timeout
        backoff = self._retry_backoff
        while True:
            try:
                snapshot = await self.refresh()
            except ClusterUnreachableError:
                if time.monotonic() + backoff >= deadline:
                    raise
                snapshot = None
            if snapshot is not None:
                missing = [t for t in topics if t not in snapshot.topics]
                if not missing:
                    return snapshot
                if time.monotonic() + backoff >= deadline:
                    code, message = snapshot.topic_errors.get(
                        missing[0], (ErrorCode.UNKNOWN_TOPIC_OR_PARTITION, "")
                    )
                    raise TidelogError(
                        code,
                        message or f"topic {missing[0]!r} does not exist "
                        f"(create it with `tidelog topic create {missing[0]}`)",
                    )
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 1.0)
