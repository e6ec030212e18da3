"""Partition replicas hosted by this node, their high watermarks and group-committed fsyncs.

A `Partition` wraps one `PartitionLog`. Appends happen on the event loop (a write to the page
cache is cheap); fsync never does: one flush task per partition runs `log.flush()` in a worker
thread, and every append that arrived while the previous flush ran is covered by the next one
(group commit, DESIGN.md §3). With ``flush = always`` the high watermark only moves to what has
been flushed, so acks=all and consumers see only durable data; with ``flush = interval`` it moves
on append and a timer flushes.

Until the Raft core lands every partition is a single-voter group led by this node at epoch
`LOCAL_LEADER_EPOCH`; the `Partition` API (append, wait_committed, read_committed, wait_change)
is what the replicated version keeps.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from tidelog.node.config import METADATA_TOPIC, FlushPolicy
from tidelog.node.metadata import MetadataImage
from tidelog.node.storage import LogConfig, OffsetOutOfRangeError, PartitionLog
from tidelog.proto import records as codec
from tidelog.proto.records import BATCH_OVERHEAD

log = logging.getLogger(__name__)

# The epoch of a single-voter partition: the one election it always wins.
LOCAL_LEADER_EPOCH = 1
PARTITION_METADATA_FILE = "partition.metadata"


def _value(attribute: Any) -> int:
    return int(attribute() if callable(attribute) else attribute)


def open_log(directory: Path, topic_configs: Mapping[str, str]) -> PartitionLog:
    return PartitionLog.open(directory, log_config(topic_configs))


def log_config(topic_configs: Mapping[str, str]) -> LogConfig:
    """The storage LogConfig for a topic's effective configs (Kafka names → field names).

    cleanup.policy=compact and delete.retention.ms are accepted and shown but not acted on
    until compaction exists.
    """
    return LogConfig(
        segment_bytes=max(int(topic_configs["segment.bytes"]), BATCH_OVERHEAD),
        segment_ms=int(topic_configs["segment.ms"]),
        index_interval_bytes=int(topic_configs["index.interval.bytes"]),
        retention_bytes=int(topic_configs["retention.bytes"]),
        retention_ms=int(topic_configs["retention.ms"]),
        max_message_bytes=max(int(topic_configs["max.message.bytes"]), BATCH_OVERHEAD),
    )


class PartitionClosed(Exception):
    pass


class StorageFailed(Exception):
    pass


@dataclass(frozen=True, slots=True)
class Appended:
    base_offset: int
    last_offset: int


class Partition:
    def __init__(self, topic: str, partition: int, topic_id: str, directory: Path, storage_log: Any,
                 flush_policy: str, leader_epoch: int = LOCAL_LEADER_EPOCH) -> None:
        self.topic = topic
        self.partition = partition
        self.topic_id = topic_id
        self.directory = directory
        self.log = storage_log
        self.flush_policy = flush_policy
        self.leader_epoch = leader_epoch
        self.closed = False
        self.failure: BaseException | None = None
        end = _value(storage_log.end_offset)
        # What recovery found on disk was flushed before the crash or restart, so it is committed.
        self.high_watermark = end
        self._flushed = end
        self._flush_task: asyncio.Task[None] | None = None
        self._change: asyncio.Future[None] | None = None

    # --- state ----------------------------------------------------------------------------

    @property
    def end_offset(self) -> int:
        return _value(self.log.end_offset)

    @property
    def log_start_offset(self) -> int:
        return _value(self.log.log_start_offset)

    def wait_change(self) -> asyncio.Future[None]:
        """A future resolved the next time the high watermark moves or the partition closes."""
        if self._change is None or self._change.done():
            self._change = asyncio.get_running_loop().create_future()
        return self._change

    def _notify(self) -> None:
        if self._change is not None and not self._change.done():
            self._change.set_result(None)
        self._change = None

    def _advance_high_watermark(self, offset: int) -> None:
        if offset > self.high_watermark:
            self.high_watermark = offset
            self._notify()

    def check_usable(self) -> None:
        if self.closed:
            raise PartitionClosed(f"{self.topic}-{self.partition} is closed")
        if self.failure is not None:
            raise StorageFailed(f"{self.topic}-{self.partition} storage failed: {self.failure}")

    # --- writes ---------------------------------------------------------------------------

    def append(self, batches: bytearray) -> Appended:
        """Append validated batches as the leader; offsets and epoch are stamped by the log."""
        self.check_usable()
        result = self.log.append(batches, self.leader_epoch)
        appended = Appended(int(result.base_offset), int(result.last_offset))
        if self.flush_policy == FlushPolicy.ALWAYS:
            self._start_flush()
        else:
            self._advance_high_watermark(appended.last_offset + 1)
        return appended

    def _start_flush(self) -> None:
        if self._flush_task is None and not self.closed:
            self._flush_task = asyncio.get_running_loop().create_task(self._flush_loop())

    async def _flush_loop(self) -> None:
        try:
            while not self.closed and self._flushed < self.end_offset:
                target = self.end_offset
                await asyncio.to_thread(self.log.flush)
                self._flushed = max(self._flushed, target)
                if self.flush_policy == FlushPolicy.ALWAYS:
                    self._advance_high_watermark(target)
        except Exception as exc:  # a failed fsync leaves the data's durability unknown
            log.exception("flush of %s-%d failed; the partition stops", self.topic, self.partition)
            self.failure = exc
            self._notify()
        finally:
            self._flush_task = None

    async def flush_now(self) -> None:
        """Flush everything appended so far (the interval timer and shutdown use this)."""
        while self._flush_task is not None:
            await asyncio.shield(self._flush_task)
        if self._flushed < self.end_offset and not self.closed:
            self._start_flush()
            if self._flush_task is not None:
                await asyncio.shield(self._flush_task)

    async def wait_committed(self, offset: int) -> None:
        """Return once ``offset`` is below the high watermark (committed)."""
        while self.high_watermark <= offset:
            self.check_usable()
            await self.wait_change()
        self.check_usable()

    # --- reads ----------------------------------------------------------------------------

    def read_committed(self, offset: int, max_bytes: int) -> bytes:
        """Whole batches from the one holding ``offset``, never past the high watermark."""
        self.check_usable()
        high_watermark = self.high_watermark
        if offset >= high_watermark:
            return b""
        data = self.log.read(offset, max(1, max_bytes))
        data = getattr(data, "data", data)
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
        if found is None:
            return self.high_watermark, -1
        if isinstance(found, tuple):
            offset, ts = int(found[0]), int(found[1])
        else:
            offset, ts = int(getattr(found, "offset", found)), int(getattr(found, "timestamp", -1))
        if offset >= self.high_watermark:
            return self.high_watermark, -1
        return offset, ts

    # --- lifecycle ------------------------------------------------------------------------

    async def close(self) -> None:
        if self.closed:
            return
        if self.failure is None:
            try:
                await self.flush_now()
            except Exception:
                log.exception("final flush of %s-%d failed", self.topic, self.partition)
        self.closed = True
        self._notify()
        await asyncio.to_thread(self.log.close)


def partition_dir(data_dir: Path, topic: str, partition: int) -> Path:
    return data_dir / f"{topic}-{partition}"


class PartitionManager:
    """Opens and closes this node's partition replicas as the metadata image changes."""

    def __init__(self, data_dir: Path, node_id: int, flush_policy: str, flush_interval_ms: int,
                 topic_config_defaults: Callable[[], Mapping[str, str]],
                 retention_check_interval_ms: int = 300000) -> None:
        self.data_dir = data_dir
        self.node_id = node_id
        self.flush_policy = flush_policy
        self.flush_interval_ms = flush_interval_ms
        self._defaults = topic_config_defaults
        self.partitions: dict[tuple[str, int], Partition] = {}
        self.retention_check_interval_ms = retention_check_interval_ms
        self._tasks: list[asyncio.Task[None]] = []
        self._reconcile_lock = asyncio.Lock()

    def get(self, topic: str, partition: int) -> Partition | None:
        return self.partitions.get((topic, partition))

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        if self.flush_policy == FlushPolicy.INTERVAL:
            self._tasks.append(loop.create_task(self._flush_periodically()))
        self._tasks.append(loop.create_task(self._enforce_retention_periodically()))

    async def _enforce_retention_periodically(self) -> None:
        while True:
            await asyncio.sleep(self.retention_check_interval_ms / 1000)
            for partition in list(self.partitions.values()):
                enforce = getattr(partition.log, "enforce_retention", None)
                if enforce is None or partition.closed or partition.failure is not None:
                    continue
                try:
                    # Never delete what consumers cannot have read yet.
                    enforce(max_offset=partition.high_watermark)
                except Exception:
                    log.exception("retention of %s-%d failed", partition.topic, partition.partition)

    async def _flush_periodically(self) -> None:
        while True:
            await asyncio.sleep(self.flush_interval_ms / 1000)
            for partition in list(self.partitions.values()):
                try:
                    await partition.flush_now()
                except Exception:
                    log.exception("periodic flush failed")

    async def reconcile(self, image: MetadataImage) -> None:
        """Open the replicas the image assigns to this node; close and delete the others."""
        async with self._reconcile_lock:
            wanted: dict[tuple[str, int], tuple[str, Mapping[str, str]]] = {}
            for topic in image.topics.values():
                configs = {**self._defaults(), **topic.configs}
                for assignment in topic.partitions:
                    if self.node_id in assignment.replicas:
                        wanted[(topic.name, assignment.partition)] = (topic.topic_id, configs)
            for key, partition in list(self.partitions.items()):
                if key not in wanted or wanted[key][0] != partition.topic_id:
                    del self.partitions[key]
                    await partition.close()
                    await asyncio.to_thread(_remove_dir, partition.directory)
            for key, (topic_id, configs) in wanted.items():
                if key not in self.partitions:
                    self.partitions[key] = await asyncio.to_thread(self._open, key[0], key[1], topic_id, configs)
            await asyncio.to_thread(self._remove_orphans, image)

    def _open(self, topic: str, index: int, topic_id: str, configs: Mapping[str, str]) -> Partition:
        directory = partition_dir(self.data_dir, topic, index)
        marker = directory / PARTITION_METADATA_FILE
        if directory.exists() and _read_topic_id(marker) not in (None, topic_id):
            # The topic was deleted and created again while this node was away.
            _remove_dir(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if _read_topic_id(marker) is None:
            _write_atomically(marker, json.dumps({"version": 0, "topic_id": topic_id}).encode())
        storage_log = open_log(directory, configs)
        return Partition(topic, index, topic_id, directory, storage_log, self.flush_policy)

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
        await asyncio.gather(*(p.close() for p in partitions), return_exceptions=True)


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
