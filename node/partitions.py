"""Partition replicas hosted by this node.

A `Partition` is one replica of one topic-partition: a `PartitionLog` driven by a Raft group
(`tidelog.node.replica.Replica`) whose voters are the partition's replicas. A single-replica
partition is a group of one. The Raft epoch is the partition leader epoch: the log stamps it
into each batch's partitionLeaderEpoch on the leader's append.

Durability is the replica driver's group commit (one fsync in a worker thread covers every
append waiting on it, DESIGN.md §3); only flushed data counts toward the high watermark with
``flush = always``. With ``flush = interval`` a timer here fsyncs every replica.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from tidelog.node.compaction import (
    CleanerConfig,
    CleanStats,
    discard_prepared,
    prepare_clean,
    write_checkpoint,
)
from tidelog.node.config import METADATA_TOPIC, FlushPolicy
from tidelog.node.metadata import MetadataImage
from tidelog.node.producer_state import (
    DEFAULT_PRODUCER_ID_EXPIRATION_MS,
    CheckResult,
    ProducerStateManager,
    Verdict,
)
from tidelog.node.replica import Flusher, NotLeader, Replica, ReplicaClosed, read_headers_from
from tidelog.node.storage import LogConfig, PartitionLog
from tidelog.proto import records as codec
from tidelog.proto.records import BATCH_OVERHEAD
from tidelog.replication.messages import Message
from tidelog.replication.raft import Proposal

log = logging.getLogger(__name__)

PARTITION_METADATA_FILE = "partition.metadata"
# Producer-state snapshots live in a subdirectory so the log's own start-up scan never sees them.
PRODUCER_SNAPSHOT_DIR = "producer-state"


def open_log(directory: Path, topic_configs: Mapping[str, str]) -> PartitionLog:
    return PartitionLog.open(directory, log_config(topic_configs))


def log_config(topic_configs: Mapping[str, str]) -> LogConfig:
    """The storage LogConfig for a topic's effective configs (Kafka names → field names).
    The compaction settings are `cleaner_config`'s."""
    return LogConfig(
        segment_bytes=max(int(topic_configs["segment.bytes"]), BATCH_OVERHEAD),
        segment_ms=int(topic_configs["segment.ms"]),
        index_interval_bytes=int(topic_configs["index.interval.bytes"]),
        retention_bytes=int(topic_configs["retention.bytes"]),
        retention_ms=int(topic_configs["retention.ms"]),
        max_message_bytes=max(int(topic_configs["max.message.bytes"]), BATCH_OVERHEAD),
    )


def is_compacted(topic_configs: Mapping[str, str]) -> bool:
    return "compact" in topic_configs.get("cleanup.policy", "delete").split(",")


def deletes_by_retention(topic_configs: Mapping[str, str]) -> bool:
    # Kafka: a compact-only topic keeps its segments however old or large (retention.* ignored).
    return "delete" in topic_configs.get("cleanup.policy", "delete").split(",")


def cleaner_config(topic_configs: Mapping[str, str]) -> CleanerConfig:
    return CleanerConfig(
        delete_retention_ms=int(topic_configs.get("delete.retention.ms", "86400000")),
        min_cleanable_dirty_ratio=float(topic_configs.get("min.cleanable.dirty.ratio", "0.5")),
        segment_bytes=max(int(topic_configs["segment.bytes"]), BATCH_OVERHEAD),
        index_interval_bytes=int(topic_configs["index.interval.bytes"]),
    )


def group_id_for(topic: str, partition: int, topic_id: str) -> str:
    # The topic id keeps a re-created topic's groups apart from stale replicas of the old one.
    return f"{topic}-{partition}@{topic_id}"


class PartitionClosed(Exception):
    pass


class StorageFailed(Exception):
    pass


@dataclass(frozen=True, slots=True)
class Appended:
    base_offset: int
    last_offset: int
    epoch: int
    committed: asyncio.Future[Proposal]


