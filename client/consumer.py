"""The consumer: `AsyncConsumer` (the asyncio core) and `Consumer` (its sync facade).

Without a ``group_id`` a consumer reads the partitions it is assigned, or every partition of the
topics it subscribes to, from positions it keeps itself. With a ``group_id``, `subscribe` makes
it a member of that consumer group (tidelog.client.group): the group's coordinator assigns it
partitions, it starts each from the group's committed offset (``auto_offset_reset`` where there
is none), and it commits its positions (`commit`, or every ``auto_commit_interval_ms`` from
`poll`, before giving a partition up, and on `close`). `assign` with a ``group_id`` reads
exactly the partitions given and commits to the group without joining it (a commit the
coordinator refuses while the group has live members).

on_assign/on_revoke receive a set of TopicPartitions. `AsyncConsumer` runs them on its event loop
(they may be coroutine functions); `Consumer` runs them on the application's thread inside
`poll`/`close`, as Kafka's consumer does, so a revocation waits until the application is back
in poll (heartbeats go on meanwhile; max_poll_interval_ms bounds the wait). on_revoke runs
while the revoked partitions still count as assigned (so `commit()` there includes them), after
their fetching stopped and, under auto-commit, after their positions were committed; it is also
called, without a commit, for partitions lost to fencing or an expired session.

Fetching is pipelined: one Fetch per leader node is in flight at a time, sent again as soon as
the previous answer is checked, for every partition holding fewer than two undelivered answers;
so the next records are on their way while the application handles the current ones, and at
most two answers (``max_partition_fetch_bytes`` each) are buffered per partition, as raw
batches: `poll` decodes a batch when it hands out its first record. The sync `Consumer` does
that on the application's thread when records are already fetched (`drain_ready`), without a
trip to the loop; a group member's poll still goes to the loop. A batch whose records do
not decode (or whose deserializer raises) stops its partition there: the records before it are
delivered, then poll raises, again each time, until the application seeks past it. A fetch that
reports a leader change marks the partition's leader unknown, takes the answer's leader hint and
refreshes metadata; the partition is fetched again once a leader is known, so `poll` simply
waits (within its timeout) through a failover.
"""

from __future__ import annotations

import asyncio
import functools
import concurrent.futures
import logging
import queue
import re
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping, Sequence

import grpc

from tidelog.client._loop import LoopThread, wait_event
from tidelog.client.connection import (
    ClusterUnreachableError,
    Connections,
    Metadata,
    describe_rpc_error,
    is_retriable_rpc_error,
)
from tidelog.client.group import (
    GroupCoordinatorClient,
    GroupMembership,
    call_callback,
    compile_pattern,
    topics_matching,
)
from tidelog.client.types import ConsumerRecord, OffsetAndTimestamp, TopicPartition
from tidelog.proto import api_pb2
from tidelog.proto.common_pb2 import ErrorCode
from tidelog.proto.errors import TidelogError, is_retriable
from tidelog.proto.records import CorruptRecordError, Record, RecordBatch, decode_batches

log = logging.getLogger(__name__)

# While closing past its deadline, how often to check whether a rebalance callback has returned.
_CALLBACK_CHECK_S = 0.01

EARLIEST_TIMESTAMP = -2
LATEST_TIMESTAMP = -1

_RESET_POLICIES = {"earliest": EARLIEST_TIMESTAMP, "latest": LATEST_TIMESTAMP, "none": None}
_METADATA_ERRORS = frozenset(
    {
        ErrorCode.NOT_LEADER_OR_FOLLOWER,
        ErrorCode.LEADER_NOT_AVAILABLE,
        ErrorCode.UNKNOWN_TOPIC_OR_PARTITION,
        ErrorCode.FENCED_LEADER_EPOCH,
        ErrorCode.UNKNOWN_LEADER_EPOCH,
    }
)
_PREFETCH_ANSWERS = 2
# The codec builds a ConsumerRecord as (topic, partition) + a Record's fields: they must line up.
assert ConsumerRecord._fields[2:] == Record._fields
# How late a long-poll fetch may be, beyond its max wait, before the leaders are looked up again.
_FETCH_GRACE = 2.0
# While the sync Consumer's polls are served on the application's thread (`drain_ready`), how
# often the loop is still asked to do a poll's other chores (resets, overdue fetches, metadata age).
_CHORES_EVERY_S = 0.1


@dataclass(slots=True, eq=False)
class _CompletedFetch:
    """One fetch answer of a partition, its batches checked (CRCs) but decoded one at a time,
    as `poll` hands their records out. Every ConsumerRecord is an object the garbage collector
    tracks: decoding whole answers ahead kept hundreds of thousands of them alive (two answers
    of up to max_partition_fetch_bytes of compressed data per partition), and the collector
    walked them over and over, a quarter of the consumer's CPU with lz4 batches of 1 KiB
    records. Raw batches are also several times smaller than their records."""

    batches: deque[RecordBatch]  # data batches not decoded yet (control batches left out)
    next_offset: int  # the offset after the last batch, control batches included
    fetch_offset: int  # records before it (in the first batch) are not delivered
    records: list[ConsumerRecord] = field(default_factory=list)  # the batch being handed out
    index: int = 0  # of the next record of ``records`` to hand out


@dataclass(slots=True, eq=False)
class _PartitionState:
    position: int | None = None
    fetch_offset: int | None = None
    paused: bool = False
    epoch: int = 0  # bumped on every seek, so answers to older fetches are dropped
    in_flight: bool = False
    retry_at: float = 0.0
    high_watermark: int = -1
    log_start_offset: int = -1
    buffered: deque[_CompletedFetch] = field(default_factory=deque)
    error: BaseException | None = None
    revoked: bool = False  # being given up: never fetched or delivered again

    def seek(self, offset: int | None) -> None:
        self.position = offset
        self.fetch_offset = offset
        self.epoch += 1
        self.buffered.clear()
        self.error = None


class _Pulse:
    def __init__(self) -> None:
        self._event = asyncio.Event()

    def fire(self) -> None:
        event, self._event = self._event, asyncio.Event()
        event.set()

    def waiter(self) -> asyncio.Event:
        return self._event


