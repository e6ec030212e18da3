"""One Raft group replica on top of a `PartitionLog`: the node's driver for `RaftGroup`.

The core is sans-IO (replication/raft.py); this module supplies what it lacks:

* the log: `RaftLogAdapter` gives `PartitionLog` the `RaftLog` shape (names and the
  "no epoch" conventions differ slightly);
* the clock: a timer per replica set to `next_deadline()`, so an idle group costs nothing
  between its deadlines (no global tick loop over every partition);
* durability: `Flush` outputs run `PartitionLog.flush` in a worker thread, one at a time per
  replica; requests arriving meanwhile are covered by the next one (group commit). With
  ``flush = interval`` the flush is reported at once and a node timer fsyncs later;
* the quorum state: written atomically to ``quorum-state`` *before* any message of the same
  output leaves (the core's ordering contract), synchronously on the event loop because it is
  rare (epoch changes and votes) and tiny;
* the network: messages go to `send`, which the transport coalesces per destination node.

Every input (receive, tick, propose, flush completion) is followed by `_process`, which applies
the output; all of it runs on the event loop, so the group is never entered concurrently.
"""

from __future__ import annotations

import asyncio
import json
import logging
import queue
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

from tidelog.node.config import FlushPolicy
from tidelog.node.fsutil import atomic_write
from tidelog.node.producer_state import ProducerStateManager
from tidelog.node.storage import PartitionLog
from tidelog.proto import records as codec
from tidelog.proto.records import BatchHeader
from tidelog.replication.messages import NO_EPOCH, Message
from tidelog.replication.raft import (
    Flush,
    NotLeaderError,
    Proposal,
    QuorumState,
    RaftConfig,
    RaftGroup,
    Role,
)

log = logging.getLogger(__name__)

QUORUM_STATE_FILE = "quorum-state"
TIMER_GRID_MS = 50
# Bytes a follower fetch may return: several 256 KiB-1 MiB produce batches per round trip.
REPLICA_FETCH_MAX_BYTES = 4 << 20
_NEVER = 1 << 61


def read_headers_from(partition_log: PartitionLog, offset: int) -> Iterator[BatchHeader]:
    """Headers (with offsets) of the log's batches from the one holding ``offset`` to the end:
    `ProducerStateManager`'s ``read_batches_from``. The data was checked when appended."""
    offset = max(offset, partition_log.log_start_offset)
    while offset < partition_log.end_offset:
        data = partition_log.read(offset, REPLICA_FETCH_MAX_BYTES)
        headers = codec.scan_valid_prefix(data, verify_crc=False)[0] if data else []
        if not headers:
            return
        yield from headers
        offset = headers[-1].next_offset