class Partition:
    def __init__(self, topic: str, partition: int, topic_id: str, directory: Path, replica: Replica) -> None:
        self.topic = topic
        self.partition = partition
        self.topic_id = topic_id
        self.directory = directory
        self.replica = replica
        self.log = replica.storage

    # --- state ----------------------------------------------------------------------------

    @property
    def group_id(self) -> str:
        return self.replica.group_id

    @property
    def closed(self) -> bool:
        return self.replica.closed

    @property
    def failure(self) -> BaseException | None:
        return self.replica.failure

    @property
    def leader_epoch(self) -> int:
        return self.replica.epoch

    @property
    def leader_id(self) -> int | None:
        return self.replica.leader_id

    @property
    def is_leader(self) -> bool:
        return self.replica.is_leader

    @property
    def high_watermark(self) -> int:
        return self.replica.high_watermark

    @property
    def end_offset(self) -> int:
        return self.log.end_offset

    @property
    def log_start_offset(self) -> int:
        return self.log.log_start_offset

    def wait_change(self) -> asyncio.Future[None]:
        return self.replica.wait_change()

    def check_usable(self) -> None:
        if self.failure is not None:
            raise StorageFailed(f"{self.topic}-{self.partition} is offline: {self.failure}")
        if self.closed:
            raise PartitionClosed(f"{self.topic}-{self.partition} is closed")

    # --- writes ---------------------------------------------------------------------------

    def append(self, batches: bytes | memoryview, headers: list[codec.BatchHeader] | None = None
               ) -> Appended | CheckResult:
        """Append validated batches as the leader (NotLeader otherwise).

        With ``headers`` (the request's scan), batches of an idempotent producer are checked
        against the producer state first (DESIGN.md §8): a REJECT or DUPLICATE verdict is
        returned instead of appending. Check and append run with no ``await`` between, so the
        next pipelined batch of the same producer is checked against this one.
        """
        self.check_usable()
        adapter = self.replica.log_adapter
        producers = adapter.producers
        if headers is not None and producers is not None:
            if not self.is_leader:
                raise NotLeader(self.leader_id, self.leader_epoch)
            if any(header.producer_id >= 0 for header in headers):
                result = producers.check(headers, _wall_ms())
                if result.verdict is not Verdict.APPEND:
                    return result
            adapter.expect(batches, headers)
        try:
            proposal, future = self.replica.propose(batches)
        except ReplicaClosed:
            raise PartitionClosed(f"{self.topic}-{self.partition} is closed") from None
        return Appended(proposal.base_offset, proposal.last_offset, proposal.epoch, future)

    async def flush_now(self) -> None:
        await self.replica.flush_now()

    async def wait_committed(self, last_offset: int) -> None:
        """Until the high watermark passes ``last_offset`` (a duplicate's original batch) while
        this replica leads; NotLeader once it does not."""
        while self.high_watermark <= last_offset:
            self.check_usable()
            if not self.is_leader:
                raise NotLeader(self.leader_id, self.leader_epoch)
            await self.wait_change()

    # --- reads ----------------------------------------------------------------------------

    def read_committed(self, offset: int, max_bytes: int) -> bytes:
        """Whole batches from the one holding ``offset``, never past the high watermark."""
        self.check_usable()
        high_watermark = self.high_watermark
        if offset >= high_watermark:
            return b""
        data = self.log.read(offset, max(1, max_bytes))
        view = memoryview(data).cast("B")
        if not len(view):
            return b""
        headers = codec.scan_valid_prefix(view, verify_crc=False)[0]
        end = 0
        for header in headers:
            if header.next_offset > high_watermark:
                break
            end = header.position + header.size
        return bytes(view[:end])

    def offset_for_timestamp(self, timestamp: int) -> tuple[int, int]:
        """(offset, timestamp) of the first batch with a record at or after ``timestamp``."""
        self.check_usable()
        found = self.log.offset_for_timestamp(timestamp)
        if found is None or found.offset >= self.high_watermark:
            return self.high_watermark, -1
        return found.offset, found.timestamp

    async def close(self, resign: bool = True) -> None:
        await self.replica.close(resign=resign)


