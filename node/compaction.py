"""Log compaction: Kafka's log cleaner for partitions with ``cleanup.policy`` compact.

A pass over one partition log (`clean_log`, or `prepare_clean` in a worker thread followed by
`finish_clean` on the log's owner thread):

1. The cleanable range is the log's whole segments below the active segment, the high
   watermark and the recovery point's segment (`PartitionLog.cleanable_segments`). The
   per-partition ``cleaner-offset-checkpoint`` (Kafka's cleaner-offset-checkpoint idea) splits
   it into the *clean* section, already compacted, and the *dirty* one after it. A pass runs
   when dirty bytes are at least ``min.cleanable.dirty.ratio`` of the range, or when a tombstone
   kept by an earlier pass is due to expire.
2. An offset map (key → latest offset) is built from the dirty section's records.
3. Every segment of the range is filtered: a record survives unless the map holds a later
   offset for its key, or it is a tombstone (null value) in a segment that was cleaned at least
   ``delete.retention.ms`` ago (Kafka's rule: a consumer that read the clean section once had
   that long to see the delete). Records without a key and control batches always survive.
   Offsets never change: a rewritten batch keeps every header field (base offset,
   lastOffsetDelta, epoch, producer id/epoch/base sequence, timestamps, attributes with the
   codec, recompressing with it) except the record count, length and CRC. A batch left without
   records is dropped unless it is the last batch of its producer id in the segment (producer
   state rebuilt from the log must still see the producer's last sequence) or the segment's
   last batch (so a segment's batches still end where the next segment begins: reads never end
   in a gap, and a swap's offset range is known from its file).
4. Consecutive filtered segments are merged while they fit in ``segment.bytes``; each group
   whose content changed (or that merges segments) is written as ``.cleaned`` files and swapped
   in by the log (`PartitionLog.swap_cleaned`, crash safe); unchanged segments are not
   rewritten.
5. The checkpoint records the new clean offset and, per segment, when it was first cleaned
   (the start of its tombstones' delete.retention.ms; a merged segment takes the latest of its
   parts, so a tombstone may outlive delete.retention.ms but never falls short of it). It is
   written only after every swap of the pass, so a pass cut short is simply redone.

The checkpoint also names the clean section's last batch (its position, size, leader epoch
and last offset, which may lie before the clean offset: a follower cut inside a gap it copied
from its leader, then rolled, has a segment ending in a gap). A log truncated below the clean
offset and written again (a follower after a majority crash under ``flush=interval``, or a
`reset_to`) would otherwise have its new batches taken for clean ones: never put in the offset
map, and their tombstones dropped at once by an old segment's cleaning time, so a deleted key
could come back. Each pass first finds that batch where the checkpoint says (Raft's log
matching: the same offset and epoch mean the same prefix); if it is not there the whole log
counts as dirty again, and while the cleanable segments do not yet reach the clean offset the
pass waits (Kafka instead lowers the checkpoint on truncation, ``maybeTruncateCheckpoint``;
checking at the pass also covers a pass racing a truncation).

Only the swaps touch the log's owner thread; reading, filtering and writing the cleaned files
run in a worker (the log's files below the recovery point never change in place, so the worker
reads them by name, and a segment deleted meanwhile by retention just abandons the pass). A
pass holds the offset map plus one output group (at most ``segment.bytes``) and one input
segment in memory. Tombstone lifetimes are kept in the checkpoint rather than in the batches
(Kafka's KIP-534 stamps a delete horizon into baseTimestamp and attributes bit 6), because a
rewritten batch here keeps every header field as it was.
"""

from __future__ import annotations

import json
import logging
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import crc32c

from tidelog.node.fsutil import atomic_write
from tidelog.node.storage import (
    CleanableSegment,
    CleanedSegment,
    PartitionLog,
    SwapStep,
    discard_cleaned,
    write_cleaned_segment,
)
from tidelog.proto.records import (
    ATTRIBUTES_OFFSET,
    BASE_OFFSET_OFFSET,
    BATCH_LENGTH_OFFSET,
    BATCH_OVERHEAD,
    COMPRESSION_CODEC_MASK,
    CONTROL_FLAG_MASK,
    CRC_OFFSET,
    LAST_OFFSET_DELTA_OFFSET,
    LOG_OVERHEAD,
    PARTITION_LEADER_EPOCH_OFFSET,
    RECORDS_COUNT_OFFSET,
    BatchHeader,
    Compression,
    CorruptRecordError,
    _compress,
    _decompress,
    scan_batches,
)