class RaftLogAdapter:
    """`PartitionLog` as a `tidelog.replication.log.RaftLog`.

    With a `ProducerStateManager` it also folds every batch the log appends (leader and
    follower alike) into it and rolls it back on truncation, so a replica that becomes leader
    has exactly the old leader's producer state (DESIGN.md §8). With a snapshot directory it
    snapshots that state whenever the log rolls to a new segment (at the new segment's base
    offset, as Kafka does), so a restart after a crash replays at most the active segment; the
    bytes are built on the caller's thread (the event loop) and written in a worker thread.
    """

    __slots__ = ("_active_segment", "_pending", "_snapshot_lock", "_snapshot_write", "_truncations", "log",
                 "producers", "snapshot_dir")

    def __init__(self, partition_log: PartitionLog, producers: ProducerStateManager | None = None,
                 snapshot_dir: Path | None = None) -> None:
        self.log = partition_log
        self.producers = producers
        self.snapshot_dir = snapshot_dir
        # (buffer, headers) the produce path already scanned, so the leader append need not
        # scan the same bytes again; matched by identity.
        self._pending: tuple[bytes | memoryview, list[BatchHeader]] | None = None
        self._active_segment = partition_log.segment_base_offsets[-1]
        # A snapshot written in a worker thread must not land after a truncation removed its
        # offset (a later, different history could reach that offset and a restart would trust
        # it): the writer checks the truncation count under this lock, and truncation deletes
        # snapshots above the new end under it.
        self._snapshot_lock = threading.Lock()
        self._truncations = 0
        self._snapshot_write: list[asyncio.Future[None]] = []  # writes not known to be finished

    def expect(self, batches: bytes | memoryview, headers: list[BatchHeader]) -> None:
        self._pending = (batches, headers)

    @property
    def start_epoch(self) -> int:
        return self.log.start_epoch

    @property
    def start_offset(self) -> int:
        return self.log.log_start_offset

    @property
    def end_offset(self) -> int:
        return self.log.end_offset

    @property
    def last_epoch(self) -> int:
        # An emptied log (retention, reset) still ended its prefix in start_epoch; answering
        # NO_EPOCH there would let this replica vote for a candidate missing committed entries.
        if self.log.end_offset <= self.log.log_start_offset:
            return max(self.log.start_epoch, NO_EPOCH)
        return max(self.log.latest_epoch, NO_EPOCH)

    def append(self, batches: bytes | memoryview, epoch: int) -> tuple[int, int]:
        pending, self._pending = self._pending, None
        checked = pending[1] if pending is not None and pending[0] is batches else None
        # The produce path already CRC-checked these bytes: the log takes its headers.
        result = self.log.append(batches, epoch, checked_headers=checked)
        if self.producers is not None:
            headers = checked if checked is not None else codec.scan_batches(batches, verify_crc=False)
            self._snapshot_if_rolled(result.base_offset)
            self.producers.update(headers, _wall_ms(), first_offset=result.base_offset)
        return result.base_offset, result.last_offset

    def append_replicated(self, batches: bytes) -> tuple[int, int]:
        result = self.log.append_replicated(batches)
        if self.producers is not None:
            self._snapshot_if_rolled(result.base_offset)
            self.producers.update(codec.scan_batches(batches, verify_crc=False), _wall_ms())
        return result.base_offset, result.last_offset

    def _snapshot_if_rolled(self, base_offset: int) -> None:
        """After an append at ``base_offset`` and before the producer state folds it in: if the
        append started a new segment, snapshot the state as of that segment's base."""
        active = self.log.segment_base_offsets[-1]
        if active == self._active_segment:
            return
        self._active_segment = active
        producers = self.producers
        if (producers is None or self.snapshot_dir is None or active != base_offset
                or producers.end_offset > base_offset):
            return
        offset, data = producers.snapshot_bytes(base_offset)
        truncations = self._truncations
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._write_snapshot(offset, data, truncations)
            return
        self._snapshot_write = [f for f in self._snapshot_write if not f.done()]
        self._snapshot_write.append(loop.run_in_executor(None, self._write_snapshot, offset, data, truncations))

    async def wait_for_snapshot(self) -> None:
        """Until the roll snapshots are written (close: nothing may write after the replica)."""
        if self._snapshot_write:
            await asyncio.gather(*self._snapshot_write, return_exceptions=True)

    def _write_snapshot(self, offset: int, data: bytes, truncations: int) -> None:
        try:
            with self._snapshot_lock:
                if truncations == self._truncations and self.snapshot_dir is not None:
                    ProducerStateManager.write_snapshot(self.snapshot_dir, offset, data)
        except Exception:
            log.exception("%s: producer state snapshot at offset %d failed", self.log.directory, offset)

    def delete_snapshots_below(self, log_start_offset: int) -> None:
        """Retention moved the log start: snapshots below it describe deleted data (blocking)."""
        if self.snapshot_dir is not None:
            with self._snapshot_lock:
                ProducerStateManager.delete_snapshots_outside(self.snapshot_dir, log_start_offset, 1 << 62)

    def read(self, offset: int, max_bytes: int) -> bytes:
        return self.log.read(offset, max_bytes)

    def truncate_to(self, offset: int) -> int:
        end = self.log.truncate_to(offset)
        self._active_segment = self.log.segment_base_offsets[-1]
        if self.producers is not None:
            self._truncations += 1
            with self._snapshot_lock:
                self.producers.truncate_to(end, self.snapshot_dir, log_start_offset=self.log.log_start_offset,
                                           read_batches_from=lambda o: read_headers_from(self.log, o),
                                           now_ms=_wall_ms())
        return end

    def reset_to(self, start_offset: int, start_epoch: int) -> None:
        self.log.reset_to(start_offset, start_epoch)
        self._active_segment = self.log.segment_base_offsets[-1]
        if self.producers is not None:
            self._truncations += 1
            self.producers.clear(start_offset)
            if self.snapshot_dir is not None:
                with self._snapshot_lock:
                    ProducerStateManager.delete_snapshots_outside(self.snapshot_dir, start_offset, start_offset)

    def epoch_for(self, offset: int) -> int | None:
        return self.log.epoch_for(offset)

    def end_offset_for_epoch(self, epoch: int) -> tuple[int, int]:
        # The core's convention (replication/log.py): (NO_EPOCH, start) when the log holds no
        # epoch <= ``epoch``; storage answers differently for that case, so compute it here.
        # start_epoch counts as present from the log start, as in MemoryLog (replication/log.py).
        starts: list[tuple[int, int]] = []
        if self.log.start_epoch != NO_EPOCH:
            starts.append((self.log.start_epoch, self.log.log_start_offset))
        if self.log.end_offset > self.log.log_start_offset:
            for entry in self.log.epoch_entries:
                if not starts or starts[-1][0] != entry.epoch:
                    starts.append((entry.epoch, max(entry.start_offset, self.log.log_start_offset)))
        for index in range(len(starts) - 1, -1, -1):
            found_epoch = starts[index][0]
            if found_epoch <= epoch:
                end = starts[index + 1][1] if index + 1 < len(starts) else self.log.end_offset
                return found_epoch, end
        return NO_EPOCH, self.log.log_start_offset

    def flush(self) -> int:
        return self.log.flush()