def partition_dir(data_dir: Path, topic: str, partition: int) -> Path:
    return data_dir / f"{topic}-{partition}"


class PartitionManager:
    """Opens and closes this node's partition replicas as the metadata image changes."""

    def __init__(self, data_dir: Path, node_id: int, flush_policy: str, flush_interval_ms: int,
                 topic_config_defaults: Callable[[], Mapping[str, str]],
                 retention_check_interval_ms: int, send: Callable[[list[Message]], None],
                 election_timeout_ms: int, on_leaders_changed: Callable[[], None],
                 fetch_max_wait_ms: int | None = None, log_cleaner_interval_ms: int = 15000) -> None:
        self.data_dir = data_dir
        self.node_id = node_id
        self.flush_policy = flush_policy
        self.flush_interval_ms = flush_interval_ms
        self._defaults = topic_config_defaults
        self.retention_check_interval_ms = retention_check_interval_ms
        self.log_cleaner_interval_ms = log_cleaner_interval_ms
        # Each hosted partition's effective topic configs, as of the last reconcile.
        self._topic_configs: dict[tuple[str, int], Mapping[str, str]] = {}
        self._compacting: set[str] = set()  # group ids with a compaction pass in progress
        self._send = send
        self._election_timeout_ms = election_timeout_ms
        self._fetch_max_wait_ms = fetch_max_wait_ms
        self._on_leaders_changed = on_leaders_changed
        self._producer_id_expiration_ms = DEFAULT_PRODUCER_ID_EXPIRATION_MS
        self.partitions: dict[tuple[str, int], Partition] = {}
        self.by_group: dict[str, Partition] = {}
        # Replicas that could not be opened (damaged data), with why; they stay closed.
        self.offline: dict[tuple[str, int], str] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._shared_flusher: Flusher | None = None  # made on the event loop, with the first replica
        self._reconcile_lock = asyncio.Lock()

    def get(self, topic: str, partition: int) -> Partition | None:
        return self.partitions.get((topic, partition))

    def deliver(self, message: Message) -> bool:
        partition = self.by_group.get(message.group_id)
        if partition is None:
            return False
        partition.replica.receive(message)
        return True

    def leaders(self) -> dict[str, int]:
        return {p.group_id: p.leader_epoch for p in self.partitions.values() if p.is_leader}

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        if self.flush_policy == FlushPolicy.INTERVAL:
            self._tasks.append(loop.create_task(self._flush_periodically()))
        self._tasks.append(loop.create_task(self._enforce_retention_periodically()))
        self._tasks.append(loop.create_task(self._compact_periodically()))

    async def _flush_periodically(self) -> None:
        while True:
            await asyncio.sleep(self.flush_interval_ms / 1000)
            for partition in list(self.partitions.values()):
                try:
                    await partition.flush_now()
                except Exception:
                    log.exception("periodic flush failed")

    async def _enforce_retention_periodically(self) -> None:
        while True:
            await asyncio.sleep(self.retention_check_interval_ms / 1000)
            for key, partition in list(self.partitions.items()):
                if partition.closed or partition.failure is not None:
                    continue
                try:
                    # Never delete what consumers cannot have read yet.
                    if deletes_by_retention(self._topic_configs.get(key, {})):
                        partition.log.enforce_retention(max_offset=partition.high_watermark)
                    adapter = partition.replica.log_adapter
                    producers = adapter.producers
                    if producers is not None:
                        start = partition.log.log_start_offset
                        producers.remove_before(start)
                        producers.expire(_wall_ms(), self._producer_id_expiration_ms)
                        await asyncio.to_thread(adapter.delete_snapshots_below, start)
                except Exception:
                    log.exception("retention of %s-%d failed", partition.topic, partition.partition)

    async def _compact_periodically(self) -> None:
        while True:
            await asyncio.sleep(self.log_cleaner_interval_ms / 1000)
            for key, partition in list(self.partitions.items()):
                configs = self._topic_configs.get(key)
                if configs is None or not is_compacted(configs):
                    continue
                try:
                    await self.compact(partition, configs)
                except Exception:
                    log.exception("compaction of %s-%d failed", partition.topic, partition.partition)

    async def compact(self, partition: Partition, configs: Mapping[str, str],
                      force: bool = False) -> CleanStats | None:
        """One compaction pass over a replica's log: the reading and rewriting in a worker
        thread, the swap of each rewritten segment on the event loop (the log's owner), which
        holds up appends and fetches for no more than that. Every replica compacts its own
        log, as in Kafka; only committed offsets (below the high watermark) are touched."""
        if partition.closed or partition.failure is not None or partition.group_id in self._compacting:
            return None
        self._compacting.add(partition.group_id)  # one pass per log at a time: they share files
        try:
            storage = partition.log
            segments = storage.cleanable_segments(partition.high_watermark)
            prepared = await asyncio.to_thread(prepare_clean, storage.directory, segments,
                                               cleaner_config(configs), _wall_ms(), force=force)
            if prepared is None:
                return None
            for index, cleaned in enumerate(prepared.cleaned):
                # Between swaps, appends and fetches run; the log may close meanwhile.
                if (partition.closed or partition.failure is not None
                        or not storage.swap_cleaned(cleaned)):
                    discard_prepared(prepared, index)
                    return None
                await asyncio.sleep(0)
            await asyncio.to_thread(write_checkpoint, storage.directory, prepared.checkpoint)
        finally:
            self._compacting.discard(partition.group_id)
        if prepared.stats.records_removed:
            log.info("compacted %s-%d: %d records removed, %d -> %d bytes", partition.topic,
                     partition.partition, prepared.stats.records_removed, prepared.stats.bytes_before,
                     prepared.stats.bytes_after)
        return prepared.stats

    async def reconcile(self, image: MetadataImage) -> None:
        """Open the replicas the image assigns to this node; close and delete the others."""
        async with self._reconcile_lock:
            wanted: dict[tuple[str, int], tuple[str, tuple[int, ...], Mapping[str, str]]] = {}
            for topic in image.topics.values():
                configs = {**self._defaults(), **topic.configs}
                for assignment in topic.partitions:
                    if self.node_id in assignment.replicas:
                        wanted[(topic.name, assignment.partition)] = (topic.topic_id, assignment.replicas, configs)
            self._topic_configs = {key: configs for key, (_, _, configs) in wanted.items()}
            changed = False
            for key, partition in list(self.partitions.items()):
                if key in wanted and wanted[key][0] == partition.topic_id:
                    self._apply_configs(partition, wanted[key][2])
                    continue
                del self.partitions[key]
                self.by_group.pop(partition.group_id, None)
                await partition.close(resign=False)
                await asyncio.to_thread(_remove_dir, partition.directory)
                changed = True
            for key, (topic_id, replicas, topic_configs) in wanted.items():
                if key in self.partitions or key in self.offline:
                    continue
                try:
                    storage, producers = await asyncio.to_thread(self._open_storage, key[0], key[1], topic_id,
                                                                 topic_configs)
                except Exception as exc:
                    # DESIGN.md §3: a damaged replica goes offline with a clear error, never
                    # skipping data; the partition's other replicas keep serving it, and an
                    # operator decides (deleting the directory makes it re-fetch everything).
                    self.offline[key] = f"{type(exc).__name__}: {exc}"
                    log.error("replica %s-%d is offline: %s", key[0], key[1], exc)
                    continue
                partition = self._start_replica(key[0], key[1], topic_id, replicas, storage, producers)
                self.partitions[key] = partition
                self.by_group[partition.group_id] = partition
            await asyncio.to_thread(self._remove_orphans, image)
            if changed:
                self._on_leaders_changed()

    @staticmethod
    def _apply_configs(partition: Partition, configs: Mapping[str, str]) -> None:
        """An altered topic config reaches an open replica's log, as Kafka's LogManager.updateLogConfig
        does: the log reads its config at every append, roll and retention pass, so the new limits
        hold from the next one (a larger max.message.bytes, a shorter retention.ms) without a
        restart. The controller validated the values; one the log still refuses keeps the old
        config rather than taking the node down."""
        try:
            config = log_config(configs)
        except (KeyError, ValueError) as exc:
            log.error("%s-%d keeps its log config: %s", partition.topic, partition.partition, exc)
            return
        if config != partition.log.config:
            partition.log.config = config

    def _open_storage(self, topic: str, index: int, topic_id: str, configs: Mapping[str, str]
                      ) -> tuple[PartitionLog, ProducerStateManager]:
        directory = partition_dir(self.data_dir, topic, index)
        marker = directory / PARTITION_METADATA_FILE
        if directory.exists() and _read_topic_id(marker) not in (None, topic_id):
            # The topic was deleted and created again while this node was away.
            _remove_dir(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if _read_topic_id(marker) is None:
            _write_atomically(marker, json.dumps({"version": 0, "topic_id": topic_id}).encode())
        storage = open_log(directory, configs)
        try:
            # The newest snapshot (written on clean close and on every segment roll) plus a
            # replay of the log after it: after a crash, at most the active segment's headers.
            producers = ProducerStateManager(partition=f"{topic}-{index}")
            producers.rebuild(directory / PRODUCER_SNAPSHOT_DIR, log_start_offset=storage.log_start_offset,
                              log_end_offset=storage.end_offset,
                              read_batches_from=lambda offset: read_headers_from(storage, offset),
                              now_ms=_wall_ms())
        except BaseException:
            storage.close()
            raise
        return storage, producers

    def _start_replica(self, topic: str, index: int, topic_id: str, replicas: tuple[int, ...],
                       storage: PartitionLog, producers: ProducerStateManager | None = None) -> Partition:
        directory = partition_dir(self.data_dir, topic, index)
        replica = Replica(group_id_for(topic, index, topic_id), self.node_id, tuple(replicas), directory, storage,
                          self._send, self.flush_policy, self._election_timeout_ms,
                          on_role_change=lambda _: self._on_leaders_changed(),
                          campaign_now=replicas[0] == self.node_id, fetch_max_wait_ms=self._fetch_max_wait_ms,
                          producers=producers, producer_snapshot_dir=directory / PRODUCER_SNAPSHOT_DIR,
                          lazy_follower_hw=True, flusher=self._flusher())
        return Partition(topic, index, topic_id, directory, replica)

    def _remove_orphans(self, image: MetadataImage) -> None:
        live = {p.directory.name for p in self.partitions.values()}
        for path in self.data_dir.iterdir():
            if not path.is_dir() or path.name in live or path.name.startswith(METADATA_TOPIC):
                continue
            topic_id = _read_topic_id(path / PARTITION_METADATA_FILE)
            if topic_id is None:
                continue
            if not any(t.topic_id == topic_id for t in image.topics.values()):
                _remove_dir(path)

    async def close_all(self) -> None:
        for task in self._tasks:
            task.cancel()
        partitions = list(self.partitions.values())
        self.partitions.clear()
        self.by_group.clear()
        await asyncio.gather(*(p.close() for p in partitions), return_exceptions=True)
        if self._shared_flusher is not None:
            self._shared_flusher.close()
            self._shared_flusher = None

    def _flusher(self) -> Flusher:
        if self._shared_flusher is None:
            self._shared_flusher = Flusher()
        return self._shared_flusher


def _wall_ms() -> int:
    return int(time.time() * 1000)


def _read_topic_id(path: Path) -> str | None:
    try:
        return str(json.loads(path.read_text())["topic_id"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_dir(directory: Path) -> None:
    # Rename first so a crash half-way through the delete never leaves a half-deleted replica
    # under the live name.
    if not directory.exists():
        return
    doomed = directory.with_name(directory.name + ".deleted")
    if doomed.exists():
        shutil.rmtree(doomed, ignore_errors=True)
    os.replace(directory, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


__all__ = ["Appended", "NotLeader", "Partition", "PartitionClosed", "PartitionManager", "StorageFailed"]