class AsyncConsumer:
    """Consume records from tidelog in asyncio code.

    Defaults (Kafka's): auto_offset_reset="latest", fetch_max_wait_ms=500, fetch_min_bytes=1,
    fetch_max_bytes=52428800, max_partition_fetch_bytes=1048576, max_poll_records=500,
    request_timeout_ms=30000, default_api_timeout_ms=60000, retry_backoff_ms=100,
    metadata_max_age_ms=300000; consumer_timeout_ms=None (iteration never stops by itself).
    Groups: group_id=None, enable_auto_commit=True, auto_commit_interval_ms=5000,
    group_instance_id=None (static membership), group_remote_assignor=None (the group's
    default: "uniform"; or "range"), max_poll_interval_ms=300000 (sent as the rebalance
    timeout; also Kafka's poll timer: a member whose application has not been in `poll` for
    that long leaves its group, its partitions lost, and joins again at its next poll),
    session_timeout_ms=None. The session timeout itself is the coordinator's
    (node config group_consumer_session_timeout_ms, KIP-848); the client's value (default
    45000, the coordinator's default) is how long it keeps its partitions without a heartbeat
    answer before treating them as lost, so set it to the cluster's value.
    """

    def __init__(
        self,
        bootstrap: str | Sequence[str] | None = None,
        *,
        topics: Iterable[str] | None = None,
        auto_offset_reset: str = "latest",
        fetch_max_wait_ms: int = 500,
        fetch_min_bytes: int = 1,
        fetch_max_bytes: int = 52428800,
        max_partition_fetch_bytes: int = 1048576,
        max_poll_records: int = 500,
        request_timeout_ms: float = 30000,
        default_api_timeout_ms: float = 60000,
        retry_backoff_ms: float = 100,
        metadata_max_age_ms: float = 300000,
        consumer_timeout_ms: float | None = None,
        key_deserializer: Callable[[bytes | None], Any] | None = None,
        value_deserializer: Callable[[bytes | None], Any] | None = None,
        group_id: str | None = None,
        enable_auto_commit: bool = True,
        auto_commit_interval_ms: float = 5000,
        session_timeout_ms: int | None = None,
        group_instance_id: str | None = None,
        group_remote_assignor: str | None = None,
        max_poll_interval_ms: int = 300000,
        client_id: str = "tidelog-consumer",
    ) -> None:
        if group_id is not None and not group_id:
            raise ValueError("group_id must not be empty (None means no group)")
        if group_id is None and group_instance_id is not None:
            raise ValueError("group_instance_id needs a group_id")
        if auto_offset_reset not in _RESET_POLICIES:
            raise ValueError(
                f"invalid auto_offset_reset {auto_offset_reset!r}: use earliest, latest or none"
            )
        self.auto_offset_reset = auto_offset_reset
        self.fetch_max_wait_ms = fetch_max_wait_ms
        self.fetch_min_bytes = fetch_min_bytes
        self.fetch_max_bytes = fetch_max_bytes
        self.max_partition_fetch_bytes = max_partition_fetch_bytes
        self.max_poll_records = max_poll_records
        self.request_timeout = request_timeout_ms / 1000.0
        self.api_timeout = default_api_timeout_ms / 1000.0
        self.retry_backoff = retry_backoff_ms / 1000.0
        self.consumer_timeout = None if consumer_timeout_ms is None else consumer_timeout_ms / 1000.0
        self.key_deserializer = key_deserializer
        self.value_deserializer = value_deserializer
        self.connections = Connections(bootstrap)
        self.metadata = Metadata(
            self.connections,
            request_timeout_ms=request_timeout_ms,
            retry_backoff_ms=retry_backoff_ms,
            metadata_max_age_ms=metadata_max_age_ms,
        )
        self._assignment: dict[TopicPartition, _PartitionState] = {}
        self._subscription: tuple[str, ...] = ()
        # A pattern subscription: the topics it matches in the metadata, resolved again at every
        # refresh (metadata_max_age_ms), become the subscription.
        self._pattern: re.Pattern[str] | None = None
        self._pattern_snapshot: object = None
        self._fetches: dict[int, asyncio.Task[None]] = {}
        self._reset_task: asyncio.Task[None] | None = None
        self._pulse: _Pulse | None = None
        self._rotation = 0
        # Held while fetched data is handed out, or changed by the loop, which `drain_ready` (the
        # sync Consumer's poll, on the application's thread) needs: what is buffered, the
        # positions and the assignment. Never held across an await.
        self._delivery_lock = threading.RLock()
        self._fetch_slot_freed = False  # a drain handed out an answer's last record
        self._chores_due = 0.0
        self._iter_buffer: deque[ConsumerRecord] = deque()
        self._closed = False
        self._listening = False
        self.group_id = group_id
        self.enable_auto_commit = enable_auto_commit
        self.auto_commit_interval = auto_commit_interval_ms / 1000.0
        self._next_auto_commit = time.monotonic() + self.auto_commit_interval
        self._auto_commit_task: asyncio.Task[None] | None = None
        self._group_options = {
            "instance_id": group_instance_id,
            "server_assignor": group_remote_assignor,
            "rebalance_timeout_ms": int(max_poll_interval_ms),
            "session_timeout_ms": int(session_timeout_ms if session_timeout_ms is not None else 45000),
            "client_id": client_id,
        }
        self._coordinator: GroupCoordinatorClient | None = None
        if group_id is not None:
            self._coordinator = GroupCoordinatorClient(
                group_id,
                self.connections,
                self.metadata,
                request_timeout=self.request_timeout,
                retry_backoff=self.retry_backoff,
            )
        self._membership: GroupMembership | None = None
        self._on_assign: Callable[[set[TopicPartition]], Any] | None = None
        self._on_revoke: Callable[[set[TopicPartition]], Any] | None = None
        self._committed: dict[TopicPartition, int] = {}  # what this consumer last committed
        # Commits on their way (settled when they end): a revocation's commit waits for them,
        # so an older offset still being retried cannot land after it.
        self._commits_in_flight: set[asyncio.Future[None]] = set()
        # The sync facade runs on_assign/on_revoke on the application's thread (inside poll or
        # close) through this; None: run them here on the loop.
        self.callback_runner: Callable[[Callable[[set[TopicPartition]], Any] | None,
                                        frozenset[TopicPartition]], Awaitable[None]] | None = None
        self.pending_callbacks = 0  # poll returns early while the application owes one
        # Rebalance callbacks running or waiting for the application (GroupMembership's
        # callbacks_running): a close past its deadline does not cut them short.
        self.callbacks_running = 0
        # Tasks inside a callback run on the loop (AsyncConsumer): a close or a blocking
        # unsubscribe awaited there would wait for that very callback to return.
        self._callback_tasks: set[asyncio.Task[Any]] = set()
        self._leaving: asyncio.Task[None] | None = None
        # The membership `unsubscribe` is ending: its revocation commits as that member.
        self._departing: GroupMembership | None = None
        # While closing: the one deadline (monotonic) of the final commit and the leave.
        self._close_deadline: float | None = None
        if topics:
            self.subscribe(topics)

    # --- assignment ----------------------------------------------------------------------------

    def _ensure_loop_state(self) -> _Pulse:
        if self._pulse is None:
            self._pulse = _Pulse()
        if not self._listening:
            self.metadata.add_listener(self._on_metadata)
            self._listening = True
        if self._membership is not None:
            self._membership.start()
        return self._pulse

    def _on_metadata(self) -> None:
        self._resolve_pattern()
        if self._subscription and self._membership is None:
            self._update_subscribed_assignment()
        # A fetch still waiting on a node that no longer leads one of its partitions (a paused or
        # partitioned node answers nothing until the request times out) is abandoned, so the
        # partition moves to its new leader now rather than after request_timeout_ms.
        snapshot = self.metadata.snapshot
        for node_id, task in list(self._fetches.items()):
            if any(snapshot.leader_id(tp) != node_id for tp in getattr(task, "tidelog_partitions", ())):
                task.cancel()
        if self._pulse is not None:
            self._pulse.fire()

    def assign(self, partitions: Iterable[TopicPartition]) -> None:
        """Read exactly these partitions (replacing any earlier assignment or subscription)."""
        wanted = list(dict.fromkeys(partitions))
        for tp in wanted:
            if not isinstance(tp, TopicPartition):
                raise TypeError(f"assign() takes TopicPartition objects, not {type(tp).__name__}")
        # A pattern that matches nothing yet still makes this consumer a subscribed member.
        if self._membership is not None and (self._membership.topics or self._pattern is not None):
            raise RuntimeError(
                f"this consumer is subscribed as a member of group {self.group_id!r}: "
                f"unsubscribe() before assign()"
            )
        self._subscription = ()
        self._pattern = None
        self._set_assignment(wanted)
        self.metadata.add_topics(tp.topic for tp in wanted)

    def subscribe(
        self,
        topics: Iterable[str] = (),
        on_assign: Callable[[set[TopicPartition]], Any] | None = None,
        on_revoke: Callable[[set[TopicPartition]], Any] | None = None,
        *,
        pattern: str | re.Pattern[str] | None = None,
    ) -> None:
        """With a ``group_id``: join the group and read the partitions of ``topics`` it assigns
        this consumer. Without: read every partition of ``topics`` (on_assign/on_revoke are not
        called then: nothing is ever revoked).

        ``pattern`` (a regex, str or compiled, instead of ``topics``, as kafka-python's and
        aiokafka's ``subscribe(pattern=...)``) subscribes to every non-internal topic whose
        whole name matches; the consumer resolves it against the cluster's topics at each
        metadata refresh (metadata_max_age_ms), so a topic created later joins the assignment
        after the next refresh and a deleted one leaves it."""
        if isinstance(topics, str):
            topics = [topics]
        topics = list(topics)
        if pattern is not None and topics:
            raise ValueError("subscribe to topics or to a pattern, not both")
        self._pattern = None if pattern is None else compile_pattern(pattern)
        self._pattern_snapshot = None
        if self._pattern is not None:
            self.metadata.track_all_topics()
            topics = list(topics_matching(self._pattern, self.metadata.snapshot.topics))
        self._subscription = tuple(dict.fromkeys(topics))
        self.metadata.add_topics(self._subscription)
        if self._coordinator is None:
            self._update_subscribed_assignment()
            return
        if self._membership is None:
            self._set_assignment([])  # partitions from assign(): the group decides from now on
            options = self._group_options
            self._membership = GroupMembership(
                self._coordinator,
                self,
                instance_id=options["instance_id"],
                server_assignor=options["server_assignor"],
                rebalance_timeout_ms=options["rebalance_timeout_ms"],
                session_timeout_ms=options["session_timeout_ms"],
                client_id=options["client_id"],
            )
        self._on_assign, self._on_revoke = on_assign, on_revoke
        self._membership.subscribe(self._subscription)
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return  # started by the first poll
        self._ensure_loop_state()

    def unsubscribe(self) -> None:
        """Stop reading; a group member leaves its group (in the background)."""
        self._subscription = ()
        self._pattern = None
        membership, self._membership = self._membership, None
        if membership is not None:
            # Leaving gives the partitions up (commit, on_revoke) and needs the loop.
            self._departing = membership
            self._leaving = asyncio.get_running_loop().create_task(self._leave(membership))
            return
        self._set_assignment([])

    async def _leave(self, membership: GroupMembership) -> None:
        try:
            await membership.leave(self.request_timeout)
        finally:
            if self._departing is membership:
                self._departing = None

    async def unsubscribe_and_wait(self) -> None:
        """`unsubscribe`, returning once the group has been left (Kafka's blocking unsubscribe:
        the sync Consumer runs on_revoke inside it). RuntimeError when awaited inside
        on_assign/on_revoke: leaving waits for the callback to return."""
        self._refuse_inside_callback("unsubscribe_and_wait()")
        self.unsubscribe()
        if self._leaving is not None:
            await asyncio.gather(self._leaving, return_exceptions=True)

    def _resolve_pattern(self) -> None:
        """A pattern subscription takes the topics it matches in the latest metadata."""
        snapshot = self.metadata.snapshot
        if self._pattern is None or snapshot is self._pattern_snapshot:
            return
        self._pattern_snapshot = snapshot
        matched = topics_matching(self._pattern, snapshot.topics)
        if matched == self._subscription:
            return
        log.info("subscription pattern %r now matches %s", self._pattern.pattern, ", ".join(matched) or "no topic")
        self._subscription = matched
        if self._membership is not None:
            self._membership.subscribe(matched)  # the next heartbeat carries it
        else:
            self._update_subscribed_assignment()

    def _update_subscribed_assignment(self) -> None:
        if self._membership is not None:
            return  # the group assigns
        snapshot = self.metadata.snapshot
        wanted = [
            TopicPartition(topic, p)
            for topic in self._subscription
            for p in range(snapshot.partition_count(topic) or 0)
        ]
        self._set_assignment(wanted)

    def _set_assignment(self, wanted: list[TopicPartition]) -> None:
        with self._delivery_lock:
            self._assignment = {tp: self._assignment.get(tp) or _PartitionState() for tp in wanted}

    def assignment(self) -> set[TopicPartition]:
        return set(self._assignment)

    def subscription(self) -> set[str]:
        return set(self._subscription)

    def _state(self, tp: TopicPartition) -> _PartitionState:
        state = self._assignment.get(tp)
        if state is None:
            raise ValueError(f"{tp} is not assigned to this consumer")
        return state

    # --- positions -----------------------------------------------------------------------------

    def seek(self, tp: TopicPartition, offset: int) -> None:
        if offset < 0:
            raise ValueError(f"invalid offset {offset}: use seek_to_beginning/seek_to_end")
        with self._delivery_lock:  # against a drain_ready of another application thread
            self._state(tp).seek(offset)
        self._chores_due = 0.0  # its fetch goes out at the next poll even if that one is ready
        self._cancel_fetch_for(tp)
        self._drop_iterated(tp)

    def _drop_iterated(self, tp: TopicPartition) -> None:
        """Forget records of ``tp`` that iteration buffered but did not hand out yet."""
        if self._iter_buffer:
            self._iter_buffer = deque(r for r in self._iter_buffer if r.topic_partition != tp)

    async def seek_to_beginning(self, *partitions: TopicPartition) -> None:
        await self._seek_to(partitions, EARLIEST_TIMESTAMP)

    async def seek_to_end(self, *partitions: TopicPartition) -> None:
        await self._seek_to(partitions, LATEST_TIMESTAMP)

    async def _seek_to(self, partitions: Sequence[TopicPartition], which: int) -> None:
        if not partitions and self._subscription and not self._assignment:
            await self._resolve_subscription(self.api_timeout)
        tps = list(partitions) or list(self._assignment)
        for tp in tps:
            self._state(tp)
        offsets = await self._list_offsets({tp: which for tp in tps}, self.api_timeout)
        for tp in tps:
            self.seek(tp, offsets[tp][0])

    async def position(self, tp: TopicPartition, timeout: float | None = None) -> int:
        """The offset of the next record `poll` will return for ``tp``."""
        state = self._state(tp)
        if state.position is None:
            await self._reset_positions([tp], self.api_timeout if timeout is None else timeout)
        assert state.position is not None
        return state.position

    async def beginning_offsets(
        self, partitions: Iterable[TopicPartition], timeout: float | None = None
    ) -> dict[TopicPartition, int]:
        answers = await self._list_offsets(
            {tp: EARLIEST_TIMESTAMP for tp in partitions}, timeout or self.api_timeout
        )
        return {tp: offset for tp, (offset, _) in answers.items()}

    async def end_offsets(
        self, partitions: Iterable[TopicPartition], timeout: float | None = None
    ) -> dict[TopicPartition, int]:
        """The high watermark of each partition: the offset the next record will get."""
        answers = await self._list_offsets(
            {tp: LATEST_TIMESTAMP for tp in partitions}, timeout or self.api_timeout
        )
        return {tp: offset for tp, (offset, _) in answers.items()}

    async def offsets_for_times(
        self, timestamps: Mapping[TopicPartition, int], timeout: float | None = None
    ) -> dict[TopicPartition, OffsetAndTimestamp | None]:
        """The first offset whose record's timestamp is at or after the given one (Kafka's
        semantics); None when no record is.

        The node answers with the first *batch* whose max timestamp qualifies (its time index
        is per batch); the exact record is found here by reading that batch, skipping control
        batches, whose timestamps are the leader's clock rather than the producer's.
        """
        for tp, ts in timestamps.items():
            if ts < 0:
                raise ValueError(f"invalid timestamp {ts} for {tp}: must be >= 0")
        limit = timeout or self.api_timeout
        deadline = time.monotonic() + limit
        answers = await self._list_offsets(dict(timestamps), limit)
        result: dict[TopicPartition, OffsetAndTimestamp | None] = {}
        for tp, (offset, ts) in answers.items():
            if ts < 0 or offset < 0:
                result[tp] = None
            else:
                result[tp] = await self._first_record_at_or_after(
                    tp, offset, timestamps[tp], deadline
                )
        return result

    async def _first_record_at_or_after(
        self, tp: TopicPartition, offset: int, target: int, deadline: float
    ) -> OffsetAndTimestamp | None:
        while True:
            buf = await self._fetch_once(tp, offset, deadline)
            if not buf:
                return None  # reached the high watermark
            progressed = False
            try:
                for batch in decode_batches(buf):
                    if batch.next_offset <= offset:
                        continue
                    if not batch.is_control and batch.max_timestamp >= target:
                        for record in batch.records():
                            if record.offset >= offset and record.timestamp >= target:
                                return OffsetAndTimestamp(record.offset, record.timestamp)
                    offset = batch.next_offset
                    progressed = True
            except CorruptRecordError as exc:
                raise TidelogError(ErrorCode.CORRUPT_MESSAGE, f"{tp}: {exc.reason}") from None
            if not progressed:
                return None

    async def _fetch_once(self, tp: TopicPartition, offset: int, deadline: float) -> bytes:
        """One immediate fetch of ``tp`` at its leader (retrying leader moves until deadline)."""
        backoff = self.retry_backoff
        while True:
            snapshot = self.metadata.snapshot
            leader = snapshot.leader_id(tp)
            error: TidelogError | None = None
            if leader is None:
                error = TidelogError(ErrorCode.LEADER_NOT_AVAILABLE, f"no leader known for {tp}")
            else:
                address = snapshot.address(leader)
                assert address is not None
                request = api_pb2.FetchRequest(
                    max_wait_ms=0,
                    min_bytes=0,
                    max_bytes=self.max_partition_fetch_bytes,
                    partitions=[
                        api_pb2.FetchPartition(
                            topic=tp.topic, partition=tp.partition, fetch_offset=offset,
                            partition_max_bytes=64 * 1024, current_leader_epoch=-1,
                        )
                    ],
                )
                try:
                    response = await self.connections.broker(address).Fetch(
                        request, timeout=self.request_timeout
                    )
                except grpc.aio.AioRpcError as exc:
                    error = ClusterUnreachableError(describe_rpc_error(exc, address))
                else:
                    [result] = response.partitions
                    if result.error == ErrorCode.NONE:
                        return result.records
                    error = TidelogError(result.error, result.error_message or f"reading {tp}")
                    if not error.retriable:
                        raise error
                    if result.error in _METADATA_ERRORS and result.HasField("leader"):
                        self.metadata.apply_leader_hint(tp, result.leader)
            if time.monotonic() + backoff >= deadline:
                raise error
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 1.0)
            try:
                await self.metadata.refresh()
            except ClusterUnreachableError:
                pass

    def pause(self, *partitions: TopicPartition) -> None:
        with self._delivery_lock:
            for tp in partitions:
                self._state(tp).paused = True

    def resume(self, *partitions: TopicPartition) -> None:
        with self._delivery_lock:
            for tp in partitions:
                state = self._state(tp)
                if not state.revoked:
                    state.paused = False
        self._chores_due = 0.0
        if self._pulse is not None:
            self._pulse.fire()

    def paused(self) -> set[TopicPartition]:
        return {tp for tp, state in self._assignment.items() if state.paused}

    def highwater(self, tp: TopicPartition) -> int | None:
        """The last high watermark a fetch reported for ``tp`` (None before the first)."""
        hw = self._state(tp).high_watermark
        return hw if hw >= 0 else None

    async def partitions_for_topic(self, topic: str, timeout: float | None = None) -> set[int]:
        snapshot = await self.metadata.wait_for_topics(
            [topic], self.api_timeout if timeout is None else timeout
        )
        return set(range(snapshot.partition_count(topic) or 0))

    async def topics(self) -> set[str]:
        self.metadata.track_all_topics()
        snapshot = await self.metadata.refresh()
        return set(snapshot.topics)

    # --- ListOffsets ---------------------------------------------------------------------------

    async def _list_offsets(
        self, wanted: Mapping[TopicPartition, int], timeout: float
    ) -> dict[TopicPartition, tuple[int, int]]:
        """ListOffsets for each partition at its leader, retrying retriable errors until timeout."""
        deadline = time.monotonic() + timeout
        pending = dict(wanted)
        answers: dict[TopicPartition, tuple[int, int]] = {}
        if not pending:
            return answers
        await self.metadata.wait_for_topics(sorted({tp.topic for tp in pending}), timeout)
        backoff = self.retry_backoff
        last_error: TidelogError | None = None
        while pending:
            snapshot = self.metadata.snapshot
            by_node: dict[int, list[TopicPartition]] = {}
            for tp in pending:
                count = snapshot.partition_count(tp.topic)
                if count is not None and tp.partition >= count:
                    raise TidelogError(
                        ErrorCode.UNKNOWN_TOPIC_OR_PARTITION,
                        f"partition {tp.partition} of topic {tp.topic!r} does not exist "
                        f"(the topic has {count})",
                    )
                leader = snapshot.leader_id(tp)
                if leader is None:
                    last_error = TidelogError(
                        ErrorCode.LEADER_NOT_AVAILABLE, f"no leader known for {tp}"
                    )
                else:
                    by_node.setdefault(leader, []).append(tp)
            for node_id, tps in by_node.items():
                address = snapshot.address(node_id)
                assert address is not None
                request = api_pb2.ListOffsetsRequest(
                    partitions=[
                        api_pb2.ListOffsetsPartition(
                            topic=tp.topic, partition=tp.partition, timestamp=pending[tp]
                        )
                        for tp in tps
                    ]
                )
                try:
                    response = await self.connections.broker(address).ListOffsets(
                        request, timeout=self.request_timeout
                    )
                except grpc.aio.AioRpcError as exc:
                    if not is_retriable_rpc_error(exc):
                        raise TidelogError(
                            ErrorCode.UNKNOWN_SERVER_ERROR, describe_rpc_error(exc, address)
                        ) from None
                    last_error = ClusterUnreachableError(describe_rpc_error(exc, address))
                    continue
                for result in response.partitions:
                    tp = TopicPartition(result.topic, result.partition)
                    if tp not in pending:
                        continue
                    if result.error == ErrorCode.NONE:
                        answers[tp] = (result.offset, result.timestamp)
                        del pending[tp]
                        continue
                    error = TidelogError(result.error, result.error_message or f"listing offsets of {tp}")
                    if not error.retriable:
                        raise error
                    last_error = error
                    if result.error in _METADATA_ERRORS and result.HasField("leader"):
                        self.metadata.apply_leader_hint(tp, result.leader)
            if not pending:
                break
            if time.monotonic() + backoff >= deadline:
                raise last_error or TidelogError(
                    ErrorCode.REQUEST_TIMED_OUT, f"listing offsets timed out after {timeout} s"
                )
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 1.0)
            try:
                await self.metadata.refresh()
            except ClusterUnreachableError as exc:
                last_error = exc
        return answers

    async def _reset_positions(self, tps: Sequence[TopicPartition], timeout: float) -> None:
        which = _RESET_POLICIES[self.auto_offset_reset]
        if which is None:
            raise TidelogError(
                ErrorCode.OFFSET_OUT_OF_RANGE,
                f"no position for {', '.join(map(str, tps))} and auto_offset_reset='none': "
                f"seek() first",
            )
        answers = await self._list_offsets({tp: which for tp in tps}, timeout)
        with self._delivery_lock:
            for tp, (offset, _) in answers.items():
                state = self._assignment.get(tp)
                if state is not None and state.position is None:
                    state.seek(offset)

    def _start_resets(self) -> None:
        """Look up positions for partitions without one, in the background."""
        missing = [tp for tp, s in self._assignment.items() if s.position is None and s.error is None]
        if not missing or (self._reset_task is not None and not self._reset_task.done()):
            return
        if _RESET_POLICIES[self.auto_offset_reset] is None:
            error = TidelogError(
                ErrorCode.OFFSET_OUT_OF_RANGE,
                f"no position for {', '.join(map(str, missing))} and auto_offset_reset='none': "
                f"seek() first",
            )
            for tp in missing:
                self._assignment[tp].error = error
            return
        self._reset_task = asyncio.get_running_loop().create_task(self._run_resets(missing))

    async def _run_resets(self, tps: list[TopicPartition]) -> None:
        try:
            await self._reset_positions(tps, self.api_timeout)
        except TidelogError as exc:
            if not exc.retriable:
                for tp in tps:
                    state = self._assignment.get(tp)
                    if state is not None and state.position is None:
                        state.error = exc
            else:
                log.debug("offset reset failed, will retry: %s", exc)
        finally:
            if self._pulse is not None:
                self._pulse.fire()

    # --- fetching ------------------------------------------------------------------------------

    def _cancel_fetch_for(self, tp: TopicPartition) -> None:
        for task in list(self._fetches.values()):
            if tp in getattr(task, "tidelog_partitions", ()):
                task.cancel()

    def _send_fetches(self) -> None:
        snapshot = self.metadata.snapshot
        now = time.monotonic()
        by_node: dict[int, list[TopicPartition]] = {}
        need_metadata = False
        for tp, state in self._assignment.items():
            if (
                state.paused
                or state.revoked
                or state.fetch_offset is None
                or state.in_flight
                or state.error is not None
                or len(state.buffered) >= _PREFETCH_ANSWERS
                or state.retry_at > now
            ):
                continue
            leader = snapshot.leader_id(tp)
            if leader is None:
                need_metadata = True
                continue
            if leader in self._fetches:
                continue
            by_node.setdefault(leader, []).append(tp)
        if need_metadata:
            self.metadata.request_update()
        loop = asyncio.get_running_loop()
        for node_id, tps in by_node.items():
            for tp in tps:
                self._assignment[tp].in_flight = True
            task = loop.create_task(self._fetch(node_id, tps))
            task.tidelog_partitions = frozenset(tps)  # type: ignore[attr-defined]
            task.tidelog_started = time.monotonic()  # type: ignore[attr-defined]
            task.add_done_callback(functools.partial(self._fetch_done, node_id, tps))
            self._fetches[node_id] = task

    def _check_overdue_fetches(self) -> None:
        """A long-poll that outlives its max wait by far hints at an unresponsive node: look
        again where the leaders are (`_on_metadata` abandons the fetch if one moved)."""
        overdue = time.monotonic() - (self.fetch_max_wait_ms / 1000.0 + _FETCH_GRACE)
        if any(getattr(t, "tidelog_started", overdue) < overdue for t in self._fetches.values()):
            self.metadata.request_update()

    def _fetch_done(self, node_id: int, tps: list[TopicPartition], task: asyncio.Task[None]) -> None:
        if task.cancelled() and not getattr(task, "tidelog_ran", False):
            # Cancelled before its first step (abandoned by `_on_metadata` right after it was
            # created): its finally never ran, and its partitions would stay in flight for good.
            self._fetch_finished(node_id, tps, task)

    def _fetch_finished(self, node_id: int, tps: list[TopicPartition], task: asyncio.Task[None] | None) -> None:
        for tp in tps:
            state = self._assignment.get(tp)
            if state is not None:
                state.in_flight = False
        if self._fetches.get(node_id) is task:
            del self._fetches[node_id]
        if not self._closed:
            if self._pulse is not None:
                self._pulse.fire()
            self._send_fetches()

    async def _fetch(self, node_id: int, tps: list[TopicPartition]) -> None:
        asyncio.current_task().tidelog_ran = True  # type: ignore[union-attr]
        with self._delivery_lock:
            sent = {tp: (self._assignment[tp].fetch_offset, self._assignment[tp].epoch) for tp in tps}
        snapshot = self.metadata.snapshot
        try:
            address = snapshot.address(node_id)
            if address is None:
                self.metadata.request_update()
                return
            request = api_pb2.FetchRequest(
                max_wait_ms=self.fetch_max_wait_ms,
                min_bytes=self.fetch_min_bytes,
                max_bytes=self.fetch_max_bytes,
                partitions=[
                    api_pb2.FetchPartition(
                        topic=tp.topic,
                        partition=tp.partition,
                        fetch_offset=sent[tp][0],
                        partition_max_bytes=self.max_partition_fetch_bytes,
                        current_leader_epoch=(snapshot.leader(tp).leader_epoch if snapshot.leader(tp) else -1),
                    )
                    for tp in tps
                ],
            )
            try:
                response = await self.connections.broker(address).Fetch(
                    request, timeout=self.request_timeout + self.fetch_max_wait_ms / 1000.0
                )
            except grpc.aio.AioRpcError as exc:
                log.debug("fetch from node %d failed: %s", node_id, describe_rpc_error(exc, address))
                self.metadata.request_update()
                self._back_off(tps)
                return
            with self._delivery_lock:
                for result in response.partitions:
                    tp = TopicPartition(result.topic, result.partition)
                    state = self._assignment.get(tp)
                    if state is None or tp not in sent or (state.fetch_offset, state.epoch) != sent[tp]:
                        continue  # unassigned or sought meanwhile
                    self._handle_fetch_result(tp, state, result)
        finally:
            self._fetch_finished(node_id, tps, asyncio.current_task())

    def _back_off(self, tps: Iterable[TopicPartition]) -> None:
        retry_at = time.monotonic() + self.retry_backoff
        for tp in tps:
            state = self._assignment.get(tp)
            if state is not None:
                state.retry_at = retry_at

    def _handle_fetch_result(
        self, tp: TopicPartition, state: _PartitionState, result: api_pb2.FetchPartitionResult
    ) -> None:
        if result.error == ErrorCode.NONE:
            state.high_watermark = result.high_watermark
            state.log_start_offset = result.log_start_offset
            if not result.records:
                return
            fetch_offset = state.fetch_offset
            assert fetch_offset is not None
            try:
                batches, next_offset = self._scan(result.records, fetch_offset)
            except CorruptRecordError as exc:
                state.error = TidelogError(
                    ErrorCode.CORRUPT_MESSAGE, f"{tp} at offset {fetch_offset}: {exc.reason}"
                )
                return
            if next_offset > fetch_offset:
                state.buffered.append(_CompletedFetch(deque(batches), next_offset, fetch_offset))
                state.fetch_offset = next_offset
            return
        if result.error == ErrorCode.OFFSET_OUT_OF_RANGE:
            if _RESET_POLICIES[self.auto_offset_reset] is None:
                state.error = TidelogError(
                    ErrorCode.OFFSET_OUT_OF_RANGE,
                    f"offset {state.fetch_offset} is out of range for {tp} "
                    f"and auto_offset_reset='none'",
                )
            elif not state.buffered:
                log.info("offset %s out of range for %s; resetting to %s",
                         state.fetch_offset, tp, self.auto_offset_reset)
                state.seek(None)
            return
        if result.error in _METADATA_ERRORS:
            if result.HasField("leader") and result.leader.leader_id >= 0:
                self.metadata.apply_leader_hint(tp, result.leader)
            else:
                self.metadata.mark_leader_unknown(tp)
            self.metadata.request_update()
            self._back_off([tp])
            return
        if is_retriable(result.error):
            self._back_off([tp])
            return
        state.error = TidelogError(result.error, result.error_message or f"fetching {tp}")

    @staticmethod
    def _scan(buf: bytes, fetch_offset: int) -> tuple[list[RecordBatch], int]:
        """The data batches of a fetch answer with records at or after ``fetch_offset``, and
        the offset after its last batch (control batches count: they take offsets too)."""
        batches: list[RecordBatch] = []
        next_offset = fetch_offset
        for batch in decode_batches(buf):
            if batch.next_offset <= fetch_offset:
                continue
            next_offset = batch.next_offset
            if not batch.is_control:
                batches.append(batch)
        return batches, next_offset

    def _decode_next(self, tp: TopicPartition, completed: _CompletedFetch) -> None:
        """Decode the next batch of ``completed`` into its records to hand out; the batch is
        taken off only once decoded, so an error leaves the partition where it was."""
        batch = completed.batches[0]
        # The codec builds each ConsumerRecord itself, as (topic, partition) + a Record's fields.
        records = batch.records_as(ConsumerRecord, (tp.topic, tp.partition))
        if batch.base_offset < completed.fetch_offset:
            records = [r for r in records if r.offset >= completed.fetch_offset]
        kd, vd = self.key_deserializer, self.value_deserializer
        if kd is not None or vd is not None:
            new = tuple.__new__
            records = [
                new(ConsumerRecord, (topic, partition, offset, timestamp, kd(key) if kd else key,
                                     vd(value) if vd else value, headers))
                for topic, partition, offset, timestamp, key, value, headers in records
            ]
        completed.batches.popleft()
        completed.records = records
        completed.index = 0

    def _drain(self, max_records: int) -> list[ConsumerRecord]:
        out: list[ConsumerRecord] = []
        tps = list(self._assignment)
        if not tps:
            return out
        start = self._rotation % len(tps)
        self._rotation += 1
        for tp in tps[start:] + tps[:start]:
            state = self._assignment[tp]
            if state.paused or state.revoked:
                continue
            while state.buffered and len(out) < max_records:
                completed = state.buffered[0]
                if completed.index >= len(completed.records) and completed.batches:
                    try:
                        self._decode_next(tp, completed)
                    except CorruptRecordError as exc:
                        # Kafka's consumer too hands out the records before a corrupt batch and
                        # then fails at it, again on every poll until the application seeks.
                        position = state.position
                        state.seek(position)  # drops what was fetched after it
                        state.error = TidelogError(
                            ErrorCode.CORRUPT_MESSAGE, f"{tp} at offset {position}: {exc.reason}")
                        break
                    except Exception:
                        # A deserializer failed: the records before it go out now, and the
                        # next poll raises it (and every poll after, until a seek past it).
                        if out:
                            return out
                        raise
                    continue
                take = completed.records[completed.index : completed.index + max_records - len(out)]
                if take:
                    out += take
                    completed.index += len(take)
                    state.position = take[-1].offset + 1
                if completed.index >= len(completed.records) and not completed.batches:
                    state.buffered.popleft()
                    state.position = completed.next_offset
                    self._fetch_slot_freed = True
            if len(out) >= max_records:
                break
        return out

    def drain_ready(self, max_records: int | None) -> tuple[list[ConsumerRecord], bool] | None:
        """The sync Consumer's poll on the application's thread, for records already fetched:
        handed out (decoded there, positions advanced) as `poll` hands them out, without the
        trip to the loop and back, which cost as much CPU as decoding a tenth of a poll's
        records. Returns the records and whether the loop is owed a poll's other chores
        (`do_chores`: fetch for a partition whose buffer has room again, or the periodic
        ones); None when this poll needs the loop: nothing ready (so it waits, or raises a
        partition's error), the loop not started yet, a group (its membership counts the
        polls, commits from them and revokes partitions on the loop), or a key or value
        deserializer: application code never runs under ``_delivery_lock``, which the shared
        I/O loop of every client in the process takes to store a fetch answer (a deserializer
        that waited for any client there would wait for ever).

        Safe beside the loop: the loop changes what this reads (answers arriving, resets,
        seeks, pauses, the assignment) only under ``_delivery_lock``, which this holds; close
        marks the consumer closed under it too, so no records go out once close returned."""
        if (self._closed or self._pulse is None or self._coordinator is not None
                or self.key_deserializer is not None or self.value_deserializer is not None):
            return None
        with self._delivery_lock:
            if self._closed:  # closed by another thread while this one waited for the lock
                return None
            records = self._drain(max_records or self.max_poll_records)
            freed, self._fetch_slot_freed = self._fetch_slot_freed, False
        if not records:
            return None
        now = time.monotonic()
        if freed or now >= self._chores_due:
            self._chores_due = now + _CHORES_EVERY_S
            return records, True
        return records, False

    def do_chores(self) -> None:
        """What `poll` does on the loop besides handing out records (see `drain_ready`)."""
        if self._closed:
            return
        if (self._assignment or self._pattern is not None) and self.metadata.maybe_expired():
            self.metadata.request_update()
        self._start_resets()
        self._send_fetches()
        self._check_overdue_fetches()

    def _raise_errors(self) -> None:
        for tp, state in self._assignment.items():
            if state.error is not None and not state.buffered:
                error, state.error = state.error, None
                raise error

    async def _resolve_subscription(self, timeout: float) -> None:
        try:
            await self.metadata.wait_for_topics(self._subscription, timeout)
        except TidelogError:
            pass
        self._update_subscribed_assignment()

    # --- groups: the membership's host, and committing -----------------------------------------

    def _require_group(self, what: str) -> GroupCoordinatorClient:
        if self._coordinator is None:
            raise ValueError(f"{what} needs a consumer group: create the consumer with group_id=...")
        return self._coordinator

    def _member(self) -> tuple[str, int]:
        membership = self._membership or self._departing
        if membership is not None:
            return membership.member()
        return "", -1

    def _positions(self) -> dict[TopicPartition, int]:
        return {tp: s.position for tp, s in self._assignment.items() if s.position is not None}

    async def revoke_partitions(self, partitions: frozenset[TopicPartition], lost: bool) -> None:
        """The membership takes ``partitions`` away (see tidelog.client.group)."""
        revoking = [tp for tp in partitions if tp in self._assignment]
        for tp in revoking:
            state = self._assignment[tp]
            state.revoked = True
            state.buffered.clear()
            self._cancel_fetch_for(tp)
            self._drop_iterated(tp)
        if revoking and not lost and self.callback_runner is not None:
            # Commit only once the application is back in poll: by then it has handled what
            # earlier polls returned, which the positions already count.
            self.callbacks_running += 1
            try:
                await self.callback_runner(None, partitions)
            finally:
                self.callbacks_running -= 1
        if revoking and not lost and self._commits_in_flight:
            await asyncio.wait(list(self._commits_in_flight), timeout=self._closing_budget(None))
        if revoking and not lost and self.enable_auto_commit and self._coordinator is not None:
            positions = {
                tp: pos for tp, pos in self._positions().items()
                if tp in partitions and self._committed.get(tp) != pos
            }
            try:
                await self._commit(positions, self._closing_budget(self.request_timeout), strict=False)
            except TidelogError as exc:
                log.warning("group %s: committing the positions of revoked partitions failed: %s",
                            self.group_id, exc)
        await self._callback(self._on_revoke, partitions, "on_revoke")
        for tp in partitions:
            self._assignment.pop(tp, None)
            self._committed.pop(tp, None)
        if self._pulse is not None:
            self._pulse.fire()

    def halt_partitions(self) -> None:
        """The membership is lost (see tidelog.client.group): deliver nothing more."""
        for tp, state in self._assignment.items():
            state.revoked = True
            state.buffered.clear()
            self._cancel_fetch_for(tp)
            self._drop_iterated(tp)

    async def assign_partitions(self, partitions: frozenset[TopicPartition]) -> None:
        """The membership hands ``partitions`` over: start each from its committed offset."""
        coordinator = self._require_group("assigning partitions")
        committed = await coordinator.fetch_committed(partitions, self._member, self.api_timeout)
        for tp in sorted(partitions):
            state = _PartitionState()
            offset = committed.get(tp)
            if offset is not None:
                state.seek(offset)
                self._committed[tp] = offset
            self._assignment[tp] = state
        self.metadata.add_topics(tp.topic for tp in partitions)
        await self._callback(self._on_assign, partitions, "on_assign")
        if self._pulse is not None:
            self._pulse.fire()

    async def _callback(
        self,
        callback: Callable[[set[TopicPartition]], Any] | None,
        partitions: frozenset[TopicPartition],
        what: str,
    ) -> None:
        if callback is None:
            return
        self.callbacks_running += 1
        task = asyncio.current_task()
        try:
            if self.callback_runner is not None:
                await self.callback_runner(callback, partitions)
            else:
                if task is not None:
                    self._callback_tasks.add(task)
                await call_callback(callback, partitions, what)
        finally:
            self.callbacks_running -= 1
            if task is not None:
                self._callback_tasks.discard(task)

    def _refuse_inside_callback(self, what: str) -> None:
        if asyncio.current_task() in self._callback_tasks:
            raise RuntimeError(
                f"{what} cannot be awaited inside a rebalance callback (on_assign/on_revoke): it "
                f"waits for the callback to return; return first, or run it in a task of its own"
            )

    def _owned_offsets(self, strict: bool) -> Callable[[Mapping[TopicPartition, int]], Mapping[TopicPartition, int]]:
        """What a member may commit at this moment: offsets of partitions it owns (a partition
        being revoked still counts until the revocation is reported). Its epoch alone would
        not stop a commit racing a revocation: retried under the next epoch, it would land on
        the new owner's partition. ``strict``: refuse the commit (the application asked for
        those partitions); else drop them (auto-commit: the revocation committed them)."""

        def select(offsets: Mapping[TopicPartition, int]) -> Mapping[TopicPartition, int]:
            membership = self._membership or self._departing
            if membership is None:
                return offsets  # not a member: an admin commit, fenced by the coordinator
            in_group = bool(membership.member()[0])
            foreign = sorted(tp for tp in offsets if not in_group or tp not in self._assignment)
            if not foreign:
                return offsets
            if strict:
                raise TidelogError(
                    ErrorCode.STALE_MEMBER_EPOCH,
                    f"cannot commit {', '.join(map(str, foreign))}: not assigned to this member of "
                    f"group {self.group_id!r} (revoked or lost in a rebalance)",
                )
            return {tp: offset for tp, offset in offsets.items() if tp not in foreign}

        return select

    async def _commit(self, offsets: Mapping[TopicPartition, int], timeout: float, *, strict: bool = True) -> None:
        coordinator = self._require_group("commit()")
        if not offsets:
            return
        settled = asyncio.get_running_loop().create_future()
        self._commits_in_flight.add(settled)
        try:
            await coordinator.commit(offsets, self._member, timeout, select=self._owned_offsets(strict))
        finally:
            self._commits_in_flight.discard(settled)
            settled.set_result(None)
        for tp, offset in offsets.items():
            if tp in self._assignment:
                self._committed[tp] = offset

    async def commit(
        self, offsets: Mapping[TopicPartition, int] | None = None, timeout: float | None = None
    ) -> None:
        """Commit ``offsets`` (each the offset of the next record to read), by default the
        positions of every assigned partition, and wait until the coordinator has them."""
        self._require_group("commit()")
        wanted = self._positions() if offsets is None else dict(offsets)
        for tp, offset in wanted.items():
            if not isinstance(tp, TopicPartition) or offset < 0:
                raise ValueError(f"invalid commit {tp!r}: {offset!r}")
        await self._commit(wanted, self.api_timeout if timeout is None else timeout)

    def commit_async(
        self,
        offsets: Mapping[TopicPartition, int] | None = None,
        callback: Callable[[dict[TopicPartition, int], BaseException | None], Any] | None = None,
    ) -> asyncio.Future[None]:
        """Start a commit (of the current positions by default) without waiting for it; the
        returned future, and ``callback(offsets, error)``, say how it went."""
        self._require_group("commit_async()")
        wanted = self._positions() if offsets is None else dict(offsets)
        task = asyncio.get_running_loop().create_task(self._commit(wanted, self.api_timeout))

        def done(finished: asyncio.Task[None]) -> None:
            error = None if finished.cancelled() else finished.exception()
            if error is not None and callback is None:
                log.warning("group %s: asynchronous commit failed: %s", self.group_id, error)
            if callback is not None:
                callback(wanted, error)

        task.add_done_callback(done)
        return task

    async def committed(
        self, partitions: Iterable[TopicPartition], timeout: float | None = None
    ) -> dict[TopicPartition, int | None]:
        """The group's committed offset of each partition (None where nothing is committed)."""
        coordinator = self._require_group("committed()")
        return await coordinator.fetch_committed(
            list(partitions), self._member, self.api_timeout if timeout is None else timeout
        )

    def _maybe_auto_commit(self) -> None:
        """Kafka's auto-commit: from poll, commit the positions of what earlier polls returned
        (records the application has had), at most every auto_commit_interval_ms."""
        if not self.enable_auto_commit or self._coordinator is None:
            return
        now = time.monotonic()
        if now < self._next_auto_commit:
            return
        if self._auto_commit_task is not None and not self._auto_commit_task.done():
            return
        self._next_auto_commit = now + self.auto_commit_interval
        changed = {
            tp: pos for tp, pos in self._positions().items()
            if self._committed.get(tp) != pos and not self._assignment[tp].revoked
        }
        if changed:
            self._auto_commit_task = asyncio.get_running_loop().create_task(
                self._commit(changed, self.api_timeout, strict=False))
            self._auto_commit_task.add_done_callback(self._auto_commit_done)

    def _auto_commit_done(self, task: asyncio.Task[None]) -> None:
        error = None if task.cancelled() else task.exception()
        if error is not None:
            log.warning("group %s: auto-commit failed: %s", self.group_id, error)

    def group_member(self) -> tuple[str, int] | None:
        """(member id, member epoch) while this consumer is a member of its group."""
        if self._membership is None or not self._membership.member_id:
            return None
        return self._membership.member_id, self._membership.member_epoch

    # --- polling -------------------------------------------------------------------------------

    async def poll(
        self, timeout_ms: float = 0, max_records: int | None = None
    ) -> list[ConsumerRecord]:
        """Records from the assigned partitions, waiting up to ``timeout_ms`` for some."""
        if self._closed:
            raise RuntimeError("the consumer is closed")
        pulse = self._ensure_loop_state()
        limit = max_records or self.max_poll_records
        deadline = time.monotonic() + timeout_ms / 1000.0
        if self._membership is not None and self._membership.fatal_error is not None:
            raise self._membership.fatal_error
        self._maybe_auto_commit()
        if (self._subscription and not self._assignment and self._membership is None) or (
            (self._assignment or self._pattern is not None) and self.metadata.maybe_expired()
        ):
            self.metadata.request_update()
        if not self._assignment and not self._subscription and self._pattern is None:
            raise RuntimeError("the consumer has no assignment: call assign() or subscribe() first")
        while True:
            if self._membership is not None:
                self._membership.note_poll()  # waiting inside poll is not being away from it
            event = pulse.waiter()
            self._start_resets()
            with self._delivery_lock:
                records = self._drain(limit)
            self._send_fetches()
            self._check_overdue_fetches()
            if records or self.pending_callbacks:
                return records
            self._raise_errors()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return []
            # Wake at least every backoff to resend fetches that were backing off.
            await wait_event(event, min(remaining, max(self.retry_backoff, 0.05)))

    async def getmany(self, timeout_ms: float = 0, max_records: int | None = None) -> dict[TopicPartition, list[ConsumerRecord]]:
        """`poll`, grouped by partition (aiokafka's name)."""
        grouped: dict[TopicPartition, list[ConsumerRecord]] = {}
        for record in await self.poll(timeout_ms, max_records):
            grouped.setdefault(record.topic_partition, []).append(record)
        return grouped

    def __aiter__(self) -> AsyncIterator[ConsumerRecord]:
        return self

    async def __anext__(self) -> ConsumerRecord:
        deadline = None if self.consumer_timeout is None else time.monotonic() + self.consumer_timeout
        while not self._iter_buffer:
            wait = 1.0 if deadline is None else max(0.0, deadline - time.monotonic())
            self._iter_buffer.extend(await self.poll(wait * 1000))
            if not self._iter_buffer and deadline is not None and time.monotonic() >= deadline:
                raise StopAsyncIteration
        return self._iter_buffer.popleft()

    async def __aenter__(self) -> AsyncConsumer:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def _closing_budget(self, default: float | None) -> float | None:
        """``default`` seconds, or while closing what is left of close()'s deadline."""
        if self._close_deadline is None:
            return default
        return max(0.0, self._close_deadline - time.monotonic())

    async def _finish_within_close(self, task: asyncio.Task[Any] | None) -> None:
        if task is None:
            return
        await asyncio.wait({task}, timeout=self._closing_budget(None))
        # Past the deadline only waits on the coordinator are cut off: an unsubscribe's leave
        # in the middle of the application's on_revoke (an AsyncConsumer's) finishes it first.
        while not task.done() and self.callbacks_running:
            await asyncio.wait({task}, timeout=_CALLBACK_CHECK_S)
        if not task.done():
            task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    async def close(self, timeout: float | None = None) -> None:
        """Close; a group member commits (under auto-commit), runs on_revoke and leaves its
        group at once, so its partitions move on without waiting for the session timeout.

        ``timeout`` seconds (default request_timeout_ms) is ONE deadline for the final commit
        and the leave heartbeat together, as Kafka's close(Duration): an unreachable
        coordinator costs at most that (the session timeout then removes the member). The
        rebalance callbacks are the application's and are not cut short. With no time left
        (``timeout`` 0) the leave heartbeat is still sent, but its answer is not waited for.
        A negative ``timeout`` is a ValueError, as in Kafka's close(Duration).

        RuntimeError when awaited inside on_assign/on_revoke: close waits for the callback to
        return, so it would wait for itself."""
        if timeout is not None and timeout < 0:
            raise ValueError(f"close timeout must be >= 0, not {timeout}")
        self._refuse_inside_callback("close()")
        if self._closed:
            return
        budget = self.request_timeout if timeout is None else timeout
        self._close_deadline = time.monotonic() + budget
        try:
            if self._membership is not None:
                await self._membership.leave(budget)
            elif self._coordinator is not None and self.enable_auto_commit and self._assignment:
                try:
                    await self._commit(
                        {tp: p for tp, p in self._positions().items() if self._committed.get(tp) != p},
                        self._closing_budget(budget) or 0.0,
                    )
                except TidelogError as exc:
                    log.warning("group %s: commit on close failed: %s", self.group_id, exc)
            await self._finish_within_close(self._leaving)
            await self._finish_within_close(self._auto_commit_task)
        finally:
            with self._delivery_lock:  # a drain_ready under way ends first (see there)
                self._closed = True
        tasks = list(self._fetches.values())
        if self._reset_task is not None:
            tasks.append(self._reset_task)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.connections.close()


