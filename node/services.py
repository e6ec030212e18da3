"""The client-facing gRPC services, Broker and Admin (DESIGN.md §6, proto/api.proto).

Every per-partition problem is answered with its ErrorCode and a message, never with a gRPC
status and never by storing anything: input is validated with the header-only scan before a
single byte reaches the log. gRPC status codes are left to transport failures.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
from tidelog.node.compaction import has_keyless_record
from tidelog.node.config import CONSUMER_OFFSETS_TOPIC, topic_name_error
from tidelog.node.controller import ADMIN_TIMEOUT_S, NotController
from tidelog.node.metadata import MetadataImage
from tidelog.node.partitions import Partition, PartitionClosed, StorageFailed
from tidelog.node.producer_state import CheckResult, Verdict
from tidelog.node.replica import NotLeader, ReplicaClosed
from tidelog.node.request_decoding import add_service
from tidelog.node.storage import OffsetOutOfRangeError, RecordTooLargeError
from tidelog.proto.wire import WIRE_LEN, WIRE_VARINT, length_delimited, read_varint, signed, skip_field
from tidelog.proto import api_pb2, api_pb2_grpc
from tidelog.proto import records as codec
from tidelog.proto.common_pb2 import ErrorCode

if TYPE_CHECKING:
    from tidelog.node.server import Node

log = logging.getLogger(__name__)

EARLIEST_TIMESTAMP = -2
LATEST_TIMESTAMP = -1
DEFAULT_PRODUCE_TIMEOUT_MS = 30000
DEFAULT_FETCH_MAX_BYTES = 52428800  # Kafka's fetch.max.bytes


@dataclass(frozen=True, slots=True)
class ProducePartitionData:
    """`api_pb2.ProducePartitionData` as `decode_produce_request` reads it."""

    topic: str
    partition: int
    records: memoryview  # a view of the request's bytes


@dataclass(frozen=True, slots=True)
class ProduceRequest:
    """`api_pb2.ProduceRequest` as `decode_produce_request` reads it."""

    acks: int
    timeout_ms: int
    partitions: list[ProducePartitionData]


def decode_produce_request(data: bytes) -> ProduceRequest:
    """The Produce method's request deserializer: the fields of `api_pb2.ProduceRequest`, with
    each partition's records a view of ``data`` instead of the two copies protobuf makes (its
    parse, then the attribute read). Raises ValueError on bytes that are not such a message
    (answered INVALID_ARGUMENT, as a request protobuf cannot parse is)."""
    view = memoryview(data)
    acks = timeout_ms = 0
    partitions: list[ProducePartitionData] = []
    position, size = 0, len(data)
    try:
        while position < size:
            key, position = read_varint(data, position)
            field, wire_type = key >> 3, key & 7
            if field in (1, 2) and wire_type == WIRE_VARINT:
                value, position = read_varint(data, position)
                if field == 1:
                    acks = signed(value)
                else:
                    timeout_ms = signed(value)
            elif field == 3 and wire_type == WIRE_LEN:
                start, position = length_delimited(data, position)
                partitions.append(_decode_produce_partition(data, view, start, position))
            else:
                position = skip_field(data, position, wire_type)
    except IndexError:
        raise ValueError("truncated produce request") from None
    if position != size:
        raise ValueError("a field runs past the end of the produce request")
    return ProduceRequest(acks, timeout_ms, partitions)


def _decode_produce_partition(data: bytes, view: memoryview, position: int, end: int) -> ProducePartitionData:
    topic = ""
    partition = 0
    records = view[0:0]
    while position < end:
        key, position = read_varint(data, position)
        field, wire_type = key >> 3, key & 7
        if field == 2 and wire_type == WIRE_VARINT:
            value, position = read_varint(data, position)
            partition = signed(value)
        elif field in (1, 3) and wire_type == WIRE_LEN:
            start, position = length_delimited(data, position)
            if position > end:
                raise ValueError("a field runs past the end of its partition")
            if field == 1:
                topic = str(data[start:position], "utf-8")
            else:
                records = view[start:position]
        else:
            position = skip_field(data, position, wire_type)
    if position != end:
        raise ValueError("a field runs past the end of its partition")
    return ProducePartitionData(topic, partition, records)


def add_broker_service(service: BrokerService, server: grpc.aio.Server) -> None:
    """`api_pb2_grpc.add_BrokerServicer_to_server`, with Produce's requests decoded by
    `decode_produce_request` (records as views of the received bytes), and undecodable
    requests answered INVALID_ARGUMENT (node/request_decoding.py)."""
    add_service(server, api_pb2, "Broker", service, {"Produce": decode_produce_request})


class _Rejected(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _leader_hint(node: Node, image: MetadataImage, topic: str, partition: int) -> api_pb2.LeaderHint:
    leader_id, epoch = node.leader_of(image, topic, partition)
    registration = image.nodes.get(leader_id)
    if registration is None:
        return api_pb2.LeaderHint(leader_id=-1, leader_epoch=epoch)
    return api_pb2.LeaderHint(leader_id=leader_id, leader_epoch=epoch, host=registration.host,
                              port=registration.port)


def _abandon(future: asyncio.Future[Any]) -> None:
    """Stop waiting for ``future``: a commit future stays (its append may still commit) but its
    outcome is marked retrieved; a wait for a retried batch's original is our task to cancel."""
    if isinstance(future, asyncio.Task):
        future.cancel()
    future.add_done_callback(lambda done: done.cancelled() or done.exception())


