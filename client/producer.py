"""The producer: `AsyncProducer` (the asyncio core) and `Producer` (its sync facade).

Shape (aiokafka's producer, DESIGN.md §8): `send` serializes the record, picks its partition
(Kafka's murmur2 for keys, sticky for null keys) and appends it to the `RecordAccumulator`; one
sender task drains batches that are full or whose linger expired, groups them by leader node and
sends one Produce request per node (up to ``max_in_flight_requests_per_connection`` per node).
Per partition, the idempotent producer keeps up to 5 batches in flight, numbered once and resent
byte for byte in sequence order after a retriable error (Kafka's producer; the accumulator's
docstring has the rules); without idempotence one run of batches per partition is in flight,
which keeps per-partition order across retries. Retriable errors are retried with exponential
backoff until ``delivery_timeout_ms``; NOT_LEADER_OR_FOLLOWER takes the answer's leader hint at
once and refreshes metadata in the background. Every outcome reaches the record's future.

Defaults (listed in the class docstring) follow Kafka's producer except
``batch_size`` (256 KiB rather than 16 KiB: measured on this project, throughput keeps rising up
to 64–256 KiB batches) and ``compression`` (lz4).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import struct
import functools
import itertools
import logging
import operator
import random
import threading
import time
from itertools import repeat
from typing import Any, Callable, Iterable, Mapping, Sequence

import crc32c
import grpc

from tidelog.client._futures import RecordFuture, settle, settle_delivered
from tidelog.client._loop import LoopThread, wait_event
from tidelog.client.accumulator import (
    RECORD_OVERHEAD,
    BufferExhausted,
    ProducerBatch,
    RecordAccumulator,
    estimate_record_size,
)
from tidelog.client.connection import (
    ClusterSnapshot,
    Connections,
    Metadata,
    describe_rpc_error,
    is_retriable_rpc_error,
)
from tidelog.client.partitioner import StickyPartitioner, partition_for_key
from tidelog.client.types import RecordMetadata, TopicPartition
from tidelog.proto import api_pb2
from tidelog.proto.common_pb2 import ErrorCode
from tidelog.proto.errors import TidelogError, is_retriable
from tidelog.proto.records import (
    BASE_SEQUENCE_OFFSET,
    BATCH_OVERHEAD,
    CRC_OFFSET,
    PRODUCER_ID_OFFSET,
    Compression,
    finish_batch,
)
from tidelog.proto.wire import encode_varint

log = logging.getLogger(__name__)

Serializer = Callable[[Any], "bytes | None"]
HeadersArg = "Mapping[str, bytes | str | None] | Iterable[tuple[str, bytes | str | None]] | None"

# How long a produce request may go unanswered before the leaders are looked up again.
_PRODUCE_GRACE = 2.0

# Errors after which the partition's leader may have moved: look again.
_METADATA_ERRORS = frozenset(
    {
        ErrorCode.NOT_LEADER_OR_FOLLOWER,
        ErrorCode.LEADER_NOT_AVAILABLE,
        ErrorCode.UNKNOWN_TOPIC_OR_PARTITION,
        ErrorCode.FENCED_LEADER_EPOCH,
        ErrorCode.UNKNOWN_LEADER_EPOCH,
    }
)


# The Produce RPC called with a request already in wire form (see encode_produce_request).
_PRODUCE_METHOD = "/tidelog.Broker/Produce"
# The protobuf keys (field number << 3 | length-delimited) of ProduceRequest.partitions and
# ProducePartitionData.records, both field 3 in api.proto.
_PARTITIONS_KEY = b"\x1a"
_RECORDS_KEY = b"\x1a"


def encode_produce_request(acks: int, timeout_ms: int, runs: list[list[ProducerBatch]]) -> bytes:
    """A ProduceRequest in protobuf wire form, one partition entry per run.

    Written by hand around the encoded batches so that their bytes are copied once, into the
    result, rather than three times (joining a run, setting the message's bytes field,
    serializing): a third of the I/O thread's time per record with uncompressed 1 KiB records.
    The small fields are still serialized by protobuf; only the framing of the repeated
    ``partitions`` entries and their ``records`` field is written here.
    """
    parts = [api_pb2.ProduceRequest(acks=acks, timeout_ms=timeout_ms).SerializeToString()]
    for run in runs:
        head = api_pb2.ProducePartitionData(
            topic=run[0].tp.topic, partition=run[0].tp.partition
        ).SerializeToString()
        batches: list[bytes] = [b.encoded for b in run]  # type: ignore[misc]
        size = sum(map(len, batches))
        records_head = _RECORDS_KEY + encode_varint(size)
        parts += (_PARTITIONS_KEY, encode_varint(len(head) + len(records_head) + size), head, records_head)
        parts += batches
    return b"".join(parts)


def parse_acks(acks: int | str) -> int:
    if isinstance(acks, str):
        if acks.lower() == "all":
            return -1
        try:
            acks = int(acks)
        except ValueError:
            raise ValueError(f"invalid acks {acks!r}: use 0, 1 or all") from None
    if acks not in (0, 1, -1):
        raise ValueError(f"invalid acks {acks!r}: use 0, 1 or all")
    return acks


def to_bytes(data: Any, what: str) -> bytes | None:
    if data is None or isinstance(data, bytes):
        return data
    if isinstance(data, str):
        return data.encode("utf-8")
    if isinstance(data, (bytearray, memoryview)):
        return bytes(data)
    raise TypeError(
        f"the record {what} must be bytes, str or None, not {type(data).__name__} "
        f"(or pass {what}_serializer=...)"
    )


def normalize_headers(headers: Any) -> tuple[tuple[str, bytes | None], ...]:
    if not headers:
        return ()
    items = headers.items() if isinstance(headers, Mapping) else headers
    return tuple((str(k), to_bytes(v, "header value")) for k, v in items)


def _resolve(handle: object, value: Any = None, exc: BaseException | None = None) -> None:
    """Complete a record's future, whichever kind it is, unless the caller cancelled it."""
    if isinstance(handle, asyncio.Future):
        if handle.done():
            return
        if exc is None:
            handle.set_result(value)
        else:
            handle.set_exception(exc)
    else:
        assert isinstance(handle, concurrent.futures.Future)
        try:
            if exc is None:
                handle.set_result(value)
            else:
                handle.set_exception(exc)
        except concurrent.futures.InvalidStateError:
            pass


