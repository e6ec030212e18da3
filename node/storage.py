"""The segment log of one partition replica (DESIGN.md §3).

A partition directory holds segments ``<20-digit base offset>.log`` with a sparse offset index
``.index`` (u32 relative offset → u32 file position, big-endian, Kafka's layout) and a time index
``.timeindex`` (i64 timestamp → u32 relative offset), plus three small state files, each replaced
atomically (node/fsutil.py):

* ``leader-epoch-checkpoint`` — Kafka's text format: ``0``, the entry count, then one
  ``<epoch> <start offset>`` line per epoch;
* ``recovery-point`` — JSON: how far the data and the index entries are known to be durable;
* ``clean-shutdown`` — present only between `PartitionLog.close` and the next open.

Batches are stored exactly as Kafka RecordBatch v2 bytes. The log never decodes a record: it
checks and stamps batch headers with the codec's header-only path (tidelog.proto.records).

Offset index entries follow Kafka: an entry is added for a batch once more than
``index_interval_bytes`` were appended since the previous entry; its key is the batch's *last*
offset relative to the segment base (what Kafka's DumpLogSegments checks) and its value the
batch's start position. A time index entry ``(T, o)`` means "the largest timestamp among the
batches up to offset ``o`` is ``T``"; entries are added with offset entries when the maximum
grows, and once more when the segment rolls, so the last entry of a rolled segment is its maximum.

Durability and recovery
-----------------------
`flush` fdatasyncs every segment with unflushed bytes and advances `flushed_offset`. When a
segment rolled or ``recovery_point_interval_bytes`` were flushed since the last time, it also
appends the pending index entries to the index files, fsyncs them and rewrites
``recovery-point`` (one file rewrite per interval keeps a flush after every 1 MiB batch close to
the cost of the data fdatasync itself; the active segment's index entries past the recovery
point are rebuilt by the scan at open, so writing them in between would buy nothing). On open:

* everything before the recovery point is trusted and not read: segments before it are opened
  lazily (their indexes are loaded on first use and rebuilt, with a warning, if damaged), and the
  recovery-point segment's index files are cut back to the entry counts the recovery point lists;
* everything after it is scanned with CRC checks, its index entries and leader epochs rebuilt;
  the first invalid, torn or out-of-sequence batch ends the log: the rest is truncated (and
  logged), later segments are deleted;
* a cleanly closed log has its recovery point at the end, so nothing is scanned;
* flushed data that is missing or not a valid batch sequence where the recovery point says it
  must be raises `CorruptLogError`: the replica must go offline and re-fetch, never skip. After
  a crash the batches just below the recovery point (from the last index entry) are CRC-checked
  too; damage deeper in the flushed region is found when a read walks over it or by `verify`,
  which reads everything.

Retention deletes whole segments only below the recovery point's segment (so only durable
ones) and first records the new log start and `start_epoch` in the recovery point, so a crash
part-way is finished on the next open. `reset_to` replaces the log with an empty one at a given
offset (a Raft follower whose leader deleted what it lacks); a recovery point flagged ``reset``
commits it in the same way.

Compaction (tidelog.node.compaction) removes records but never changes offsets, so a log may
have gaps: between batches, before a segment's first batch, and in a follower's active segment
(a follower copies its leader's batches as they are, so `append_replicated` accepts offsets that
jump forward, as Kafka's followers do). Offsets only ever increase: recovery, `verify` and index
rebuilds reject a batch that goes back, not one that skips ahead. A read at an offset in a gap
returns the next surviving batch, from a later segment if need be; `truncate_to` an offset in a
gap ends the log there. The cleaner rewrites only segments below the recovery point's segment
(durable, never rescanned at open) and swaps one group of them for its rewritten segment with
Kafka's protocol (`swap_cleaned`): ``.cleaned`` files fsynced, renamed to ``.swap`` (the log
file's rename commits), the old segments deleted, the ``.swap`` files renamed over the final
names; an open discards ``.cleaned`` leftovers and finishes a committed swap (the ``.swap`` log
file's batches say which old segments it replaces). The swap runs on the owner thread under the
flush lock, so reads never see a missing segment and a flush never syncs a closed descriptor.

Appends check every batch with the codec (CRC included) before anything is written, then write
the 16 rewritten header bytes of each batch (baseOffset, batchLength, partitionLeaderEpoch)
gathered with the caller's unchanged bytes in a single ``writev``: copying a 1 MiB buffer to
stamp it in place costs about as much as the CRC check (more than 512 batches in one append fall
back to one copy stamped by the codec's `stamp_batches`).

Threads
-------
Every method is meant for one owner thread (the node's event loop) except `flush`, which may run
in one worker thread at a time concurrently with the owner's appends and reads, and `close`,
which may run in a worker once the owner has stopped using the log. Two locks make that safe:

* ``_state_lock`` guards the in-memory picture (segment list, sizes, index arrays, end offset,
  epochs). Appends hold it only to publish what they wrote; flush holds it only to take a
  snapshot, never across a syscall that can block for long.
* ``_flush_lock`` serializes flush with the operations that close or shrink files (`truncate_to`,
  `enforce_retention`, `reset_to`, `swap_cleaned`, `close`, `delete`) and with other flushes (concurrent flush
  calls from several threads simply queue: group commit), so a file descriptor is never
  closed under a running fdatasync. Those rare operations may therefore wait for a flush in
  progress on the owner thread.

An append writes its bytes before publishing the new end offset, and flush reads the end offset
before it fdatasyncs, so `flushed_offset` never claims bytes that were not yet written.
"""

from __future__ import annotations

import bisect
import dataclasses
import enum
import errno
import itertools
import json
import logging
import operator
import os
import shutil
import struct
import sys
import threading
import time
from array import array
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from tidelog.node.fsutil import TEMP_SUFFIX, atomic_write, fsync_directory, write_all
from tidelog.proto.records import (
    BATCH_LENGTH_OFFSET,
    BATCH_OVERHEAD,
    LAST_OFFSET_DELTA_OFFSET,
    LOG_OVERHEAD,
    MAX_TIMESTAMP_OFFSET,
    PARTITION_LEADER_EPOCH_OFFSET,
    BatchHeader,
    CorruptRecordError,
    scan_batches,
    scan_valid_prefix,
    stamp_batches,
)

log = logging.getLogger(__name__)

LOG_SUFFIX = ".log"
INDEX_SUFFIX = ".index"
TIME_INDEX_SUFFIX = ".timeindex"
LEADER_EPOCH_CHECKPOINT = "leader-epoch-checkpoint"
RECOVERY_POINT = "recovery-point"
CLEAN_SHUTDOWN = "clean-shutdown"
# Compaction's segment replacement (Kafka's protocol): new files are written as ".cleaned",
# renamed to ".swap" once durable (the commit point is the log file's rename), then renamed
# over the old names; an open finishes a swap it finds and discards ".cleaned" leftovers.
CLEANED_SUFFIX = ".cleaned"
SWAP_SUFFIX = ".swap"

OFFSET_INDEX_ENTRY = 8  # u32 relative offset, u32 position
TIME_INDEX_ENTRY = 12  # i64 timestamp, u32 relative offset
_MAX_RELATIVE = 0xFFFFFFFF
_MAX_SEGMENT_BYTES = 0x7FFFFFFF  # Kafka's limit (an int); positions are u32 in the index
_NO_TIMESTAMP = -1

_DAY_MS = 24 * 60 * 60 * 1000

# Bytes read per pread when walking headers of a trusted region or scanning a tail with CRCs.
_WALK_CHUNK = 8 * 1024  # index entries are index_interval_bytes (4 KiB) apart
_SCAN_CHUNK = 8 * 1024 * 1024

# The part of a batch header the log rewrites: baseOffset, batchLength (copied), and
# partitionLeaderEpoch. Neither rewritten field is covered by the CRC.
_STAMP = struct.Struct(">qii")
assert BATCH_LENGTH_OFFSET == 8 and PARTITION_LEADER_EPOCH_OFFSET == 12 and _STAMP.size == 16
_BASE_AND_LENGTH = struct.Struct(">qi")
_INT32 = struct.Struct(">i")
_INT64 = struct.Struct(">q")

_LITTLE_ENDIAN = sys.byteorder == "little"
assert array("I").itemsize == 4 and array("q").itemsize == 8

try:
    _IOV_MAX = int(os.sysconf("SC_IOV_MAX"))
except (ValueError, OSError, AttributeError):
    _IOV_MAX = 1024


def _wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


# --- errors --------------------------------------------------------------------------------


class StorageError(Exception):
    """Base class of the storage engine's own errors (bad bytes raise CorruptRecordError)."""


class CorruptLogError(StorageError):
    """Data the log had made durable is missing or damaged; the replica must re-fetch it."""


class OffsetOutOfRangeError(StorageError):
    """An offset outside [log_start_offset, end_offset] (Kafka's OFFSET_OUT_OF_RANGE)."""

    def __init__(self, offset: int, log_start_offset: int, end_offset: int) -> None:
        super().__init__(
            f"offset {offset} is outside the log [{log_start_offset}, {end_offset}]"
        )
        self.offset = offset
        self.log_start_offset = log_start_offset
        self.end_offset = end_offset


class InvalidAppendError(StorageError):
    """Well-formed batches that cannot go at the end of this log (offsets or epoch)."""


class RecordTooLargeError(InvalidAppendError):
    """A batch larger than ``max_message_bytes`` (Kafka's MESSAGE_TOO_LARGE)."""


class LogClosedError(StorageError):
    """The log was closed or deleted, or an earlier write failed half-way."""


# --- values --------------------------------------------------------------------------------


class FlushPolicy(enum.Enum):
    """How the node uses `PartitionLog.flush`; the log itself never flushes on its own."""

    ALWAYS = "always"  # fsync before a batch counts toward the commit (group commit)
    INTERVAL = "interval"  # fsync every flush_interval_ms; a crash may lose that window