def _wall_ms() -> int:
    # Producer idleness is measured on the broker's wall clock (producer_state's docstring).
    return int(time.time() * 1000)


def load_quorum_state(directory: Path) -> QuorumState | None:
    try:
        raw = json.loads((directory / QUORUM_STATE_FILE).read_text())
    except FileNotFoundError:
        return None
    except ValueError as exc:
        raise RuntimeError(f"{directory / QUORUM_STATE_FILE} is damaged: {exc}") from None
    return QuorumState(int(raw["epoch"]), raw.get("voted_for"), raw.get("leader_id"))


def save_quorum_state(directory: Path, state: QuorumState) -> None:
    body = json.dumps({"version": 0, "epoch": state.epoch, "voted_for": state.voted_for,
                       "leader_id": state.leader_id})
    atomic_write(directory, QUORUM_STATE_FILE, body.encode())


def raft_config_for(voters: int, election_timeout_ms: int, fetch_max_wait_ms: int | None = None,
                    lazy_follower_hw: bool = False) -> RaftConfig:
    """KRaft's timings at ``election_timeout_ms``, with an optionally longer replica long-poll.

    An idle group costs one fetch per follower per long-poll, so the long-poll sets the idle
    cost of many partitions; the fetch timeout (a silent leader's detection) is kept at twice
    it, as KIP-1236 requires. A crashed leader is detected faster than that anyway, by its
    refused connection (`Replica.leader_node_down`). ``lazy_follower_hw`` is for partitions
    (see `RaftConfig`): their followers learn the HW with the next data, not in a message of
    its own.
    """
    if voters == 1:
        # A single voter cannot split a vote, so it need not wait a full election timeout
        # before leading (that wait would be the start-up latency of every such partition).
        return RaftConfig.scaled(20)
    base = replace(RaftConfig.scaled(election_timeout_ms), max_fetch_bytes=REPLICA_FETCH_MAX_BYTES,
                   lazy_follower_hw=lazy_follower_hw)
    if fetch_max_wait_ms is None or fetch_max_wait_ms <= base.fetch_max_wait_ms:
        return base
    return replace(base, fetch_max_wait_ms=fetch_max_wait_ms,
                   fetch_timeout_ms=max(base.fetch_timeout_ms, 2 * fetch_max_wait_ms))


