"""Hosting group coordinators: one `GroupCoordinator` per `__consumer_offsets` partition led here.

`GroupCoordinator` (node/group_coordinator.py) is sans-IO; this module gives it the log, the
clock and the leadership it lacks (DESIGN.md §7):

* **Placement.** Group G lives in partition `coordinator_partition(G, N)` of
  `__consumer_offsets` (Kafka's `abs(G.hashCode()) % N`); its coordinator is that partition's
  leader. A call for a partition this node does not lead is NOT_COORDINATOR.
* **Loading.** When this node becomes leader of a partition (in a new Raft epoch), a fresh
  coordinator replays the partition's local log from its start to its end — everything there
  will commit, because a Raft leader never truncates its own log — and then `on_loaded(now)`.
  Meanwhile calls get COORDINATOR_LOAD_IN_PROGRESS.
* **Apply on append, answer after commit.** A write call applies its records to the coordinator
  at once and stages them (no `await` between the call and the staging, so records reach the
  log in call order); the answer waits until the high watermark passes the batch that holds
  them. A call without records (and every read) waits until everything applied before it is
  committed.
* **Group commit.** While a batch this coordinator appended is not yet committed, or was
  appended less than `append_linger_ms` ago, the records of later calls wait in one staged
  batch, appended as ONE record batch when both have passed (or when it reaches
  `STAGED_BATCH_BYTES`). An isolated call is appended at once; under load one batch carries
  every call of a replication round or linger, so the Raft append, the fsyncs and the replica
  fetches are paid per batch instead of per call — they were most of a commit's CPU (issue
  #6's bench). Answers still wait for the commit of
  their own records: acks=all durability is unchanged.
* **Failure.** If an append fails or the partition's leadership (or its epoch) changes, the
  coordinator is dropped: its state may hold records that will never commit. Calls waiting on
  it get NOT_COORDINATOR and clients find the coordinator again; if this node still (or again)
  leads the partition, a new coordinator is loaded from the log. A call's records too large
  for one batch (max.message.bytes) never cost a reload: the caller says how they may go
  (`Batching`): checked before the call (commits), taken back and refused (heartbeats), or
  split over several batches (DeleteGroup).
* **Timers.** The coordinator's `next_deadline()` arms one loop timer per hosted partition;
  `tick(now)` removes expired members and its records are appended like a write's. Every
  `offsets_retention_check_interval_ms` each loaded coordinator's `expire_offsets(now)` runs the
  same way (KIP-211 offset retention); replayed records carry their timestamps, which date a
  group's emptiness.

The host reads leadership from `OffsetsPartition` objects (the node's `Partition`, or a fake in
tests) and is told to `refresh()` when leaderships change; it also re-checks periodically.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from tidelog.node.group_coordinator import (
    CoordinatorNotLoadedError,
    GroupCoordinator,
    GroupCoordinatorConfig,
    GroupListing,
    Result,
)
from tidelog.node.group_records import (
    ConsumerGroupMetadataKey,
    CorruptGroupRecordError,
    GroupRecord,
    coordinator_partition,
)
from tidelog.node.storage import RecordTooLargeError
from tidelog.proto import records as codec
from tidelog.proto.common_pb2 import ErrorCode

log = logging.getLogger(__name__)

T = TypeVar("T")

# Bytes read from the log per step of a replay; the loop runs other work between steps.
REPLAY_CHUNK_BYTES = 1 << 20
# Kafka's offsets.commit.timeout.ms: how long an answer waits for its records to commit.
DEFAULT_COMMIT_TIMEOUT_MS = 5000
# A staged batch is appended at once when it reaches this size (even with a batch in flight),
# well under __consumer_offsets' max.message.bytes (1 MiB by default): a call's records are
# checked against that limit alone (group_service.py), so the sum of many must stay below it.
STAGED_BATCH_BYTES = 64 << 10
# A batch is appended at most this often per partition (Kafka's coordinator has the same knob,
# group.coordinator.append.linger.ms, 10 ms by default in 3.x/4.0): under load each batch then
# carries several ms of calls, so the per-batch Raft round (fsyncs, the followers' fetches) is
# paid ~125 times a second at most. An isolated call is appended at once; a call under load
# waits at most this long more. Issue #6's bench on 2 cores (3 nodes, RF 3), linger 0 / 5 / 8 /
# 10 ms: CPU per commit (all processes, closed loop) ~1,000-1,140 / 1,000-1,260 / 570-730 /
# 720 us, and the followers' share ~125-160 / 100-150 / 36-56 / 49 us each; open loop at
# 1,000/s p50 ~10-15 ms at every value (8 ms: 8.9-10.9 ms), so 8.
DEFAULT_APPEND_LINGER_MS = 8.0
# uvloop's loop.time() is the loop's cached clock in whole milliseconds and its timers round a
# delay to whole milliseconds. A linger found to have a sliver left (float rounding leaves
# ~1e-12 s of "appended_at + linger - now") or under 1 ms was waited for with a timer that
# fires on the next loop turn with the clock unchanged: the watcher spun through ~13 empty
# turns per appended batch until the clock ticked (issue #6's bench at 1,000 commits/s:
# 29,690 sub-ms waits for 2,210 batches). Less than this left is taken as over.
LINGER_RESOLUTION_S = 0.001
# Offsets of waiters whose records are staged, not yet appended: above every real offset, so
# the high watermark never releases them before their batch is appended and committed.
STAGED = 1 << 62
# Bytes a record adds to a batch beyond its key and value (varint lengths, deltas, headers).
_RECORD_OVERHEAD = 24
# Leadership is re-checked this often even without a notification (a missed one must not leave
# a partition without its coordinator).
REFRESH_INTERVAL_S = 0.5
# A load that failed (an undecodable log, a coordinator bug) is retried after this long.
RELOAD_BACKOFF_S = 2.0
# Offset expiry and DeleteGroup (records that need not commit together) append their
# tombstones in batches of about this many bytes, well below any sane max.message.bytes of
# __consumer_offsets (Kafka's default is 1 MiB).
EXPIRY_BATCH_BYTES = 64 * 1024
EXPIRY_RECORD_OVERHEAD = 32  # a record's framing beyond its key and value, at most
# Group ids whose partition is remembered; past this many the memory is dropped and rebuilt
# (a bound, not an LRU: the ids a node sees repeat, and rebuilding costs one hash per id).
PLACEMENT_CACHE_SIZE = 100_000


class Batching(enum.Enum):
    """How a write call's records reach the log, for calls whose records may not fit one batch
    of `__consumer_offsets` (max.message.bytes). None of them reloads the coordinator."""

    # One batch; the caller bounded the records' size before the call (a commit answers
    # INVALID_COMMIT_OFFSET_SIZE up front).
    CHECKED = "checked"
    # One batch, as the records must commit together (a heartbeat's member, epoch and
    # assignment records); one the log refuses as too large takes the call back and answers
    # INVALID_REQUEST. Costs a look at each written key's old value during the call.
    ATOMIC = "atomic"
    # As many batches as it takes, in order (a DeleteGroup's tombstones: a failover half-way
    # leaves part of the group, and the retried delete removes the rest).
    SPLIT = "split"


class CoordinatorUnavailable(Exception):
    """The call cannot be served here (now); `code` is the retriable ErrorCode to answer."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class LogReader(Protocol):
    def read(self, offset: int, max_bytes: int) -> bytes: ...