def _locate(node: Node, image: MetadataImage, topic: str, index: int) -> Partition:
    """The local leader replica of (topic, index), or _Rejected with the right code."""
    if topic_name_error(topic) is not None:
        raise _Rejected(ErrorCode.UNKNOWN_TOPIC_OR_PARTITION, f"no topic {topic!r}")
    topic_image = image.topics.get(topic)
    if topic_image is None:
        raise _Rejected(ErrorCode.UNKNOWN_TOPIC_OR_PARTITION, f"no topic {topic!r}")
    if image.partition(topic, index) is None:
        raise _Rejected(ErrorCode.UNKNOWN_TOPIC_OR_PARTITION,
                        f"topic {topic!r} has {len(topic_image.partitions)} partition(s); no partition {index}")
    partition = node.partitions.get(topic, index)
    offline = node.partitions.offline.get((topic, index))
    if offline is not None:
        raise _Rejected(ErrorCode.NOT_LEADER_OR_FOLLOWER,
                        f"node {node.config.node_id}'s replica of {topic}-{index} is offline ({offline})")
    if partition is None or not partition.is_leader:
        leader_id, _ = node.leader_of(image, topic, index)
        where = f"node {leader_id} leads it" if leader_id >= 0 else "its leader is not known yet"
        raise _Rejected(ErrorCode.NOT_LEADER_OR_FOLLOWER,
                        f"node {node.config.node_id} does not lead {topic}-{index}; {where}")
    return partition