# fsyncs of different files run at once (ext4 commits concurrent ones in one journal commit),
# so a node keeps several flusher threads; idle ones cost nothing.
FLUSH_THREADS = 8


class Flusher:
    """Runs the fsyncs of a node's replicas on a few long-lived threads.

    Cheaper per flush than `asyncio.to_thread` (no context copy, executor future or
    `wrap_future` chain), and the completions that finish while the event loop is busy reach it
    with one wake-up between them instead of one each.
    """

    def __init__(self, threads: int = FLUSH_THREADS) -> None:
        self._loop = asyncio.get_running_loop()
        self._requests: queue.SimpleQueue[tuple[Callable[[], int], asyncio.Future[int]] | None] = queue.SimpleQueue()
        self._completed: deque[tuple[asyncio.Future[int], int, BaseException | None]] = deque()
        self._lock = threading.Lock()
        self._wake_pending = False
        self._threads = [threading.Thread(target=self._work, name=f"tidelog-flusher-{index}", daemon=True)
                         for index in range(threads)]
        for thread in self._threads:
            thread.start()

    def run(self, flush: Callable[[], int]) -> asyncio.Future[int]:
        """``flush()`` on a flusher thread; its result (or exception) in the returned future."""
        future: asyncio.Future[int] = self._loop.create_future()
        self._requests.put((flush, future))
        return future

    def _work(self) -> None:
        while (request := self._requests.get()) is not None:
            flush, future = request
            try:
                self._completed.append((future, flush(), None))
            except BaseException as exc:
                self._completed.append((future, 0, exc))
            with self._lock:
                if self._wake_pending:
                    continue  # the wake-up already on its way will see this completion too
                self._wake_pending = True
            try:
                self._loop.call_soon_threadsafe(self._deliver)
            except RuntimeError:
                return  # the loop is closed: the process is exiting

    def _deliver(self) -> None:
        with self._lock:
            self._wake_pending = False
        # Cleared first: a completion added from here on schedules a wake-up of its own.
        while self._completed:
            future, flushed, exc = self._completed.popleft()
            if future.done():
                continue  # its waiter was cancelled
            if exc is not None:
                future.set_exception(exc)
            else:
                future.set_result(flushed)

    def close(self) -> None:
        for _ in self._threads:
            self._requests.put(None)


class ReplicaClosed(Exception):
    pass


class NotLeader(Exception):
    def __init__(self, leader_id: int | None, epoch: int) -> None:
        super().__init__(f"not the leader (leader {leader_id}, epoch {epoch})")
        self.leader_id = leader_id
        self.epoch = epoch