@dataclass(frozen=True, slots=True)
class LogConfig:
    """Per-partition storage settings, named after Kafka's topic configs."""

    # segment.bytes: roll to a new segment before one would grow past this (≤ 2 GiB - 1).
    segment_bytes: int = 1 << 30
    # segment.ms: roll once the active segment's first batch is this old (by its timestamp).
    segment_ms: int = 7 * _DAY_MS
    # index.interval.bytes: bytes appended between two offset index entries.
    index_interval_bytes: int = 4096
    # retention.ms: delete segments whose newest timestamp is older; -1 keeps them forever.
    retention_ms: int = 7 * _DAY_MS
    # retention.bytes: delete the oldest segments while the log stays at least this big; -1 off.
    retention_bytes: int = -1
    # max.message.bytes: the largest batch `append` accepts (Kafka's default, 1 MiB + 12).
    max_message_bytes: int = 1048588
    # Read by the node's flusher, not by the log (DESIGN.md §3).
    flush: FlushPolicy = FlushPolicy.ALWAYS
    flush_interval_ms: int = 1000
    # Rewrite recovery-point on flush at most once per this many flushed bytes (and on every
    # roll, truncation and close); 0 rewrites it on every flush. Bounds crash-recovery work.
    recovery_point_interval_bytes: int = 8 << 20

    def __post_init__(self) -> None:
        if not BATCH_OVERHEAD <= self.segment_bytes <= _MAX_SEGMENT_BYTES:
            raise ValueError(f"segment_bytes must be in [{BATCH_OVERHEAD}, {_MAX_SEGMENT_BYTES}]")
        if self.segment_ms <= 0:
            raise ValueError("segment_ms must be positive")
        if self.index_interval_bytes < 0:
            raise ValueError("index_interval_bytes must be >= 0")
        if self.retention_ms < -1 or self.retention_bytes < -1:
            raise ValueError("retention_ms and retention_bytes must be >= 0, or -1 for no limit")
        if self.max_message_bytes < BATCH_OVERHEAD:
            raise ValueError(f"max_message_bytes must be at least {BATCH_OVERHEAD}")
        if self.flush_interval_ms <= 0:
            raise ValueError("flush_interval_ms must be positive")
        if self.recovery_point_interval_bytes < 0:
            raise ValueError("recovery_point_interval_bytes must be >= 0")


@dataclass(frozen=True, slots=True)
class AppendResult:
    base_offset: int
    last_offset: int
    max_timestamp: int  # the largest batch maxTimestamp appended, -1 if none carried one
    size: int  # bytes appended

    @property
    def next_offset(self) -> int:
        return self.last_offset + 1


@dataclass(frozen=True, slots=True)
class TimestampOffset:
    """What `offset_for_timestamp` found: a batch's base offset and its maxTimestamp."""

    offset: int
    timestamp: int


@dataclass(frozen=True, slots=True)
class EpochEntry:
    epoch: int
    start_offset: int


@dataclass(frozen=True, slots=True)
class CleanableSegment:
    """A segment compaction may rewrite (`PartitionLog.cleanable_segments`): whole, durable,
    below the active segment and the offset limit given. Its file does not change until the
    segment is swapped out, deleted by retention or dropped by a reset."""

    base_offset: int
    next_offset: int  # the base of the segment after it
    size: int
    path: str


@dataclass(frozen=True, slots=True)
class CleanedSegment:
    """The durable ``.cleaned`` files `write_cleaned_segment` wrote to replace ``replaces``
    (consecutive segments, the first at ``base_offset``), with the index it built."""

    base_offset: int
    replaces: tuple[CleanableSegment, ...]
    size: int
    index_relative: array
    index_positions: array
    time_timestamps: array
    time_relative: array
    max_timestamp: int
    max_timestamp_offset: int
    bytes_since_index: int

    @property
    def next_offset(self) -> int:
        return self.replaces[-1].next_offset


class SwapStep(enum.Enum):
    """The points of `PartitionLog.swap_cleaned` a test may stop at to simulate a crash."""

    CHECKED = "checked"  # .cleaned files durable, nothing renamed
    INDEX_SWAP = "index-swap"  # index files renamed to .swap, the log file not yet
    COMMITTED = "committed"  # the log file renamed to .swap: the swap will happen
    OLD_DELETED = "old-deleted"  # the replaced segments after the first are gone
    INDEX_FINAL = "index-final"  # index files in place, the log file still .swap


@dataclass(frozen=True, slots=True)
class _RecoveryPoint:
    """Everything before ``offset`` is durable: segments before ``segment`` completely (log and
    index files), and segment ``segment`` up to byte ``position`` with its first
    ``index_entries``/``time_index_entries`` index entries.

    ``log_start`` is the log start offset (segments below it are leftovers of an interrupted
    retention) and ``start_epoch`` the epoch of the last batch before it. ``reset`` = 1 marks a
    `PartitionLog.reset_to` in progress: the log is empty at ``offset`` and every segment file
    found is a leftover."""

    offset: int
    segment: int
    position: int
    index_entries: int
    time_index_entries: int
    max_timestamp: int
    max_timestamp_offset: int
    bytes_since_index: int
    log_start: int = 0
    start_epoch: int = 0
    reset: int = 0

    def encode(self) -> bytes:
        body = {"version": 1, **{name: getattr(self, name) for name in self.__slots__}}
        return (json.dumps(body, sort_keys=True) + "\n").encode()

    @classmethod
    def decode(cls, data: bytes) -> _RecoveryPoint:
        body = json.loads(data)
        if body.get("version") != 1:
            raise ValueError(f"unknown recovery-point version {body.get('version')!r}")
        optional = {"log_start": 0, "start_epoch": 0, "reset": 0}
        values = {name: body[name] if name not in optional else body.get(name, optional[name])
                  for name in cls.__slots__}
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in values.values()):
            raise ValueError("recovery-point fields must be integers")
        point = cls(**values)
        if min(point.offset, point.segment, point.position, point.index_entries,
               point.time_index_entries, point.bytes_since_index, point.log_start) < 0 \
                or point.segment > point.offset or point.log_start > point.offset:
            raise ValueError("recovery-point fields out of range")
        return point


# --- index encoding (C-speed conversions between Kafka's big-endian files and arrays) --------


def _u32_words(data: bytes) -> array:
    words = array("I")
    words.frombytes(data)
    if _LITTLE_ENDIAN:
        words.byteswap()
    return words


def _encode_offset_entries(relative: array, positions: array) -> bytes:
    words = array("I", [0]) * (2 * len(relative))
    words[0::2] = relative
    words[1::2] = positions
    if _LITTLE_ENDIAN:
        words.byteswap()
    return words.tobytes()


def _decode_offset_entries(data: bytes) -> tuple[array, array]:
    words = _u32_words(data)
    return words[0::2], words[1::2]


def _encode_time_entries(timestamps: array, relative: array) -> bytes:
    native = array("I")
    native.frombytes(timestamps.tobytes())
    low, high = (native[0::2], native[1::2]) if _LITTLE_ENDIAN else (native[1::2], native[0::2])
    words = array("I", [0]) * (3 * len(timestamps))
    words[0::3] = high
    words[1::3] = low
    words[2::3] = relative
    if _LITTLE_ENDIAN:
        words.byteswap()
    return words.tobytes()


def _decode_time_entries(data: bytes) -> tuple[array, array]:
    words = _u32_words(data)
    high, low, relative = words[0::3], words[1::3], words[2::3]
    native = array("I", [0]) * (2 * len(high))
    if _LITTLE_ENDIAN:
        native[0::2], native[1::2] = low, high
    else:
        native[0::2], native[1::2] = high, low
    timestamps = array("q")
    timestamps.frombytes(native.tobytes())
    return timestamps, relative


def _strictly_increasing(values: array) -> bool:
    return all(map(operator.lt, values[:-1], values[1:]))


def _non_decreasing(values: array) -> bool:
    return all(map(operator.le, values[:-1], values[1:]))


# --- segments ------------------------------------------------------------------------------


def segment_name(base_offset: int, suffix: str = LOG_SUFFIX) -> str:
    return f"{base_offset:020d}{suffix}"


class _Segment:
    """One segment's files and in-memory state. Mutated under the log's state lock."""

    __slots__ = (
        "base_offset",
        "bytes_since_index",
        "created_ms",
        "fd",
        "first_timestamp",
        "flushed_size",
        "index_final_synced",
        "index_positions",
        "index_relative",
        "index_written",
        "max_timestamp",
        "max_timestamp_offset",
        "next_offset",
        "read_hint",
        "size",
        "time_relative",
        "time_timestamps",
        "time_written",
    )

    def __init__(self, base_offset: int, fd: int, size: int) -> None:
        self.base_offset = base_offset
        self.fd = fd
        self.size = size
        self.flushed_size = size
        self.next_offset = base_offset
        self.max_timestamp = _NO_TIMESTAMP
        self.max_timestamp_offset = base_offset - 1
        # segment.ms ages a segment as Kafka does: by the timestamps of the batches appended
        # (first batch vs incoming), or by the wall clock when the first batch had none.
        self.first_timestamp: int | None = None  # maxTimestamp of the first batch
        self.created_ms = 0
        self.bytes_since_index = 0
        # None until loaded: segments before the recovery point are loaded on first use.
        self.index_relative: array | None = None
        self.index_positions: array | None = None
        self.index_written = 0  # entries known to be in the .index file
        self.time_timestamps: array | None = None
        self.time_relative: array | None = None
        self.time_written = 0
        self.index_final_synced = False  # index files complete and fsynced (rolled segments)
        self.read_hint: tuple[int, int] | None = None  # (offset, position) where the last read ended

    def start_empty_index(self) -> None:
        self.index_relative, self.index_positions = array("I"), array("I")
        self.time_timestamps, self.time_relative = array("q"), array("I")

    @property
    def loaded(self) -> bool:
        return self.index_relative is not None

    def add_batch(self, position: int, size: int, last_offset: int, max_timestamp: int,
                  interval: int) -> None:
        """Index bookkeeping for one batch written at ``position`` (Kafka's LogSegment.append)."""
        assert self.index_relative is not None and self.index_positions is not None
        if max_timestamp > self.max_timestamp:
            self.max_timestamp = max_timestamp
            self.max_timestamp_offset = last_offset
        if self.bytes_since_index > interval:
            self.index_relative.append(last_offset - self.base_offset)
            self.index_positions.append(position)
            self.maybe_add_time_entry()
            self.bytes_since_index = 0
        self.bytes_since_index += size

    def maybe_add_time_entry(self) -> None:
        assert self.time_timestamps is not None and self.time_relative is not None
        if self.max_timestamp > (self.time_timestamps[-1] if self.time_timestamps else _NO_TIMESTAMP):
            self.time_timestamps.append(self.max_timestamp)
            self.time_relative.append(self.max_timestamp_offset - self.base_offset)


@dataclass(frozen=True, slots=True)
class _Walked:
    """A batch header read from a trusted region (no CRC check)."""

    position: int
    size: int
    base_offset: int
    last_offset: int
    max_timestamp: int
    epoch: int