class BrokerService(api_pb2_grpc.BrokerServicer):
    def __init__(self, node: Node) -> None:
        self.node = node

    # --- Produce --------------------------------------------------------------------------

    async def Produce(self, request: ProduceRequest, context: grpc.aio.ServicerContext
                      ) -> api_pb2.ProduceResponse:
        self.node.request_started()
        try:
            return await self._produce(request)
        finally:
            self.node.request_finished()

    async def _produce(self, request: ProduceRequest) -> api_pb2.ProduceResponse:
        node = self.node
        image = node.image
        acks = request.acks
        timeout_ms = request.timeout_ms if request.timeout_ms > 0 else DEFAULT_PRODUCE_TIMEOUT_MS
        results: list[api_pb2.ProducePartitionResult] = []
        waits: list[tuple[api_pb2.ProducePartitionResult, Awaitable[Any]]] = []
        for data in request.partitions:
            result = api_pb2.ProducePartitionResult(
                topic=data.topic, partition=data.partition, base_offset=-1, log_append_time_ms=-1,
                log_start_offset=-1)
            results.append(result)
            try:
                if acks not in (0, 1, -1):
                    raise _Rejected(ErrorCode.INVALID_REQUIRED_ACKS, f"acks must be 0, 1 or -1 (all), got {acks}")
                if node.shutting_down:
                    raise _Rejected(ErrorCode.NOT_LEADER_OR_FOLLOWER, "node is shutting down")
                if data.topic == CONSUMER_OFFSETS_TOPIC:
                    # Only the group coordinators write there: a foreign record would make their
                    # in-memory state differ from what a replay of the partition builds.
                    raise _Rejected(ErrorCode.INVALID_TOPIC_EXCEPTION,
                                    f"cannot produce to the internal topic {CONSUMER_OFFSETS_TOPIC}")
                partition = _locate(node, image, data.topic, data.partition)
                batches, headers = self._validate(node.topic_configs(image.topics[data.topic]), data.records)
                appended = partition.append(batches, headers)
                if isinstance(appended, CheckResult) and appended.verdict is Verdict.REJECT:
                    raise _Rejected(appended.error, appended.message)
            except _Rejected as exc:
                result.error, result.error_message = exc.code, exc.message
            except (NotLeader, PartitionClosed, StorageFailed) as exc:
                result.error, result.error_message = ErrorCode.NOT_LEADER_OR_FOLLOWER, str(exc)
            except RecordTooLargeError as exc:
                # The log's own limit: it takes an altered max.message.bytes at the node's next
                # reconcile, a moment after the check above saw the new value.
                result.error, result.error_message = ErrorCode.MESSAGE_TOO_LARGE, str(exc)
            except Exception as exc:  # bad input must never take the node down
                log.exception("produce to %s-%d failed", data.topic, data.partition)
                result.error, result.error_message = ErrorCode.UNKNOWN_SERVER_ERROR, repr(exc)
            else:
                result.base_offset = appended.base_offset
                result.log_start_offset = partition.log_start_offset
                if acks == -1:
                    if isinstance(appended, CheckResult):
                        # A retry of a batch already in the log: success with its original
                        # offsets, for acks=all only once that original is committed.
                        waits.append((result, partition.wait_committed(appended.last_offset)))
                    else:
                        waits.append((result, appended.committed))
            if result.error in (ErrorCode.NOT_LEADER_OR_FOLLOWER, ErrorCode.NONE):
                result.leader.CopyFrom(_leader_hint(node, image, data.topic, data.partition))
        if waits:
            await self._await_commits(waits, timeout_ms / 1000)
        if acks == 0:
            for result in results:
                result.base_offset = -1
        return api_pb2.ProduceResponse(partitions=results)

    @staticmethod
    async def _await_commits(waits: list[tuple[api_pb2.ProducePartitionResult, Awaitable[Any]]], timeout: float
                             ) -> None:
        """Until every append commits (or fails, or ``timeout`` runs out), with one wait for the
        whole request: no task, shield or timer per partition on the hot path."""
        pending = {asyncio.ensure_future(committed): result for result, committed in waits}
        try:
            _, late = await asyncio.wait(pending, timeout=timeout)
        except asyncio.CancelledError:
            late = set(pending)
            for future in late:
                _abandon(future)
            raise
        for future, result in pending.items():
            if future in late:
                _abandon(future)
                result.error = ErrorCode.REQUEST_TIMED_OUT
                result.error_message = f"not committed within {int(timeout * 1000)} ms; the records may still commit"
                continue
            exc = future.exception() if not future.cancelled() else ReplicaClosed("the wait was cancelled")
            if isinstance(exc, (NotLeader, ReplicaClosed, PartitionClosed, StorageFailed)):
                result.error = ErrorCode.NOT_LEADER_OR_FOLLOWER
                result.error_message = (f"leadership lost before commit ({exc}); "
                                        "the records may or may not be committed")
            elif exc is not None:
                raise exc

    @staticmethod
    def _validate(configs: Mapping[str, str], records: bytes | memoryview
                  ) -> tuple[bytes | memoryview, list[codec.BatchHeader]]:
        if not records:
            raise _Rejected(ErrorCode.CORRUPT_MESSAGE, "no record batches in the request")
        try:
            headers = codec.scan_batches(records)
        except codec.CorruptRecordError as exc:
            raise _Rejected(ErrorCode.CORRUPT_MESSAGE, f"corrupt record batch: {exc.reason}") from None
        limit = int(configs["max.message.bytes"])
        for header in headers:
            if header.is_control:
                raise _Rejected(ErrorCode.INVALID_REQUEST, "producers may not write control batches")
            if header.size > limit:
                raise _Rejected(ErrorCode.MESSAGE_TOO_LARGE,
                                f"a batch of {header.size} bytes exceeds max.message.bytes={limit}")
            if header.record_count < 1:
                raise _Rejected(ErrorCode.CORRUPT_MESSAGE, "a record batch holds no records")
        # Per-record work for compacted topics only (the check is per request otherwise).
        if "compact" in configs.get("cleanup.policy", "delete").split(",") and has_keyless_record(records, headers):
            # Kafka answers INVALID_RECORD (KIP-467), not retriable; our enum lacks it, and
            # CORRUPT_MESSAGE is retriable, so a producer would retry it until it times out.
            raise _Rejected(ErrorCode.INVALID_REQUEST, "compacted topic cannot accept message without key")
        return records, headers  # proposed and written without another copy

    # --- InitProducerId -------------------------------------------------------------------

    async def InitProducerId(self, request: api_pb2.InitProducerIdRequest, context: grpc.aio.ServicerContext
                             ) -> api_pb2.InitProducerIdResponse:
        # Every call gets a fresh id at epoch 0 (tidelog has no transactional.id to keep an id
        # across sessions); a producer that must start over asks again rather than bumping.
        async def local() -> api_pb2.InitProducerIdResponse:
            producer_id = await self.node.controller.allocate_producer_id()
            return api_pb2.InitProducerIdResponse(producer_id=producer_id, producer_epoch=0)

        return await AdminService(self.node)._on_controller(
            "InitProducerId", request, context, 0, local,
            lambda code, message: api_pb2.InitProducerIdResponse(error=code, error_message=message,
                                                                 producer_id=-1, producer_epoch=-1),
            stub_class=api_pb2_grpc.BrokerStub)

    # --- Fetch ----------------------------------------------------------------------------

    async def Fetch(self, request: api_pb2.FetchRequest, context: grpc.aio.ServicerContext
                    ) -> api_pb2.FetchResponse:
        self.node.request_started()
        try:
            return await self._fetch(request)
        finally:
            self.node.request_finished()

    async def _fetch(self, request: api_pb2.FetchRequest) -> api_pb2.FetchResponse:
        node = self.node
        loop = asyncio.get_running_loop()
        max_wait = min(max(request.max_wait_ms, 0), node.config.fetch_max_wait_ms_limit) / 1000
        deadline = loop.time() + max_wait
        max_bytes = request.max_bytes if request.max_bytes > 0 else DEFAULT_FETCH_MAX_BYTES
        while True:
            results, partitions, total, failed = self._fetch_once(request, max_bytes)
            remaining = deadline - loop.time()
            if failed or total >= request.min_bytes or remaining <= 0 or node.shutting_down or not partitions:
                return api_pb2.FetchResponse(partitions=results)
            waiters = [p.wait_change() for p in partitions] + [node.shutdown_signal()]
            await asyncio.wait(waiters, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)

    def _fetch_once(self, request: api_pb2.FetchRequest, max_bytes: int
                    ) -> tuple[list[api_pb2.FetchPartitionResult], list[Partition], int, bool]:
        node = self.node
        image = node.image
        results = []
        partitions: list[Partition] = []
        total = 0
        failed = False
        for wanted in request.partitions:
            result = api_pb2.FetchPartitionResult(topic=wanted.topic, partition=wanted.partition,
                                                  high_watermark=-1, log_start_offset=-1)
            results.append(result)
            try:
                partition = _locate(node, image, wanted.topic, wanted.partition)
                epoch = wanted.current_leader_epoch
                # Epoch 0 never has a leader (the first election makes epoch 1), so 0 — proto3's
                # default — means "unknown" like -1 does.
                if 0 < epoch < partition.leader_epoch:
                    raise _Rejected(ErrorCode.FENCED_LEADER_EPOCH,
                                    f"epoch {epoch} is older than the leader's {partition.leader_epoch}")
                if epoch > partition.leader_epoch:
                    raise _Rejected(ErrorCode.UNKNOWN_LEADER_EPOCH,
                                    f"epoch {epoch} is newer than the leader's {partition.leader_epoch}")
                high_watermark = partition.high_watermark
                start = partition.log_start_offset
                result.high_watermark, result.log_start_offset = high_watermark, start
                offset = wanted.fetch_offset
                if offset < start or offset > partition.end_offset:
                    raise _Rejected(ErrorCode.OFFSET_OUT_OF_RANGE,
                                    f"offset {offset} is outside [{start}, {high_watermark}] of "
                                    f"{wanted.topic}-{wanted.partition}")
                partitions.append(partition)
                limit = wanted.partition_max_bytes if wanted.partition_max_bytes > 0 else max_bytes
                limit = min(limit, max_bytes - total)
                if limit <= 0 and total > 0:
                    continue
                try:
                    data = partition.read_committed(offset, max(limit, 1))
                except OffsetOutOfRangeError as exc:
                    # Retention moved the log start between the check and the read.
                    raise _Rejected(ErrorCode.OFFSET_OUT_OF_RANGE, str(exc)) from None
                result.records = data
                total += len(data)
            except _Rejected as exc:
                result.error, result.error_message = exc.code, exc.message
                failed = True
            except (NotLeader, PartitionClosed, StorageFailed) as exc:
                result.error, result.error_message = ErrorCode.NOT_LEADER_OR_FOLLOWER, str(exc)
                failed = True
            except Exception as exc:
                log.exception("fetch from %s-%d failed", wanted.topic, wanted.partition)
                result.error, result.error_message = ErrorCode.UNKNOWN_SERVER_ERROR, repr(exc)
                failed = True
            if result.error in (ErrorCode.NOT_LEADER_OR_FOLLOWER, ErrorCode.NONE, ErrorCode.FENCED_LEADER_EPOCH):
                result.leader.CopyFrom(_leader_hint(node, image, wanted.topic, wanted.partition))
        return results, partitions, total, failed

    # --- ListOffsets ----------------------------------------------------------------------

    async def ListOffsets(self, request: api_pb2.ListOffsetsRequest, context: grpc.aio.ServicerContext
                          ) -> api_pb2.ListOffsetsResponse:
        node = self.node
        image = node.image
        results = []
        for wanted in request.partitions:
            result = api_pb2.ListOffsetsPartitionResult(topic=wanted.topic, partition=wanted.partition,
                                                        offset=-1, timestamp=-1, leader_epoch=-1)
            results.append(result)
            try:
                partition = _locate(node, image, wanted.topic, wanted.partition)
                result.leader_epoch = partition.leader_epoch
                if wanted.timestamp == EARLIEST_TIMESTAMP:
                    result.offset = partition.log_start_offset
                elif wanted.timestamp == LATEST_TIMESTAMP:
                    result.offset = partition.high_watermark
                elif wanted.timestamp < 0:
                    raise _Rejected(ErrorCode.INVALID_REQUEST,
                                    f"timestamp must be -2 (earliest), -1 (latest) or >= 0, got {wanted.timestamp}")
                else:
                    result.offset, result.timestamp = partition.offset_for_timestamp(wanted.timestamp)
            except _Rejected as exc:
                result.error, result.error_message = exc.code, exc.message
            except (PartitionClosed, StorageFailed) as exc:
                result.error, result.error_message = ErrorCode.NOT_LEADER_OR_FOLLOWER, str(exc)
            except Exception as exc:
                log.exception("list offsets of %s-%d failed", wanted.topic, wanted.partition)
                result.error, result.error_message = ErrorCode.UNKNOWN_SERVER_ERROR, repr(exc)
            if result.error in (ErrorCode.NOT_LEADER_OR_FOLLOWER, ErrorCode.NONE):
                result.leader.CopyFrom(_leader_hint(node, image, wanted.topic, wanted.partition))
        return api_pb2.ListOffsetsResponse(partitions=results)

    # --- Metadata -------------------------------------------------------------------------

    async def Metadata(self, request: api_pb2.MetadataRequest, context: grpc.aio.ServicerContext
                       ) -> api_pb2.MetadataResponse:
        node = self.node
        image = node.image
        names = list(request.topics) or sorted(image.topics)
        return api_pb2.MetadataResponse(
            cluster_id=image.cluster_id, controller_id=node.controller_id, nodes=node.node_infos(image),
            topics=[topic_metadata(node, image, name) for name in names])