def _settle_handles(
    handles: list[object], results: list[RecordMetadata] | None, exc: BaseException | None
) -> None:
    """Complete a batch's futures: the sync producer's in one pass (`settle`), others one by one."""
    if handles and isinstance(handles[0], RecordFuture):
        settle(handles, results, exc)  # type: ignore[arg-type]
    elif exc is not None:
        for handle in handles:
            _resolve(handle, exc=exc)
    else:
        assert results is not None
        for handle, value in zip(handles, results):
            _resolve(handle, value)


class _Pulse:
    """Wake every coroutine waiting for 'something changed' (memory freed, a batch done)."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def fire(self) -> None:
        event, self._event = self._event, asyncio.Event()
        event.set()

    def waiter(self) -> asyncio.Event:
        return self._event


# Sequences wrap from INT32_MAX to 0 (Kafka's DefaultRecordBatch.incrementSequence).
_INT32_MAX_MASK = 0x7FFFFFFF
# Kafka's limit: the broker remembers a producer's last 5 batches per partition, so a retry of any
# batch still in flight is recognised as long as no more than 5 are.
MAX_IN_FLIGHT_IDEMPOTENT = 5
# Answers meaning "this sequence does not follow the last one the partition has".
_SEQUENCE_ERRORS = frozenset({ErrorCode.OUT_OF_ORDER_SEQUENCE_NUMBER, ErrorCode.UNKNOWN_PRODUCER_ID})
_PRODUCER_FIELDS = struct.Struct(">qhi")  # producerId, producerEpoch, baseSequence
_CRC = struct.Struct(">I")


def renumber_batch(encoded: bytes, producer_id: int, producer_epoch: int, base_sequence: int) -> bytes:
    """``encoded`` with another producer id, epoch and base sequence (and its CRC redone): the
    records, compressed or not, are unchanged."""
    buf = bytearray(encoded)
    _PRODUCER_FIELDS.pack_into(buf, PRODUCER_ID_OFFSET, producer_id, producer_epoch, base_sequence)
    assert PRODUCER_ID_OFFSET + _PRODUCER_FIELDS.size == BASE_SEQUENCE_OFFSET + 4
    _CRC.pack_into(buf, CRC_OFFSET, crc32c.crc32c(memoryview(buf)[CRC_OFFSET + 4:]))
    return bytes(buf)


class AsyncProducer:
    """Produce records to tidelog from asyncio code.

    ``fut = await producer.send(topic, value, key=...)`` queues a record (waiting for buffer
    memory up to ``max_block_ms``) and returns an `asyncio.Future` of `RecordMetadata`;
    ``await producer.send_and_wait(...)`` does both (aiokafka's API).

    Defaults: acks="all", compression="lz4", linger_ms=5, batch_size=262144 (256 KiB),
    buffer_memory=33554432 (32 MiB), max_block_ms=60000, max_request_size=1048576,
    request_timeout_ms=30000, delivery_timeout_ms=120000, retry_backoff_ms=100 (doubling up to
    retry_backoff_max_ms=1000), max_in_flight_requests_per_connection=5,
    metadata_max_age_ms=300000, enable_idempotence (on unless acks is 0 or 1 or
    max_in_flight_requests_per_connection is above 5; True with those is a ValueError, as in
    Kafka): every batch carries a producer id and a per-partition sequence so retries never
    write a record twice, and up to 5 batches per partition are in flight (DESIGN.md §8).
    """

    def __init__(
        self,
        bootstrap: str | Sequence[str] | None = None,
        *,
        acks: int | str = "all",
        compression: str = "lz4",
        linger_ms: float = 5,
        batch_size: int = 262144,
        buffer_memory: int = 33554432,
        max_block_ms: float = 60000,
        max_request_size: int = 1048576,
        request_timeout_ms: float = 30000,
        delivery_timeout_ms: float = 120000,
        retry_backoff_ms: float = 100,
        retry_backoff_max_ms: float = 1000,
        max_in_flight_requests_per_connection: int = 5,
        metadata_max_age_ms: float = 300000,
        key_serializer: Serializer | None = None,
        value_serializer: Serializer | None = None,
        enable_idempotence: bool | None = None,
    ) -> None:
        self.acks = parse_acks(acks)
        # DESIGN.md §8: idempotence is on by default and needs acks=all. As Kafka (3.2+) does, a
        # default-on idempotence quietly steps aside for an explicit acks=0/1, while an explicit
        # enable_idempotence=True with them is a configuration error.
        self._idempotence_explicit = enable_idempotence is not None
        if max_in_flight_requests_per_connection < 1:
            raise ValueError("max_in_flight_requests_per_connection must be at least 1")
        if enable_idempotence is None:
            enable_idempotence = (
                self.acks == -1 and max_in_flight_requests_per_connection <= MAX_IN_FLIGHT_IDEMPOTENT
            )
        elif enable_idempotence and self.acks != -1:
            raise ValueError(
                f"enable_idempotence=True requires acks='all', got acks={acks!r}; set acks='all' or "
                f"enable_idempotence=False"
            )
        elif enable_idempotence and max_in_flight_requests_per_connection > MAX_IN_FLIGHT_IDEMPOTENT:
            raise ValueError(
                f"enable_idempotence=True requires max_in_flight_requests_per_connection <= "
                f"{MAX_IN_FLIGHT_IDEMPOTENT} (the broker recognises retries of a producer's last "
                f"{MAX_IN_FLIGHT_IDEMPOTENT} batches per partition), got "
                f"{max_in_flight_requests_per_connection}; lower it or set enable_idempotence=False"
            )
        self.idempotent = bool(enable_idempotence)
        self._producer_id = -1
        self._producer_epoch = 0
        # The next base sequence per partition for the current producer id.
        self._sequences: dict[TopicPartition, int] = {}
        self.compression = Compression.parse(compression)
        if self.compression not in (Compression.NONE, Compression.GZIP, Compression.LZ4):
            raise ValueError(f"compression {compression!r} is not supported; use none, gzip or lz4")
        if batch_size <= 0 or buffer_memory <= 0 or max_request_size <= 0:
            raise ValueError("batch_size, buffer_memory and max_request_size must be positive")
        self.max_block = max_block_ms / 1000.0
        self.max_request_size = max_request_size
        self.request_timeout_ms = request_timeout_ms
        self.retry_backoff = retry_backoff_ms / 1000.0
        self.retry_backoff_max = retry_backoff_max_ms / 1000.0
        self.max_in_flight = max_in_flight_requests_per_connection
        self.key_serializer = key_serializer
        self.value_serializer = value_serializer
        self.connections = Connections(bootstrap)
        self.metadata = Metadata(
            self.connections,
            request_timeout_ms=request_timeout_ms,
            retry_backoff_ms=retry_backoff_ms,
            metadata_max_age_ms=metadata_max_age_ms,
        )
        self.accumulator = RecordAccumulator(
            batch_size=batch_size,
            linger_ms=linger_ms,
            buffer_memory=buffer_memory,
            delivery_timeout_ms=delivery_timeout_ms,
            on_memory_freed=self._on_memory_freed,
            max_in_flight_batches=self._batches_in_flight_per_partition(),
        )
        self._partitioner = StickyPartitioner(batch_size)
        self._partitioner_lock = threading.Lock()
        # TopicPartition objects are cached: building a frozen dataclass per record costs more
        # than the lookup.
        self._tps: dict[str, list[TopicPartition]] = {}
        self._available: dict[str, Callable[[], list[int]]] = {}
        # topic -> (the metadata snapshot, its TopicPartitions, `_available` of it) for
        # Producer.send's fast path, which needs no serializer (``_plain_records``).
        self._routes: dict[str, tuple[ClusterSnapshot, list[TopicPartition], Callable[[], list[int]]]] = {}
        self._plain_records = key_serializer is None and value_serializer is None
        self._max_record_size = min(max_request_size - BATCH_OVERHEAD, buffer_memory)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sender: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self._memory_pulse: _Pulse | None = None
        self._batch_pulse: _Pulse | None = None
        self._in_flight: dict[int, int] = {}
        self._requests: set[asyncio.Task[None]] = set()
        self._closing = False
        self._stopping = False
        self._closed = False

    def _batches_in_flight_per_partition(self) -> int | None:
        # None: one run at a time, which keeps order without sequence numbers.
        return min(self.max_in_flight, MAX_IN_FLIGHT_IDEMPOTENT) if self.idempotent else None

    # --- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        if self._sender is not None:
            return
        if self._closed:
            raise RuntimeError("the producer is closed")
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._memory_pulse = _Pulse()
        self._batch_pulse = _Pulse()
        self.metadata.add_listener(self._on_metadata)
        self._sender = self._loop.create_task(self._run_sender(), name="tidelog-producer-sender")

    async def __aenter__(self) -> AsyncProducer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def flush(self, timeout: float | None = None) -> None:
        """Send everything queued so far now and wait until each of those records is done."""
        await self.start()
        assert self._batch_pulse is not None
        last = self.accumulator.last_batch_id()
        self.accumulator.seal_all()
        self._wake_sender()
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.accumulator.any_incomplete_up_to(last):
            event = self._batch_pulse.waiter()
            if not self.accumulator.any_incomplete_up_to(last):
                break
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise TidelogError(ErrorCode.REQUEST_TIMED_OUT, f"flush did not finish in {timeout} s")
            await wait_event(event, remaining)

    async def close(self, timeout: float | None = None) -> None:
        """Deliver what is queued (up to ``timeout`` seconds, default: the delivery timeout)."""
        if self._closed:
            return
        self._closing = True
        if self._sender is not None:
            try:
                await self.flush(timeout)
            except TidelogError:
                pass
            self.accumulator.closed = True
            error = TidelogError(ErrorCode.REQUEST_TIMED_OUT, "the producer was closed before delivery")
            self._fail_handles(self.accumulator.abort_all(), error)
            self._stopping = True
            self._wake_sender()
            await self._sender
            requests = list(self._requests)
            for task in requests:
                task.cancel()
            await asyncio.gather(*requests, return_exceptions=True)
        self.accumulator.closed = True
        self._closed = True
        await self.connections.close()

    # --- sending -------------------------------------------------------------------------------

    def _prepare(
        self, topic: str, value: Any, key: Any, headers: Any, timestamp: int | None
    ) -> tuple[tuple, int, bytes | None]:
        """``((timestamp, key, value, headers), size, key)`` of a record ready to append."""
        # The hot path of every send: the checks are ordered so that the common case (bytes in,
        # no serializers, no headers) costs as few calls as possible.
        if not isinstance(topic, str) or not topic:
            raise TypeError("topic must be a non-empty string")
        if self.key_serializer is not None:
            key = self.key_serializer(key)
        if self.value_serializer is not None:
            value = self.value_serializer(value)
        if key is not None and type(key) is not bytes:
            key = to_bytes(key, "key")
        if value is not None and type(value) is not bytes:
            value = to_bytes(value, "value")
        size = RECORD_OVERHEAD + (len(key) if key else 0) + (len(value) if value else 0)
        if headers:
            header_items = normalize_headers(headers)
            size = estimate_record_size(key, value, header_items)
        else:
            header_items = ()
        if size > self._max_record_size:
            raise TidelogError(
                ErrorCode.MESSAGE_TOO_LARGE,
                f"the record is {size} bytes serialized, larger than max_request_size="
                f"{self.max_request_size} (or buffer_memory={self.accumulator.buffer_memory})",
            )
        if timestamp is None:
            timestamp = time.time_ns() // 1_000_000
        elif type(timestamp) is not int:
            # Checked here: the record is encoded as it is appended, in this call.
            try:
                timestamp = operator.index(timestamp)  # an int of another type (numpy's, say)
            except TypeError:
                raise TypeError(f"timestamp must be an int (epoch milliseconds), not "
                                f"{type(timestamp).__name__}") from None
        return (timestamp, key, value, header_items), size, key

    def _choose_partition(
        self,
        snapshot: ClusterSnapshot,
        topic: str,
        partition: int | None,
        key_bytes: bytes | None,
        size: int,
    ) -> TopicPartition:
        cached = self._tps.get(topic)
        count = len(snapshot.topics[topic])
        if cached is None or len(cached) != count:
            cached = self._tps[topic] = [TopicPartition(topic, i) for i in range(count)]
        if partition is not None:
            if not 0 <= partition < count:
                raise TidelogError(
                    ErrorCode.UNKNOWN_TOPIC_OR_PARTITION,
                    f"partition {partition} of topic {topic!r} does not exist "
                    f"(the topic has {count})",
                )
            return cached[partition]
        if key_bytes is not None:
            return cached[partition_for_key(key_bytes, count)]
        available = self._available.get(topic)
        if available is None:
            # Built once per topic rather than a closure per record; it reads the snapshot
            # current when a new sticky partition is chosen.
            available = self._available[topic] = functools.partial(
                self._available_partitions, topic
            )
        # For Producer.send's fast path, valid while the metadata stays this snapshot.
        self._routes[topic] = (snapshot, cached, available)
        with self._partitioner_lock:
            return cached[self._partitioner.choose(topic, count, size, available)]

    def _available_partitions(self, topic: str) -> list[int]:
        return self.metadata.snapshot.available_partitions(topic)

    async def send(
        self,
        topic: str,
        value: Any = None,
        key: Any = None,
        headers: Any = None,
        partition: int | None = None,
        timestamp: int | None = None,
    ) -> asyncio.Future[RecordMetadata]:
        """Queue one record; the returned future resolves to its `RecordMetadata`.

        Errors from the cluster or from timeouts (unknown topic, buffer full for
        ``max_block_ms``, MESSAGE_TOO_LARGE, ...) fail the future rather than raise here.
        """
        if self._closing:
            raise RuntimeError("the producer is closed")
        await self.start()
        assert self._loop is not None and self._memory_pulse is not None
        future: asyncio.Future[RecordMetadata] = self._loop.create_future()
        try:
            fields, size, key_bytes = self._prepare(topic, value, key, headers, timestamp)
            deadline = time.monotonic() + self.max_block
            snapshot = self.metadata.snapshot
            if snapshot.partition_count(topic) is None:
                snapshot = await self.metadata.wait_for_topics([topic], self.max_block)
            tp = self._choose_partition(snapshot, topic, partition, key_bytes, size)
            while True:
                event = self._memory_pulse.waiter()
                result = self.accumulator.try_append(tp, fields, size, future)
                if result is not None:
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TidelogError(
                        ErrorCode.REQUEST_TIMED_OUT,
                        f"no buffer memory became free within max_block_ms="
                        f"{self.max_block * 1000:.0f}",
                    )
                await wait_event(event, remaining)
            if result.wake_sender:
                self._wake_sender()
        except TidelogError as exc:
            if not future.done():
                future.set_exception(exc)
        return future

    async def send_and_wait(
        self,
        topic: str,
        value: Any = None,
        key: Any = None,
        headers: Any = None,
        partition: int | None = None,
        timestamp: int | None = None,
    ) -> RecordMetadata:
        future = await self.send(topic, value, key, headers, partition, timestamp)
        return await future

    async def partitions_for(self, topic: str, timeout: float | None = None) -> list[int]:
        """The partition numbers of ``topic``, waiting up to ``timeout`` s (max_block_ms) for it."""
        snapshot = await self.metadata.wait_for_topics(
            [topic], self.max_block if timeout is None else timeout
        )
        return list(range(snapshot.partition_count(topic) or 0))

    # --- the sender ----------------------------------------------------------------------------

    def _wake_sender(self) -> None:
        if self._wake is not None:
            self._wake.set()

    def _on_metadata(self) -> None:
        # A request still waiting on a node that no longer leads one of its partitions (a paused
        # or partitioned node answers nothing until the request times out) is abandoned and its
        # runs retried at the new leader now, rather than after request_timeout_ms.
        snapshot = self.metadata.snapshot
        for task in list(self._requests):
            node_id = getattr(task, "tidelog_node", None)
            if node_id is not None and any(
                snapshot.leader_id(tp) != node_id for tp in getattr(task, "tidelog_partitions", ())
            ):
                task.tidelog_abandoned = True  # type: ignore[attr-defined]
                task.cancel()
        self._wake_sender()

    def _on_memory_freed(self) -> None:
        # Called with the accumulator's lock held, always on the loop thread.
        if self._memory_pulse is not None:
            self._memory_pulse.fire()

    def _node_ready(self, node_id: int) -> bool:
        return self._in_flight.get(node_id, 0) < self.max_in_flight

    async def _init_producer_id(self) -> bool:
        """Ask the cluster for a producer id (DESIGN.md §8); False if none could be had now."""

        async def ask(address: str) -> api_pb2.InitProducerIdResponse | None:
            try:
                return await self.connections.broker(address).InitProducerId(
                    api_pb2.InitProducerIdRequest(), timeout=self.request_timeout_ms / 1000.0
                )
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                    return None
                raise

        try:
            answer = await self.metadata.call_any(ask, what="InitProducerId")
        except TidelogError as exc:
            log.debug("InitProducerId failed: %s", exc)
            return False
        if answer is None:
            if self._idempotence_explicit:
                log.warning("the cluster does not support idempotent producers (no InitProducerId)")
                return False
            # Only a default: a server without idempotence gets the plain producer.
            log.warning("the cluster does not support idempotent producers; sending without idempotence")
            self.idempotent = False
            self.accumulator.max_in_flight_batches = self._batches_in_flight_per_partition()
            return True
        if answer.error != ErrorCode.NONE:
            log.debug("InitProducerId answered %s: %s", answer.error, answer.error_message)
            return False
        self._producer_id, self._producer_epoch = answer.producer_id, answer.producer_epoch
        self._sequences.clear()
        return True

    async def _run_sender(self) -> None:
        assert self._wake is not None and self._loop is not None
        while not self._stopping:
            self._wake.clear()
            # Nothing is encoded before the id is known: every batch carries it.
            if (self.idempotent and self._producer_id < 0 and not self.accumulator.is_empty()
                    and not await self._init_producer_id()):
                for batch in self.accumulator.expire(time.monotonic()):
                    self._fail_handles([batch], batch.last_error if isinstance(batch.last_error, TidelogError)
                                       else TidelogError(ErrorCode.REQUEST_TIMED_OUT,
                                                         f"no producer id for {batch.tp} within "
                                                         f"delivery_timeout_ms"))
                await wait_event(self._wake, self.retry_backoff)
                continue
            now = time.monotonic()
            for batch in self.accumulator.expire(now):
                self._forget_producer_id([batch])
                self._fail_handles(
                    [batch],
                    batch.last_error
                    if isinstance(batch.last_error, TidelogError)
                    else TidelogError(
                        ErrorCode.REQUEST_TIMED_OUT,
                        f"{batch.record_count} record(s) for {batch.tp} expired: "
                        f"delivery_timeout_ms={self.accumulator.delivery_timeout * 1000:.0f} passed "
                        f"since the batch was created"
                        + (f" (last error: {batch.last_error})" if batch.last_error else ""),
                    ),
                )
            snapshot = self.metadata.snapshot
            drain = self.accumulator.drain(
                now, snapshot.leader_id, self._node_ready, self.max_request_size, self._producer_id
            )
            if drain.unknown_leader:
                self.metadata.add_topics(tp.topic for tp in drain.unknown_leader)
                self.metadata.request_update()
            elif snapshot.topics and self.metadata.maybe_expired():
                self.metadata.request_update()  # notice added partitions and moved leaders
            for node_id, runs in drain.by_node.items():
                for chunk in self._split_by_size(runs):
                    self._in_flight[node_id] = self._in_flight.get(node_id, 0) + 1
                    task = self._loop.create_task(self._send_request(node_id, chunk))
                    task.tidelog_node = node_id  # type: ignore[attr-defined]
                    task.tidelog_partitions = frozenset(run[0].tp for run in chunk)  # type: ignore[attr-defined]
                    task.tidelog_started = now  # type: ignore[attr-defined]
                    task.tidelog_runs = chunk  # type: ignore[attr-defined]
                    self._requests.add(task)
                    task.add_done_callback(self._request_done)
            overdue = now - _PRODUCE_GRACE
            if any(getattr(t, "tidelog_started", now) < overdue for t in self._requests):
                # An unanswered request hints at an unresponsive leader: look again where the
                # leaders are (_on_metadata abandons the request if one moved).
                self.metadata.request_update()
            timeout = None
            if drain.next_check is not None:
                timeout = max(0.0, drain.next_check - time.monotonic())
            if drain.unknown_leader or not self.accumulator.is_empty():
                # Re-check expiry and leaders from time to time even when nothing else wakes us.
                timeout = 0.5 if timeout is None else min(timeout, 0.5)
            if timeout == 0.0:
                await asyncio.sleep(0)
                continue
            await wait_event(self._wake, timeout)

    def _split_by_size(self, runs: list[list[ProducerBatch]]) -> list[list[list[ProducerBatch]]]:
        """Encode each batch (once: retries reuse the bytes) and pack runs into requests."""
        chunks: list[list[list[ProducerBatch]]] = []
        current: list[list[ProducerBatch]] = []
        size = 0
        for run in runs:
            run_size = 0
            for batch in run:
                if self.idempotent and batch.producer_id < 0:
                    # Numbered once, when first sent: a retry resends these exact bytes. A batch
                    # numbered before under an id it never got written with is numbered again.
                    sequence = self._sequences.get(batch.tp, 0)
                    self._sequences[batch.tp] = (sequence + batch.record_count) & _INT32_MAX_MASK
                    batch.producer_id = self._producer_id
                    if batch.encoded is None:
                        batch.encoded = finish_batch(
                            batch.parts, batch.timestamps,  # type: ignore[arg-type]
                            compression=self.compression, producer_id=self._producer_id,
                            producer_epoch=self._producer_epoch, base_sequence=sequence,
                        )
                        batch.parts = None  # sealed, and resent only as ``encoded``
                    else:
                        batch.encoded = renumber_batch(
                            batch.encoded, self._producer_id, self._producer_epoch, sequence
                        )
                elif batch.encoded is None:
                    batch.encoded = finish_batch(batch.parts, batch.timestamps,  # type: ignore[arg-type]
                                                 compression=self.compression)
                    batch.parts = None  # sealed, and resent only as ``encoded``
                run_size += len(batch.encoded)
            if current and size + run_size > self.max_request_size:
                chunks.append(current)
                current, size = [], 0
            current.append(run)
            size += run_size
        if current:
            chunks.append(current)
        return chunks

    def _request_done(self, task: asyncio.Task[None]) -> None:
        self._requests.discard(task)
        if task.cancelled() and not getattr(task, "tidelog_ran", False):
            # Cancelled before its first step (a leader move noticed right after the task was
            # created): the coroutine never ran, so neither its except nor its finally settled
            # its batches, and their partitions would stay in flight for good.
            node_id: int = task.tidelog_node  # type: ignore[attr-defined]
            self._in_flight[node_id] -= 1
            self._settle_cancelled(node_id, task.tidelog_runs,  # type: ignore[attr-defined]
                                   getattr(task, "tidelog_abandoned", False))
            self._wake_sender()

    def _settle_cancelled(self, node_id: int, runs: list[list[ProducerBatch]], abandoned: bool) -> bool:
        """Settle the runs of a cancelled request; True if they were put back to be retried."""
        if abandoned and not self._closing:
            moved = TidelogError(
                ErrorCode.NOT_LEADER_OR_FOLLOWER,
                f"node {node_id} stopped answering and no longer leads; the records may or "
                f"may not have been written there",
            )
            for run in runs:
                self._retry_or_fail(run, moved)
            return True
        # A forced close: the outcome is unknown, and the future must say so.
        error = TidelogError(
            ErrorCode.REQUEST_TIMED_OUT,
            "the producer was closed while the request was in flight; the records may or may "
            "not have been written",
        )
        for run in runs:
            self.accumulator.complete(run)
            self._fail_handles(run, error)
        return False

    async def _send_request(self, node_id: int, runs: list[list[ProducerBatch]]) -> None:
        asyncio.current_task().tidelog_ran = True  # type: ignore[union-attr]
        try:
            address = self.metadata.snapshot.address(node_id)
            if address is None:
                for run in runs:
                    self._retry_or_fail(
                        run, TidelogError(ErrorCode.LEADER_NOT_AVAILABLE, f"node {node_id} is unknown")
                    )
                self.metadata.request_update()
                return
            request = encode_produce_request(self.acks, int(self.request_timeout_ms), runs)
            produce = self.connections._channel(address).unary_unary(
                _PRODUCE_METHOD, response_deserializer=api_pb2.ProduceResponse.FromString
            )
            try:
                response = await produce(request, timeout=self.request_timeout_ms / 1000.0 + 5.0)
            except grpc.aio.AioRpcError as exc:
                error = TidelogError(
                    ErrorCode.REQUEST_TIMED_OUT if is_retriable_rpc_error(exc) else ErrorCode.UNKNOWN_SERVER_ERROR,
                    f"produce to node {node_id} failed: {describe_rpc_error(exc, address)}",
                )
                self.metadata.request_update()
                for run in runs:
                    self._retry_or_fail(run, error)
                return
            results = {(r.topic, r.partition): r for r in response.partitions}
            for run in runs:
                tp = run[0].tp
                result = results.get((tp.topic, tp.partition))
                if result is None:
                    self._retry_or_fail(
                        run, TidelogError(ErrorCode.UNKNOWN_SERVER_ERROR, f"no result for {tp}")
                    )
                elif result.error == ErrorCode.NONE:
                    self._complete(run, result)
                else:
                    if result.error in _METADATA_ERRORS:
                        if result.HasField("leader"):
                            self.metadata.apply_leader_hint(tp, result.leader)
                        self.metadata.request_update()
                    self._retry_or_fail(
                        run, TidelogError(result.error, result.error_message or f"producing to {tp}")
                    )
        except asyncio.CancelledError:
            if self._settle_cancelled(node_id, runs,
                                      getattr(asyncio.current_task(), "tidelog_abandoned", False)):
                return
            raise
        except Exception as exc:  # a bug must still reach the futures, not vanish in a task
            log.exception("producer request failed")
            for run in runs:
                self.accumulator.complete(run)
                self._fail_handles(run, exc)
        finally:
            self._in_flight[node_id] -= 1
            self._wake_sender()

    def _complete(self, run: list[ProducerBatch], result: api_pb2.ProducePartitionResult) -> None:
        self.accumulator.complete(run)
        topic, partition = run[0].tp.topic, run[0].tp.partition
        base = result.base_offset if self.acks != 0 else -1
        append_time = result.log_append_time_ms
        new = tuple.__new__
        where = (topic, partition)
        for batch in run:
            count = batch.record_count
            offsets: Iterable[int]
            if base >= 0:
                offsets = range(base, base + count)  # a record's offset in its batch is its index
                base += count  # the node gives a run contiguous offsets
            else:
                offsets = itertools.repeat(-1, count)
            timestamps = repeat(append_time, count) if append_time >= 0 else batch.timestamps
            handles = batch.handles
            if handles and isinstance(handles[0], RecordFuture):
                # The sync producer's futures build their RecordMetadata when it is read.
                settle_delivered(handles, where, offsets, timestamps)  # type: ignore[arg-type]
                continue
            # tuple.__new__ over zipped fields: a RecordMetadata per record built entirely in C,
            # without the NamedTuple's Python-level __new__ or a Python loop.
            metadata = list(map(new, repeat(RecordMetadata, count),
                                zip(repeat(topic, count), repeat(partition, count), offsets, timestamps)))
            _settle_handles(handles, metadata, None)
        self._batch_done()

    def _retry_or_fail(self, run: list[ProducerBatch], error: TidelogError) -> None:
        head = run[0]
        for batch in run:
            batch.last_error = error
        backoff = min(self.retry_backoff * (2 ** head.attempts), self.retry_backoff_max)
        backoff *= random.uniform(0.8, 1.2)
        retry_at = time.monotonic() + backoff
        retriable = error.retriable
        renumber = False
        if error.code in _SEQUENCE_ERRORS and self.idempotent and head.producer_id >= 0:
            if self.accumulator.has_earlier_outstanding(run) or (
                    head.sent_behind and head.producer_id == self._producer_id):
                # It overtook an earlier batch of its id that is being retried (Kafka's producer
                # retries it too rather than surface the error): resent after that one. Or it was
                # sent behind one that is answered now: two requests run on separate gRPC
                # streams, so the node may have checked this one first and answered it last
                # (its request waited for other partitions' commits), where Kafka's one ordered
                # connection cannot. Resent alone (the partition resyncs), its retry is sent with
                # nothing in flight, so a real gap still fails it then.
                retriable = True
            elif head.producer_id != self._producer_id:
                # An earlier batch failed for good and its id was dropped: the broker has
                # nothing of this one, so it is numbered again under the new id, at once.
                retriable = renumber = True
                retry_at = time.monotonic()
        if not retriable or self._closed:
            self._forget_producer_id(run)
            self.accumulator.complete(run)
            self._fail_handles(run, error)
            return
        # Deadlines grow along the run (batches were created in order): fail the expired prefix.
        expired = [b for b in run if retry_at >= b.deadline]
        if expired:
            self._forget_producer_id(expired)
            self.accumulator.complete(expired)
            self._fail_handles(expired, error)
        rest = run[len(expired):]
        if rest:
            log.debug("retrying %s after %s (attempt %d)", head.tp, error, head.attempts + 1)
            self.accumulator.reenqueue(rest, retry_at, renumber=renumber)

    def _forget_producer_id(self, failed: list[ProducerBatch]) -> None:
        """Failed batches that used a sequence leave a gap (or an unknown outcome) in their
        partition's numbering: the producer takes a new id (DESIGN.md §8), and batches of the old
        id still in flight or queued are retried under it until the broker answers them (a
        success, a duplicate, or a sequence error, after which they are numbered again under the
        new id from sequence 0), so no acknowledged record is reordered or written twice."""
        if self._producer_id >= 0 and any(b.producer_id == self._producer_id for b in failed):
            self._producer_id = -1

    def _fail_handles(self, batches: list[ProducerBatch], error: BaseException) -> None:
        for batch in batches:
            _settle_handles(batch.handles, None, error)
        self._batch_done()

    def _batch_done(self) -> None:
        if self._batch_pulse is not None:
            self._batch_pulse.fire()


class Producer:
    """Produce records to tidelog from ordinary (threaded) code.

    ``send`` returns a `concurrent.futures.Future` of `RecordMetadata` and blocks only when the
    buffer is full (up to ``max_block_ms``) or the topic's metadata is not known yet. Takes the
    same options as `AsyncProducer`. The futures complete on the client's I/O thread, so
    callbacks added to them should be quick and must not call blocking producer methods.
    """

    def __init__(self, bootstrap: str | Sequence[str] | None = None, **options: Any) -> None:
        self._thread = LoopThread("tidelog-producer")
        try:
            self._core: AsyncProducer = self._thread.run(self._create(bootstrap, options))
        except BaseException:
            self._thread.stop()
            raise
        self._closed = False
        # Shared by every record's future (see RecordFuture).
        self._future_condition = threading.Condition()
        self._new_future = RecordFuture.bound_to(self._future_condition)

    @staticmethod
    async def _create(bootstrap: Any, options: dict[str, Any]) -> AsyncProducer:
        producer = AsyncProducer(bootstrap, **options)
        await producer.start()
        return producer

    def __enter__(self) -> Producer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def send(
        self,
        topic: str,
        value: Any = None,
        key: Any = None,
        headers: Any = None,
        partition: int | None = None,
        timestamp: int | None = None,
    ) -> concurrent.futures.Future[RecordMetadata]:
        if self._closed:
            raise RuntimeError("the producer is closed")
        core = self._core
        future: concurrent.futures.Future[RecordMetadata] = self._new_future()
        try:
            blocked = 0.0  # of max_block_ms, spent waiting for the topic's metadata
            route = core._routes.get(topic)
            if (route is not None and route[0] is core.metadata.snapshot and type(value) is bytes
                    and key is None and headers is None and partition is None and timestamp is None
                    and core._plain_records):
                # The common case (bytes, no key, a topic already sent to since the metadata last
                # changed) without _prepare and _choose_partition: a third of send's cost.
                size = RECORD_OVERHEAD + len(value)
                if size > core._max_record_size:
                    core._prepare(topic, value, key, headers, timestamp)  # raises MESSAGE_TOO_LARGE
                partitions = route[1]
                lock = core._partitioner_lock
                lock.acquire()  # not `with`: see RecordAccumulator.add
                try:
                    tp = partitions[core._partitioner.choose(topic, len(partitions), size, route[2])]
                finally:
                    lock.release()
                fields: tuple = (time.time_ns() // 1_000_000, None, value, ())
            else:
                fields, size, key_bytes = core._prepare(topic, value, key, headers, timestamp)
                snapshot = core.metadata.snapshot
                if not snapshot.topics.get(topic):
                    started = time.monotonic()
                    snapshot = self._thread.run(core.metadata.wait_for_topics([topic], core.max_block))
                    blocked = time.monotonic() - started
                tp = core._choose_partition(snapshot, topic, partition, key_bytes, size)
            accumulator = core.accumulator
            wake = accumulator.add(tp, fields, size, future)
            if wake is None:  # buffer memory is short: wait for some (max_block_ms)
                if self._thread.in_loop_thread():
                    raise TidelogError(
                        ErrorCode.REQUEST_TIMED_OUT,
                        "buffer memory is full and send() was called from the client's I/O "
                        "thread, where it cannot wait",
                    )
                try:
                    wake = accumulator.append(
                        tp, fields, size, future, max(0.0, core.max_block - blocked)
                    ).wake_sender
                except BufferExhausted as exc:
                    raise TidelogError(ErrorCode.REQUEST_TIMED_OUT, str(exc)) from None
            if wake:
                self._thread.call_soon(core._wake_sender)
        except TidelogError as exc:
            future.set_exception(exc)
        return future

    def flush(self, timeout: float | None = None) -> None:
        self._thread.run(self._core.flush(timeout))

    def partitions_for(self, topic: str, timeout: float | None = None) -> list[int]:
        return self._thread.run(self._core.partitions_for(topic, timeout))

    def close(self, timeout: float | None = None) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._thread.run(self._core.close(timeout))
        finally:
            self._thread.stop(self._core.connections.close)
