"""The `Groups` gRPC service (proto/api.proto): consumer groups on the node (DESIGN.md §7).

FindCoordinator is answered by any node from its metadata image and leadership view: the
coordinator of group G is the leader of `__consumer_offsets` partition
`abs(G.hashCode()) % N`. The first group request creates `__consumer_offsets` (through the
controller, like any topic; concurrent first requests all succeed). Every other call runs on the
group's coordinator here (`GroupHost`), or is answered NOT_COORDINATOR /
COORDINATOR_LOAD_IN_PROGRESS / COORDINATOR_NOT_AVAILABLE, all retriable after a new
FindCoordinator.

Bad input never reaches the coordinator in a shape it cannot store: group ids and other strings
are bounded by the record format's int16 lengths, subscribed topic names must be valid topic
names (unknown ones are fine: they have 0 partitions until created, as in Kafka), and offsets
may be committed only for partitions that exist (UNKNOWN_TOPIC_OR_PARTITION otherwise, as
Kafka's broker answers).

A commit carries no record batches (offsets are protobuf fields), so nothing in it can be a
CORRUPT_MESSAGE: bytes that do not parse are refused by gRPC before this service sees them, and
every field is checked here or by the coordinator (OFFSET_METADATA_TOO_LARGE,
UNKNOWN_TOPIC_OR_PARTITION). A commit whose records would not fit one batch of the offsets
topic (max.message.bytes) gets Kafka's INVALID_COMMIT_OFFSET_SIZE before the coordinator
applies anything: a batch the log refused would make the coordinator reload its whole partition,
holding up every group there.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, TypeVar

import grpc
from tidelog.node.config import CONSUMER_OFFSETS_TOPIC, topic_name_error
from tidelog.node.group_coordinator import (
    CommittedOffset,
    GroupCoordinator,
    GroupErrorCode,
    GroupState,
)
from tidelog.node.group_host import Batching, CoordinatorUnavailable, GroupHost, encode_group_batch
from tidelog.node.group_records import (
    GroupRecord,
    OffsetCommitKey,
    OffsetCommitValue,
    TopicPartition,
    coordinator_partition,
)
from tidelog.node.metadata import MetadataImage
from tidelog.proto import api_pb2, api_pb2_grpc, common_pb2
from tidelog.proto.records import BATCH_OVERHEAD
from tidelog.proto.common_pb2 import ErrorCode

if TYPE_CHECKING:
    from tidelog.node.server import Node

log = logging.getLogger(__name__)

R = TypeVar("R")

# The record format writes ids as int16-length strings (Kafka's classic STRING).
MAX_ID_BYTES = 32767
# How long FindCoordinator waits for `__consumer_offsets` to be created and for its partition to
# elect a leader before answering COORDINATOR_NOT_AVAILABLE (the client retries anyway).
FIND_WAIT_S = 5.0
CREATE_TIMEOUT_MS = 10000
# More than one OffsetCommit record adds to its batch besides the group id, topic and metadata
# bytes (key 10, value 24, record framing at most 32): below this estimate no commit needs
# encoding to know that it fits.
COMMIT_RECORD_MAX_OVERHEAD = 80


def _error(code: int) -> int:
    """GroupErrorCode → ErrorCode: the same numbers (Kafka's)."""
    return int(code)


def _too_long(text: str) -> bool:
    return len(text) > MAX_ID_BYTES // 4 and len(text.encode("utf-8")) > MAX_ID_BYTES


def _group_id_error(group_id: str) -> str | None:
    if not group_id:
        return "the group id must not be empty"
    if _too_long(group_id):
        return f"the group id is longer than {MAX_ID_BYTES} bytes"
    return None


def _tp(tp: TopicPartition) -> common_pb2.TopicPartition:
    return common_pb2.TopicPartition(topic=tp.topic, partition=tp.partition)


def _tps(partitions: frozenset[TopicPartition] | None) -> list[common_pb2.TopicPartition]:
    return [_tp(tp) for tp in sorted(partitions or ())]


def _offset_info(tp: TopicPartition, committed: CommittedOffset | None) -> api_pb2.CommittedOffsetInfo:
    if committed is None:
        return api_pb2.CommittedOffsetInfo(topic=tp.topic, partition=tp.partition, offset=-1, leader_epoch=-1,
                                           commit_timestamp_ms=-1)
    return api_pb2.CommittedOffsetInfo(topic=tp.topic, partition=tp.partition, offset=committed.offset,
                                       leader_epoch=committed.leader_epoch, metadata=committed.metadata,
                                       commit_timestamp_ms=committed.commit_timestamp_ms)


def _client_host(context: grpc.aio.ServicerContext) -> str:
    # "ipv4:127.0.0.1:5555" -> "/127.0.0.1", the form Kafka shows.
    peer = context.peer() or ""
    kind, _, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6"):
        return "/" + rest.rsplit(":", 1)[0].strip("[]")
    return peer


class GroupsService(api_pb2_grpc.GroupsServicer):
    def __init__(self, node: Node) -> None:
        self.node = node
        self._creating: asyncio.Task[str | None] | None = None
        self._counts_image: MetadataImage | None = None
        self._counts: Mapping[str, int] = {}
        self._limit_image: MetadataImage | None = None
        self._limit: int | None = None
        self._commit_streams: set[asyncio.Task[object]] = set()

    @property
    def host(self) -> GroupHost:
        return self.node.groups

    # --- `__consumer_offsets` -------------------------------------------------------------

    def _ensure_offsets_topic(self) -> asyncio.Task[str | None]:
        """One creation at a time per node; the controller treats the rest as already done."""
        if self._creating is None or self._creating.done():
            self._creating = asyncio.get_running_loop().create_task(self._create_offsets_topic())
        return self._creating

    async def _create_offsets_topic(self) -> str | None:
        """Create `__consumer_offsets` through this node's own Admin service (which forwards to
        the controller leader); None once it exists here, else why not."""
        node = self.node
        request = api_pb2.CreateTopicsRequest(
            topics=[api_pb2.NewTopic(name=CONSUMER_OFFSETS_TOPIC, num_partitions=-1, replication_factor=-1)],
            timeout_ms=CREATE_TIMEOUT_MS)
        if CONSUMER_OFFSETS_TOPIC not in node.image.topics:
            try:
                stub = api_pb2_grpc.AdminStub(node.admin_channel(str(node.config.advertised_address)))
                response = await stub.CreateTopics(request, timeout=CREATE_TIMEOUT_MS / 1000 + 1)
            except grpc.RpcError as exc:
                return f"creating {CONSUMER_OFFSETS_TOPIC} failed: {exc.code().name}"
            except Exception as exc:  # an answer the caller retries, never a fatal error
                log.exception("creating %s failed", CONSUMER_OFFSETS_TOPIC)
                return f"creating {CONSUMER_OFFSETS_TOPIC} failed: {exc!r}"
            result = response.topics[0]
            if result.error not in (ErrorCode.NONE, ErrorCode.TOPIC_ALREADY_EXISTS):
                log.warning("creating %s: %s %s", CONSUMER_OFFSETS_TOPIC, ErrorCode.Name(result.error),
                            result.error_message)
                return f"creating {CONSUMER_OFFSETS_TOPIC}: {ErrorCode.Name(result.error)}: {result.error_message}"
            log.info("%s created (or found) through the controller", CONSUMER_OFFSETS_TOPIC)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + CREATE_TIMEOUT_MS / 1000
        while CONSUMER_OFFSETS_TOPIC not in node.image.topics:
            if loop.time() > deadline:
                return f"{CONSUMER_OFFSETS_TOPIC} was created but this node has not seen it yet"
            await node.quorum.wait_image_change(0.1)
        return None

    def _partition_counts(self) -> Mapping[str, int]:
        image = self.node.image
        if image is not self._counts_image:
            self._counts = {name: len(topic.partitions) for name, topic in image.topics.items()}
            self._counts_image = image
        return self._counts

    async def _call(self, call: Callable[[], Awaitable[R]], failed: Callable[[int, str], R], what: str) -> R:
        """Run a coordinator call, turning unavailability (and bugs) into error answers."""
        try:
            return await call()
        except CoordinatorUnavailable as exc:
            if exc.code == ErrorCode.COORDINATOR_NOT_AVAILABLE:
                self._ensure_offsets_topic()
            return failed(exc.code, exc.message)
        except Exception as exc:  # a bad request must never take the node down
            log.exception("%s failed", what)
            return failed(ErrorCode.UNKNOWN_SERVER_ERROR, repr(exc))

    # --- FindCoordinator ------------------------------------------------------------------

    async def FindCoordinator(self, request: api_pb2.FindCoordinatorRequest,
                              context: grpc.aio.ServicerContext) -> api_pb2.FindCoordinatorResponse:
        try:
            return await self._find_coordinator(request.group_id)
        except Exception as exc:
            log.exception("FindCoordinator failed")
            return api_pb2.FindCoordinatorResponse(error=ErrorCode.UNKNOWN_SERVER_ERROR, error_message=repr(exc),
                                                   node_id=-1, partition=-1)

    async def _find_coordinator(self, group_id: str) -> api_pb2.FindCoordinatorResponse:
        error = _group_id_error(group_id)
        if error is not None:
            return api_pb2.FindCoordinatorResponse(error=ErrorCode.INVALID_GROUP_ID, error_message=error,
                                                   node_id=-1, partition=-1)
        node = self.node
        loop = asyncio.get_running_loop()
        deadline = loop.time() + FIND_WAIT_S
        why = ""
        partition = -1
        while True:
            image = node.image
            topic = image.topics.get(CONSUMER_OFFSETS_TOPIC)
            if topic is None or not topic.partitions:
                creating = self._ensure_offsets_topic()
                try:
                    problem: str | None = await asyncio.wait_for(asyncio.shield(creating),
                                                                 max(0.0, deadline - loop.time()))
                    why = problem or ""
                except TimeoutError:
                    why = f"{CONSUMER_OFFSETS_TOPIC} is being created"
            else:
                partition = coordinator_partition(group_id, len(topic.partitions))
                leader_id, _ = node.leader_of(image, CONSUMER_OFFSETS_TOPIC, partition)
                registration = image.nodes.get(leader_id)
                if leader_id >= 0 and registration is not None and node.transport.alive(leader_id):
                    return api_pb2.FindCoordinatorResponse(error=ErrorCode.NONE, node_id=leader_id,
                                                           host=registration.host, port=registration.port,
                                                           partition=partition)
                why = f"{CONSUMER_OFFSETS_TOPIC}-{partition} has no leader yet"
            if loop.time() >= deadline or node.shutting_down:
                return api_pb2.FindCoordinatorResponse(error=ErrorCode.COORDINATOR_NOT_AVAILABLE,
                                                       error_message=why, node_id=-1, partition=partition)
            await asyncio.sleep(0.05)

    # --- ConsumerGroupHeartbeat -----------------------------------------------------------

    async def ConsumerGroupHeartbeat(self, request: api_pb2.ConsumerGroupHeartbeatRequest,
                                     context: grpc.aio.ServicerContext) -> api_pb2.ConsumerGroupHeartbeatResponse:
        def failed(code: int, message: str) -> api_pb2.ConsumerGroupHeartbeatResponse:
            return api_pb2.ConsumerGroupHeartbeatResponse(error=code, error_message=message,
                                                          member_id=request.member_id,
                                                          member_epoch=request.member_epoch)

        group_id = request.group_id
        error = _group_id_error(group_id)
        if error is not None:
            return failed(ErrorCode.INVALID_GROUP_ID, error)
        for name, text in (("member id", request.member_id), ("instance id", request.instance_id),
                           ("rack id", request.rack_id), ("client id", request.client_id),
                           ("server assignor", request.server_assignor)):
            if _too_long(text):
                return failed(ErrorCode.INVALID_REQUEST, f"the {name} is longer than {MAX_ID_BYTES} bytes")
        topics: list[str] | None = None
        if request.has_subscription:
            topics = list(request.subscribed_topics)
            for name in topics:
                problem = topic_name_error(name)
                if problem is not None:
                    return failed(ErrorCode.INVALID_REQUEST, f"cannot subscribe: {problem}")
        owned = ([TopicPartition(tp.topic, tp.partition) for tp in request.owned_partitions]
                 if request.has_owned_partitions else None)
        rebalance_timeout = None if request.rebalance_timeout_ms in (-1, 0) else request.rebalance_timeout_ms
        counts = self._partition_counts()
        client_host = _client_host(context)

        def heartbeat(coordinator: GroupCoordinator, now: int):  # type: ignore[no-untyped-def]
            return coordinator.heartbeat(
                group_id, request.member_id, request.member_epoch, request.instance_id or None, topics, owned,
                rebalance_timeout, now, counts, server_assignor=request.server_assignor or None,
                rack_id=request.rack_id or None, client_id=request.client_id or None, client_host=client_host)

        async def call() -> api_pb2.ConsumerGroupHeartbeatResponse:
            answer = await self.host.write(group_id, heartbeat, Batching.ATOMIC)
            response = api_pb2.ConsumerGroupHeartbeatResponse(
                error=_error(answer.error), error_message=answer.message, member_id=answer.member_id,
                member_epoch=answer.member_epoch, heartbeat_interval_ms=answer.heartbeat_interval_ms)
            if answer.assignment is not None:
                response.has_assignment = True
                response.assignment.extend(_tps(answer.assignment))
            return response

        return await self._call(call, failed, "ConsumerGroupHeartbeat")

    # --- offsets --------------------------------------------------------------------------

    async def OffsetCommit(self, request: api_pb2.OffsetCommitRequest,
                           context: grpc.aio.ServicerContext) -> api_pb2.OffsetCommitResponse:
        def failed(code: int, message: str) -> api_pb2.OffsetCommitResponse:
            return api_pb2.OffsetCommitResponse(error=code, error_message=message, partitions=[
                api_pb2.OffsetCommitPartitionResult(topic=p.topic, partition=p.partition, error=code)
                for p in request.partitions])

        group_id = request.group_id
        error = _group_id_error(group_id)
        if error is not None:
            return failed(ErrorCode.INVALID_GROUP_ID, error)
        if _too_long(request.member_id):
            return failed(ErrorCode.INVALID_REQUEST, f"the member id is longer than {MAX_ID_BYTES} bytes")
        image = self.node.image
        offsets: dict[TopicPartition, CommittedOffset] = {}
        unknown: set[TopicPartition] = set()
        for p in request.partitions:
            tp = TopicPartition(p.topic, p.partition)
            if image.partition(p.topic, p.partition) is None:
                unknown.add(tp)
                continue
            offsets[tp] = CommittedOffset(p.offset, p.leader_epoch, p.metadata)
        too_large = self._commit_too_large(group_id, offsets)
        if too_large is not None:
            return failed(ErrorCode.INVALID_COMMIT_OFFSET_SIZE, too_large)
        # An empty member id is an admin (or simple consumer) commit, whatever epoch it sends.
        admin = not request.member_id
        member_epoch = -1 if admin else request.member_epoch

        async def call() -> api_pb2.OffsetCommitResponse:
            answer = await self.host.write(
                group_id, lambda c, now: c.commit_offsets(group_id, request.member_id, member_epoch, offsets, now))
            if answer.error != GroupErrorCode.NONE:
                code, message = _error(answer.error), answer.message
                if admin and answer.error == GroupErrorCode.UNKNOWN_MEMBER_ID:
                    code = ErrorCode.NON_EMPTY_GROUP
                    message = f"group {group_id} has live members; an admin commit needs an empty group"
                return failed(code, message)
            results = []
            for p in request.partitions:
                tp = TopicPartition(p.topic, p.partition)
                code = (ErrorCode.UNKNOWN_TOPIC_OR_PARTITION if tp in unknown
                        else _error(answer.partition_errors.get(tp, GroupErrorCode.NONE)))
                results.append(api_pb2.OffsetCommitPartitionResult(topic=p.topic, partition=p.partition, error=code))
            return api_pb2.OffsetCommitResponse(error=ErrorCode.NONE, partitions=results)

        return await self._call(call, failed, "OffsetCommit")

    async def OffsetCommitStream(self, requests: AsyncIterator[api_pb2.OffsetCommitStreamRequest],
                                 context: grpc.aio.ServicerContext
                                 ) -> AsyncIterator[api_pb2.OffsetCommitStreamResponse]:
        """Each call of each request is an OffsetCommit, answered (with its id) when it commits.
        Every call starts as its request is read, so one stream's commits apply in the order
        sent: a call is applied before its first wait. Answers ready together (one batch of
        `__consumer_offsets` commits many calls) go out in one message: a stream's messages
        are written one after another, and one each made the last of a batch wait for the
        writes of all the others."""
        loop = asyncio.get_running_loop()
        ready: list[api_pb2.OffsetCommitAnswer] = []
        wakeup = asyncio.Event()
        calls: set[asyncio.Task[None]] = set()

        async def answer(call: api_pb2.OffsetCommitCall) -> None:
            response = await self.OffsetCommit(call.commit, context)
            ready.append(api_pb2.OffsetCommitAnswer(id=call.id, commit=response))
            wakeup.set()

        async def read() -> None:
            try:
                async for request in requests:
                    for call in request.calls:
                        task = loop.create_task(answer(call))
                        calls.add(task)
                        task.add_done_callback(calls.discard)
                # The client closed its side: the calls under way still get their answers.
                while calls:
                    await asyncio.wait(list(calls))
            finally:
                wakeup.set()

        reader = loop.create_task(read())
        stream = asyncio.current_task()
        if stream is not None:
            self._commit_streams.add(stream)
        try:
            while True:
                # Cleared before looking: whatever comes while the answers are written sets it.
                wakeup.clear()
                if ready:
                    answers, ready[:] = list(ready), []
                    yield api_pb2.OffsetCommitStreamResponse(answers=answers)
                elif reader.done():
                    break
                else:
                    await wakeup.wait()
            await reader  # an undecodable request ended the stream: its INVALID_ARGUMENT
        finally:
            if stream is not None:
                self._commit_streams.discard(stream)
            reader.cancel()
            for task in list(calls):
                task.cancel()

    def cancel_streams(self) -> None:
        """End every open commit stream (shutdown): they never finish on their own, and the
        server's stop would wait out its grace period for them. Their clients commit again
        through the new coordinator."""
        for task in list(self._commit_streams):
            task.cancel()

    def _offsets_batch_limit(self) -> int | None:
        """`__consumer_offsets`' max.message.bytes, None while the topic does not exist. Merging
        the topic's configs with the node's defaults costs more than the rest of a commit's
        checks, so it is done once per metadata image, not per call."""
        image = self.node.image
        if image is not self._limit_image:
            topic = image.topics.get(CONSUMER_OFFSETS_TOPIC)
            self._limit = None if topic is None else int(self.node.topic_configs(topic)["max.message.bytes"])
            self._limit_image = image
        return self._limit

    def _commit_too_large(self, group_id: str, offsets: Mapping[TopicPartition, CommittedOffset]) -> str | None:
        """Why the commit's records cannot be one batch of the offsets topic, or None."""
        limit = self._offsets_batch_limit()
        if limit is None or not offsets:
            return None
        # The coordinator writes nothing for metadata over its limit (OFFSET_METADATA_TOO_LARGE).
        metadata_max = self.host.config.offset_metadata_max_bytes
        record_overhead = COMMIT_RECORD_MAX_OVERHEAD + len(group_id.encode("utf-8"))
        estimate = BATCH_OVERHEAD
        for tp, c in offsets.items():
            metadata_bytes = len(c.metadata.encode("utf-8")) if c.metadata else 0
            if metadata_bytes <= metadata_max:
                estimate += record_overhead + len(tp.topic.encode("utf-8")) + metadata_bytes
        if estimate <= limit:
            return None
        stored = {tp: c for tp, c in offsets.items() if len(c.metadata.encode("utf-8")) <= metadata_max}
        size = len(encode_group_batch(tuple(
            GroupRecord.of(OffsetCommitKey(group_id, tp.topic, tp.partition),
                           OffsetCommitValue(c.offset, c.leader_epoch, c.metadata, 0))
            for tp, c in sorted(stored.items())), 0))
        if size <= limit:
            return None
        return (f"the commit's {len(stored)} offsets make a {size}-byte batch, over {CONSUMER_OFFSETS_TOPIC}'s "
                f"max.message.bytes of {limit}; commit fewer partitions (or shorter metadata) at a time")

    async def OffsetFetch(self, request: api_pb2.OffsetFetchRequest,
                          context: grpc.aio.ServicerContext) -> api_pb2.OffsetFetchResponse:
        def failed(code: int, message: str) -> api_pb2.OffsetFetchResponse:
            return api_pb2.OffsetFetchResponse(error=code, error_message=message)

        group_id = request.group_id
        error = _group_id_error(group_id)
        if error is not None:
            return failed(ErrorCode.INVALID_GROUP_ID, error)
        wanted = [TopicPartition(p.topic, p.partition) for p in request.partitions] or None
        member_epoch = -1 if not request.member_id else request.member_epoch

        async def call() -> api_pb2.OffsetFetchResponse:
            answer = await self.host.read(group_id, lambda c: c.fetch_offsets(
                group_id, wanted, member_id=request.member_id, member_epoch=member_epoch))
            if answer.error != GroupErrorCode.NONE:
                return failed(_error(answer.error), answer.message)
            return api_pb2.OffsetFetchResponse(error=ErrorCode.NONE, offsets=[
                _offset_info(tp, committed) for tp, committed in answer.offsets.items()])

        return await self._call(call, failed, "OffsetFetch")

    # --- admin ----------------------------------------------------------------------------

    async def ListGroups(self, request: api_pb2.ListGroupsRequest,
                         context: grpc.aio.ServicerContext) -> api_pb2.ListGroupsResponse:
        node_id = self.node.config.node_id

        async def call() -> api_pb2.ListGroupsResponse:
            listings, loading = await self.host.list_groups()
            response = api_pb2.ListGroupsResponse(groups=[
                api_pb2.GroupListing(group_id=g.group_id, state=g.state.value, coordinator_id=node_id)
                for g in listings])
            if loading:
                response.error = ErrorCode.COORDINATOR_LOAD_IN_PROGRESS
                response.error_message = "some __consumer_offsets partitions led here are still loading"
            return response

        return await self._call(
            call, lambda code, message: api_pb2.ListGroupsResponse(error=code, error_message=message), "ListGroups")

    async def DescribeGroup(self, request: api_pb2.DescribeGroupRequest,
                            context: grpc.aio.ServicerContext) -> api_pb2.DescribeGroupResponse:
        group_id = request.group_id
        node_id = self.node.config.node_id

        def failed(code: int, message: str) -> api_pb2.DescribeGroupResponse:
            return api_pb2.DescribeGroupResponse(error=code, error_message=message, group_id=group_id,
                                                 state=GroupState.DEAD.value, coordinator_id=-1)

        error = _group_id_error(group_id)
        if error is not None:
            return failed(ErrorCode.INVALID_GROUP_ID, error)

        async def call() -> api_pb2.DescribeGroupResponse:
            d = await self.host.read(group_id, lambda c: c.describe_group(group_id))
            response = api_pb2.DescribeGroupResponse(
                error=_error(d.error), group_id=group_id, state=d.state.value, group_epoch=d.group_epoch,
                assignment_epoch=d.assignment_epoch, assignor=d.assignor, coordinator_id=node_id,
                offsets=[_offset_info(tp, c) for tp, c in d.offsets.items()])
            if d.error == GroupErrorCode.GROUP_ID_NOT_FOUND:
                response.error_message = f"group {group_id} does not exist"
            for m in d.members:
                response.members.append(api_pb2.GroupMemberDescription(
                    member_id=m.member_id, instance_id=m.instance_id or "", member_epoch=m.member_epoch,
                    state=m.state.name.lower(), subscribed_topics=list(m.subscribed_topics),
                    assignment=_tps(m.assignment), pending_revocation=_tps(m.partitions_pending_revocation),
                    target_assignment=_tps(m.target_assignment), client_id=m.client_id,
                    client_host=m.client_host))
            return response

        return await self._call(call, failed, "DescribeGroup")

    async def DeleteGroup(self, request: api_pb2.DeleteGroupRequest,
                          context: grpc.aio.ServicerContext) -> api_pb2.DeleteGroupResponse:
        group_id = request.group_id

        def failed(code: int, message: str) -> api_pb2.DeleteGroupResponse:
            return api_pb2.DeleteGroupResponse(error=code, error_message=message)

        error = _group_id_error(group_id)
        if error is not None:
            return failed(ErrorCode.INVALID_GROUP_ID, error)

        async def call() -> api_pb2.DeleteGroupResponse:
            answer = await self.host.write(group_id, lambda c, now: c.delete_group(group_id), Batching.SPLIT)
            return api_pb2.DeleteGroupResponse(error=_error(answer.error), error_message=answer.message)

        return await self._call(call, failed, "DeleteGroup")