class AppendedBatch(Protocol):
    @property
    def last_offset(self) -> int: ...


class OffsetsPartition(Protocol):
    """What the host needs of a `__consumer_offsets` replica (tidelog.node.partitions.Partition)."""

    log: Any  # LogReader

    @property
    def is_leader(self) -> bool: ...

    @property
    def leader_epoch(self) -> int: ...

    @property
    def high_watermark(self) -> int: ...

    @property
    def end_offset(self) -> int: ...

    @property
    def log_start_offset(self) -> int: ...

    @property
    def closed(self) -> bool: ...

    def append(self, batches: bytes) -> Any: ...  # an AppendedBatch; raises if not leader

    def wait_change(self) -> asyncio.Future[None]: ...


@dataclass(frozen=True, slots=True)
class HostedPartitionState:
    """One hosted partition as `describe()` shows it (tests and debugging)."""

    partition: int
    epoch: int
    loaded: bool
    last_appended: int


class _Hosted:
    """A partition this node leads, and the coordinator built for its current epoch."""

    __slots__ = (
        "coordinator",
        "dropped",
        "epoch",
        "appended_at",
        "in_flight",
        "index",
        "last_appended",
        "load_task",
        "partition",
        "staged",
        "staged_bytes",
        "staged_calls",
        "timer",
        "timer_at",
        "waiters",
        "watcher",
    )

    def __init__(self, index: int, partition: OffsetsPartition, epoch: int) -> None:
        self.index = index
        self.partition = partition
        self.epoch = epoch
        self.coordinator: GroupCoordinator | None = None  # None while loading
        # The last offset appended on behalf of this coordinator (or replayed into it): every
        # answer waits until the high watermark has passed it.
        self.last_appended = -1
        # Records applied but not yet appended (group commit), the bytes they take and how
        # many calls (or ticks) staged them; their waiters sit at the tail of `waiters` with
        # offset STAGED until the batch is appended.
        self.staged: list[GroupRecord] = []
        self.staged_bytes = 0
        self.staged_calls = 0
        # The last offset of the last batch this coordinator appended: while the high
        # watermark has not passed it, new records are staged.
        self.in_flight = -1
        self.appended_at = 0.0
        self.dropped = False
        self.load_task: asyncio.Task[None] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.timer_at: int | None = None
        # Answers waiting for the high watermark: (last offset, future, loop-time deadline), in
        # append order, so both offsets and deadlines never decrease along the deque.
        self.waiters: deque[tuple[int, asyncio.Future[None], float]] = deque()
        self.watcher: asyncio.Task[None] | None = None

    def barrier(self) -> int:
        """The offset a call must see committed: everything applied before it."""
        return STAGED if self.staged else self.last_appended

    def fail_waiters(self, error: CoordinatorUnavailable) -> None:
        self.staged.clear()
        self.staged_bytes = self.staged_calls = 0
        while self.waiters:
            _, future, _ = self.waiters.popleft()
            if not future.done():
                future.set_exception(error)

    def current(self) -> bool:
        """Still the coordinator of a partition this node leads in the epoch it loaded?"""
        p = self.partition
        return not self.dropped and not p.closed and p.is_leader and p.leader_epoch == self.epoch