def _walk_headers(fd: int, start: int, end: int) -> Iterator[_Walked]:
    """Batch headers between ``start`` and ``end`` of a file, reading only the headers' bytes
    (plus whatever else a chunk holds). Raises CorruptLogError if the region is not whole
    batches."""
    buf = b""
    buf_start = start
    position = start
    while position < end:
        relative = position - buf_start
        if relative + BATCH_OVERHEAD > len(buf):
            buf = os.pread(fd, min(_WALK_CHUNK, end - position), position)
            buf_start, relative = position, 0
            if len(buf) < min(BATCH_OVERHEAD, end - position) or len(buf) < LOG_OVERHEAD:
                raise CorruptLogError(f"log ends inside a batch header at byte {position}")
        if len(buf) - relative < BATCH_OVERHEAD:
            raise CorruptLogError(f"truncated batch header at byte {position} (region ends {end})")
        base_offset, length = _BASE_AND_LENGTH.unpack_from(buf, relative)
        size = length + LOG_OVERHEAD
        if size < BATCH_OVERHEAD or position + size > end:
            raise CorruptLogError(f"batch at byte {position} declares {size} bytes; region ends at {end}")
        (delta,) = _INT32.unpack_from(buf, relative + LAST_OFFSET_DELTA_OFFSET)
        (max_timestamp,) = _INT64.unpack_from(buf, relative + MAX_TIMESTAMP_OFFSET)
        (epoch,) = _INT32.unpack_from(buf, relative + PARTITION_LEADER_EPOCH_OFFSET)
        if delta < 0:
            raise CorruptLogError(f"batch at byte {position} has a negative lastOffsetDelta")
        yield _Walked(position, size, base_offset, base_offset + delta, max_timestamp, epoch)
        position += size


def _scan_valid(fd: int, start: int, end: int, max_batch: int) -> Iterator[tuple[int, BatchHeader]]:
    """(position, header) of each CRC-valid batch from ``start``; stops at the first bad byte."""
    position = start
    while position < end:
        buf = os.pread(fd, min(_SCAN_CHUNK, end - position), position)
        if not buf:
            return
        headers, valid = scan_valid_prefix(buf)
        if valid == 0 and len(buf) >= LOG_OVERHEAD:
            # Maybe one batch bigger than the chunk: read exactly it, if its length is plausible.
            (length,) = _INT32.unpack_from(buf, BATCH_LENGTH_OFFSET)
            size = length + LOG_OVERHEAD
            if len(buf) < size <= min(end - position, max_batch):
                headers, valid = scan_valid_prefix(os.pread(fd, size, position))
        if valid == 0:
            return
        for header in headers:
            yield position + header.position, header
        position += valid


# --- the log -------------------------------------------------------------------------------


