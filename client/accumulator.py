"""Per-partition record batching for the producer (aiokafka's message_accumulator, in spirit).

Records go into an *open* batch per partition; a batch is *sealed* when the next record would
not fit in ``batch_size``, when ``linger_ms`` has passed since its first record, or on
flush/close. The sender drains sealed batches as *runs*: a partition's queued batches from the
head, as many as fit in one request, sent together as one partition entry.

How many batches of a partition may be in flight depends on ``max_in_flight_batches``:

- None (a producer without idempotence): at most one run per partition, retried whole and first
  in line, so per-partition order survives retries without sequence numbers, while a busy
  partition still moves up to a request's worth of batches per round trip. While the run is in
  flight the open batch keeps filling instead of being sealed on linger, so a slow partition
  gets fewer, larger batches.
- N (the idempotent producer, N <= 5, Kafka's rule): up to N batches per partition in flight,
  in several runs. The broker orders them by sequence number and answers a retry of any of its
  last 5 batches with the original offsets, so pipelining cannot reorder or duplicate. A run that
  comes back with a retriable error returns to the queue in sequence (batch id) order, and the
  partition *resyncs* as Kafka's producer does: nothing more is sent while any of its batches is
  still in flight, then one run at a time until a run succeeds. A batch that was sent keeps its
  run: a retry resends exactly the batches first sent together (or a part of them), never mixed
  with others, because the broker refuses a request that mixes retries with new batches. Runs of
  different producer ids are never in flight together for one partition, so batches renumbered
  under a new id cannot overtake batches still being retried under the old one.

The accumulator is shared between the application's threads (appends) and the client's event
loop (draining, completion), so its state is guarded by one lock; waiting for buffer memory is a
`threading.Condition` for the sync facade, and the async producer is woken through
``on_memory_freed``. It holds no futures logic of its own: a batch carries opaque completion
handles for the producer to resolve.

A record is encoded as it is appended (Kafka's MemoryRecordsBuilder): its bytes go onto its
batch's records section (a list of bytes parts, which the garbage collector does not track),
and only its timestamp and handle are kept beside them, so no tuple of Python objects per
record waits in the queue for the garbage collector to walk. Sealing
leaves compression and the header to the sender; a renumbered retry rewrites only the header.
Memory is counted by each record's size estimate (`estimate_record_size`), never less than the
bytes it takes.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterable, NamedTuple

from tidelog.client.types import TopicPartition
from tidelog.proto.records import BATCH_OVERHEAD, append_record

# Kafka's DefaultRecord.MAX_RECORD_OVERHEAD: length, attributes, timestamp and offset deltas,
# key/value lengths and header count, as varints at their largest.
RECORD_OVERHEAD = 21


def estimate_record_size(
    key: bytes | None, value: bytes | None, headers: Iterable[tuple[str, bytes | None]]
) -> int:
    size = RECORD_OVERHEAD + (len(key) if key else 0) + (len(value) if value else 0)
    for header_key, header_value in headers:
        size += 10 + len(header_key) + (len(header_value) if header_value else 0)
    return size


@dataclass(slots=True, eq=False)
class ProducerBatch:
    tp: TopicPartition
    batch_id: int
    created: float  # monotonic seconds
    deadline: float  # delivery timeout, monotonic seconds
    # The records section, encoded as records arrive (`append_record`), in parts; None once
    # the sender has made ``encoded`` from it.
    parts: list[bytes] | None = field(default_factory=list)
    # Each record's timestamp (the first is the batch's base): for the header and for the
    # RecordMetadata of each record. Plain ints, which the garbage collector does not track.
    timestamps: list[int] = field(default_factory=list)
    handles: list[object] = field(default_factory=list)
    size: int = BATCH_OVERHEAD
    sealed: bool = False
    attempts: int = 0
    retry_at: float = 0.0
    encoded: bytes | None = None
    last_error: BaseException | None = None
    # The idempotent producer id whose sequence ``encoded`` carries; -1 when none yet, or when
    # the batch must be numbered again (its sequence was never written, see `renumber`).
    producer_id: int = -1
    # The batch id of the first batch of the run this one was sent in (-1: not sent): a numbered
    # batch is only ever resent with (part of) the same run.
    run_tag: int = -1
    # Sent while an earlier batch of its partition was unanswered: the node may have checked it
    # before that one (requests travel on separate streams), so a sequence error for it can mean
    # only that it overtook, even once the earlier batch is acknowledged (see `drain`).
    sent_behind: bool = False

    @property
    def record_count(self) -> int:
        return len(self.timestamps)


@dataclass(slots=True)
class _PartitionQueue:
    open: ProducerBatch | None = None
    # Waiting to be sent, in batch id (= sequence) order; retried batches go back in order.
    sealed: deque[ProducerBatch] = field(default_factory=deque)
    # Sent and not yet answered.
    in_flight: list[ProducerBatch] = field(default_factory=list)
    # A run came back with a retriable error: one run at a time until one succeeds.
    resync: bool = False
    # No more may be sent now (kept up to date so `add` needs no computation per record).
    blocked: bool = False


class AppendResult(NamedTuple):
    batch: ProducerBatch
    index: int  # position of the record within its batch
    # A batch was created or sealed, so the sender must re-plan (its linger timer, or a send);
    # not while the partition has a run in flight: the sender drains again when that run
    # completes (complete/reenqueue, then a wake), which saves the producer a cross-thread wake
    # per batch while it keeps up.
    wake_sender: bool


@dataclass(slots=True)
class Drain:
    """What the sender should do now."""

    by_node: dict[int, list[list[ProducerBatch]]]  # per node: one run of batches per partition
    unknown_leader: set[TopicPartition]
    next_check: float | None  # monotonic time of the next linger/backoff deadline


class BufferExhausted(Exception):
    """No buffer memory became free within the allowed time."""


class RecordAccumulator:
    def __init__(
        self,
        *,
        batch_size: int,
        linger_ms: float,
        buffer_memory: int,
        delivery_timeout_ms: float,
        clock: Callable[[], float] = time.monotonic,
        on_memory_freed: Callable[[], None] | None = None,
        max_in_flight_batches: int | None = None,
    ) -> None:
        if max_in_flight_batches is not None and max_in_flight_batches < 1:
            raise ValueError("max_in_flight_batches must be at least 1")
        # None: one run per partition (no idempotence); N: up to N batches (module docstring).
        self.max_in_flight_batches = max_in_flight_batches
        self.batch_size = batch_size
        self.linger = linger_ms / 1000.0
        self.buffer_memory = buffer_memory
        self.delivery_timeout = delivery_timeout_ms / 1000.0
        self._clock = clock
        self._on_memory_freed = on_memory_freed
        self._lock = threading.Lock()
        self._memory_freed = threading.Condition(self._lock)
        self._partitions: dict[TopicPartition, _PartitionQueue] = {}
        self._used = 0
        self._next_batch_id = 0
        self._incomplete: set[int] = set()
        self._last_tp: TopicPartition | None = None
        self._last_queue = _PartitionQueue()
        self.closed = False

    # --- appending (any thread) -------------------------------------------------------------

    @property
    def used_memory(self) -> int:
        return self._used

    def try_append(
        self, tp: TopicPartition, record_fields: tuple, size: int, handle: object
    ) -> AppendResult | None:
        """Append a record, or return None when buffer memory is short.

        ``record_fields`` is ``(timestamp, key, value, headers)``, encoded into the batch here;
        the offset within the batch is the record's index in it.
        """
        with self._lock:
            batch = self._append_locked(tp, record_fields, size, handle)
            return None if batch is None else self._result_locked(batch)

    def add(
        self, tp: TopicPartition, record_fields: tuple, size: int, handle: object
    ) -> bool | None:
        """`try_append` for the producer's hot path: only ``wake_sender`` (None when buffer
        memory is short)."""
        # acquire/release rather than `with`, which costs twice as much (a bound __exit__ made
        # and called per record).
        lock = self._lock
        lock.acquire()
        try:
            # The common case inline: the partition of the last record, whose open batch has
            # room (so it holds a record already and no wake is due unless it fills up).
            if tp is self._last_tp:
                queue = self._last_queue
                batch = queue.open
                if (batch is not None and batch.size + size < self.batch_size
                        and self._used + size <= self.buffer_memory and not self.closed):
                    timestamp, key, value, headers = record_fields
                    timestamps = batch.timestamps
                    append_record(batch.parts, len(timestamps), timestamp - timestamps[0],  # type: ignore[arg-type]
                                  key, value, headers)
                    timestamps.append(timestamp)
                    batch.handles.append(handle)
                    batch.size += size
                    self._used += size
                    return False
            batch = self._append_locked(tp, record_fields, size, handle)
            if batch is None:
                return None
            return (batch.sealed or len(batch.timestamps) == 1) and not self._last_queue.blocked
        finally:
            lock.release()

    def append(
        self,
        tp: TopicPartition,
        record_fields: tuple,
        size: int,
        handle: object,
        timeout: float,
    ) -> AppendResult:
        """Append, blocking the calling thread up to ``timeout`` seconds for buffer memory."""
        # Waiting is real time, whatever clock the batches' linger and expiry are measured on.
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                batch = self._append_locked(tp, record_fields, size, handle)
                if batch is not None:
                    return self._result_locked(batch)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise BufferExhausted(
                        f"{size} bytes of buffer memory did not become free within "
                        f"{timeout * 1000:.0f} ms (buffer_memory={self.buffer_memory})"
                    )
                self._memory_freed.wait(remaining)

    def _result_locked(self, batch: ProducerBatch) -> AppendResult:
        index = len(batch.timestamps) - 1
        return AppendResult(
            batch, index, (batch.sealed or index == 0) and not self._partitions[batch.tp].blocked
        )

    def _append_locked(
        self, tp: TopicPartition, record_fields: tuple, size: int, handle: object
    ) -> ProducerBatch | None:
        """The batch the record went into, or None when buffer memory is short."""
        if self.closed:
            raise RuntimeError("the producer is closed")
        if self._used + size > self.buffer_memory and self._used > 0:
            return None
        # Consecutive records mostly go to the same partition (sticky partitioning), and the
        # producer passes the same TopicPartition object for it: an identity check saves the
        # dataclass's Python-level __hash__ per record. Queues are never removed.
        if tp is self._last_tp:
            queue = self._last_queue
        else:
            queue = self._partitions.get(tp)
            if queue is None:
                queue = self._partitions[tp] = _PartitionQueue()
            self._last_tp, self._last_queue = tp, queue
        batch = queue.open
        if batch is not None and batch.size + size > self.batch_size:
            batch.sealed = True
            queue.sealed.append(batch)
            queue.open = batch = None
        timestamp, key, value, headers = record_fields
        if batch is None:
            now = self._clock()
            batch = ProducerBatch(tp, self._next_batch_id, now, now + self.delivery_timeout)
            # Encoded before the batch is registered: a record that cannot be encoded leaves
            # no empty batch behind.
            append_record(batch.parts, 0, 0, key, value, headers)  # type: ignore[arg-type]
            self._next_batch_id += 1
            self._incomplete.add(batch.batch_id)
            queue.open = batch
        else:
            append_record(batch.parts, len(batch.timestamps), timestamp - batch.timestamps[0],  # type: ignore[arg-type]
                          key, value, headers)
        batch.timestamps.append(timestamp)
        batch.handles.append(handle)
        batch.size += size
        self._used += size
        if batch.size >= self.batch_size:
            batch.sealed = True
            queue.sealed.append(batch)
            queue.open = None
        return batch

    # --- draining (the event loop) ----------------------------------------------------------

    def seal_all(self) -> None:
        """Make every open batch sendable now (flush and close)."""
        with self._lock:
            for queue in self._partitions.values():
                if queue.open is not None:
                    queue.open.sealed = True
                    queue.sealed.append(queue.open)
                    queue.open = None

    def last_batch_id(self) -> int:
        with self._lock:
            return self._next_batch_id - 1

    def any_incomplete_up_to(self, batch_id: int) -> bool:
        with self._lock:
            return any(i <= batch_id for i in self._incomplete)

    def is_empty(self) -> bool:
        with self._lock:
            return not self._incomplete

    def drain(
        self,
        now: float,
        leader_of: Callable[[TopicPartition], int | None],
        node_ready: Callable[[int], bool] = lambda node: True,
        max_bytes: int = 0,
        producer_id: int = -1,
    ) -> Drain:
        """Take what to send now, grouped by leader node and marked in flight.

        Each entry of ``by_node[node]`` is one partition's *run*: its sealed batches from the head
        of its queue, as many as fit in ``max_bytes`` (at least one; 0 = just one) and in the
        partition's in-flight allowance. A run travels as one partition entry of one Produce
        request. ``producer_id`` is the id that batches not numbered yet will carry.
        """
        by_node: dict[int, list[list[ProducerBatch]]] = {}
        unknown: set[TopicPartition] = set()
        next_check: float | None = None
        limit = self.max_in_flight_batches

        def later(moment: float) -> None:
            nonlocal next_check
            if next_check is None or moment < next_check:
                next_check = moment

        with self._lock:
            for tp, queue in self._partitions.items():
                if queue.blocked:
                    continue
                if queue.open is not None:
                    linger_end = queue.open.created + self.linger
                    if now >= linger_end:
                        queue.open.sealed = True
                        queue.sealed.append(queue.open)
                        queue.open = None
                    elif not queue.sealed:
                        later(linger_end)
                        continue
                if not queue.sealed:
                    continue
                head = queue.sealed[0]
                if head.retry_at > now:
                    later(head.retry_at)
                    continue
                if queue.in_flight:
                    # Batches of an older producer id must be answered first (-1: numbered with
                    # ``producer_id`` once sent).
                    flying = queue.in_flight[-1].producer_id
                    if (flying if flying >= 0 else producer_id) != (
                            head.producer_id if head.producer_id >= 0 else producer_id):
                        continue
                leader = leader_of(tp)
                if leader is None:
                    unknown.add(tp)
                    continue
                if not node_ready(leader):
                    continue
                run = self._take_run_locked(queue, head, max_bytes,
                                            None if limit is None else limit - len(queue.in_flight))
                # Batches still in flight are earlier ones of the same producer id (runs of
                # different ids are never in flight together).
                behind = bool(queue.in_flight)
                for batch in run:
                    batch.sent_behind = behind
                queue.in_flight.extend(run)
                self._update_blocked_locked(queue)
                by_node.setdefault(leader, []).append(run)
        return Drain(by_node, unknown, next_check)

    @staticmethod
    def _take_run_locked(queue: _PartitionQueue, head: ProducerBatch, max_bytes: int,
                         budget: int | None) -> list[ProducerBatch]:
        sealed = queue.sealed
        sealed.popleft()
        run = [head]
        size = head.size
        numbered = head.producer_id >= 0
        while sealed and (budget is None or len(run) < budget):
            batch = sealed[0]
            if size + batch.size > max_bytes:
                break
            if numbered:
                # A retry: only the batches first sent with it (the broker refuses a request
                # that mixes batches it already has with new ones).
                if batch.run_tag != head.run_tag or batch.producer_id != head.producer_id:
                    break
            elif batch.producer_id >= 0:
                break
            sealed.popleft()
            run.append(batch)
            size += batch.size
        if not numbered:
            for batch in run:
                batch.run_tag = head.batch_id
        return run

    def _update_blocked_locked(self, queue: _PartitionQueue) -> None:
        limit = self.max_in_flight_batches
        in_flight = queue.in_flight
        queue.blocked = bool(in_flight) and (
            limit is None or queue.resync or len(in_flight) >= limit
        )

    def complete(self, run: list[ProducerBatch]) -> None:
        """The in-flight ``run`` (or a part of it) is finished: delivered or failed for good."""
        with self._lock:
            queue = self._partitions[run[0].tp]
            self._remove_in_flight_locked(queue, run)
            for batch in run:
                self._release_locked(batch)
            if not queue.in_flight:
                queue.resync = False
            self._update_blocked_locked(queue)

    @staticmethod
    def _remove_in_flight_locked(queue: _PartitionQueue, run: list[ProducerBatch]) -> None:
        done = {id(batch) for batch in run}
        before = len(queue.in_flight)
        queue.in_flight = [batch for batch in queue.in_flight if id(batch) not in done]
        assert before - len(queue.in_flight) == len(run), "only in-flight batches complete"

    def reenqueue(self, run: list[ProducerBatch], retry_at: float, *, renumber: bool = False) -> None:
        """The in-flight ``run`` failed retriably: back into the queue in sequence order, sent
        again at ``retry_at``. With ``renumber`` its sequence was certainly not written (the
        broker answered that its predecessor is missing, and that predecessor failed for good):
        it and every later queued batch of the same producer id get numbered again."""
        with self._lock:
            queue = self._partitions[run[0].tp]
            self._remove_in_flight_locked(queue, run)
            stale = run[0].producer_id
            for batch in run:
                batch.attempts += 1
                batch.retry_at = retry_at
            merged = sorted([*run, *queue.sealed], key=_batch_id)
            if renumber and stale >= 0:
                first = run[0].batch_id
                for batch in merged:
                    if batch.producer_id == stale and batch.batch_id >= first:
                        batch.producer_id = -1
                        batch.run_tag = -1
            queue.sealed = deque(merged)
            if self.max_in_flight_batches is not None:
                queue.resync = True
            self._update_blocked_locked(queue)

    def has_earlier_outstanding(self, run: list[ProducerBatch]) -> bool:
        """Whether a batch of the partition numbered under the same producer id before ``run``
        (in flight now) is unanswered or waiting for a retry: then a sequence error for ``run``
        only means that it overtook that batch."""
        with self._lock:
            queue = self._partitions[run[0].tp]
            first, producer_id = run[0].batch_id, run[0].producer_id
            for batch in itertools.chain(queue.in_flight, queue.sealed):
                if batch.batch_id < first and batch.producer_id == producer_id:
                    return True
            return False

    def expire(self, now: float) -> list[ProducerBatch]:
        """Remove and return batches past their delivery timeout that are not in flight."""
        expired: list[ProducerBatch] = []
        with self._lock:
            for queue in self._partitions.values():
                if queue.in_flight:
                    continue
                while queue.sealed and queue.sealed[0].deadline <= now:
                    expired.append(queue.sealed.popleft())
                if not queue.sealed and queue.open is not None and queue.open.deadline <= now:
                    expired.append(queue.open)
                    queue.open = None
            for batch in expired:
                self._release_locked(batch)
        return expired

    def abort_all(self) -> list[ProducerBatch]:
        """Remove and return every batch that is not in flight (a forced close)."""
        aborted: list[ProducerBatch] = []
        with self._lock:
            for queue in self._partitions.values():
                aborted.extend(queue.sealed)
                queue.sealed = deque()
                if queue.open is not None:
                    aborted.append(queue.open)
                    queue.open = None
            for batch in aborted:
                self._release_locked(batch)
        return aborted

    def _release_locked(self, batch: ProducerBatch) -> None:
        self._incomplete.discard(batch.batch_id)
        self._used -= batch.size - BATCH_OVERHEAD
        self._memory_freed.notify_all()
        if self._on_memory_freed is not None:
            self._on_memory_freed()



def _batch_id(batch: ProducerBatch) -> int:
    return batch.batch_id