class Replica:
    """Drives one `RaftGroup` whose log is ``partition_log`` in ``directory``."""

    def __init__(self, group_id: str, node_id: int, voters: tuple[int, ...], directory: Path,
                 partition_log: PartitionLog, send: Callable[[list[Message]], None], flush_policy: str,
                 election_timeout_ms: int = 1000,
                 on_role_change: Callable[[Replica], None] | None = None,
                 on_high_watermark: Callable[[Replica], None] | None = None,
                 campaign_now: bool = False, fetch_max_wait_ms: int | None = None,
                 observers: tuple[int, ...] = (),
                 producers: ProducerStateManager | None = None, producer_snapshot_dir: Path | None = None,
                 lazy_follower_hw: bool = False, flusher: Flusher | None = None) -> None:
        self.group_id = group_id
        self.node_id = node_id
        self.directory = directory
        self.storage = partition_log
        self._send = send
        self.flush_policy = flush_policy
        self._on_role_change = on_role_change
        self._on_high_watermark = on_high_watermark
        self._loop = asyncio.get_running_loop()
        self.closed = False
        self.failure: BaseException | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = _NEVER
        self._flush_wanted: Flush | None = None
        self._flush_task: asyncio.Task[None] | None = None
        self._flusher = flusher
        self._proposals: dict[tuple[int, int], asyncio.Future[Proposal]] = {}
        self._change: asyncio.Future[None] | None = None
        self._skew_ms = 0
        self._config_fetch_timeout_ms = 0
        self._persisting: asyncio.Task[None] | None = None
        self._held: deque[Callable[[], None]] = deque()
        quorum_state = load_quorum_state(directory)
        config = raft_config_for(len(voters), election_timeout_ms, fetch_max_wait_ms, lazy_follower_hw)
        start_ms = self._now()
        if campaign_now and quorum_state is None:
            # A brand-new group's preferred leader starts as if its election timeout had
            # already run out, so a new topic gets leaders in a few round trips rather than
            # after 1-2 election timeouts. Safe: it only moves this replica's first pre-vote
            # earlier; the other replicas still vote by the usual rules.
            start_ms -= 2 * config.election_timeout_ms
        self._config_fetch_timeout_ms = config.fetch_timeout_ms
        self.log_adapter = RaftLogAdapter(partition_log, producers, producer_snapshot_dir)
        self.group = RaftGroup(
            group_id, node_id, voters, observers, log=self.log_adapter, quorum_state=quorum_state,
            config=config, rng=random.Random(), now_ms=start_ms,
        )
        self._process()

    # --- views ----------------------------------------------------------------------------

    def _now(self) -> int:
        # Wall-clock milliseconds: the core stamps them into leader-change batches, which the
        # time index, segment.ms and retention.ms read as record timestamps. The core ignores a
        # clock that goes back; a jump forward at worst starts an election early. ``_skew_ms``
        # is such a jump, made on purpose when the leader's node is known dead (see
        # `leader_node_down`).
        return int(time.time() * 1000) + self._skew_ms

    @property
    def role(self) -> Role:
        return self.group.role

    @property
    def is_leader(self) -> bool:
        # Not until the new role's quorum state is durable and its output applied.
        return self.group.role is Role.LEADER and self._persisting is None

    @property
    def epoch(self) -> int:
        return self.group.epoch

    @property
    def leader_id(self) -> int | None:
        leader = self.group.leader_id
        if leader == self.node_id and self._persisting is not None:
            return None  # becoming leader: not before its quorum state is durable
        return leader

    @property
    def high_watermark(self) -> int:
        return self.group.high_watermark

    def wait_change(self) -> asyncio.Future[None]:
        """Resolved the next time the high watermark or the role changes, or on close."""
        if self._change is None or self._change.done():
            self._change = self._loop.create_future()
        return self._change

    def _notify(self) -> None:
        if self._change is not None and not self._change.done():
            self._change.set_result(None)
        self._change = None

    # --- inputs ---------------------------------------------------------------------------

    def receive(self, message: Message) -> None:
        if self.closed:
            return
        if self._persisting is not None:
            self._held.append(lambda: self.receive(message))
            return
        self.group.receive(message, self._now())
        self._process()

    def propose(self, batches: bytes | bytearray | memoryview) -> tuple[Proposal, asyncio.Future[Proposal]]:
        """Append as leader; the future resolves when committed, fails with NotLeader if lost."""
        if self.closed:
            raise ReplicaClosed(self.group_id)
        if self._persisting is not None:
            # The group's new epoch or vote is being made durable; a moment later it can
            # take proposals again (clients retry NOT_LEADER_OR_FOLLOWER).
            raise NotLeader(self.group.leader_id, self.group.epoch)
        try:
            # A view of immutable bytes (a produce request's records) is appended as it is: the
            # log writes it before this returns. Only a mutable buffer is copied.
            if isinstance(batches, bytearray) or (isinstance(batches, memoryview) and not batches.readonly):
                batches = bytes(batches)
            proposal = self.group.propose(batches, self._now())  # type: ignore[arg-type]
        except NotLeaderError as exc:
            raise NotLeader(exc.leader_id, exc.epoch) from None
        future: asyncio.Future[Proposal] = self._loop.create_future()
        self._proposals[(proposal.epoch, proposal.base_offset)] = future
        self._process()
        return proposal, future

    def leader_node_down(self, node_id: int) -> None:
        """The leader's node is gone for sure (its connection was refused, as after a crash).

        Waiting out the fetch timeout would only delay the failover, so this replica's clock
        jumps past it and the election starts now. Only liveness depends on time in Raft, so
        this cannot affect safety; a node that is merely slow or paused keeps its connection
        and is never declared down this way.
        """
        if self.closed or self.group.role is not Role.FOLLOWER or self.group.leader_id != node_id:
            return
        self._skew_ms += self._config_fetch_timeout_ms
        self._tick()

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = _NEVER
        self._tick()

    def _tick(self) -> None:
        if self.closed:
            return
        if self._persisting is not None:
            self._held.append(self._tick)
            return
        self.group.tick(self._now())
        self._process()

    def _flush_completed(self, offset: int, generation: int) -> None:
        if self.closed:
            return
        if self._persisting is not None:
            self._held.append(lambda: self._flush_completed(offset, generation))
            return
        self.group.flush_completed(offset, generation, self._now())
        self._process()

    # --- output ---------------------------------------------------------------------------

    def _process(self) -> None:
        try:
            out = self.group.take_output()
            if out.quorum_state is not None:
                # The contract: the state is durable before any message of this output leaves.
                # The write (two fsyncs) runs in a worker thread so that the mass elections of
                # many groups do not stall the event loop; meanwhile this group takes no input
                # (they wait in ``_held``), so nothing it says can get ahead of the write.
                self._persisting = self._loop.create_task(self._persist_then_apply(out))
                return
            self._apply(out)
        except Exception as exc:
            self._fail(exc)

    async def _persist_then_apply(self, out) -> None:  # type: ignore[no-untyped-def]
        try:
            await asyncio.to_thread(save_quorum_state, self.directory, out.quorum_state)
        except Exception as exc:
            self._persisting = None
            self._fail(exc)
            return
        self._persisting = None
        if self.closed:
            return
        try:
            self._apply(out)
        except Exception as exc:
            self._fail(exc)
            return
        while self._held and self._persisting is None and not self.closed:
            self._held.popleft()()

    def _apply(self, out) -> None:  # type: ignore[no-untyped-def]
        changed = False
        if out.role_changes:
            changed = True
            last = out.role_changes[-1]
            # Partitions change roles by the thousand when a node comes or goes; keep INFO for
            # the metadata quorum, whose leader is the controller.
            log.log(logging.INFO if self.group_id.startswith("__cluster_metadata") else logging.DEBUG,
                    "%s: %s in epoch %d (leader %s)", self.group_id, last.role.value, last.epoch, last.leader_id)
        if out.high_watermark is not None:
            changed = True
        for proposal in out.committed:
            future = self._proposals.pop((proposal.epoch, proposal.base_offset), None)
            if future is not None and not future.done():
                future.set_result(proposal)
        for proposal in out.failed:
            future = self._proposals.pop((proposal.epoch, proposal.base_offset), None)
            if future is not None and not future.done():
                future.set_exception(NotLeader(self.group.leader_id, self.group.epoch))
        if out.flush is not None:
            self._request_flush(out.flush)
        if out.messages:
            self._send(out.messages)
        if changed:
            self._notify()
            if out.role_changes and self._on_role_change is not None:
                self._on_role_change(self)
            if out.high_watermark is not None and self._on_high_watermark is not None:
                self._on_high_watermark(self)
        self._schedule()

    def _schedule(self) -> None:
        deadline = self.group.next_deadline()
        if deadline >= _NEVER or self.closed:
            if self._timer is not None:
                self._timer.cancel()
                self._timer, self._timer_at = None, _NEVER
            return
        if self._timer is not None and self._timer_at <= deadline:
            return  # an earlier timer will fire and reschedule
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = deadline
        # Timers fire on a common grid (a little late is allowed; early is harmless too), so the
        # long-poll expiries and fetches of many idle groups fall into the same loop iteration
        # and leave in one envelope per peer instead of one gRPC write each.
        fire_at = -(-(deadline + 1) // TIMER_GRID_MS) * TIMER_GRID_MS
        self._timer = self._loop.call_later(max(fire_at - self._now(), 0) / 1000, self._on_timer)

    def _request_flush(self, flush: Flush) -> None:
        if self.flush_policy == FlushPolicy.INTERVAL:
            # Write caching: count appended bytes as durable now; the node's timer fsyncs.
            self._loop.call_soon(self._flush_completed, flush.up_to, flush.generation)
            return
        self._flush_wanted = flush
        if self._flush_task is None:
            self._flush_task = self._loop.create_task(self._flush_loop())

    async def _flush_loop(self) -> None:
        try:
            while self._flush_wanted is not None and not self.closed:
                flush, self._flush_wanted = self._flush_wanted, None
                if self._flusher is not None:
                    flushed = await self._flusher.run(self.storage.flush)
                else:
                    flushed = await asyncio.to_thread(self.storage.flush)
                self._flush_completed(flushed, flush.generation)
        except Exception as exc:
            self._fail(exc)
        finally:
            self._flush_task = None

    async def flush_now(self) -> None:
        """fsync what was appended (interval timer and shutdown)."""
        while self._flush_task is not None:
            await asyncio.shield(self._flush_task)
        if not self.closed and self.failure is None:
            await asyncio.to_thread(self.storage.flush)

    def _fail(self, exc: BaseException) -> None:
        # A storage failure or a broken invariant: this replica stops serving (DESIGN.md §3:
        # never carry on in a bad state); the others on the node keep going.
        log.exception("%s: replica failed and goes offline", self.group_id, exc_info=exc)
        self.failure = exc
        self._shutdown_group()

    def _shutdown_group(self) -> None:
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for future in self._proposals.values():
            if not future.done():
                future.set_exception(ReplicaClosed(self.group_id))
        self._proposals.clear()
        self._notify()

    async def _wait_persisted(self) -> None:
        while self._persisting is not None:
            try:
                await asyncio.shield(self._persisting)
            except Exception:
                return

    async def close(self, resign: bool = True) -> None:
        """Hand leadership over (so the others elect at once), flush, close the log."""
        if not self.closed and resign:
            await self._wait_persisted()
            if not self.closed and self.group.role is Role.LEADER:
                try:
                    self.group.resign()
                    self._process()
                except Exception:
                    log.exception("%s: resign failed", self.group_id)
                await self._wait_persisted()
        self._shutdown_group()
        for task in (self._persisting, self._flush_task):
            if task is not None:
                try:
                    await asyncio.shield(task)
                except Exception:
                    pass
        adapter = self.log_adapter
        await adapter.wait_for_snapshot()
        if adapter.producers is not None and adapter.snapshot_dir is not None and self.failure is None:
            # Taken after the group stopped, so no append or truncation races the write; a
            # restart then replays only what follows it.
            try:
                offset, data = adapter.producers.snapshot_bytes(self.storage.end_offset)
                await asyncio.to_thread(ProducerStateManager.write_snapshot, adapter.snapshot_dir, offset, data)
            except Exception:
                log.exception("%s: producer state snapshot failed", self.group_id)
        try:
            await asyncio.to_thread(self.storage.close)
        except Exception:
            log.exception("%s: close failed", self.group_id)