def topic_metadata(node: Node, image: MetadataImage, name: str) -> api_pb2.TopicMetadata:
    error = topic_name_error(name)
    if error is not None:
        return api_pb2.TopicMetadata(name=name, error=ErrorCode.INVALID_TOPIC_EXCEPTION, error_message=error)
    topic = image.topics.get(name)
    if topic is None:
        return api_pb2.TopicMetadata(name=name, error=ErrorCode.UNKNOWN_TOPIC_OR_PARTITION,
                                     error_message=f"no topic {name!r}")
    alive = {info.node_id for info in node.node_infos(image) if info.alive}
    partitions = []
    for assignment in topic.partitions:
        leader_id, epoch = node.leader_of(image, name, assignment.partition)
        partitions.append(api_pb2.PartitionMetadata(
            partition=assignment.partition,
            error=ErrorCode.NONE if leader_id >= 0 else ErrorCode.LEADER_NOT_AVAILABLE,
            leader_id=leader_id, leader_epoch=epoch, replicas=assignment.replicas,
            in_sync_replicas=[r for r in assignment.replicas if r in alive],
            offline_replicas=[r for r in assignment.replicas if r not in alive]))
    return api_pb2.TopicMetadata(name=name, internal=topic.internal, partitions=partitions,
                                 topic_id=topic.topic_id)