class PartitionLog:
    """The segment log of one partition replica. Create with `PartitionLog.open`."""

    def __init__(self, directory: Path, config: LogConfig, clock: Callable[[], int]) -> None:
        self.directory = directory
        self.config = config
        self._clock = clock
        self._segments: list[_Segment] = []
        self._bases: list[int] = []
        self._end_offset = 0
        self._flushed_offset = 0
        self._total_bytes = 0
        self._appended_bytes = 0  # ever, in this process: measures flushed volume between checkpoints
        self._checkpoint_mark = 0
        self._checkpoint: _RecoveryPoint | None = None
        self._epochs: list[EpochEntry] = []
        self._epoch_numbers: list[int] = []
        self._epoch_starts: list[int] = []
        self._epochs_dirty = False
        self._start_epoch = 0
        self._dir_dirty = False
        self._closed = False
        self._failure: BaseException | None = None
        self._state_lock = threading.Lock()
        self._flush_lock = threading.Lock()

    # --- opening and recovery ------------------------------------------------------------

    @classmethod
    def open(cls, directory: str | os.PathLike[str], config: LogConfig | None = None, *,
             clock: Callable[[], int] = _wall_clock_ms) -> PartitionLog:
        """Open (creating if needed) the partition in ``directory``, recovering it if it was not
        closed cleanly. ``clock`` returns milliseconds (segment.ms and retention.ms)."""
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        plog = cls(path, config or LogConfig(), clock)
        try:
            plog._load()
        except BaseException:
            plog._close_files()
            raise
        return plog

    def _path(self, name: str) -> str:
        return os.path.join(self.directory, name)

    def _open_segment_fd(self, base_offset: int, create: bool = False) -> int:
        flags = os.O_RDWR | os.O_APPEND | (os.O_CREAT | os.O_TRUNC if create else 0)
        return os.open(self._path(segment_name(base_offset)), flags, 0o644)

    def _load(self) -> None:
        self._finish_swaps()
        names = os.listdir(self.directory)
        own_state = (RECOVERY_POINT, LEADER_EPOCH_CHECKPOINT, CLEAN_SHUTDOWN)
        for name in names:
            # An atomic write of ours that never reached its rename (other files are not ours).
            if name.endswith(TEMP_SUFFIX) and (name[:20].isdigit() or name[:-len(TEMP_SUFFIX)] in own_state):
                os.unlink(self._path(name))
        bases = sorted(int(n[:-len(LOG_SUFFIX)]) for n in names
                       if n.endswith(LOG_SUFFIX) and len(n) == 20 + len(LOG_SUFFIX)
                       and n[:20].isdigit())
        known = set(bases)
        for name in names:
            for suffix in (INDEX_SUFFIX, TIME_INDEX_SUFFIX):
                if name.endswith(suffix) and name[:20].isdigit() and int(name[:20]) not in known:
                    log.warning("%s: removing index file %s without a segment", self.directory, name)
                    os.unlink(self._path(name))
        clean = CLEAN_SHUTDOWN in names
        point = self._read_recovery_point()
        epochs = self._read_epoch_checkpoint()

        if point is not None and point.reset:
            log.warning("%s: finishing an interrupted reset to offset %d", self.directory, point.offset)
            for base in bases:
                for suffix in (LOG_SUFFIX, INDEX_SUFFIX, TIME_INDEX_SUFFIX):
                    try:
                        os.unlink(self._path(segment_name(base, suffix)))
                    except FileNotFoundError:
                        pass
            bases = []
        if not bases:
            start = 0
            if point is not None and point.reset:
                start = point.offset
            elif point is not None and point.offset > 0:
                raise CorruptLogError(
                    f"{self.directory}: recovery-point says offsets below {point.offset} are "
                    "durable but there are no segment files"
                )
            self._segments, self._bases = [self._create_segment(start)], [start]
            self._end_offset = self._flushed_offset = start
            if point is not None and point.reset:
                self._start_epoch = point.start_epoch
            fsync_directory(self.directory)
            if point is not None and point.reset:
                self._epochs_dirty = True  # the file may still list the old log's epochs
                self._flush_locked(force_checkpoint=True)
            return

        if point is not None:
            self._start_epoch = point.start_epoch
            leftovers = [b for b in bases if b < point.log_start]
            if leftovers and len(leftovers) < len(bases):
                log.warning("%s: finishing an interrupted retention: log starts at %d",
                            self.directory, point.log_start)
                for base in leftovers:
                    for suffix in (LOG_SUFFIX, INDEX_SUFFIX, TIME_INDEX_SUFFIX):
                        try:
                            os.unlink(self._path(segment_name(base, suffix)))
                        except FileNotFoundError:
                            pass
                bases = bases[len(leftovers):]
                known = set(bases)
                fsync_directory(self.directory)
        for base in bases:
            fd = self._open_segment_fd(base)
            self._segments.append(_Segment(base, fd, os.fstat(fd).st_size))
            self._bases.append(base)
        for earlier, later in zip(self._segments, self._segments[1:]):
            earlier.next_offset = later.base_offset
            earlier.index_final_synced = True

        if point is not None and point.segment not in known:
            if point.segment < bases[0]:
                log.warning("%s: recovery point %d precedes the first segment %d; validating all",
                            self.directory, point.offset, bases[0])
                point = None
            else:
                raise CorruptLogError(
                    f"{self.directory}: segment {segment_name(point.segment)} holding flushed data "
                    f"up to offset {point.offset} is missing"
                )
        changed = self._recover(point, epochs, clean)
        if clean and changed:
            log.warning("%s: clean-shutdown marker present but the log needed recovery", self.directory)
        elif not clean and changed:
            log.info("%s: recovered after an unclean shutdown", self.directory)
        if changed:
            self._flush_locked(force_checkpoint=True)
        else:
            self._checkpoint = point
        if clean:
            # Later appends must not look clean after a crash.
            os.unlink(self._path(CLEAN_SHUTDOWN))
            fsync_directory(self.directory)

    def _recover(self, point: _RecoveryPoint | None, epochs: list[EpochEntry] | None,
                 clean: bool) -> bool:
        """Rebuild the in-memory state; scan and repair everything after ``point``. Returns
        whether anything needs writing back."""
        changed = False
        if point is None:
            # No recovery point: nothing is known to be durable, validate every segment.
            first = 0
            trusted_end = self._segments[0].base_offset
            start_position = 0
            segment = self._segments[0]
            segment.start_empty_index()
            self._set_index_files_length(segment, 0, 0)
            epochs = []
            changed = True
        else:
            first = self._bases.index(point.segment)
            segment = self._segments[first]
            if segment.size < point.position:
                raise CorruptLogError(
                    f"{self.directory}: {segment_name(segment.base_offset)} is {segment.size} bytes "
                    f"but {point.position} bytes were flushed (offsets below {point.offset})"
                )
            trusted_end = point.offset
            start_position = point.position
            segment.next_offset = point.offset
            segment.size = point.position
            if not self._load_recovery_segment(segment, point, thorough=not clean):
                changed = True
            elif not clean:
                self._check_seam(segment, point)
            if epochs is None:
                log.warning("%s: leader-epoch-checkpoint missing or damaged; rebuilding it from "
                            "batch headers", self.directory)
                epochs = self._epochs_from_headers(first, point)
                changed = True
        kept = [e for e in epochs if e.start_offset < trusted_end]
        self._set_epochs(kept)
        if point is None or len(kept) != len(epochs):
            # The checkpoint file still lists epochs past what is trusted: a reopen must not read
            # them back (a power loss after an epoch change recorded its start, not its data).
            changed = True
            self._epochs_dirty = True

        expected = trusted_end
        # (segment index, position of the first bad byte, whether the whole segment goes)
        cut: tuple[int, int, bool] | None = None
        scanned = 0
        for index in range(first, len(self._segments)):
            segment = self._segments[index]
            segment.index_final_synced = False
            file_size = os.fstat(segment.fd).st_size
            if index > first:
                segment.size = 0
                segment.flushed_size = 0
                segment.index_final_synced = False
                segment.start_empty_index()
                self._set_index_files_length(segment, 0, 0)
                if segment.base_offset < expected:
                    log.warning("%s: segment %s starts at %d but the log before it ends at %d",
                                self.directory, segment_name(segment.base_offset),
                                segment.base_offset, expected)
                    cut = (index, 0, True)
                    break
                # A gap before this segment (a follower truncated into a compaction gap).
                self._segments[index - 1].next_offset = expected = segment.base_offset
            position = start_position if index == first else 0
            segment.flushed_size = position
            tail = (_scan_valid(segment.fd, position, file_size,
                                max(self.config.max_message_bytes, _SCAN_CHUNK))
                    if position < file_size else ())
            for batch_position, header in tail:
                # Offsets may jump forward: a follower of a compacted leader copies its gaps.
                if (header.base_offset < expected
                        or header.partition_leader_epoch < self.latest_epoch
                        or header.last_offset - segment.base_offset > _MAX_RELATIVE):
                    break
                segment.add_batch(batch_position, header.size, header.last_offset,
                                  header.max_timestamp, self.config.index_interval_bytes)
                if batch_position == 0:
                    segment.first_timestamp = header.max_timestamp
                if header.partition_leader_epoch > self.latest_epoch:
                    self._add_epoch(header.partition_leader_epoch, header.base_offset)
                expected = header.next_offset
                position = batch_position + header.size
            scanned += position - (start_position if index == first else 0)
            segment.size = position
            segment.next_offset = expected
            if position > segment.flushed_size:
                changed = True
            if position < file_size:
                cut = (index, position, False)
                break
            if index + 1 < len(self._segments):
                segment.maybe_add_time_entry()
        if scanned:
            log.info("%s: validated %d bytes after the recovery point", self.directory, scanned)

        if cut is not None:
            changed = True
            index, position, whole = cut
            segment = self._segments[index]
            lost = sum(os.fstat(s.fd).st_size for s in self._segments[index:]) - position
            log.warning("%s: truncating a torn or corrupt tail of %d bytes at offset %d "
                        "(segment %s, byte %d)", self.directory, lost, expected,
                        segment_name(segment.base_offset), position)
            drop_from = index if whole else index + 1
            if not whole:
                os.ftruncate(segment.fd, position)
                segment.size = position
                segment.flushed_size = min(segment.flushed_size, position)
            for dropped in self._segments[drop_from:]:
                os.close(dropped.fd)
                for suffix in (LOG_SUFFIX, INDEX_SUFFIX, TIME_INDEX_SUFFIX):
                    try:
                        os.unlink(self._path(segment_name(dropped.base_offset, suffix)))
                    except FileNotFoundError:
                        pass
            del self._segments[drop_from:]
            del self._bases[drop_from:]
            self._dir_dirty = True

        active = self._segments[-1]
        for segment in self._segments:
            segment.created_ms = self._clock()
        if active.first_timestamp is None and active.size > 0:
            header = os.pread(active.fd, BATCH_OVERHEAD, 0)
            (first_max,) = _INT64.unpack_from(header, MAX_TIMESTAMP_OFFSET)
            active.first_timestamp = first_max
        self._end_offset = active.next_offset
        self._total_bytes = sum(s.size for s in self._segments)
        self._flushed_offset = self._end_offset if not changed else trusted_end
        self._truncate_epochs_from_start(self._bases[0])  # after an interrupted retention
        self._truncate_epochs_from_end(self._end_offset)
        return changed or self._epochs_dirty

    def _load_recovery_segment(self, segment: _Segment, point: _RecoveryPoint, thorough: bool) -> bool:
        """Load the trusted part of the recovery-point segment's indexes; False if rebuilt.
        After a clean shutdown only the cheap bounds are checked (no pass over the entries)."""
        try:
            index_data = self._read_file(segment, INDEX_SUFFIX)
            time_data = self._read_file(segment, TIME_INDEX_SUFFIX)
        except FileNotFoundError:
            index_data = time_data = b""
        if (len(index_data) >= point.index_entries * OFFSET_INDEX_ENTRY
                and len(time_data) >= point.time_index_entries * TIME_INDEX_ENTRY):
            relative, positions = _decode_offset_entries(
                index_data[:point.index_entries * OFFSET_INDEX_ENTRY])
            timestamps, time_relative = _decode_time_entries(
                time_data[:point.time_index_entries * TIME_INDEX_ENTRY])
            segment.index_relative, segment.index_positions = relative, positions
            segment.time_timestamps, segment.time_relative = timestamps, time_relative
            segment.max_timestamp = point.max_timestamp
            segment.max_timestamp_offset = point.max_timestamp_offset
            segment.bytes_since_index = point.bytes_since_index
            if self._index_consistent(segment, point.position, point.offset, thorough=thorough):
                self._set_index_files_length(segment, len(relative), len(timestamps))
                return True
        log.warning("%s: index of %s shorter than its recovery point lists; rebuilding",
                    self.directory, segment_name(segment.base_offset))
        self._rebuild_index(segment, point.position)
        self._set_index_files_length(segment, 0, 0)
        return False

    def _check_seam(self, segment: _Segment, point: _RecoveryPoint) -> None:
        """After a crash, CRC-check the flushed batches from the last index entry up to the
        recovery point (at most about index_interval_bytes and one batch): they must end
        exactly there. Damage to flushed data is an error, never a tail to cut."""
        assert segment.index_positions is not None and segment.index_relative is not None
        start = segment.index_positions[-1] if segment.index_positions else 0
        if point.position - start > _SCAN_CHUNK:
            return  # a sparse index (huge index.interval.bytes): not worth reading at open
        expected = None
        if segment.index_relative:
            expected_last = segment.base_offset + segment.index_relative[-1]
        else:
            expected, expected_last = segment.base_offset, None
        position = start
        for batch_position, header in _scan_valid(segment.fd, start, point.position,
                                                  max(self.config.max_message_bytes, _SCAN_CHUNK)):
            if expected_last is not None:
                if header.last_offset != expected_last:
                    break
                expected_last = None
            elif header.base_offset < expected:
                break
            expected = header.next_offset
            position = batch_position + header.size
        # A truncation into a compaction gap leaves the log ending after its last batch.
        if position != point.position or expected is None or expected > point.offset:
            raise CorruptLogError(
                f"{self.directory}: flushed data of {segment_name(segment.base_offset)} is damaged "
                f"between bytes {start} and {point.position} (below the recovery point, offset "
                f"{point.offset}); the replica must re-fetch it")

    def _read_file(self, segment: _Segment, suffix: str) -> bytes:
        with open(self._path(segment_name(segment.base_offset, suffix)), "rb") as f:
            return f.read()

    def _set_index_files_length(self, segment: _Segment, entries: int, time_entries: int) -> None:
        """Cut (or create) the index files to what is in memory and known written."""
        for suffix, length in ((INDEX_SUFFIX, entries * OFFSET_INDEX_ENTRY),
                               (TIME_INDEX_SUFFIX, time_entries * TIME_INDEX_ENTRY)):
            fd = os.open(self._path(segment_name(segment.base_offset, suffix)),
                         os.O_WRONLY | os.O_CREAT, 0o644)
            try:
                if os.fstat(fd).st_size != length:
                    os.ftruncate(fd, length)
            finally:
                os.close(fd)
        segment.index_written = entries
        segment.time_written = time_entries

    @staticmethod
    def _index_consistent(segment: _Segment, size: int, next_offset: int, *,
                          thorough: bool = True) -> bool:
        relative, positions = segment.index_relative, segment.index_positions
        timestamps, time_relative = segment.time_timestamps, segment.time_relative
        assert relative is not None and positions is not None
        assert timestamps is not None and time_relative is not None
        span = next_offset - segment.base_offset
        if relative and (relative[-1] >= span or positions[-1] >= size):
            return False
        if time_relative and time_relative[-1] >= span:
            return False
        if not thorough:
            return True
        return (_strictly_increasing(relative) and _strictly_increasing(positions)
                and _strictly_increasing(timestamps) and _non_decreasing(time_relative))

    def _rebuild_index(self, segment: _Segment, end: int) -> None:
        """Rebuild a segment's index entries from its batch headers up to ``end`` (trusted)."""
        segment.start_empty_index()
        segment.max_timestamp = _NO_TIMESTAMP
        segment.max_timestamp_offset = segment.base_offset - 1
        segment.bytes_since_index = 0
        expected = segment.base_offset
        for batch in _walk_headers(segment.fd, 0, end):
            if batch.base_offset < expected:  # gaps are compaction's; going back is damage
                raise CorruptLogError(
                    f"{self.directory}: {segment_name(segment.base_offset)} has a batch at byte "
                    f"{batch.position} with offset {batch.base_offset}, expected {expected}"
                )
            segment.add_batch(batch.position, batch.size, batch.last_offset, batch.max_timestamp,
                              self.config.index_interval_bytes)
            expected = batch.last_offset + 1
        if expected > segment.next_offset:
            raise CorruptLogError(
                f"{self.directory}: {segment_name(segment.base_offset)} holds offsets up to "
                f"{expected - 1}, but the log expects it to end at {segment.next_offset - 1}"
            )

    def _epochs_from_headers(self, first: int, point: _RecoveryPoint) -> list[EpochEntry]:
        entries: list[EpochEntry] = []
        for index in range(first + 1):
            segment = self._segments[index]
            end = point.position if index == first else segment.size
            for batch in _walk_headers(segment.fd, 0, end):
                if not entries or batch.epoch > entries[-1].epoch:
                    entries.append(EpochEntry(batch.epoch, batch.base_offset))
        return entries

    def _ensure_loaded(self, segment: _Segment) -> None:
        """Load a segment's indexes on first use (segments before the recovery point)."""
        if segment.loaded:
            return
        # Under the state lock so a concurrent flush never sees a half-loaded segment; only
        # a flush can wait here, and loading happens once per segment.
        with self._state_lock:
            self._load_index(segment)

    def _load_index(self, segment: _Segment) -> None:
        try:
            index_data = self._read_file(segment, INDEX_SUFFIX)
            time_data = self._read_file(segment, TIME_INDEX_SUFFIX)
        except FileNotFoundError:
            index_data = time_data = b"?"  # forces the rebuild below
        if len(index_data) % OFFSET_INDEX_ENTRY == 0 and len(time_data) % TIME_INDEX_ENTRY == 0:
            segment.index_relative, segment.index_positions = _decode_offset_entries(index_data)
            segment.time_timestamps, segment.time_relative = _decode_time_entries(time_data)
            if self._index_consistent(segment, segment.size, segment.next_offset):
                segment.index_written = len(segment.index_relative)
                segment.time_written = len(segment.time_timestamps)
                if segment.time_timestamps:
                    segment.max_timestamp = segment.time_timestamps[-1]
                    segment.max_timestamp_offset = segment.base_offset + segment.time_relative[-1]
                return
        log.warning("%s: index files of %s are missing or damaged; rebuilding them",
                    self.directory, segment_name(segment.base_offset))
        self._rebuild_index(segment, segment.size)
        segment.maybe_add_time_entry()
        assert segment.index_relative is not None and segment.index_positions is not None
        assert segment.time_timestamps is not None and segment.time_relative is not None
        atomic_write(self.directory, segment_name(segment.base_offset, INDEX_SUFFIX),
                     _encode_offset_entries(segment.index_relative, segment.index_positions),
                     sync_directory=False)
        atomic_write(self.directory, segment_name(segment.base_offset, TIME_INDEX_SUFFIX),
                     _encode_time_entries(segment.time_timestamps, segment.time_relative))
        segment.index_written = len(segment.index_relative)
        segment.time_written = len(segment.time_timestamps)

    def _read_recovery_point(self) -> _RecoveryPoint | None:
        try:
            with open(self._path(RECOVERY_POINT), "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        try:
            return _RecoveryPoint.decode(data)
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("%s: unreadable %s (%s); validating every segment",
                        self.directory, RECOVERY_POINT, exc)
            return None

    def _read_epoch_checkpoint(self) -> list[EpochEntry] | None:
        try:
            with open(self._path(LEADER_EPOCH_CHECKPOINT), "rb") as f:
                text = f.read().decode("ascii")
        except FileNotFoundError:
            return None
        except UnicodeDecodeError:
            return None
        lines = text.splitlines()
        try:
            if len(lines) < 2 or lines[0].strip() != "0":
                raise ValueError("bad header")
            count = int(lines[1])
            if count != len(lines) - 2:
                raise ValueError("count does not match")
            entries = []
            for line in lines[2:]:
                epoch, start = line.split()
                entries.append(EpochEntry(int(epoch), int(start)))
            for a, b in itertools.pairwise(entries):
                if not (a.epoch < b.epoch and a.start_offset <= b.start_offset):
                    raise ValueError("entries out of order")
            return entries
        except ValueError as exc:
            log.warning("%s: unreadable %s (%s)", self.directory, LEADER_EPOCH_CHECKPOINT, exc)
            return None

    # --- state ---------------------------------------------------------------------------

    @property
    def end_offset(self) -> int:
        """The offset the next appended record gets (Kafka's log end offset)."""
        return self._end_offset

    @property
    def log_start_offset(self) -> int:
        return self._bases[0]

    @property
    def flushed_offset(self) -> int:
        """Every offset below this is durable (fdatasynced)."""
        return self._flushed_offset

    @property
    def size_bytes(self) -> int:
        return self._total_bytes

    @property
    def latest_epoch(self) -> int:
        """The epoch of the last epoch entry, -1 for a log without one."""
        return self._epochs[-1].epoch if self._epochs else -1

    @property
    def start_epoch(self) -> int:
        """The epoch of the last batch before `log_start_offset` (deleted by retention, or the
        one given to `reset_to`); 0 when nothing ever preceded the log start."""
        return self._start_epoch

    @property
    def epoch_entries(self) -> tuple[EpochEntry, ...]:
        return tuple(self._epochs)

    @property
    def segment_base_offsets(self) -> tuple[int, ...]:
        return tuple(self._bases)

    def __repr__(self) -> str:
        return (f"PartitionLog({str(self.directory)!r}, start={self.log_start_offset}, "
                f"end={self._end_offset}, flushed={self._flushed_offset}, "
                f"segments={len(self._segments)})")

    def __enter__(self) -> PartitionLog:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _check_usable(self) -> None:
        if self._closed:
            raise LogClosedError(f"{self.directory}: log is closed")
        if self._failure is not None:
            raise LogClosedError(f"{self.directory}: an earlier write failed: {self._failure}")

    # --- appending -----------------------------------------------------------------------

    def append(self, batches: bytes | bytearray | memoryview, epoch: int, *,
               checked_headers: list[BatchHeader] | None = None) -> AppendResult:
        """Append producer batches as the leader of ``epoch``: check them (CRC and all, via
        the codec; CorruptRecordError propagates and nothing is written), give them the next
        offsets and the epoch, and write them with one syscall. ``checked_headers`` are the
        codec's `scan_batches` of exactly these (immutable) bytes, CRCs checked, when the
        caller already has them: they are not scanned again."""
        self._check_usable()
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        headers = checked_headers if checked_headers is not None else scan_batches(batches)
        if not headers:
            raise InvalidAppendError("nothing to append: no batches")
        if epoch < self.latest_epoch:
            raise InvalidAppendError(
                f"epoch {epoch} is older than the log's latest epoch {self.latest_epoch}")
        limit = self.config.max_message_bytes
        for header in headers:
            if header.size > limit:
                raise RecordTooLargeError(
                    f"batch of {header.size} bytes exceeds max_message_bytes {limit}")
        base_offset = self._end_offset
        if len(headers) * 2 <= _IOV_MAX:
            # Stamp only the 16 header bytes that change and gather them with the caller's
            # bytes in one writev: copying a 1 MiB buffer costs as much as the checks.
            view = memoryview(batches).cast("B")
            pieces: list[bytes | bytearray | memoryview] = []
            offset = base_offset
            for header in headers:
                pieces.append(_STAMP.pack(offset, header.size - LOG_OVERHEAD, epoch))
                pieces.append(view[header.position + _STAMP.size:header.position + header.size])
                offset += header.last_offset_delta + 1
        else:
            stamped = bytearray(batches)
            stamp_batches(stamped, base_offset, epoch)
            pieces = [stamped]
        lasts = []
        offset = base_offset
        for header in headers:
            offset += header.last_offset_delta + 1
            lasts.append(offset - 1)
        return self._write(pieces, headers, base_offset, lasts, [epoch] * len(headers))

    def append_replicated(self, batches: bytes | bytearray | memoryview) -> AppendResult:
        """Append batches a leader already stamped (a follower's path): their offsets must
        start at or after `end_offset` and increase, and their epochs must not decrease nor be
        older than the log's. Offsets may skip forward, as Kafka followers allow: a compacted
        leader has gaps where its cleaner removed records, and its followers copy them."""
        self._check_usable()
        headers = scan_batches(batches)
        if not headers:
            raise InvalidAppendError("nothing to append: no batches")
        expected = self._end_offset
        latest = self.latest_epoch
        for header in headers:
            if header.base_offset < expected:
                raise InvalidAppendError(
                    f"replicated batch at offset {header.base_offset}, expected at least "
                    f"{expected} (the log ends at {self._end_offset})")
            if header.partition_leader_epoch < latest:
                raise InvalidAppendError(
                    f"replicated batch at offset {header.base_offset} has epoch "
                    f"{header.partition_leader_epoch}, older than {latest}")
            latest = header.partition_leader_epoch
            expected = header.next_offset
        return self._write([batches], headers, headers[0].base_offset,
                           [h.last_offset for h in headers],
                           [h.partition_leader_epoch for h in headers])

    def _write(self, pieces: list[bytes | bytearray | memoryview], headers: list[BatchHeader], base_offset: int,
               lasts: list[int], epochs: list[int]) -> AppendResult:
        total = sum(h.size for h in headers)
        last_offset = lasts[-1]
        segment = self._segments[-1]
        if segment.size > 0 and (
                segment.size + total > self.config.segment_bytes
                or last_offset - segment.base_offset > _MAX_RELATIVE
                or self._waited_for_roll(segment, headers) > self.config.segment_ms):
            segment = self._roll()
        position = segment.size
        try:
            written = os.writev(segment.fd, pieces) if len(pieces) > 1 else os.write(segment.fd, pieces[0])
            if written != total:
                raise OSError(errno.EIO, f"short write: {written} of {total} bytes")
        except OSError as exc:
            try:
                os.ftruncate(segment.fd, position)
            except OSError:
                self._failure = exc  # the file's tail is unknown: refuse further writes
            raise
        max_timestamp = _NO_TIMESTAMP
        interval = self.config.index_interval_bytes
        with self._state_lock:
            if segment.first_timestamp is None:
                segment.first_timestamp = headers[0].max_timestamp
            batch_position = position
            for header, last, epoch in zip(headers, lasts, epochs):
                if epoch > self.latest_epoch:
                    self._add_epoch(epoch, last - header.last_offset_delta)
                segment.add_batch(batch_position, header.size, last, header.max_timestamp, interval)
                max_timestamp = max(max_timestamp, header.max_timestamp)
                batch_position += header.size
            segment.size = batch_position
            segment.next_offset = last_offset + 1
            self._total_bytes += total
            self._appended_bytes += total
            self._end_offset = last_offset + 1
        return AppendResult(base_offset, last_offset, max_timestamp, total)

    def _waited_for_roll(self, segment: _Segment, headers: list[BatchHeader]) -> int:
        """Kafka's LogSegment.timeWaitedForRoll: how old the active segment is for segment.ms."""
        if segment.first_timestamp is not None and segment.first_timestamp >= 0:
            return max(h.max_timestamp for h in headers) - segment.first_timestamp
        return self._clock() - segment.created_ms

    def _create_segment(self, base: int) -> _Segment:
        """A new, empty segment's three files (the directory still needs an fsync)."""
        fd = self._open_segment_fd(base, create=True)
        segment = _Segment(base, fd, 0)
        segment.next_offset = base
        segment.created_ms = self._clock()
        segment.start_empty_index()
        try:
            for suffix in (INDEX_SUFFIX, TIME_INDEX_SUFFIX):
                os.close(os.open(self._path(segment_name(base, suffix)),
                                 os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644))
        except OSError:
            os.close(fd)
            raise
        return segment

    def _roll(self) -> _Segment:
        """Start a new active segment at the end offset (owner thread)."""
        base = self._end_offset
        segment = self._create_segment(base)
        with self._state_lock:
            previous = self._segments[-1]
            previous.maybe_add_time_entry()  # the last time entry of a rolled segment is its max
            previous.read_hint = None
            self._segments.append(segment)
            self._bases.append(base)
            self._dir_dirty = True
        return segment

    def _add_epoch(self, epoch: int, start_offset: int) -> None:
        self._epochs.append(EpochEntry(epoch, start_offset))
        self._epoch_numbers.append(epoch)
        self._epoch_starts.append(start_offset)
        self._epochs_dirty = True

    def _set_epochs(self, entries: list[EpochEntry]) -> None:
        self._epochs = list(entries)
        self._epoch_numbers = [e.epoch for e in entries]
        self._epoch_starts = [e.start_offset for e in entries]

    def _truncate_epochs_from_end(self, end_offset: int) -> None:
        keep = bisect.bisect_left(self._epoch_starts, end_offset)
        if keep < len(self._epochs):
            self._set_epochs(self._epochs[:keep])
            self._epochs_dirty = True

    def _truncate_epochs_from_start(self, start_offset: int) -> None:
        # Kafka's truncateFromStart: the epoch in force at the new start now begins there.
        below = bisect.bisect_right(self._epoch_starts, start_offset)
        if below == 0 or (below == 1 and self._epochs[0].start_offset == start_offset):
            return
        kept = [EpochEntry(self._epochs[below - 1].epoch, start_offset)] + self._epochs[below:]
        self._set_epochs(kept)
        self._epochs_dirty = True

    # --- reading -------------------------------------------------------------------------

    def read(self, offset: int, max_bytes: int) -> bytes:
        """Whole batches from the one containing ``offset``, up to ``max_bytes`` but at least
        one batch, all from one segment. Empty at `end_offset`; OffsetOutOfRangeError outside
        [log_start_offset, end_offset]."""
        self._check_usable()
        if offset == self._end_offset and offset >= self._bases[0]:
            return b""
        index = self._segment_index_for(offset)
        segment = self._segments[index]
        start = self._position_of(segment, offset)
        while start >= segment.size:
            # The offset is in a gap compaction left at the end of this segment: the next
            # surviving batch is in a later segment.
            index += 1
            if index == len(self._segments):
                return b""
            segment = self._segments[index]
            start = self._position_of(segment, segment.base_offset)
        size = segment.size
        limit = start + max(max_bytes, 0)
        next_offset = segment.next_offset
        if limit >= size:
            end = size
        else:
            end, next_offset = self._boundary_before(segment, start, limit)
        segment.read_hint = (next_offset, end)
        return os.pread(segment.fd, end - start, start)

    def _segment_index_for(self, offset: int) -> int:
        if not self._bases[0] <= offset < self._end_offset:
            raise OffsetOutOfRangeError(offset, self._bases[0], self._end_offset)
        return bisect.bisect_right(self._bases, offset) - 1

    def _position_of(self, segment: _Segment, offset: int) -> int:
        """Byte position of the batch containing ``offset`` in ``segment`` or, when compaction
        removed that offset, of the first batch after it; the segment's size when no batch of
        the segment ends at or after ``offset``."""
        hint = segment.read_hint
        if hint is not None and hint[0] == offset:
            return hint[1]
        self._ensure_loaded(segment)
        assert segment.index_relative is not None and segment.index_positions is not None
        entry = bisect.bisect_right(segment.index_relative, offset - segment.base_offset) - 1
        start = segment.index_positions[entry] if entry >= 0 else 0
        for batch in _walk_headers(segment.fd, start, segment.size):
            if batch.last_offset >= offset:
                return batch.position
        return segment.size

    def _boundary_before(self, segment: _Segment, start: int, limit: int) -> tuple[int, int]:
        """(end position, next offset) of the last whole batch ending at or before ``limit``
        (at least the batch at ``start``)."""
        self._ensure_loaded(segment)
        assert segment.index_positions is not None
        entry = bisect.bisect_right(segment.index_positions, limit) - 1
        walk_from = start
        if entry >= 0 and segment.index_positions[entry] > start:
            walk_from = segment.index_positions[entry]
        end, next_offset = walk_from, -1
        for batch in _walk_headers(segment.fd, walk_from, segment.size):
            if next_offset < 0:
                next_offset = batch.base_offset  # the offset at walk_from
            if batch.position + batch.size > limit and end > start:
                break
            end, next_offset = batch.position + batch.size, batch.last_offset + 1
            if end >= limit:
                break
        return end, next_offset

    def offset_for_timestamp(self, timestamp: int) -> TimestampOffset | None:
        """The first batch (by offset) whose maxTimestamp is >= ``timestamp``: its base offset
        and maxTimestamp, or None if there is none. Clients find the exact record in it."""
        self._check_usable()
        for segment in self._segments:
            self._ensure_loaded(segment)
            if segment.max_timestamp < timestamp or segment.size == 0:
                continue
            assert segment.time_timestamps is not None and segment.time_relative is not None
            # Entries with T < timestamp prove no batch up to their offset qualifies.
            entry = bisect.bisect_left(segment.time_timestamps, timestamp) - 1
            start_offset = segment.base_offset
            if entry >= 0:
                start_offset = segment.base_offset + segment.time_relative[entry] + 1
            if start_offset >= segment.next_offset:
                continue
            position = self._position_of(segment, start_offset)
            for batch in _walk_headers(segment.fd, position, segment.size):
                if batch.max_timestamp >= timestamp:
                    return TimestampOffset(batch.base_offset, batch.max_timestamp)
        return None

    def verify(self) -> None:
        """Read the whole log and check every batch's CRC and offsets, including the part
        before the recovery point that opening trusts without reading. Raises CorruptLogError
        at the first bad batch. Slow (reads everything); for operators and for a replica that
        suspects its disk."""
        self._check_usable()
        max_batch = max(self.config.max_message_bytes, _SCAN_CHUNK)
        expected = self._bases[0]
        for segment in list(self._segments):
            size, position = segment.size, 0
            for batch_position, header in _scan_valid(segment.fd, 0, size, max_batch):
                if header.base_offset < expected:
                    raise CorruptLogError(
                        f"{self.directory}: {segment_name(segment.base_offset)} byte "
                        f"{batch_position}: batch at offset {header.base_offset}, expected at "
                        f"least {expected}")
                expected = header.next_offset
                position = batch_position + header.size
            if position < size:
                reason = "not a whole batch"
                try:
                    scan_batches(os.pread(segment.fd, min(size - position, max_batch), position))
                except CorruptRecordError as exc:
                    reason = exc.reason
                raise CorruptLogError(
                    f"{self.directory}: {segment_name(segment.base_offset)} byte {position} "
                    f"(offset {expected}): {reason}")
        if expected > self._end_offset:
            raise CorruptLogError(f"{self.directory}: batches end at {expected}, "
                                  f"the log at {self._end_offset}")

    # --- leader epochs (KIP-101 / KIP-595) ------------------------------------------------

    def epoch_for(self, offset: int) -> int | None:
        """The leader epoch of the batch holding ``offset``; None outside the log."""
        if not self._bases[0] <= offset < self._end_offset:
            return None
        entry = bisect.bisect_right(self._epoch_starts, offset) - 1
        return self._epochs[entry].epoch if entry >= 0 else None

    def end_offset_for_epoch(self, epoch: int) -> tuple[int, int]:
        """(largest epoch <= ``epoch``, the offset where the epoch after it starts — or the end
        offset when there is none). A requested epoch below every known one answers
        (``epoch``, start of the first known epoch), as Kafka does; (-1, -1) when the log has
        no epochs or ``epoch`` < 0. Unlike Kafka, an epoch above the latest answers
        (latest, end_offset) instead of undefined."""
        if epoch < 0 or not self._epochs:
            return (-1, -1)
        higher = bisect.bisect_right(self._epoch_numbers, epoch)
        if higher == len(self._epochs):
            return (self._epochs[-1].epoch, self._end_offset)
        if higher == 0:
            return (epoch, self._epochs[0].start_offset)
        return (self._epochs[higher - 1].epoch, self._epochs[higher].start_offset)

    # --- durability ----------------------------------------------------------------------

    def flush(self) -> int:
        """fdatasync everything appended so far; returns `flushed_offset`. Safe to call from
        one worker thread while the owner thread appends (see the module docstring)."""
        with self._flush_lock:
            if self._closed:
                return self._flushed_offset
            self._check_usable()
            return self._flush_locked(force_checkpoint=False)

    def _flush_locked(self, force_checkpoint: bool) -> int:
        checkpoint = self._checkpoint
        with self._state_lock:
            target = self._end_offset
            active = self._segments[-1]
            appended = self._appended_bytes
            due = (force_checkpoint or checkpoint is None or checkpoint.segment != active.base_offset
                   or appended - self._checkpoint_mark >= self.config.recovery_point_interval_bytes)
            to_sync = [(s, s.size) for s in self._segments if s.flushed_size < s.size]
            index_work = []
            for s in self._segments:
                if not s.loaded or (s is active and not due):
                    # The active segment's entries past the recovery point are rebuilt by the
                    # scan at open anyway (it cuts the files back to the point's counts), so
                    # they are written with the next recovery point, not on every flush: a
                    # flush is then the data fdatasync and nothing else, and its thread needs
                    # the GIL once instead of once per index syscall.
                    continue
                assert s.index_relative is not None and s.time_timestamps is not None
                entries, time_entries = len(s.index_relative), len(s.time_timestamps)
                if entries > s.index_written or time_entries > s.time_written or (
                        s is not active and not s.index_final_synced):
                    index_work.append((s, entries, time_entries))
            epochs = list(self._epochs) if self._epochs_dirty else None
            self._epochs_dirty = False
            dir_dirty, self._dir_dirty = self._dir_dirty, False
            assert active.index_relative is not None and active.time_timestamps is not None
            point = _RecoveryPoint(
                offset=target, segment=active.base_offset, position=active.size,
                index_entries=len(active.index_relative),
                time_index_entries=len(active.time_timestamps),
                max_timestamp=active.max_timestamp,
                max_timestamp_offset=active.max_timestamp_offset,
                bytes_since_index=active.bytes_since_index,
                log_start=self._bases[0], start_epoch=self._start_epoch)
        if (not to_sync and not index_work and epochs is None and not dir_dirty
                and (checkpoint == point or not due)):
            return self._flushed_offset
        try:
            if epochs is not None:
                # Before the data: durable batches must never carry an epoch the file lacks.
                self._write_epoch_checkpoint(epochs)
            for segment, _ in to_sync:
                os.fdatasync(segment.fd)
            if dir_dirty:
                fsync_directory(self.directory)
        except BaseException:
            with self._state_lock:
                self._epochs_dirty = self._epochs_dirty or epochs is not None
                self._dir_dirty = self._dir_dirty or dir_dirty
            raise
        with self._state_lock:
            for segment, size in to_sync:
                segment.flushed_size = max(segment.flushed_size, size)
            self._flushed_offset = max(self._flushed_offset, target)
        for segment, entries, time_entries in index_work:
            self._write_index_entries(segment, entries, time_entries,
                                      sync=due or segment is not active)
            if segment is not active:
                segment.index_final_synced = True
        if due and checkpoint != point:
            atomic_write(self.directory, RECOVERY_POINT, point.encode())
            self._checkpoint = point
            self._checkpoint_mark = appended
        return self._flushed_offset

    def _write_index_entries(self, segment: _Segment, entries: int, time_entries: int,
                             sync: bool) -> None:
        """Append index entries [written, entries) to the files (flush lock held)."""
        relative, positions = segment.index_relative, segment.index_positions
        timestamps, time_relative = segment.time_timestamps, segment.time_relative
        assert relative is not None and positions is not None
        assert timestamps is not None and time_relative is not None
        # Slices are taken without the state lock: entries below the snapshot counts never
        # change while the flush lock is held, and an array slice is one C call under the GIL.
        jobs = (
            (INDEX_SUFFIX, OFFSET_INDEX_ENTRY, segment.index_written, entries,
             lambda a, b: _encode_offset_entries(relative[a:b], positions[a:b])),
            (TIME_INDEX_SUFFIX, TIME_INDEX_ENTRY, segment.time_written, time_entries,
             lambda a, b: _encode_time_entries(timestamps[a:b], time_relative[a:b])),
        )
        for suffix, entry_size, written, wanted, encode in jobs:
            if written >= wanted and not sync:
                continue
            fd = os.open(self._path(segment_name(segment.base_offset, suffix)),
                         os.O_WRONLY | os.O_CREAT, 0o644)
            try:
                if wanted > written:
                    data = encode(written, wanted)
                    view = memoryview(data)
                    position = written * entry_size
                    while len(view):
                        count = os.pwrite(fd, view, position)
                        view, position = view[count:], position + count
                if sync:
                    os.fsync(fd)
            finally:
                os.close(fd)
        segment.index_written = max(segment.index_written, entries)
        segment.time_written = max(segment.time_written, time_entries)

    def _write_epoch_checkpoint(self, entries: list[EpochEntry]) -> None:
        lines = ["0", str(len(entries))] + [f"{e.epoch} {e.start_offset}" for e in entries]
        atomic_write(self.directory, LEADER_EPOCH_CHECKPOINT, ("\n".join(lines) + "\n").encode())

    # --- truncation and retention --------------------------------------------------------

    def truncate_to(self, offset: int) -> int:
        """Remove every batch at or after ``offset``; a batch containing ``offset`` goes
        whole (Kafka's semantics), so the new end offset is ``offset`` or that batch's base.
        No-op at or beyond the end. Durable when it returns. Returns the new end offset."""
        self._check_usable()
        if offset >= self._end_offset:
            return self._end_offset
        if offset < self._bases[0]:
            raise OffsetOutOfRangeError(offset, self._bases[0], self._end_offset)
        with self._flush_lock:
            self._flush_locked(force_checkpoint=True)
            index = bisect.bisect_right(self._bases, offset) - 1
            if offset == self._bases[index] and index > 0:
                index -= 1  # drop the segment starting at offset, keep the one before whole
                keep = self._segments[index]
                position, new_end = keep.size, keep.next_offset
            else:
                keep = self._segments[index]
                position = self._position_of(keep, offset)
                new_end = offset  # an offset in a compaction gap: everything from it goes
                if position < keep.size:
                    header = os.pread(keep.fd, LOG_OVERHEAD, position)
                    new_end = min(new_end, _INT64.unpack_from(header, 0)[0])
            self._ensure_loaded(keep)
            assert keep.index_relative is not None and keep.index_positions is not None
            assert keep.time_timestamps is not None and keep.time_relative is not None
            span = new_end - keep.base_offset
            entries = bisect.bisect_left(keep.index_relative, span)
            time_entries = bisect.bisect_left(keep.time_relative, span)
            # The kept segment's largest timestamp: its last kept time entry, or a batch after
            # the last kept offset entry (those are not covered by a time entry yet).
            max_timestamp, max_offset = _NO_TIMESTAMP, keep.base_offset - 1
            if time_entries:
                max_timestamp = keep.time_timestamps[time_entries - 1]
                max_offset = keep.base_offset + keep.time_relative[time_entries - 1]
            walk_from = keep.index_positions[entries - 1] if entries else 0
            for batch in _walk_headers(keep.fd, walk_from, position):
                if batch.max_timestamp > max_timestamp:
                    max_timestamp, max_offset = batch.max_timestamp, batch.last_offset
            point = _RecoveryPoint(
                offset=new_end, segment=keep.base_offset, position=position,
                index_entries=entries, time_index_entries=time_entries,
                max_timestamp=max_timestamp, max_timestamp_offset=max_offset,
                bytes_since_index=position - walk_from,
                log_start=self._bases[0], start_epoch=self._start_epoch)
            # Lower the recovery point first: a crash before the files shrink then rescans
            # the old tail instead of trusting a file that is about to change.
            atomic_write(self.directory, RECOVERY_POINT, point.encode())
            self._checkpoint = point
            dropped = self._segments[index + 1:]
            with self._state_lock:
                del self._segments[index + 1:]
                del self._bases[index + 1:]
                keep.read_hint = None
                del keep.index_relative[entries:]
                del keep.index_positions[entries:]
                del keep.time_timestamps[time_entries:]
                del keep.time_relative[time_entries:]
                keep.max_timestamp, keep.max_timestamp_offset = max_timestamp, max_offset
                keep.bytes_since_index = point.bytes_since_index
                keep.size = keep.flushed_size = position
                keep.next_offset = new_end
                keep.index_final_synced = False
                if position == 0:
                    keep.first_timestamp = None
                    keep.created_ms = self._clock()
                self._end_offset = new_end
                self._flushed_offset = new_end
                self._total_bytes = sum(s.size for s in self._segments)
                self._truncate_epochs_from_end(new_end)
                epochs = list(self._epochs)
                self._epochs_dirty = False
            os.ftruncate(keep.fd, position)
            os.fdatasync(keep.fd)
            self._set_index_files_length(keep, min(entries, keep.index_written),
                                         min(time_entries, keep.time_written))
            self._write_index_entries(keep, entries, time_entries, sync=True)
            for segment in dropped:
                self._delete_segment_files(segment)
            fsync_directory(self.directory)
            self._write_epoch_checkpoint(epochs)
            self._checkpoint_mark = self._appended_bytes
            return new_end

    def reset_to(self, start_offset: int, start_epoch: int = 0) -> None:
        """Drop the whole log and continue as an empty log at ``start_offset`` whose prefix
        ended in ``start_epoch`` (Kafka's truncateFullyAndStartAt): for a follower whose leader
        no longer has, or never had, the offsets that would place its log. Durable when it
        returns; a crash part-way through leaves either the old log or the reset one (the next
        open finishes the reset)."""
        self._check_usable()
        if start_offset < 0:
            raise ValueError(f"start offset must be >= 0, got {start_offset}")
        with self._flush_lock:
            marker = _RecoveryPoint(
                offset=start_offset, segment=start_offset, position=0, index_entries=0,
                time_index_entries=0, max_timestamp=_NO_TIMESTAMP,
                max_timestamp_offset=start_offset - 1, bytes_since_index=0,
                log_start=start_offset, start_epoch=start_epoch, reset=1)
            # The marker commits the reset: from here on an open finishes it.
            atomic_write(self.directory, RECOVERY_POINT, marker.encode())
            for segment in self._segments:
                self._delete_segment_files(segment)
            fresh = self._create_segment(start_offset)
            fsync_directory(self.directory)
            with self._state_lock:
                self._segments, self._bases = [fresh], [start_offset]
                self._end_offset = self._flushed_offset = start_offset
                self._total_bytes = 0
                self._set_epochs([])
                self._epochs_dirty = False
                self._start_epoch = start_epoch
            self._write_epoch_checkpoint([])
            point = dataclasses.replace(marker, reset=0)
            atomic_write(self.directory, RECOVERY_POINT, point.encode())
            self._checkpoint = point
            self._checkpoint_mark = self._appended_bytes
        log.info("%s: log reset to start at offset %d", self.directory, start_offset)

    def _delete_segment_files(self, segment: _Segment) -> None:
        os.close(segment.fd)
        segment.fd = -1
        for suffix in (LOG_SUFFIX, INDEX_SUFFIX, TIME_INDEX_SUFFIX):
            try:
                os.unlink(self._path(segment_name(segment.base_offset, suffix)))
            except FileNotFoundError:
                pass

    def enforce_retention(self, now_ms: int | None = None, *, max_offset: int | None = None) -> int:
        """Delete the oldest whole segments that retention.ms or retention.bytes allow, never
        the active one, never one holding offsets at or above ``max_offset`` (pass the high
        watermark), and only segments already made durable by a flush. Advances
        `log_start_offset`; returns how many segments were deleted."""
        self._check_usable()
        now = self._clock() if now_ms is None else now_ms
        config = self.config
        checkpoint = self._checkpoint
        if checkpoint is None:
            return 0
        total = self._total_bytes
        doomed: list[_Segment] = []
        for segment in self._segments[:-1]:
            if segment.base_offset >= checkpoint.segment:
                break
            if max_offset is not None and segment.next_offset > max_offset:
                break
            by_bytes = config.retention_bytes >= 0 and total - segment.size >= config.retention_bytes
            by_time = False
            if config.retention_ms >= 0 and not by_bytes:
                self._ensure_loaded(segment)
                by_time = segment.max_timestamp < now - config.retention_ms
            if not (by_bytes or by_time):
                break
            doomed.append(segment)
            total -= segment.size
        if not doomed:
            return 0
        new_start = doomed[-1].next_offset
        start_epoch = self.epoch_for(new_start - 1)
        if start_epoch is None:
            start_epoch = self._start_epoch
        with self._flush_lock:
            # The recovery point commits the new log start (and the epoch before it) before any
            # file goes: an open after a crash part-way deletes the rest.
            point = dataclasses.replace(checkpoint, log_start=new_start, start_epoch=start_epoch)
            atomic_write(self.directory, RECOVERY_POINT, point.encode())
            self._checkpoint = point
            with self._state_lock:
                self._start_epoch = start_epoch
                del self._segments[:len(doomed)]
                del self._bases[:len(doomed)]
                self._total_bytes = sum(s.size for s in self._segments)
                self._truncate_epochs_from_start(self._bases[0])
                # An emptied log keeps no epoch entry (as after a reopen, which drops entries
                # starting at the end offset, like Kafka's truncateFromEnd on load).
                self._truncate_epochs_from_end(self._end_offset)
                epochs = list(self._epochs)
                self._epochs_dirty = False
            for segment in doomed:
                self._delete_segment_files(segment)
            fsync_directory(self.directory)
            self._write_epoch_checkpoint(epochs)
        log.info("%s: retention deleted %d segment(s); log starts at %d",
                 self.directory, len(doomed), self._bases[0])
        return len(doomed)

    # --- compaction support (the cleaner itself is tidelog.node.compaction) ---------------

    def cleanable_segments(self, max_offset: int) -> list[CleanableSegment]:
        """The oldest segments compaction may rewrite: never the active one, never one holding
        offsets at or above ``max_offset`` (pass the high watermark), and only segments before
        the recovery point's, which are durable and never rescanned at open (owner thread)."""
        self._check_usable()
        checkpoint = self._checkpoint
        if checkpoint is None:
            return []
        found: list[CleanableSegment] = []
        for segment in self._segments[:-1]:
            if segment.base_offset >= checkpoint.segment or segment.next_offset > max_offset:
                break
            found.append(CleanableSegment(segment.base_offset, segment.next_offset, segment.size,
                                          self._path(segment_name(segment.base_offset))))
        return found

    def swap_cleaned(self, cleaned: CleanedSegment,
                     stop_at: Callable[[SwapStep], None] | None = None) -> bool:
        """Replace the segments ``cleaned`` was made from with it (owner thread). Returns False,
        discarding the cleaned files, when those segments are no longer all there unchanged
        (retention or a reset got to them first).

        A crash at any point leaves the old segments or the new one: the rename of the log
        file to ``.swap`` commits, and an open finishes a committed swap (`_finish_swaps`).
        ``stop_at`` is called at each `SwapStep` (tests raise from it to simulate a crash)."""
        self._check_usable()
        step = stop_at or (lambda _: None)
        base = cleaned.base_offset
        with self._flush_lock:
            count = len(cleaned.replaces)
            first = bisect.bisect_left(self._bases, base)
            current = self._segments[first:first + count]
            checkpoint = self._checkpoint
            if (len(current) != count or first + count >= len(self._segments)
                    or checkpoint is None or cleaned.next_offset > checkpoint.segment
                    or any((s.base_offset, s.next_offset, s.size)
                           != (r.base_offset, r.next_offset, r.size)
                           for s, r in zip(current, cleaned.replaces))):
                discard_cleaned(self.directory, base)
                return False
            step(SwapStep.CHECKED)
            for suffix in (INDEX_SUFFIX, TIME_INDEX_SUFFIX, LOG_SUFFIX):
                if suffix == LOG_SUFFIX:
                    step(SwapStep.INDEX_SWAP)
                name = segment_name(base, suffix)
                os.replace(self._path(name + CLEANED_SUFFIX), self._path(name + SWAP_SUFFIX))
            fsync_directory(self.directory)
            step(SwapStep.COMMITTED)
            fd = os.open(self._path(segment_name(base) + SWAP_SUFFIX), os.O_RDWR | os.O_APPEND)
            fresh = _Segment(base, fd, cleaned.size)
            fresh.next_offset = cleaned.next_offset
            fresh.created_ms = self._clock()
            fresh.index_relative, fresh.index_positions = cleaned.index_relative, cleaned.index_positions
            fresh.time_timestamps, fresh.time_relative = cleaned.time_timestamps, cleaned.time_relative
            fresh.index_written = len(cleaned.index_relative)
            fresh.time_written = len(cleaned.time_timestamps)
            fresh.index_final_synced = True
            fresh.max_timestamp = cleaned.max_timestamp
            fresh.max_timestamp_offset = cleaned.max_timestamp_offset
            fresh.bytes_since_index = cleaned.bytes_since_index
            with self._state_lock:
                self._segments[first:first + count] = [fresh]
                self._bases[first:first + count] = [base]
                self._total_bytes = sum(s.size for s in self._segments)
            for old in current:
                os.close(old.fd)
                old.fd = -1
            for old in current[1:]:
                for suffix in (LOG_SUFFIX, INDEX_SUFFIX, TIME_INDEX_SUFFIX):
                    try:
                        os.unlink(self._path(segment_name(old.base_offset, suffix)))
                    except FileNotFoundError:
                        pass
            step(SwapStep.OLD_DELETED)
            for suffix in (INDEX_SUFFIX, TIME_INDEX_SUFFIX):
                name = segment_name(base, suffix)
                os.replace(self._path(name + SWAP_SUFFIX), self._path(name))
            # Durable before the log file's rename: the old segments' deletion (or they would
            # come back beside the new one) and the new index (or an open would pair the new
            # log file with the old index; a left-over .swap index then means nothing).
            fsync_directory(self.directory)
            step(SwapStep.INDEX_FINAL)
            name = segment_name(base)
            os.replace(self._path(name + SWAP_SUFFIX), self._path(name))
            fsync_directory(self.directory)
        return True

    def _finish_swaps(self) -> None:
        """At open: drop uncommitted compaction output and finish committed swaps."""
        names = os.listdir(self.directory)
        for name in names:
            if name[:20].isdigit() and (name.endswith(CLEANED_SUFFIX) or (
                    name.endswith(SWAP_SUFFIX) and not name.endswith(LOG_SUFFIX + SWAP_SUFFIX)
                    and segment_name(int(name[:20])) + SWAP_SUFFIX not in names)):
                log.warning("%s: discarding unfinished compaction output %s", self.directory, name)
                os.unlink(self._path(name))
        for name in sorted(names):
            if not (name[:20].isdigit() and name == segment_name(int(name[:20])) + SWAP_SUFFIX):
                continue
            base = int(name[:20])
            fd = os.open(self._path(name), os.O_RDONLY)
            try:
                next_offset = base
                for batch in _walk_headers(fd, 0, os.fstat(fd).st_size):
                    next_offset = batch.last_offset + 1
            finally:
                os.close(fd)
            log.warning("%s: finishing an interrupted compaction swap of offsets [%d, %d)",
                        self.directory, base, next_offset)
            for other in names:
                if (other[:20].isdigit() and base < int(other[:20]) < next_offset
                        and other in {segment_name(int(other[:20]), s)
                                      for s in (LOG_SUFFIX, INDEX_SUFFIX, TIME_INDEX_SUFFIX)}):
                    os.unlink(self._path(other))
            for suffix in (INDEX_SUFFIX, TIME_INDEX_SUFFIX):
                final = self._path(segment_name(base, suffix))
                if os.path.exists(final + SWAP_SUFFIX):
                    os.replace(final + SWAP_SUFFIX, final)
                elif os.path.exists(final):
                    # Already renamed, most likely; a rebuild on first use costs one header walk.
                    os.unlink(final)
            os.replace(self._path(name), self._path(segment_name(base)))
        fsync_directory(self.directory)

    # --- closing -------------------------------------------------------------------------

    def close(self) -> None:
        """Flush everything, write the recovery point and the clean-shutdown marker, and
        release the files. A reopen then trusts the files without scanning."""
        with self._flush_lock:
            if self._closed:
                return
            try:
                if self._failure is None:
                    self._flush_locked(force_checkpoint=True)
                    body = json.dumps({"end_offset": self._end_offset}) + "\n"
                    atomic_write(self.directory, CLEAN_SHUTDOWN, body.encode())
            finally:
                self._closed = True
                self._close_files()

    def delete(self) -> None:
        """Close without flushing and remove the partition directory with everything in it."""
        with self._flush_lock:
            self._closed = True
            self._close_files()
            shutil.rmtree(self.directory, ignore_errors=True)

    def _close_files(self) -> None:
        for segment in self._segments:
            if segment.fd >= 0:
                try:
                    os.close(segment.fd)
                except OSError:
                    pass
                segment.fd = -1


def discard_cleaned(directory: str | os.PathLike[str], base_offset: int) -> None:
    """Remove the ``.cleaned`` files of an abandoned compaction of the segment at ``base_offset``."""
    for suffix in (LOG_SUFFIX, INDEX_SUFFIX, TIME_INDEX_SUFFIX):
        try:
            os.unlink(os.path.join(directory, segment_name(base_offset, suffix) + CLEANED_SUFFIX))
        except FileNotFoundError:
            pass


def write_cleaned_segment(directory: str | os.PathLike[str], replaces: tuple[CleanableSegment, ...],
                          batches: Iterable[bytes | bytearray | memoryview],
                          index_interval_bytes: int) -> CleanedSegment:
    """Write ``batches`` (whole, stamped batches in offset order, within the offsets of
    ``replaces``) as the ``.cleaned`` files of a segment replacing ``replaces``, with its index
    built as appends build it, all fsynced; `PartitionLog.swap_cleaned` puts it in place. Runs
    in any thread: it touches no log state."""
    base = replaces[0].base_offset
    index = _Segment(base, -1, 0)
    index.start_empty_index()
    path = os.path.join(directory, segment_name(base) + CLEANED_SUFFIX)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        position = 0
        for data in batches:
            view = memoryview(data).cast("B")
            base_offset, length = _BASE_AND_LENGTH.unpack_from(view, 0)
            (delta,) = _INT32.unpack_from(view, LAST_OFFSET_DELTA_OFFSET)
            (max_timestamp,) = _INT64.unpack_from(view, MAX_TIMESTAMP_OFFSET)
            size = length + LOG_OVERHEAD
            assert size == len(view) and base_offset >= index.next_offset, "batches out of order"
            last_offset = base_offset + delta
            assert last_offset < replaces[-1].next_offset, "batch beyond the replaced segments"
            write_all(fd, view)
            index.add_batch(position, size, last_offset, max_timestamp, index_interval_bytes)
            index.next_offset = last_offset + 1
            position += size
        os.fsync(fd)
    finally:
        os.close(fd)
    index.maybe_add_time_entry()  # a rolled segment's last time entry is its maximum
    assert index.index_relative is not None and index.index_positions is not None
    assert index.time_timestamps is not None and index.time_relative is not None
    for suffix, data in ((INDEX_SUFFIX, _encode_offset_entries(index.index_relative, index.index_positions)),
                         (TIME_INDEX_SUFFIX, _encode_time_entries(index.time_timestamps, index.time_relative))):
        fd = os.open(os.path.join(directory, segment_name(base, suffix) + CLEANED_SUFFIX),
                     os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
    return CleanedSegment(base, replaces, position, index.index_relative, index.index_positions,
                          index.time_timestamps, index.time_relative, index.max_timestamp,
                          index.max_timestamp_offset, index.bytes_since_index)