class Consumer:
    """Consume records from tidelog in ordinary (threaded) code; see `AsyncConsumer`."""

    def __init__(self, bootstrap: str | Sequence[str] | None = None, **options: Any) -> None:
        self._thread = LoopThread("tidelog-consumer")
        try:
            self._core: AsyncConsumer = self._thread.run(self._create(bootstrap, options))
        except BaseException:
            self._thread.stop()
            raise
        self._closed = False
        self._iter_buffer: deque[ConsumerRecord] = deque()
        # Callbacks the loop asks this (the application's) thread to run, as
        # (callback, partitions, loop future) items, and markers of finished calls.
        self._app_calls: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._deferred: deque[tuple[Any, frozenset[TopicPartition], asyncio.Future[None]]] = deque()
        # The thread running a rebalance callback now: close() or unsubscribe() from there would
        # wait for the callback to return, that is for ever.
        self._callback_thread: int | None = None
        self._call(lambda: setattr(self._core, "callback_runner", self._run_on_app_thread))

    @staticmethod
    async def _create(bootstrap: Any, options: dict[str, Any]) -> AsyncConsumer:
        return AsyncConsumer(bootstrap, **options)

    def _call(self, fn: Callable[[], Any]) -> Any:
        async def run() -> Any:
            return fn()

        return self._thread.run(run())

    def _refuse_on_loop_thread(self, coro: Any = None) -> None:
        # LoopThread.run refuses this too; poll, close and _serve need it before they change
        # anything or submit (a ready poll from a deserializer would re-enter the drain that
        # called it, a refused close would leave the consumer half closed).
        if self._thread.in_loop_thread():
            if coro is not None:
                coro.close()
            raise RuntimeError(
                "a blocking tidelog Consumer call was made on the clients' shared I/O thread "
                "(inside a key/value deserializer or a delivery callback); call it after poll() returns"
            )

    # on_assign/on_revoke run on the application's thread, inside poll() or close(), as in
    # Kafka's consumer: so they may call anything but close() and unsubscribe() (which wait for
    # them), commit() included, and a revocation (its
    # commit, on_revoke, and the news to the coordinator) waits until the application is back
    # in poll, having handled what earlier polls returned. Heartbeats go on meanwhile; the
    # rebalance timeout (max_poll_interval_ms) bounds the wait.

    async def _run_on_app_thread(
        self, callback: Callable[[set[TopicPartition]], Any] | None, partitions: frozenset[TopicPartition]
    ) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        core = self._core
        core.pending_callbacks += 1
        try:
            self._app_calls.put((callback, partitions, future))
            if core._pulse is not None:
                core._pulse.fire()  # a waiting poll returns, so this thread gets to the callback
            await future
        finally:
            core.pending_callbacks -= 1

    def _run_app_call(self, item: tuple[Any, frozenset[TopicPartition], asyncio.Future[None]]) -> None:
        callback, partitions, future = item
        if future.done():
            return  # given up (the consumer is closing)
        if callback is not None:
            outer, self._callback_thread = self._callback_thread, threading.get_ident()
            try:
                callback(set(partitions))
            except Exception:  # noqa: BLE001 - user code; reported, never fatal to the membership
                log.exception("a rebalance callback raised")
            finally:
                self._callback_thread = outer

        def settle() -> None:
            if not future.done():
                future.set_result(None)

        self._thread.loop.call_soon_threadsafe(settle)

    def _run_deferred(self) -> None:
        while self._deferred:
            self._run_app_call(self._deferred.popleft())

    def _refuse_inside_callback(self, what: str) -> None:
        if self._callback_thread == threading.get_ident():
            raise RuntimeError(
                f"Consumer.{what} cannot be called inside a rebalance callback (on_assign/on_revoke): "
                f"it waits for the callback to return; call it after poll() returns"
            )

    def _serve(self, coro: Any, defer_after: Callable[[Any], bool] = lambda result: False) -> Any:
        """Run ``coro`` on the loop, running meanwhile the callbacks the loop asks of this
        thread. A callback asked for after ``coro`` finished with a result for which
        ``defer_after`` holds (records to hand out) waits for the next call instead."""
        self._refuse_on_loop_thread(coro)
        self._run_deferred()
        finished = object()
        future = self._thread.submit(coro)
        future.add_done_callback(lambda _: self._app_calls.put(finished))
        try:
            while True:
                item = self._app_calls.get()
                if item is finished:
                    return future.result()
                if not isinstance(item, tuple):
                    continue  # an earlier call's marker
                if future.done() and not future.cancelled() and future.exception() is None \
                        and defer_after(future.result()):
                    self._deferred.append(item)
                else:
                    self._run_app_call(item)
        except KeyboardInterrupt:
            future.cancel()
            raise

    def __enter__(self) -> Consumer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def assign(self, partitions: Iterable[TopicPartition]) -> None:
        partitions = list(partitions)
        self._call(lambda: self._core.assign(partitions))

    def subscribe(
        self,
        topics: Iterable[str] = (),
        on_assign: Callable[[set[TopicPartition]], Any] | None = None,
        on_revoke: Callable[[set[TopicPartition]], Any] | None = None,
        *,
        pattern: str | re.Pattern[str] | None = None,
    ) -> None:
        """See `AsyncConsumer.subscribe` (``pattern``: a regex subscription). The callbacks run
        on this thread inside `poll` (or `close`), as in Kafka's consumer, and may call any
        method, `commit` included, but `close` and `unsubscribe`, which wait for them to return
        (RuntimeError)."""
        topics = [topics] if isinstance(topics, str) else list(topics)
        self._call(lambda: self._core.subscribe(topics, on_assign, on_revoke, pattern=pattern))

    def commit(self, offsets: Mapping[TopicPartition, int] | None = None, timeout: float | None = None) -> None:
        """Commit ``offsets`` (default: every assigned partition's position) and wait."""
        offsets = None if offsets is None else dict(offsets)
        self._thread.run(self._core.commit(offsets, timeout))

    def commit_async(
        self,
        offsets: Mapping[TopicPartition, int] | None = None,
        callback: Callable[[dict[TopicPartition, int], BaseException | None], Any] | None = None,
    ) -> concurrent.futures.Future[None]:
        """Start a commit and return at once; the future (and ``callback(offsets, error)``,
        run on the I/O thread) tells how it went."""
        offsets = None if offsets is None else dict(offsets)
        result: concurrent.futures.Future[None] = concurrent.futures.Future()

        def start() -> None:
            try:
                task = self._core.commit_async(offsets, callback)
            except BaseException as exc:  # reported through the future
                result.set_exception(exc)
                return

            def settle(finished: asyncio.Future[None]) -> None:
                if finished.cancelled():
                    result.cancel()
                elif finished.exception() is not None:
                    result.set_exception(finished.exception())  # type: ignore[arg-type]
                else:
                    result.set_result(None)

            task.add_done_callback(settle)

        self._thread.call_soon(start)
        return result

    def committed(
        self, partitions: Iterable[TopicPartition], timeout: float | None = None
    ) -> dict[TopicPartition, int | None]:
        return self._thread.run(self._core.committed(list(partitions), timeout))

    def group_member(self) -> tuple[str, int] | None:
        return self._call(self._core.group_member)

    def unsubscribe(self) -> None:
        """Leave the group (committing under auto-commit, on_revoke on this thread) and return
        once it is left, as Kafka's consumer does. RuntimeError inside on_assign/on_revoke:
        leaving waits for the callback to return."""
        self._refuse_inside_callback("unsubscribe()")
        self._serve(self._core.unsubscribe_and_wait())

    def assignment(self) -> set[TopicPartition]:
        return self._call(self._core.assignment)

    def subscription(self) -> set[str]:
        return self._call(self._core.subscription)

    def poll(self, timeout_ms: float = 0, max_records: int | None = None) -> list[ConsumerRecord]:
        self._refuse_on_loop_thread()
        if not self._deferred:  # a rebalance callback owed to the application runs first
            ready = self._core.drain_ready(max_records)
            if ready is not None:
                records, chores = ready
                if chores:
                    self._thread.call_soon(self._core.do_chores)
                return records
        deadline = time.monotonic() + timeout_ms / 1000.0
        while True:
            records: list[ConsumerRecord] = self._serve(
                self._core.poll(max(0.0, deadline - time.monotonic()) * 1000, max_records), bool
            )
            if records or time.monotonic() >= deadline:
                return records
            # The core returned early for a rebalance callback, now run: poll on.

    def __iter__(self) -> Iterator[ConsumerRecord]:
        return self

    def __next__(self) -> ConsumerRecord:
        # Records are buffered on this side: one trip to the loop per poll, not per record.
        timeout = self._core.consumer_timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        # A revocation waits for the next poll, which comes only once this buffer is empty:
        # every record handed out here belongs to a partition still owned.
        while not self._iter_buffer:
            wait = 1.0 if deadline is None else max(0.0, deadline - time.monotonic())
            self._iter_buffer.extend(self.poll(wait * 1000))
            if not self._iter_buffer and deadline is not None and time.monotonic() >= deadline:
                raise StopIteration
        return self._iter_buffer.popleft()

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self._call(lambda: self._core.seek(tp, offset))
        self._drop_local([tp])

    def seek_to_beginning(self, *partitions: TopicPartition) -> None:
        self._thread.run(self._core.seek_to_beginning(*partitions))
        self._drop_local(partitions)

    def seek_to_end(self, *partitions: TopicPartition) -> None:
        self._thread.run(self._core.seek_to_end(*partitions))
        self._drop_local(partitions)

    def _drop_local(self, partitions: Sequence[TopicPartition]) -> None:
        if not partitions:
            self._iter_buffer.clear()
        elif self._iter_buffer:
            dropped = set(partitions)
            self._iter_buffer = deque(r for r in self._iter_buffer if r.topic_partition not in dropped)

    def position(self, tp: TopicPartition, timeout: float | None = None) -> int:
        return self._thread.run(self._core.position(tp, timeout))

    def beginning_offsets(
        self, partitions: Iterable[TopicPartition], timeout: float | None = None
    ) -> dict[TopicPartition, int]:
        return self._thread.run(self._core.beginning_offsets(list(partitions), timeout))

    def end_offsets(
        self, partitions: Iterable[TopicPartition], timeout: float | None = None
    ) -> dict[TopicPartition, int]:
        return self._thread.run(self._core.end_offsets(list(partitions), timeout))

    def offsets_for_times(
        self, timestamps: Mapping[TopicPartition, int], timeout: float | None = None
    ) -> dict[TopicPartition, OffsetAndTimestamp | None]:
        return self._thread.run(self._core.offsets_for_times(dict(timestamps), timeout))

    def pause(self, *partitions: TopicPartition) -> None:
        self._call(lambda: self._core.pause(*partitions))

    def resume(self, *partitions: TopicPartition) -> None:
        self._call(lambda: self._core.resume(*partitions))

    def paused(self) -> set[TopicPartition]:
        return self._call(self._core.paused)

    def highwater(self, tp: TopicPartition) -> int | None:
        return self._call(lambda: self._core.highwater(tp))

    def partitions_for_topic(self, topic: str, timeout: float | None = None) -> set[int]:
        return self._thread.run(self._core.partitions_for_topic(topic, timeout))

    def topics(self) -> set[str]:
        return self._thread.run(self._core.topics())

    def close(self, timeout: float | None = None) -> None:
        """See `AsyncConsumer.close`: ``timeout`` seconds bound the final commit and the leave
        together; on_revoke runs on this thread meanwhile. With ``timeout`` 0 the leave is sent
        without waiting for its answer; a negative one is a ValueError.

        RuntimeError inside on_assign/on_revoke: they run inside poll (or close) on this thread,
        and close would wait for the callback to return, that is for ever. Close after poll
        returns instead."""
        if timeout is not None and timeout < 0:
            raise ValueError(f"close timeout must be >= 0, not {timeout}")
        self._refuse_inside_callback("close()")
        if self._closed:
            return
        self._refuse_on_loop_thread()  # before anything is closed: a refused close changes nothing
        self._closed = True
        try:
            self._serve(self._core.close(timeout))
        finally:
            self._thread.stop(self._core.connections.close)