FORWARDED_HEADER = "x-tidelog-forwarded"
LEADER_WAIT_S = 5.0


class AdminService(api_pb2_grpc.AdminServicer):
    """Admin RPCs: answered by the controller leader; any other node forwards them there."""

    def __init__(self, node: Node) -> None:
        self.node = node

    async def _on_controller(self, method: str, request: Any, context: grpc.aio.ServicerContext,
                             timeout_ms: int, local: Callable[[], Awaitable[Any]],
                             failed: Callable[[int, str], Any], stub_class: Any = api_pb2_grpc.AdminStub) -> Any:
        node = self.node
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (timeout_ms / 1000 if timeout_ms > 0 else ADMIN_TIMEOUT_S)
        forwarded = any(key == FORWARDED_HEADER for key, _ in (context.invocation_metadata() or ()))
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0 or node.shutting_down:
                return failed(ErrorCode.NOT_CONTROLLER, "no controller leader answered in time; retry")
            leader = node.quorum.leader_id
            if node.quorum.is_leader:
                # Not cancelled on a deadline: a change may already be committing. The
                # controller's own steps are bounded, and the client's deadline bounds its wait.
                try:
                    return await local()
                except NotController:
                    pass
                except TimeoutError:
                    return failed(ErrorCode.REQUEST_TIMED_OUT,
                                  "the change was not committed in time; it may still be")
                await node.quorum.wait_image_change(min(0.1, max(deadline - loop.time(), 0.001)))
                continue
            try:
                address = node.address_of(leader) if leader is not None else None
                if address is not None and not forwarded:
                    stub = stub_class(node.admin_channel(address))
                    return await getattr(stub, method)(request, timeout=remaining,
                                                       metadata=((FORWARDED_HEADER, str(node.config.node_id)),))
            except grpc.RpcError as exc:
                log.debug("forwarding %s to node %s failed: %s", method, leader, exc)
            await node.quorum.wait_image_change(min(0.1, max(deadline - loop.time(), 0.001)))

    async def CreateTopics(self, request: api_pb2.CreateTopicsRequest, context: grpc.aio.ServicerContext
                           ) -> api_pb2.CreateTopicsResponse:
        # Leave the client some of its timeout for the answer after waiting for new leaders.
        loop = asyncio.get_running_loop()
        leader_deadline = loop.time() + (min(LEADER_WAIT_S, request.timeout_ms / 1000 * 0.8)
                                         if request.timeout_ms > 0 else LEADER_WAIT_S)
        return await self._on_controller(
            "CreateTopics", request, context, request.timeout_ms,
            lambda: self._create_topics(request, leader_deadline),
            lambda code, message: api_pb2.CreateTopicsResponse(topics=[
                api_pb2.TopicResult(name=t.name, error=code, error_message=message) for t in request.topics]))

    async def _create_topics(self, request: api_pb2.CreateTopicsRequest, leader_deadline: float
                             ) -> api_pb2.CreateTopicsResponse:
        results = await self.node.controller.create_topics(request.topics, request.validate_only)
        if not request.validate_only:
            created = [r.name for r in results if r.error == ErrorCode.NONE]
            await self._wait_for_leaders(created, leader_deadline - asyncio.get_running_loop().time())
        return api_pb2.CreateTopicsResponse(topics=results)

    async def _wait_for_leaders(self, topics: list[str], timeout: float) -> None:
        """Give new partitions a moment to elect, so the topic is usable when the call returns.

        Not an error if they have not (clients retry NOT_LEADER_OR_FOLLOWER anyway).
        """
        node = self.node
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while topics and loop.time() < deadline:
            image = node.image
            if all(node.leader_of(image, name, p.partition)[0] >= 0
                   for name in topics if name in image.topics for p in image.topics[name].partitions):
                return
            await asyncio.sleep(0.02)

    async def DeleteTopics(self, request: api_pb2.DeleteTopicsRequest, context: grpc.aio.ServicerContext
                           ) -> api_pb2.DeleteTopicsResponse:
        async def local() -> api_pb2.DeleteTopicsResponse:
            return api_pb2.DeleteTopicsResponse(topics=await self.node.controller.delete_topics(request.names))

        return await self._on_controller(
            "DeleteTopics", request, context, request.timeout_ms, local,
            lambda code, message: api_pb2.DeleteTopicsResponse(topics=[
                api_pb2.TopicResult(name=n, error=code, error_message=message) for n in request.names]))

    async def ListTopics(self, request: api_pb2.ListTopicsRequest, context: grpc.aio.ServicerContext
                         ) -> api_pb2.ListTopicsResponse:
        image = self.node.image
        return api_pb2.ListTopicsResponse(topics=[
            api_pb2.TopicListing(name=t.name, internal=t.internal, partition_count=len(t.partitions),
                                 replication_factor=t.replication_factor)
            for t in sorted(image.topics.values(), key=lambda t: t.name)
            if request.include_internal or not t.internal])

    async def DescribeTopics(self, request: api_pb2.DescribeTopicsRequest, context: grpc.aio.ServicerContext
                             ) -> api_pb2.DescribeTopicsResponse:
        node = self.node
        image = node.image
        names: Iterable[str] = list(request.names) or sorted(image.topics)
        descriptions = []
        for name in names:
            description = api_pb2.TopicDescription(metadata=topic_metadata(node, image, name))
            topic = image.topics.get(name)
            if request.include_configs and topic is not None:
                description.configs.update(node.topic_configs(topic))
            descriptions.append(description)
        return api_pb2.DescribeTopicsResponse(topics=descriptions)

    async def AlterTopicConfigs(self, request: api_pb2.AlterTopicConfigsRequest,
                                context: grpc.aio.ServicerContext) -> api_pb2.AlterTopicConfigsResponse:
        async def local() -> api_pb2.AlterTopicConfigsResponse:
            result = await self.node.controller.alter_configs(request.topic, dict(request.set), list(request.delete),
                                                              request.validate_only)
            return api_pb2.AlterTopicConfigsResponse(result=result)

        return await self._on_controller(
            "AlterTopicConfigs", request, context, 0, local,
            lambda code, message: api_pb2.AlterTopicConfigsResponse(
                result=api_pb2.TopicResult(name=request.topic, error=code, error_message=message)))

    async def CreatePartitions(self, request: api_pb2.CreatePartitionsRequest,
                               context: grpc.aio.ServicerContext) -> api_pb2.CreatePartitionsResponse:
        async def local() -> api_pb2.CreatePartitionsResponse:
            result = await self.node.controller.create_partitions(request.topic, request.new_total_count,
                                                                  request.validate_only)
            return api_pb2.CreatePartitionsResponse(result=result)

        return await self._on_controller(
            "CreatePartitions", request, context, 0, local,
            lambda code, message: api_pb2.CreatePartitionsResponse(
                result=api_pb2.TopicResult(name=request.topic, error=code, error_message=message)))

    async def DescribeCluster(self, request: api_pb2.DescribeClusterRequest,
                              context: grpc.aio.ServicerContext) -> api_pb2.DescribeClusterResponse:
        node = self.node
        image = node.image
        return api_pb2.DescribeClusterResponse(
            cluster_id=image.cluster_id, controller_id=node.controller_id, nodes=node.node_infos(image),
            controller_voters=[v.node_id for v in node.config.voters], metadata_epoch=image.epoch,
            metadata_offset=image.offset)