def wall_ms() -> int:
    # Commit timestamps go into the log, so the coordinator's clock is the wall clock.
    return int(time.time() * 1000)


def _records_bytes(records: tuple[GroupRecord, ...] | list[GroupRecord]) -> int:
    """About the bytes ``records`` take in a batch (at least their share of it)."""
    return sum(len(r.key) + len(r.value or b"") + _RECORD_OVERHEAD for r in records)


def encode_group_batch(records: tuple[GroupRecord, ...], timestamp_ms: int) -> bytes:
    """The records of one coordinator call as one RecordBatch v2 (uncompressed: a commit is a
    few dozen bytes, and lz4's frame overhead would not pay for itself)."""
    return codec.encode_batch([codec.Record(offset=i, timestamp=timestamp_ms, key=r.key, value=r.value)
                               for i, r in enumerate(records)])


class GroupHost:
    """The coordinators of the `__consumer_offsets` partitions this node leads."""

    def __init__(
        self,
        partitions: Callable[[], Mapping[int, OffsetsPartition]],
        num_partitions: Callable[[], int | None],
        config: GroupCoordinatorConfig,
        *,
        now_ms: Callable[[], int] = wall_ms,
        commit_timeout_ms: int = DEFAULT_COMMIT_TIMEOUT_MS,
        append_linger_ms: float = DEFAULT_APPEND_LINGER_MS,
    ) -> None:
        """`partitions()`: this node's local replicas of `__consumer_offsets` by partition
        index; `num_partitions()`: the topic's partition count in the metadata image (None
        while the topic does not exist)."""
        self._partitions = partitions
        self._num_partitions = num_partitions
        self.config = config
        self._now_ms = now_ms
        self._commit_timeout_s = commit_timeout_ms / 1000
        self._linger_s = append_linger_ms / 1000
        self._hosted: dict[int, _Hosted] = {}
        # group id -> partition for `_placement_count` partitions: Java's string hash in Python
        # costs a few us per call, every call routes, and a node sees the same groups again.
        self._placement: dict[str, int] = {}
        self._placement_count = 0
        self._refresh_scheduled = False
        self._closed = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._refresher: asyncio.Task[None] | None = None
        self._expirer: asyncio.Task[None] | None = None

    # --- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        self._refresher = asyncio.get_running_loop().create_task(self._refresh_periodically())
        self._expirer = asyncio.get_running_loop().create_task(self._expire_periodically())

    async def close(self) -> None:
        self._closed = True
        for task in (self._refresher, self._expirer):
            if task is not None:
                task.cancel()
        for hosted in list(self._hosted.values()):
            self._drop(hosted, "node shutting down")
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _refresh_periodically(self) -> None:
        while not self._closed:
            await asyncio.sleep(REFRESH_INTERVAL_S)
            try:
                self.refresh()
            except Exception:
                log.exception("group coordinator refresh failed")

    def leaders_changed(self) -> None:
        """Some partition's leadership changed: refresh once, soon (coalesces mass elections)."""
        if self._refresh_scheduled or self._closed:
            return
        self._refresh_scheduled = True
        asyncio.get_running_loop().call_soon(self._scheduled_refresh)

    def _scheduled_refresh(self) -> None:
        self._refresh_scheduled = False
        try:
            self.refresh()
        except Exception:
            log.exception("group coordinator refresh failed")

    def refresh(self) -> None:
        """Drop coordinators whose leadership is gone; start loading where this node now leads."""
        if self._closed:
            return
        local = self._partitions()
        for index, hosted in list(self._hosted.items()):
            if local.get(index) is not hosted.partition or not hosted.current():
                self._drop(hosted, "leadership changed")
        for index, partition in local.items():
            if index in self._hosted or partition.closed or not partition.is_leader:
                continue
            hosted = _Hosted(index, partition, partition.leader_epoch)
            self._hosted[index] = hosted
            self._start_load(hosted)

    def _drop(self, hosted: _Hosted, why: str) -> None:
        if hosted.dropped:
            return
        hosted.dropped = True
        if self._hosted.get(hosted.index) is hosted:
            del self._hosted[hosted.index]
        if hosted.timer is not None:
            hosted.timer.cancel()
            hosted.timer = None
        if hosted.load_task is not None and not hosted.load_task.done():
            hosted.load_task.cancel()
        hosted.fail_waiters(CoordinatorUnavailable(
            ErrorCode.NOT_COORDINATOR,
            f"this node stopped coordinating __consumer_offsets-{hosted.index} before the answer committed ({why})"))
        log.info("group coordinator for __consumer_offsets-%d (epoch %d) dropped: %s", hosted.index,
                 hosted.epoch, why)

    def _reload(self, hosted: _Hosted, why: str) -> None:
        """Throw the coordinator away and replay the log again (same leadership): its state may
        hold records that were applied but never appended."""
        self._drop(hosted, why)
        self.refresh()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- loading ----------------------------------------------------------------------------

    def _start_load(self, hosted: _Hosted) -> None:
        hosted.load_task = asyncio.get_running_loop().create_task(self._load(hosted))
        self._tasks.add(hosted.load_task)
        hosted.load_task.add_done_callback(self._tasks.discard)

    async def _load(self, hosted: _Hosted) -> None:
        started = time.monotonic()
        coordinator = GroupCoordinator(self.config)
        partition = hosted.partition
        try:
            offset = partition.log_start_offset
            records = skipped = 0
            while offset < partition.end_offset:
                if not hosted.current():
                    return
                data = partition.log.read(offset, REPLAY_CHUNK_BYTES)
                if not data:
                    break
                for batch in codec.decode_batches(data):
                    if batch.next_offset <= offset:
                        continue
                    if not batch.is_control:
                        for record in batch.records():
                            if record.key is None:
                                skipped += 1
                                continue
                            try:
                                coordinator.replay(record.key, record.value, record.timestamp)
                                records += 1
                            except CorruptGroupRecordError as exc:
                                # Not ours (nothing else writes here); skipping keeps every
                                # other group of the partition available.
                                skipped += 1
                                log.error("__consumer_offsets-%d: undecodable record at offset %d skipped: %s",
                                          hosted.index, record.offset, exc)
                    offset = batch.next_offset
                # Let requests (answered LOAD_IN_PROGRESS) and replication run between chunks.
                await asyncio.sleep(0)
            if not hosted.current():
                return
            hosted.last_appended = partition.end_offset - 1
            coordinator.on_loaded(self._now_ms())
            hosted.coordinator = coordinator
            log.info("group coordinator for __consumer_offsets-%d loaded in epoch %d: %d records, %d groups, "
                     "%d skipped, %.0f ms", hosted.index, hosted.epoch, records, len(coordinator.group_ids()),
                     skipped + coordinator.skipped_records, (time.monotonic() - started) * 1000)
            self._schedule_timer(hosted)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("loading __consumer_offsets-%d failed; retrying in %.0f s", hosted.index,
                          RELOAD_BACKOFF_S)
            await asyncio.sleep(RELOAD_BACKOFF_S)
            if hosted.current():
                self._reload(hosted, "load failed")

    # --- routing ----------------------------------------------------------------------------

    def partition_for(self, group_id: str) -> int:
        """The `__consumer_offsets` partition of ``group_id``; COORDINATOR_NOT_AVAILABLE while
        the topic does not exist."""
        count = self._num_partitions()
        if not count:
            raise CoordinatorUnavailable(ErrorCode.COORDINATOR_NOT_AVAILABLE,
                                         "__consumer_offsets does not exist yet; find the coordinator again")
        if count != self._placement_count or len(self._placement) >= PLACEMENT_CACHE_SIZE:
            self._placement.clear()
            self._placement_count = count
        index = self._placement.get(group_id)
        if index is None:
            index = self._placement[group_id] = coordinator_partition(group_id, count)
        return index

    def _route(self, group_id: str) -> tuple[_Hosted, GroupCoordinator]:
        index = self.partition_for(group_id)
        hosted = self._hosted.get(index)
        if hosted is None or not hosted.current():
            if hosted is not None:
                self._drop(hosted, "leadership changed")
                self.leaders_changed()
            raise CoordinatorUnavailable(
                ErrorCode.NOT_COORDINATOR,
                f"this node does not lead __consumer_offsets-{index}, which holds group {group_id!r}")
        if hosted.coordinator is None:
            raise CoordinatorUnavailable(ErrorCode.COORDINATOR_LOAD_IN_PROGRESS,
                                         f"__consumer_offsets-{index} is still being loaded")
        return hosted, hosted.coordinator

    # --- calls ------------------------------------------------------------------------------

    async def write(self, group_id: str, call: Callable[[GroupCoordinator, int], Result[T]],
                    batching: Batching = Batching.CHECKED) -> T:
        """Run a write call on the group's coordinator; its answer once its records commit."""
        hosted, coordinator = self._route(group_id)
        now = self._now_ms()
        atomic = batching is Batching.ATOMIC
        if atomic:
            coordinator.start_undo_log()
        try:
            result = call(coordinator, now)
        except CoordinatorNotLoadedError as exc:
            raise CoordinatorUnavailable(ErrorCode.COORDINATOR_LOAD_IN_PROGRESS, str(exc)) from None
        except Exception as exc:
            # A coordinator bug (bad input is checked before the call): its state may be half
            # changed, so rebuild it from the log rather than serve from it.
            log.exception("group coordinator call for %r failed", group_id)
            self._reload(hosted, f"call failed: {exc!r}")
            raise CoordinatorUnavailable(ErrorCode.UNKNOWN_SERVER_ERROR, f"coordinator error: {exc!r}") from None
        finally:
            undo_log = coordinator.stop_undo_log() if atomic else None
        if batching is Batching.SPLIT:
            self._stage_in_chunks(hosted, result.records)
        elif undo_log is not None and _records_bytes(result.records) > self._batch_bytes(hosted):
            # Only a batch this large can exceed max.message.bytes: it goes alone and at once,
            # so a refusal can still be undone (no other call has run on top of it).
            self._append_alone(hosted, result.records, functools.partial(coordinator.undo, undo_log))
        elif result.records:
            self._stage(hosted, result.records)
        self._schedule_timer(hosted)
        await self._wait_committed(hosted, hosted.barrier())
        return result.response

    async def read(self, group_id: str, call: Callable[[GroupCoordinator], T]) -> T:
        """Run a read call; answered once everything appended before it is committed."""
        hosted, coordinator = self._route(group_id)
        try:
            response = call(coordinator)
        except Exception as exc:
            log.exception("group coordinator read for %r failed", group_id)
            raise CoordinatorUnavailable(ErrorCode.UNKNOWN_SERVER_ERROR, f"coordinator error: {exc!r}") from None
        await self._wait_committed(hosted, hosted.barrier())
        return response

    async def list_groups(self) -> tuple[list[GroupListing], bool]:
        """Every group of every loaded coordinator here, and whether some partition this node
        leads is still loading (Kafka then answers COORDINATOR_LOAD_IN_PROGRESS)."""
        listings: list[GroupListing] = []
        waits = []
        loading = False
        for hosted in list(self._hosted.values()):
            if not hosted.current():
                continue
            if hosted.coordinator is None:
                loading = True
                continue
            listings.extend(hosted.coordinator.list_groups())
            waits.append(self._wait_committed(hosted, hosted.barrier()))
        results = await asyncio.gather(*waits, return_exceptions=True)
        if any(isinstance(r, CoordinatorUnavailable) for r in results):
            loading = True
        for r in results:
            if isinstance(r, BaseException) and not isinstance(r, CoordinatorUnavailable):
                raise r
        return sorted(listings, key=lambda g: g.group_id), loading

    def _stage(self, hosted: _Hosted, records: tuple[GroupRecord, ...]) -> None:
        """Add one call's records to the staged batch, before any other call can run; append
        the batch now unless one this coordinator appended is still uncommitted or was
        appended less than the append linger ago."""
        size = _records_bytes(records)
        bound = self._batch_bytes(hosted)
        if hosted.staged and hosted.staged_bytes + size > bound:
            self._append_staged(hosted)  # full: it goes now, in flight or not
        hosted.staged.extend(records)
        hosted.staged_bytes += size
        hosted.staged_calls += 1
        if (hosted.partition.high_watermark > hosted.in_flight
                and not self._linger_left(hosted, asyncio.get_running_loop().time())) \
                or hosted.staged_bytes >= bound:
            self._append_staged(hosted)
        else:
            self._ensure_watcher(hosted)  # appends it when the batch in flight commits

    def _linger_left(self, hosted: _Hosted, now: float) -> float:
        """Seconds until the staged batch may be appended, 0.0 once it may; less than the
        loop clock's resolution left counts as none (LINGER_RESOLUTION_S says why)."""
        left = hosted.appended_at + self._linger_s - now
        return left if left >= LINGER_RESOLUTION_S else 0.0

    @staticmethod
    def _batch_bytes(hosted: _Hosted) -> int:
        """The record bytes (as `_records_bytes` counts them, which is more than they take)
        one batch may carry: STAGED_BATCH_BYTES, or less where the partition's
        max.message.bytes is smaller (a cluster-wide topic default applies to
        __consumer_offsets too, so it can be)."""
        config = getattr(hosted.partition.log, "config", None)  # a PartitionLog's LogConfig
        limit = getattr(config, "max_message_bytes", None)
        if limit is None:
            return STAGED_BATCH_BYTES
        return max(1, min(STAGED_BATCH_BYTES, limit - codec.BATCH_OVERHEAD))

    def _append_alone(self, hosted: _Hosted, records: tuple[GroupRecord, ...], undo: Callable[[], None]) -> None:
        """Append one call's records now, as a batch of their own (after the staged calls
        before it); a batch the log refuses as too large is undone and answered INVALID_REQUEST
        with the coordinator kept, since then neither the log nor the state holds the call."""
        if hosted.staged:
            self._append_staged(hosted)
        hosted.staged, hosted.staged_bytes, hosted.staged_calls = list(records), _records_bytes(records), 1
        self._append_staged(hosted, undo)

    def _stage_in_chunks(self, hosted: _Hosted, records: tuple[GroupRecord, ...],
                         ends_unit: Callable[[GroupRecord], bool] = lambda record: True) -> None:
        """Stage records that need not commit together in batches of at most about
        EXPIRY_BATCH_BYTES, back to back (no call runs between them): as one batch they may
        exceed max.message.bytes. A batch ends only after a record ``ends_unit`` accepts (the
        records up to it must commit together). A chunk failing to append reloads from what
        the log took."""
        bound = min(EXPIRY_BATCH_BYTES, self._batch_bytes(hosted))
        chunk: list[GroupRecord] = []
        size = cut = cut_size = 0  # the chunk may be cut after its first `cut` records
        for record in records:
            record_size = len(record.key) + len(record.value or b"") + EXPIRY_RECORD_OVERHEAD
            if cut and size + record_size > bound:
                # Staged like a call's records (group commit); a chunk is at most one batch.
                self._stage(hosted, tuple(chunk[:cut]))
                chunk, size = chunk[cut:], size - cut_size
                cut = cut_size = 0
            chunk.append(record)
            size += record_size
            if ends_unit(record):
                cut, cut_size = len(chunk), size
        if chunk:
            self._stage(hosted, tuple(chunk))

    def _append_staged(self, hosted: _Hosted, undo: Callable[[], None] | None = None) -> None:
        """Append the staged records as one batch; their waiters then wait for its offset.
        ``undo`` (the staged records are one call's, applied just now) takes the call back
        if the log refuses the batch as too large."""
        records, calls = hosted.staged, hosted.staged_calls
        hosted.staged = []
        hosted.staged_bytes = hosted.staged_calls = 0
        try:
            appended = hosted.partition.append(encode_group_batch(tuple(records), self._now_ms()))
        except Exception as exc:  # noqa: BLE001 - whatever failed, the applied state must go
            if undo is not None and isinstance(exc, RecordTooLargeError):
                undo()
                raise CoordinatorUnavailable(
                    ErrorCode.INVALID_REQUEST,
                    f"the call's records do not fit one batch of __consumer_offsets ({exc}); nothing was "
                    f"changed") from None
            # Leadership gone (NotLeader, closed) or the batch refused (too large): the records
            # are applied in memory but not in the log, so this coordinator must go.
            code = ErrorCode.NOT_COORDINATOR
            message = f"append to __consumer_offsets-{hosted.index} failed: {exc}"
            if isinstance(exc, RecordTooLargeError):
                message = f"the records exceed __consumer_offsets' max.message.bytes: {exc}"
                # One call's own records are refused for good; several calls' together are
                # not (each fits alone), so those retry on the reloaded coordinator.
                code = ErrorCode.INVALID_REQUEST if calls == 1 else ErrorCode.NOT_COORDINATOR
            error = CoordinatorUnavailable(code, message)
            waiters = hosted.waiters
            while waiters and waiters[-1][0] == STAGED:  # this batch's calls learn why
                _, future, _ = waiters.pop()
                if not future.done():
                    future.set_exception(error)
            self._reload(hosted, message)
            raise error from None
        hosted.last_appended = hosted.in_flight = appended.last_offset
        hosted.appended_at = asyncio.get_running_loop().time()
        waiters = hosted.waiters
        index = len(waiters) - 1
        while index >= 0 and waiters[index][0] == STAGED:
            _, future, deadline = waiters[index]
            waiters[index] = (appended.last_offset, future, deadline)
            index -= 1

    async def _wait_committed(self, hosted: _Hosted, last_offset: int) -> None:
        """Until the high watermark passes ``last_offset`` in the epoch that appended it."""
        if not hosted.current():
            self._lost(hosted)
        if last_offset == STAGED and not hosted.staged:
            # The staged batch was appended since the caller took its barrier (list_groups
            # gathers its waits): it waits for that batch, at or below the last appended.
            last_offset = hosted.last_appended
        if hosted.partition.high_watermark > last_offset:
            return
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        hosted.waiters.append((last_offset, future, loop.time() + self._commit_timeout_s))
        self._ensure_watcher(hosted)
        await future

    def _ensure_watcher(self, hosted: _Hosted) -> None:
        if hosted.watcher is None or hosted.watcher.done():  # done: ended, or cancelled at birth
            hosted.watcher = asyncio.get_running_loop().create_task(self._watch(hosted))
            self._tasks.add(hosted.watcher)
            hosted.watcher.add_done_callback(self._tasks.discard)

    def _lost(self, hosted: _Hosted) -> None:
        """The partition's leadership (or epoch) changed under the coordinator: drop it."""
        if not hosted.dropped:
            self._drop(hosted, "leadership changed")
            self.leaders_changed()
        raise CoordinatorUnavailable(
            ErrorCode.NOT_COORDINATOR,
            f"this node stopped leading __consumer_offsets-{hosted.index} before the answer committed")

    async def _watch(self, hosted: _Hosted) -> None:
        """Answer the waiters as the high watermark passes them (one task per partition, not
        one wake-up per waiting call), append the staged batch when the one in flight commits,
        fail them when leadership goes, time out the old ones."""
        loop = asyncio.get_running_loop()
        partition = hosted.partition
        waiters = hosted.waiters
        try:
            while waiters or hosted.staged:
                if not hosted.current():
                    try:
                        self._lost(hosted)
                    except CoordinatorUnavailable as exc:
                        hosted.fail_waiters(exc)
                    return
                high_watermark = partition.high_watermark
                while waiters and waiters[0][0] < high_watermark:
                    _, future, _ = waiters.popleft()
                    if not future.done():
                        future.set_result(None)
                linger = 0.0
                if hosted.staged and high_watermark > hosted.in_flight:
                    linger = self._linger_left(hosted, loop.time())
                if hosted.staged and high_watermark > hosted.in_flight and linger <= 0:
                    try:
                        self._append_staged(hosted)
                    except CoordinatorUnavailable:
                        return  # reloaded: the waiters were failed with the coordinator
                now = loop.time()
                while waiters and waiters[0][2] <= now:
                    _, future, _ = waiters.popleft()
                    if not future.done():
                        future.set_exception(CoordinatorUnavailable(
                            ErrorCode.REQUEST_TIMED_OUT,
                            f"__consumer_offsets-{hosted.index} did not commit within "
                            f"{self._commit_timeout_s * 1000:.0f} ms; the change may still commit"))
                if not waiters and not hosted.staged:
                    return
                timeout = waiters[0][2] - now if waiters else self._commit_timeout_s
                if linger > 0:
                    timeout = min(timeout, linger)
                await asyncio.wait((partition.wait_change(),), timeout=timeout)
        finally:
            hosted.watcher = None

    # --- timers -----------------------------------------------------------------------------

    def _schedule_timer(self, hosted: _Hosted) -> None:
        coordinator = hosted.coordinator
        if coordinator is None or hosted.dropped:
            return
        deadline = coordinator.next_deadline()
        if deadline is None:
            return
        if hosted.timer is not None and hosted.timer_at is not None and hosted.timer_at <= deadline:
            return  # an earlier timer fires first and re-arms for the rest
        if hosted.timer is not None:
            hosted.timer.cancel()
        hosted.timer_at = deadline
        delay = max(0, deadline - self._now_ms()) / 1000
        hosted.timer = asyncio.get_running_loop().call_later(delay, self._on_timer, hosted)

    def _background_step(self, hosted: _Hosted, what: str,
                         step: Callable[[GroupCoordinator, int], Result[T]]) -> Result[T] | None:
        """Run a step nobody asked for (a timer's, an expiry pass) on a loaded coordinator; None
        when there is none, or when the step failed and the partition is being reloaded."""
        coordinator = hosted.coordinator
        if coordinator is None or not hosted.current():
            return None
        try:
            return step(coordinator, self._now_ms())
        except Exception as exc:
            log.exception("group coordinator %s failed", what)
            self._reload(hosted, f"{what} failed: {exc!r}")
            return None

    def _on_timer(self, hosted: _Hosted) -> None:
        hosted.timer = None
        hosted.timer_at = None
        result = self._background_step(hosted, "tick", GroupCoordinator.tick)
        if result is None:
            return
        for expired in result.response:
            log.info("group %s: member %s removed (%s timeout)", expired.group_id, expired.member_id,
                     expired.reason)
        if result.records:
            try:
                # Each member's removal (its tombstones, then the epoch bump) commits whole, but
                # many members expiring together (a fleet cut off at once) may not fit one
                # batch: refused, the reload restarted every session and failed alike forever.
                self._stage_in_chunks(hosted, result.records,
                                      lambda record: isinstance(record.typed_key, ConsumerGroupMetadataKey))
            except CoordinatorUnavailable:
                return
        self._schedule_timer(hosted)

    # --- offset expiry ----------------------------------------------------------------------

    async def _expire_periodically(self) -> None:
        while not self._closed:
            await asyncio.sleep(self.config.offsets_retention_check_interval_ms / 1000)
            for hosted in list(self._hosted.values()):
                try:
                    self.expire_offsets(hosted)
                except Exception:
                    log.exception("offset expiry of __consumer_offsets-%d failed", hosted.index)

    def expire_offsets(self, hosted: _Hosted) -> None:
        """One KIP-211 pass over a loaded coordinator; its tombstones are appended like a
        write's (nobody waits for them: the next pass finds what did not commit)."""
        result = self._background_step(hosted, "offset expiry", GroupCoordinator.expire_offsets)
        if result is None:
            return
        for expired in result.response:
            log.info("group %s: %d committed offsets expired%s", expired.group_id, len(expired.partitions),
                     "; the empty group is deleted" if expired.group_deleted else "")
        # Several batches: one pass may expire a whole partition's worth (the first after an
        # upgrade), which as one batch exceeds max.message.bytes; the refused batch reloaded the
        # coordinator and the next pass failed alike, forever.
        try:
            self._stage_in_chunks(hosted, result.records)
        except CoordinatorUnavailable:
            pass  # reloaded: the next pass finds what did not commit

    # --- introspection ----------------------------------------------------------------------

    def describe(self) -> list[HostedPartitionState]:
        return [HostedPartitionState(h.index, h.epoch, h.coordinator is not None, h.last_appended)
                for _, h in sorted(self._hosted.items())]