log = logging.getLogger(__name__)

CLEANER_CHECKPOINT = "cleaner-offset-checkpoint"
DEFAULT_MIN_CLEANABLE_DIRTY_RATIO = 0.5
DEFAULT_DELETE_RETENTION_MS = 86_400_000
_MAX_RELATIVE = 0xFFFFFFFF  # offsets in one segment must fit the index's u32 relative offsets
_NEVER = -1

_INT32 = struct.Struct(">i")
_INT64 = struct.Struct(">q")
_UINT32 = struct.Struct(">I")


class CompactionError(Exception):
    """A segment could not be compacted (its bytes do not decode); the pass is abandoned."""


@dataclass(frozen=True, slots=True)
class CleanerConfig:
    """The topic configs compaction reads (Kafka's names in the comments)."""

    delete_retention_ms: int = DEFAULT_DELETE_RETENTION_MS  # delete.retention.ms
    min_cleanable_dirty_ratio: float = DEFAULT_MIN_CLEANABLE_DIRTY_RATIO  # min.cleanable.dirty.ratio
    segment_bytes: int = 1 << 30  # segment.bytes: the size merged segments stay within
    index_interval_bytes: int = 4096  # index.interval.bytes, for the rebuilt indexes

    def __post_init__(self) -> None:
        if self.delete_retention_ms < 0:
            raise ValueError("delete_retention_ms must be >= 0")
        if not 0.0 <= self.min_cleanable_dirty_ratio <= 1.0:
            raise ValueError("min_cleanable_dirty_ratio must be in [0, 1]")


@dataclass(frozen=True, slots=True)
class CleanBatch:
    """The clean section's last batch, where a pass left it: proof that the log still holds
    that section (see the module doc)."""

    segment_base: int  # the segment file holding it
    position: int  # its byte position there
    size: int  # its bytes, so the segment ends right after it
    epoch: int  # its partitionLeaderEpoch
    last_offset: int  # with the epoch, what proves the prefix (Raft's log matching)


@dataclass(frozen=True, slots=True)
class CleanerCheckpoint:
    """Where the clean section ends, when each of its segments was first cleaned (the start of
    its tombstones' lifetime), when the earliest kept tombstone may go (-1: none kept), and the
    section's last batch (None: unknown, so a clean section cannot be confirmed)."""

    clean_offset: int = 0
    cleaned_ms: tuple[tuple[int, int], ...] = ()  # (segment base offset, first cleaned at)
    tombstones_due_ms: int = _NEVER
    last_batch: CleanBatch | None = None

    def encode(self) -> bytes:
        body: dict[str, object] = {"version": 1, "clean_offset": self.clean_offset,
                                   "cleaned_ms": [list(pair) for pair in self.cleaned_ms],
                                   "tombstones_due_ms": self.tombstones_due_ms}
        if self.last_batch is not None:
            b = self.last_batch
            body["last_batch"] = [b.segment_base, b.position, b.size, b.epoch, b.last_offset]
        return (json.dumps(body) + "\n").encode()

    @classmethod
    def decode(cls, data: bytes) -> CleanerCheckpoint:
        body = json.loads(data)
        if body.get("version") != 1:
            raise ValueError(f"unknown {CLEANER_CHECKPOINT} version {body.get('version')!r}")
        clean_offset = int(body["clean_offset"])
        last = body.get("last_batch")
        if last is not None and len(last) == 4:
            # Written before the last offset was recorded, when the batch had to end exactly
            # at the clean offset to be confirmed.
            last = [*last, clean_offset - 1]
        return cls(clean_offset,
                   tuple((int(base), int(ms)) for base, ms in body["cleaned_ms"]),
                   int(body.get("tombstones_due_ms", _NEVER)),
                   None if last is None else CleanBatch(*(int(v) for v in last)))


def read_checkpoint(directory: str | os.PathLike[str]) -> CleanerCheckpoint:
    """The partition's cleaner checkpoint; an empty one (everything dirty) if missing or damaged."""
    try:
        with open(os.path.join(directory, CLEANER_CHECKPOINT), "rb") as file:
            return CleanerCheckpoint.decode(file.read())
    except FileNotFoundError:
        return CleanerCheckpoint()
    except (ValueError, KeyError, TypeError) as exc:
        log.warning("%s: unreadable %s (%s); treating the whole log as dirty",
                    directory, CLEANER_CHECKPOINT, exc)
        return CleanerCheckpoint()


def write_checkpoint(directory: str | os.PathLike[str], checkpoint: CleanerCheckpoint) -> None:
    atomic_write(directory, CLEANER_CHECKPOINT, checkpoint.encode())


@dataclass(frozen=True, slots=True)
class CleanStats:
    """What one pass did."""

    segments_read: int
    segments_written: int
    records_removed: int
    bytes_before: int
    bytes_after: int
    clean_offset: int


@dataclass(frozen=True, slots=True)
class PreparedClean:
    """A pass's durable ``.cleaned`` output, ready for `finish_clean` on the owner thread."""

    directory: str
    cleaned: tuple[CleanedSegment, ...]
    checkpoint: CleanerCheckpoint
    stats: CleanStats


# --- records as raw slices --------------------------------------------------------------------


def _varint(data: bytes, position: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if position >= end or shift > 63:
            raise CompactionError("varint runs past the end of its record")
        byte = data[position]
        position += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return (result >> 1) ^ -(result & 1), position
        shift += 7


@dataclass(frozen=True, slots=True)
class _RawRecord:
    offset: int
    key: bytes | None
    tombstone: bool
    start: int  # the record's bytes in the batch's (uncompressed) payload, length prefix included
    end: int


def _split_records(header: BatchHeader, payload: bytes) -> list[_RawRecord]:
    """Each record of a batch as its key, tombstone flag and byte range; survivors are copied
    byte for byte, so their timestamp and offset deltas stay exactly as written."""
    records = []
    position, end = 0, len(payload)
    for _ in range(header.record_count):
        start = position
        length, position = _varint(payload, position, end)
        record_end = position + length
        if length < 0 or record_end > end:
            raise CompactionError("a record runs past the end of its batch")
        position += 1  # attributes
        _, position = _varint(payload, position, record_end)  # timestamp delta
        offset_delta, position = _varint(payload, position, record_end)
        key_length, position = _varint(payload, position, record_end)
        key = None
        if key_length >= 0:
            key = payload[position:position + key_length]
            position += key_length
        value_length, _ = _varint(payload, position, record_end)
        records.append(_RawRecord(header.base_offset + offset_delta, key, value_length < 0,
                                  start, record_end))
        position = record_end
    if position != end:
        raise CompactionError(f"{end - position} bytes left over after the records of a batch")
    return records


def _payload(header: BatchHeader, batch: memoryview) -> bytes:
    body = batch[BATCH_OVERHEAD:header.size]
    if header.compression is Compression.NONE:
        return bytes(body)
    return bytes(_decompress(header.compression, body))


def _rebuild_batch(header: BatchHeader, batch: memoryview, payload: bytes,
                   kept: list[_RawRecord]) -> bytes:
    """The batch with only ``kept`` records: every header field as it was except the record
    count, the length and the CRC; compressed again with the batch's own codec."""
    body: bytes = b"".join(payload[r.start:r.end] for r in kept)
    codec = Compression(header.attributes & COMPRESSION_CODEC_MASK)
    if codec is not Compression.NONE:
        body = _compress(codec, body)
    out = bytearray(batch[:BATCH_OVERHEAD])
    _INT32.pack_into(out, BATCH_LENGTH_OFFSET, BATCH_OVERHEAD + len(body) - LOG_OVERHEAD)
    _INT32.pack_into(out, RECORDS_COUNT_OFFSET, len(kept))
    out += body
    _UINT32.pack_into(out, CRC_OFFSET, crc32c.crc32c(memoryview(out)[ATTRIBUTES_OFFSET:]))
    return bytes(out)


def _read_batches(segment: CleanableSegment) -> Iterator[tuple[BatchHeader, memoryview]]:
    """The segment's batches, CRC-checked (a damaged one aborts the pass, never spreads)."""
    with open(segment.path, "rb") as file:
        data = file.read(segment.size)
    if len(data) != segment.size:
        raise CompactionError(f"{segment.path} is shorter than the {segment.size} bytes expected")
    view = memoryview(data)
    try:
        headers = scan_batches(view)
    except CorruptRecordError as exc:
        raise CompactionError(f"{segment.path}: {exc}") from None
    for header in headers:
        yield header, view[header.position:header.position + header.size]


def has_keyless_record(batches: bytes | memoryview, headers: list[BatchHeader]) -> bool:
    """Whether any record of the (checked) ``batches`` has a null key: Kafka refuses those for
    a compacted topic at produce ("compacted topic cannot accept message without key"). Decodes
    every record, so the produce path calls it for compacted topics only."""
    view = memoryview(batches).cast("B")
    for header in headers:
        if header.attributes & CONTROL_FLAG_MASK:
            continue
        batch = view[header.position:header.position + header.size]
        try:
            payload = _payload(header, batch)
            if any(r.key is None for r in _split_records(header, payload)):
                return True
        except (CorruptRecordError, CompactionError):
            return True  # undecodable records cannot be shown to carry keys
    return False


# --- one pass ---------------------------------------------------------------------------------


@dataclass(slots=True)
class _Filter:
    """What decides a record's fate in this pass."""

    latest: dict[bytes, int]  # the offset map of the dirty section
    now_ms: int
    delete_retention_ms: int
    removed: int = 0
    tombstones_due_ms: int = _NEVER

    def keep(self, record: _RawRecord, cleaned_ms: int | None) -> bool:
        if record.key is None:
            return True  # Kafka rejects these at produce; if any exist, never drop them
        if self.latest.get(record.key, -1) > record.offset:
            return False
        if record.tombstone:
            # cleaned_ms is None in the dirty section: its tombstones' lifetime starts now.
            due = (self.now_ms if cleaned_ms is None else cleaned_ms) + self.delete_retention_ms
            if cleaned_ms is not None and due <= self.now_ms:
                return False
            if self.tombstones_due_ms == _NEVER or due < self.tombstones_due_ms:
                self.tombstones_due_ms = due
        return True


def _filter_segment(segment: CleanableSegment, rules: _Filter, cleaned_ms: int | None
                    ) -> tuple[list[bytes], bool]:
    """The segment's surviving batches, and whether anything changed."""
    batches = list(_read_batches(segment))
    last_of_producer: dict[int, int] = {}
    for index, (header, _) in enumerate(batches):
        if header.producer_id >= 0:
            last_of_producer[header.producer_id] = index
    out: list[bytes] = []
    changed = False
    for index, (header, batch) in enumerate(batches):
        # Survivors are copied out (bytes) so the segment's buffer is freed once filtered.
        if header.attributes & CONTROL_FLAG_MASK:
            out.append(bytes(batch))
            continue
        try:
            payload = _payload(header, batch)
        except CorruptRecordError as exc:
            raise CompactionError(f"{segment.path} offset {header.base_offset}: {exc}") from None
        records = _split_records(header, payload)
        kept = [r for r in records if rules.keep(r, cleaned_ms)]
        keep_empty = index == len(batches) - 1 or last_of_producer.get(header.producer_id) == index
        if len(kept) == len(records) and (kept or keep_empty):
            out.append(bytes(batch))  # untouched, including an empty batch that must stay
            continue
        changed = True
        rules.removed += len(records) - len(kept)
        if kept or keep_empty:
            out.append(_rebuild_batch(header, batch, payload, kept))
    return out, changed


def _offset_map(dirty: list[CleanableSegment]) -> dict[bytes, int]:
    latest: dict[bytes, int] = {}
    for segment in dirty:
        for header, batch in _read_batches(segment):
            if header.attributes & CONTROL_FLAG_MASK or header.record_count == 0:
                continue
            try:
                payload = _payload(header, batch)
            except CorruptRecordError as exc:
                raise CompactionError(f"{segment.path} offset {header.base_offset}: {exc}") from None
            for record in _split_records(header, payload):
                if record.key is not None:
                    latest[record.key] = record.offset
    return latest


def needs_cleaning(segments: list[CleanableSegment], checkpoint: CleanerCheckpoint,
                   config: CleanerConfig, now_ms: int) -> bool:
    """Kafka's dirty-ratio test, or a kept tombstone whose delete.retention.ms has passed."""
    total = sum(s.size for s in segments)
    if total == 0:
        return False
    dirty = sum(s.size for s in segments if s.next_offset > checkpoint.clean_offset)
    if dirty and dirty / total >= config.min_cleanable_dirty_ratio:
        return True
    return checkpoint.tombstones_due_ms != _NEVER and checkpoint.tombstones_due_ms <= now_ms


def _clean_batch_at(segment: CleanableSegment, expected: CleanBatch, clean_offset: int) -> bool:
    """Whether ``segment`` still ends with the batch ``expected`` describes (one read of its
    header). The batch may end before ``clean_offset``, the segment's end: the same last offset
    and epoch prove the same prefix, and as the segment's last batch nothing follows it there."""
    if (segment.base_offset != expected.segment_base
            or segment.size != expected.position + expected.size
            or expected.last_offset >= clean_offset):
        return False
    with open(segment.path, "rb") as file:  # gone: retention got there first, the pass ends
        file.seek(expected.position)
        header = file.read(BATCH_OVERHEAD)
    if len(header) < BATCH_OVERHEAD:
        return False
    base = _INT64.unpack_from(header, BASE_OFFSET_OFFSET)[0]
    return (_INT32.unpack_from(header, BATCH_LENGTH_OFFSET)[0] + LOG_OVERHEAD == expected.size
            and _INT32.unpack_from(header, PARTITION_LEADER_EPOCH_OFFSET)[0] == expected.epoch
            and base + _INT32.unpack_from(header, LAST_OFFSET_DELTA_OFFSET)[0] == expected.last_offset)


def confirm_checkpoint(segments: list[CleanableSegment],
                       checkpoint: CleanerCheckpoint) -> CleanerCheckpoint | None:
    """``checkpoint`` if the log still holds the clean section it describes; an empty one
    (everything dirty, every tombstone's lifetime starting afresh) if the log was truncated
    below it and written again; None while ``segments`` do not reach the clean offset, so it
    cannot be told yet (the log is shorter after a truncation, or the high watermark is still
    catching up after a restart)."""
    clean_offset = checkpoint.clean_offset
    if clean_offset <= 0 or not segments or segments[0].base_offset >= clean_offset:
        return checkpoint  # no segment here is claimed clean
    for segment in segments:
        if segment.next_offset < clean_offset:
            continue
        expected = checkpoint.last_batch
        if (segment.next_offset == clean_offset and expected is not None
                and _clean_batch_at(segment, expected, clean_offset)):
            return checkpoint
        log.warning("%s: the log no longer holds the clean section the %s describes (ending at "
                    "%d); it was truncated and written again, so everything is dirty again",
                    os.path.dirname(segment.path), CLEANER_CHECKPOINT, clean_offset)
        return CleanerCheckpoint()
    return None


def prepare_clean(directory: str | os.PathLike[str], segments: list[CleanableSegment],
                  config: CleanerConfig, now_ms: int, *, force: bool = False) -> PreparedClean | None:
    """Read, filter and write the cleaned files of one pass over ``segments`` (the log's
    `cleanable_segments`); None when the pass is not worth it (see `needs_cleaning`) unless
    ``force``. Runs in a worker thread; touches no log state."""
    directory = str(directory)
    if not segments:
        return None
    try:
        checkpoint = confirm_checkpoint(segments, read_checkpoint(directory))
        if checkpoint is None:
            log.debug("%s: the cleanable segments do not reach the clean offset yet; pass postponed",
                      directory)
            return None
        if not force and not needs_cleaning(segments, checkpoint, config, now_ms):
            return None
        return _prepare(directory, segments, checkpoint, config, now_ms)
    except FileNotFoundError:
        # Retention or a reset removed a segment under the pass; the next one starts afresh.
        log.info("%s: compaction pass abandoned: a segment was deleted meanwhile", directory)
        return None


def _prepare(directory: str, segments: list[CleanableSegment], checkpoint: CleanerCheckpoint,
             config: CleanerConfig, now_ms: int) -> PreparedClean:
    known = dict(checkpoint.cleaned_ms)
    # A segment counts as clean if it lies wholly below the clean offset (the log start may
    # have moved past old entries; a reset may have moved the log anywhere).
    clean = [s for s in segments if s.next_offset <= checkpoint.clean_offset]
    dirty = segments[len(clean):]
    rules = _Filter(_offset_map(dirty), now_ms, config.delete_retention_ms)

    # Consecutive segments whose filtered content fits in one segment are merged (Kafka's
    # groupSegmentsBySize); a group is rewritten if it merges or anything in it changed. Groups
    # are written as they fill, so a pass holds one group and the offset map in memory.
    cleaned: list[CleanedSegment] = []
    cleaned_ms_after: list[tuple[int, int]] = []
    group: list[tuple[CleanableSegment, list[bytes], bool, int]] = []
    group_size = 0

    last_batch: CleanBatch | None = None

    def write_group() -> None:
        nonlocal last_batch
        base = group[0][0].base_offset
        # A segment's last batch always survives, so the group's output ends with it.
        size = sum(len(b) for item in group for b in item[1])
        last = next((item[1][-1] for item in reversed(group) if item[1]), None)
        last_batch = None if last is None else CleanBatch(
            base, size - len(last), len(last), _INT32.unpack_from(last, PARTITION_LEADER_EPOCH_OFFSET)[0],
            _INT64.unpack_from(last, BASE_OFFSET_OFFSET)[0]
            + _INT32.unpack_from(last, LAST_OFFSET_DELTA_OFFSET)[0])
        # Merged tombstones keep the latest start: kept at least delete.retention.ms.
        cleaned_ms_after.append((base, max(item[3] for item in group)))
        if len(group) > 1 or group[0][2]:
            try:
                cleaned.append(write_cleaned_segment(
                    directory, tuple(item[0] for item in group),
                    (batch for item in group for batch in item[1]), config.index_interval_bytes))
            except BaseException:
                discard_cleaned(directory, base)
                raise

    try:
        for segment in segments:
            # Clean segments without a recorded time (a lost checkpoint) start their
            # tombstones' lifetime now, like the dirty ones: never earlier than promised.
            cleaned_ms = (known.get(segment.base_offset)
                          if segment.next_offset <= checkpoint.clean_offset else None)
            batches, changed = _filter_segment(segment, rules, cleaned_ms)
            size = sum(len(b) for b in batches)
            item = (segment, batches, changed, now_ms if cleaned_ms is None else cleaned_ms)
            if (group and group_size + size <= config.segment_bytes
                    and segment.next_offset - 1 - group[0][0].base_offset <= _MAX_RELATIVE):
                group.append(item)
                group_size += size
                continue
            if group:
                write_group()
            group, group_size = [item], size
        write_group()
    except BaseException:
        for done in cleaned:
            discard_cleaned(directory, done.base_offset)
        raise
    stats = CleanStats(
        segments_read=len(segments), segments_written=len(cleaned), records_removed=rules.removed,
        bytes_before=sum(s.size for s in segments),
        bytes_after=sum(s.size for s in segments) - sum(
            sum(r.size for r in c.replaces) - c.size for c in cleaned),
        clean_offset=segments[-1].next_offset)
    after = CleanerCheckpoint(segments[-1].next_offset, tuple(cleaned_ms_after), rules.tombstones_due_ms,
                              last_batch)
    return PreparedClean(directory, tuple(cleaned), after, stats)


def finish_clean(partition_log: PartitionLog, prepared: PreparedClean,
                 stop_at: Callable[[SwapStep], None] | None = None) -> bool:
    """Swap the prepared segments in (the log's owner thread). True if every swap happened;
    then the caller writes ``prepared.checkpoint`` (`write_checkpoint`). Otherwise the log
    changed under the pass (retention, a reset) and the checkpoint stays as it was."""
    complete = True
    for index, cleaned in enumerate(prepared.cleaned):
        if not partition_log.swap_cleaned(cleaned, stop_at):
            complete = False
            discard_prepared(prepared, index + 1)
            break
    return complete


def discard_prepared(prepared: PreparedClean, start: int = 0) -> None:
    """Drop the cleaned segments of a pass from ``start`` on: they will not be swapped in."""
    for cleaned in prepared.cleaned[start:]:
        discard_cleaned(prepared.directory, cleaned.base_offset)


def clean_log(partition_log: PartitionLog, max_offset: int, config: CleanerConfig,
              now_ms: int, *, force: bool = False) -> CleanStats | None:
    """One whole pass on the calling thread (tests and tools): segments below ``max_offset``
    (the high watermark). None if nothing was worth cleaning or the log changed meanwhile."""
    segments = partition_log.cleanable_segments(max_offset)
    prepared = prepare_clean(partition_log.directory, segments, config, now_ms, force=force)
    if prepared is None or not finish_clean(partition_log, prepared):
        return None
    write_checkpoint(partition_log.directory, prepared.checkpoint)
    return prepared.stats


__all__ = [
    "CLEANER_CHECKPOINT",
    "CleanBatch",
    "CleanStats",
    "CleanerCheckpoint",
    "CleanerConfig",
    "CompactionError",
    "PreparedClean",
    "clean_log",
    "confirm_checkpoint",
    "discard_prepared",
    "finish_clean",
    "has_keyless_record",
    "needs_cleaning",
    "prepare_clean",
    "read_checkpoint",
    "write_checkpoint",
]
