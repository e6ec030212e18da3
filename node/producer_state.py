"""Broker-side idempotent-producer state of one partition replica (issue 7, DESIGN.md §8).

Kafka's `ProducerStateManager` + `ProducerAppendInfo`, reduced to what idempotence needs (tidelog has
no transactions). For every producer id the replica keeps the producer's epoch and the sequence
ranges and offsets of its last `BATCHES_TO_RETAIN` (5) batches, the same window as Kafka's
`ProducerStateEntry.NUM_BATCHES_TO_RETAIN`, which the client's "at most 5 batches in flight per
partition" is aligned with. Everything here reads batch headers only; no record is decoded.

How the node drives it
----------------------
Leader, for a client-origin produce of ``buf`` to this partition (all of it under the partition's
append lock, with no ``await`` between `check` and `update`, or a pipelined next batch of the same
producer would be checked against stale state)::

    headers = scan_batches(buf)
    result = state.check(headers, now_ms)
    if result.verdict is Verdict.REJECT:      # answer result.error / result.message, store nothing
    elif result.verdict is Verdict.DUPLICATE: # store nothing; answer NONE with result.base_offset,
                                              # result.last_offset, result.max_timestamp — for acks=all
                                              # only once the high watermark is past result.last_offset
    else:                                     # Verdict.APPEND
        next_offset = stamp_batches(buf, log_end_offset, leader_epoch)
        log.append(buf)
        state.update(headers, now_ms, first_offset=log_end_offset)

Follower, for every batch run it appends from the leader (no checks; the leader already did them)::

    state.update(scan_batches(buf), now_ms)   # headers already carry their offsets

`update` must see every batch the log appends (including ones without a producer id and control
batches: they are skipped but advance `end_offset`), on both paths, so a new leader has exactly
the state the old leader had. Other calls:

- Log truncation to ``offset`` (diverging epoch, unclean tail): ``state.truncate_to(offset,
  snapshot_dir, log_start_offset=…, read_batches_from=…, now_ms=…)``.
- Start-up: ``state.rebuild(snapshot_dir, log_start_offset=…, log_end_offset=…,
  read_batches_from=…, now_ms=…)``.
  ``read_batches_from(offset)`` is the node's callback: the headers, with their offsets, of the
  log's batches in order from the batch holding ``offset`` (or the first one after it) to the end
  of the log; `scan_batches` over the segment bytes is enough. Batches past the requested end are
  ignored, so the callback may return more than needed.
- Periodically (e.g. on segment roll and on clean shutdown): ``state.take_snapshot(snapshot_dir,
  log_end_offset)``; it keeps the newest `SNAPSHOTS_TO_KEEP` (2) snapshot files. To keep its two
  fsyncs off the event loop: ``offset, data = state.snapshot_bytes(log_end_offset)`` on the loop,
  then ``ProducerStateManager.write_snapshot(snapshot_dir, offset, data)`` in a thread (no
  truncation of this partition while it runs).
- Periodically: ``state.expire(now_ms, producer_id_expiration_ms)``.
- After retention or DeleteRecords moves the log start: ``state.remove_before(log_start_offset)``.
- A replica whose log is emptied and restarted at a new start offset: ``state.clear(new_start)``.

`update` raises ValueError for a batch below `end_offset` (a replay without `truncate_to` first);
that is a node bug, never bad client input. Nothing here raises for bad bytes in a snapshot.

Decisions
---------
- Unknown producer (no state at all) with a first sequence other than 0 is rejected with
  UNKNOWN_PRODUCER_ID. Kafka since 2.5 (KIP-360) *accepts* any sequence here ("If there is no
  current producer epoch ... accept writes with any sequence number", ProducerAppendInfo.
  checkSequence) to spare producers whose state retention removed; Kafka 1.0-2.4 answered
  UNKNOWN_PRODUCER_ID, and Kafka 4's transactions v2 rejects it too (KIP-890). tidelog promises
  no gap and no reordering (DESIGN.md §8): when a producer's first batch is lost in a failover
  while its second is in flight, accepting the second at the new leader would reorder the
  partition. The client, on UNKNOWN_PRODUCER_ID with no earlier batch of that partition still
  unacknowledged, bumps its epoch and renumbers from 0 (KIP-360's client side); with an earlier
  batch outstanding it simply retries after it, as for OUT_OF_ORDER_SEQUENCE_NUMBER.
- A duplicate is answered as Kafka's broker does since 1.0: error NONE with the offsets of the
  original batch (the client sees success), not DUPLICATE_SEQUENCE_NUMBER.
- A request whose batches are partly exact retries and partly new is rejected with
  INVALID_REQUEST: storing only the new ones would need a per-batch answer the produce response
  does not have, and Kafka (which answers the whole request as the duplicate) would silently drop
  the new batches. A retry must resend a partition's batches exactly as first sent.
- Two batches of one producer in one request are checked against each other in order, as Kafka's
  `ProducerAppendInfo` does across a request's batches.
- A batch with a producer id but a negative epoch or base sequence is INVALID_REQUEST (Kafka's
  LogValidator answers INVALID_RECORD, which tidelog's enum does not have).
- Control batches (tidelog's only control batch is the Raft leader-change marker, without a
  producer id) and batches without a producer id never touch producer state. There are no
  transactions: the transactional bit is ignored.
- Idleness for expiry is measured with the broker's clock: each entry records the ``now_ms`` of
  the last `update` that touched it (Kafka uses the batch's client timestamp, which a skewed
  client clock can push a day either way). Batches replayed during `rebuild` count as seen at
  the rebuild's ``now_ms``. Expiry therefore runs on each replica's own clock, so a leader and a
  follower may drop a producer that has been idle about `producer_id_expiration_ms` at slightly
  different moments — as in Kafka. Expiry and retention are the only ways a replica forgets a
  producer; both only touch producers idle for a day or whose data is gone.
- Snapshots below the log start offset are ignored and deleted (Kafka's truncateAndReload does
  the same): the state is then rebuilt by replaying from the log start.
- Compaction (not this module) must keep each producer's last batch, as Kafka's LogCleaner does,
  or a rebuild after a restart forgets producers a running replica still knows.

Snapshot file format (version 1)
--------------------------------
``<snapshot_dir>/<offset as 20 digits>.snapshot``; the state of every batch whose base offset is
below ``offset`` (the log end offset when it was taken). Big-endian, written to a ``.tmp`` file,
fsynced, renamed into place, directory fsynced::

    magic          4 bytes   b"TLPS"
    version        int16     1
    crc            uint32    CRC-32C (Castagnoli) of every byte after this field
    offset         int64     equals the file name's offset
    entry_count    int32
    entry_count × (ascending producer_id):
        producer_id      int64   >= 0
        producer_epoch   int16   >= 0
        last_update_ms   int64   broker time of the last batch seen
        batch_count      int8    1..5
        batch_count × (oldest first):
            first_seq      int32
            last_seq       int32
            base_offset    int64
            last_offset    int64
            max_timestamp  int64

The file ends right after the last entry. A file that fails any of these checks is reported with a
warning, deleted, and the next older snapshot (or the log start) is used instead.
"""

from __future__ import annotations

import enum
import logging
import os
import struct
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import crc32c as _crc32c

from tidelog.proto.common_pb2 import ErrorCode
from tidelog.proto.records import CONTROL_FLAG_MASK, BatchHeader

_log = logging.getLogger(__name__)

BATCHES_TO_RETAIN = 5  # Kafka's ProducerStateEntry.NUM_BATCHES_TO_RETAIN
DEFAULT_PRODUCER_ID_EXPIRATION_MS = 24 * 60 * 60 * 1000  # Kafka's producer.id.expiration.ms: 1 day
SNAPSHOTS_TO_KEEP = 2
INT32_MAX = 0x7FFFFFFF
SNAPSHOT_SUFFIX = ".snapshot"
SNAPSHOT_MAGIC = b"TLPS"
SNAPSHOT_VERSION = 1

_SNAPSHOT_PREFIX = struct.Struct(">4shI")  # magic, version, crc
_SNAPSHOT_BODY_HEADER = struct.Struct(">qi")  # offset, entry_count
_SNAPSHOT_ENTRY = struct.Struct(">qhqb")  # producer_id, epoch, last_update_ms, batch_count
_SNAPSHOT_BATCH = struct.Struct(">iiqqq")  # first_seq, last_seq, base_offset, last_offset, max_ts
_TMP_SUFFIX = ".tmp"

ReadBatchesFrom = Callable[[int], Iterable[BatchHeader]]

# The hot path keeps a retained batch as a plain tuple (a frozen dataclass costs ~40 times as much
# to build); `BatchMetadata` is the view handed out. Field order is BatchMetadata's.
_Batch = tuple[int, int, int, int, int]  # first_seq, last_seq, base_offset, last_offset, max_timestamp
_FIRST_SEQ, _LAST_SEQ, _BASE_OFFSET, _LAST_OFFSET = 0, 1, 2, 3


class Verdict(enum.Enum):
    APPEND = "append"  # store the batches, then call `update`
    DUPLICATE = "duplicate"  # store nothing; answer with the original offsets
    REJECT = "reject"  # store nothing; answer the error


@dataclass(frozen=True, slots=True)
class BatchMetadata:
    """What is retained of one appended batch: enough to recognise and answer its retry."""

    first_seq: int
    last_seq: int
    base_offset: int
    last_offset: int
    max_timestamp: int


@dataclass(frozen=True, slots=True)
class ProducerEntry:
    """A read-only view of one producer's state (batches oldest first)."""

    producer_id: int
    producer_epoch: int
    last_update_ms: int
    batches: tuple[BatchMetadata, ...]

    @property
    def last_seq(self) -> int:
        return self.batches[-1].last_seq

    @property
    def last_offset(self) -> int:
        return self.batches[-1].last_offset


@dataclass(frozen=True, slots=True)
class CheckResult:
    verdict: Verdict
    error: int = ErrorCode.NONE  # an ErrorCode value; NONE unless verdict is REJECT
    message: str = ""
    duplicates: tuple[BatchMetadata, ...] = ()  # for DUPLICATE: the originals, in request order

    @property
    def base_offset(self) -> int:
        """The original base offset of a DUPLICATE request's first batch."""
        return self.duplicates[0].base_offset

    @property
    def last_offset(self) -> int:
        return self.duplicates[-1].last_offset

    @property
    def max_timestamp(self) -> int:
        return max(batch.max_timestamp for batch in self.duplicates)


APPEND = CheckResult(Verdict.APPEND)


class SnapshotCorruptError(ValueError):
    """A snapshot file that cannot be trusted; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _Entry:
    """Mutable per-producer state; only `ProducerStateManager` touches it."""

    __slots__ = ("epoch", "batches", "last_update_ms")

    def __init__(self, epoch: int, last_update_ms: int) -> None:
        self.epoch = epoch
        self.batches: deque[_Batch] = deque(maxlen=BATCHES_TO_RETAIN)
        self.last_update_ms = last_update_ms

    def find_duplicate(self, first_seq: int, last_seq: int) -> _Batch | None:
        # Kafka's ProducerStateEntry.batchWithSequenceRange
        for batch in self.batches:
            if batch[_FIRST_SEQ] == first_seq and batch[_LAST_SEQ] == last_seq:
                return batch
        return None


def in_sequence(last_seq: int, next_seq: int) -> bool:
    """Kafka's ProducerAppendInfo.inSequence: the next sequence, wrapping after INT32_MAX to 0."""
    return next_seq == last_seq + 1 or (next_seq == 0 and last_seq == INT32_MAX)


def snapshot_path(directory: Path | str, offset: int) -> Path:
    return Path(directory) / f"{offset:020d}{SNAPSHOT_SUFFIX}"


def list_snapshots(directory: Path | str) -> list[tuple[int, Path]]:
    """(offset, path) of every snapshot file in ``directory``, oldest first; [] if none or no dir."""
    found: list[tuple[int, Path]] = []
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return found
    for name in names:
        stem = name[: -len(SNAPSHOT_SUFFIX)]
        if name.endswith(SNAPSHOT_SUFFIX) and len(stem) == 20 and stem.isdigit():
            found.append((int(stem), Path(directory) / name))
    found.sort()
    return found


def encode_snapshot(offset: int, entries: Iterable[ProducerEntry]) -> bytes:
    ordered = sorted(entries, key=lambda entry: entry.producer_id)
    body = bytearray(_SNAPSHOT_BODY_HEADER.pack(offset, len(ordered)))
    for entry in ordered:
        body += _SNAPSHOT_ENTRY.pack(
            entry.producer_id, entry.producer_epoch, entry.last_update_ms, len(entry.batches)
        )
        for batch in entry.batches:
            body += _SNAPSHOT_BATCH.pack(
                batch.first_seq, batch.last_seq, batch.base_offset, batch.last_offset, batch.max_timestamp
            )
    return _SNAPSHOT_PREFIX.pack(SNAPSHOT_MAGIC, SNAPSHOT_VERSION, _crc32c.crc32c(body)) + bytes(body)


def decode_snapshot(data: bytes) -> tuple[int, list[ProducerEntry]]:
    """(offset, entries) of a snapshot file's bytes; raises `SnapshotCorruptError`."""
    if len(data) < _SNAPSHOT_PREFIX.size + _SNAPSHOT_BODY_HEADER.size:
        raise SnapshotCorruptError(f"{len(data)} bytes is too short for a snapshot")
    magic, version, crc = _SNAPSHOT_PREFIX.unpack_from(data, 0)
    if magic != SNAPSHOT_MAGIC:
        raise SnapshotCorruptError(f"bad magic {magic!r}")
    if version != SNAPSHOT_VERSION:
        raise SnapshotCorruptError(f"unsupported version {version}")
    body = memoryview(data)[_SNAPSHOT_PREFIX.size :]
    actual = _crc32c.crc32c(body)
    if actual != crc:
        raise SnapshotCorruptError(f"CRC mismatch: stored {crc:#010x}, computed {actual:#010x}")
    # The CRC matched, so what follows guards against a writer bug, not against bad bytes.
    offset, count = _SNAPSHOT_BODY_HEADER.unpack_from(body, 0)
    position = _SNAPSHOT_BODY_HEADER.size
    entries: list[ProducerEntry] = []
    try:
        for _ in range(count):
            producer_id, epoch, last_update_ms, batch_count = _SNAPSHOT_ENTRY.unpack_from(body, position)
            position += _SNAPSHOT_ENTRY.size
            if producer_id < 0 or epoch < 0 or not 1 <= batch_count <= BATCHES_TO_RETAIN:
                raise SnapshotCorruptError(
                    f"invalid entry: producer {producer_id}, epoch {epoch}, {batch_count} batches"
                )
            batches = []
            for _ in range(batch_count):
                batches.append(BatchMetadata(*_SNAPSHOT_BATCH.unpack_from(body, position)))
                position += _SNAPSHOT_BATCH.size
            entries.append(ProducerEntry(producer_id, epoch, last_update_ms, tuple(batches)))
    except struct.error as error:
        raise SnapshotCorruptError(f"truncated at byte {position}: {error}") from None
    if position != len(body):
        raise SnapshotCorruptError(f"{len(body) - position} unexpected bytes after the last entry")
    return offset, entries


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + _TMP_SUFFIX)
    with open(tmp, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    os.replace(tmp, path)
    _fsync_directory(path.parent)


class ProducerStateManager:
    """Per-producer epoch and last-5-batch window of one partition replica.

    Not thread-safe: the node calls it from the partition's event loop. See the module docstring
    for the exact calls on the leader and follower paths.
    """

    def __init__(self, *, partition: str = "") -> None:
        self._partition = partition  # only for log messages
        self._producers: dict[int, _Entry] = {}
        self._end_offset = 0

    # --- reading --------------------------------------------------------------------------

    @property
    def end_offset(self) -> int:
        """One past the last offset whose batch this state has seen (0 when fresh)."""
        return self._end_offset

    def __len__(self) -> int:
        return len(self._producers)

    def entry(self, producer_id: int) -> ProducerEntry | None:
        entry = self._producers.get(producer_id)
        return None if entry is None else self._view(producer_id, entry)

    def entries(self) -> dict[int, ProducerEntry]:
        return {pid: self._view(pid, entry) for pid, entry in self._producers.items()}

    @staticmethod
    def _view(producer_id: int, entry: _Entry) -> ProducerEntry:
        return ProducerEntry(
            producer_id, entry.epoch, entry.last_update_ms, tuple(BatchMetadata(*b) for b in entry.batches)
        )

    # --- the leader's check ---------------------------------------------------------------

    def check(self, headers: Sequence[BatchHeader], now_ms: int) -> CheckResult:
        """Verdict on a client-origin request's batches, before offsets are assigned.

        Changes nothing. Kafka: UnifiedLog.analyzeAndValidateProducerState (duplicate lookup)
        then ProducerAppendInfo.checkProducerEpoch and checkSequence for each batch in order.
        """
        del now_ms  # part of the signature so a future rule (e.g. a timeout) needs no node change
        producers = self._producers
        # (epoch, last_seq) of producers already seen in this request, after their batches so far.
        pending: dict[int, tuple[int, int]] | None = None
        duplicates: list[_Batch] | None = None
        new_batches = 0
        for header in headers:
            producer_id = header.producer_id
            if producer_id < 0 or header.attributes & CONTROL_FLAG_MASK:
                new_batches += 1
                continue
            epoch = header.producer_epoch
            first_seq = header.base_sequence
            if epoch < 0 or first_seq < 0:
                return CheckResult(
                    Verdict.REJECT,
                    ErrorCode.INVALID_REQUEST,
                    f"batch of producer {producer_id} has producer epoch {epoch} and base sequence "
                    f"{first_seq}; an idempotent batch needs both >= 0",
                )
            last_seq = (first_seq + header.last_offset_delta) & INT32_MAX  # BatchHeader.last_sequence
            entry = producers.get(producer_id)
            seen = pending.get(producer_id) if pending is not None else None
            if seen is not None:
                current_epoch, current_last_seq = seen
            elif entry is not None:
                current_epoch, current_last_seq = entry.epoch, entry.batches[-1][_LAST_SEQ]
                if epoch == current_epoch:
                    duplicate = entry.find_duplicate(first_seq, last_seq)
                    if duplicate is not None:
                        if duplicates is None:
                            duplicates = []
                        duplicates.append(duplicate)
                        continue
            else:
                current_epoch = current_last_seq = -1

            if current_epoch < 0:
                if first_seq != 0:
                    return CheckResult(
                        Verdict.REJECT,
                        ErrorCode.UNKNOWN_PRODUCER_ID,
                        f"no state for producer {producer_id} in partition {self._partition} "
                        f"(never seen, expired, or its last batch was deleted); its first batch here "
                        f"must have sequence 0, got {first_seq} (epoch {epoch})",
                    )
            elif epoch < current_epoch:
                return CheckResult(
                    Verdict.REJECT,
                    ErrorCode.INVALID_PRODUCER_EPOCH,
                    f"producer {producer_id} is fenced in partition {self._partition}: epoch {epoch} "
                    f"is older than the current epoch {current_epoch}",
                )
            elif epoch > current_epoch:
                if first_seq != 0:
                    return CheckResult(
                        Verdict.REJECT,
                        ErrorCode.OUT_OF_ORDER_SEQUENCE_NUMBER,
                        f"invalid sequence number for new epoch of producer {producer_id} in partition "
                        f"{self._partition}: {epoch} (request epoch), {first_seq} (seq. number), "
                        f"{current_epoch} (current producer epoch)",
                    )
            elif not in_sequence(current_last_seq, first_seq):
                return CheckResult(
                    Verdict.REJECT,
                    ErrorCode.OUT_OF_ORDER_SEQUENCE_NUMBER,
                    f"out of order sequence number for producer {producer_id} in partition "
                    f"{self._partition}: {first_seq} (incoming seq. number), {current_last_seq} "
                    f"(current end sequence number), epoch {epoch}",
                )
            if pending is None:
                pending = {}
            pending[producer_id] = (epoch, last_seq)
            new_batches += 1

        if duplicates is None:
            return APPEND
        if new_batches:
            return CheckResult(
                Verdict.REJECT,
                ErrorCode.INVALID_REQUEST,
                f"request to partition {self._partition} mixes {len(duplicates)} retried batch(es) "
                f"(first already at offset {duplicates[0][_BASE_OFFSET]}) with {new_batches} new one(s); "
                f"a retry must resend the batches exactly as first sent",
            )
        return CheckResult(Verdict.DUPLICATE, duplicates=tuple(BatchMetadata(*b) for b in duplicates))

    # --- folding appended batches in -------------------------------------------------------

    def update(
        self, headers: Sequence[BatchHeader], now_ms: int, *, first_offset: int | None = None
    ) -> None:
        """Fold appended batches into the state: the leader after a successful append, a follower
        for every replicated append, and `rebuild` for the replayed log tail.

        Offsets come from the headers, or, when ``first_offset`` is given, are assigned
        contiguously from it exactly as `stamp_batches` does (so the leader need not rescan the
        stamped buffer). No sequence check: a batch in the log is a fact (Kafka's REPLICATION
        origin); an older epoch is only logged. Kafka: ProducerAppendInfo.appendDataBatch and
        ProducerStateEntry.addBatch (a different epoch clears the window).
        """
        producers = self._producers
        next_offset = first_offset
        for header in headers:
            if next_offset is None:
                base_offset = header.base_offset
                last_offset = base_offset + header.last_offset_delta
            else:
                base_offset = next_offset
                last_offset = base_offset + header.last_offset_delta
                next_offset = last_offset + 1
            if base_offset < self._end_offset:
                raise ValueError(
                    f"batch at offset {base_offset} is below the producer state's end offset "
                    f"{self._end_offset} in partition {self._partition}; truncate_to first"
                )
            self._end_offset = last_offset + 1
            producer_id = header.producer_id
            if producer_id < 0 or header.attributes & CONTROL_FLAG_MASK:
                continue
            epoch = header.producer_epoch
            first_seq = header.base_sequence
            if epoch < 0 or first_seq < 0:
                _log.warning(
                    "partition %s: ignoring batch at offset %d of producer %d with epoch %d and base "
                    "sequence %d", self._partition, base_offset, producer_id, epoch, header.base_sequence,
                )
                continue
            entry = producers.get(producer_id)
            if entry is None:
                entry = producers[producer_id] = _Entry(epoch, now_ms)
            elif epoch != entry.epoch:
                if epoch < entry.epoch:
                    # Only possible when state was lost (expiry, retention) and a zombie producer
                    # was accepted as new; the log is the truth, so follow it as Kafka does.
                    _log.warning(
                        "partition %s: batch at offset %d of producer %d has epoch %d, older than "
                        "the known epoch %d", self._partition, base_offset, producer_id, epoch, entry.epoch,
                    )
                entry.epoch = epoch
                entry.batches.clear()
            entry.batches.append(
                (first_seq, (first_seq + header.last_offset_delta) & INT32_MAX, base_offset, last_offset,
                 header.max_timestamp)
            )
            entry.last_update_ms = now_ms

    # --- forgetting ------------------------------------------------------------------------

    def expire(
        self, now_ms: int, producer_id_expiration_ms: int = DEFAULT_PRODUCER_ID_EXPIRATION_MS
    ) -> list[int]:
        """Drop producers idle for at least ``producer_id_expiration_ms``; returns their ids.

        Kafka: ProducerStateManager.removeExpiredProducers / isProducerExpired (``>=``).
        """
        expired = [
            pid for pid, entry in self._producers.items()
            if now_ms - entry.last_update_ms >= producer_id_expiration_ms
        ]
        for pid in expired:
            del self._producers[pid]
        return expired

    def remove_before(self, log_start_offset: int) -> list[int]:
        """Forget what retention deleted: producers whose last batch ends below
        ``log_start_offset`` go (Kafka: ProducerStateManager.onLogStartOffsetIncremented), and the
        others lose window entries below it, so the state equals a replay from the log start."""
        removed: list[int] = []
        for pid, entry in list(self._producers.items()):
            batches = entry.batches
            if batches[-1][_LAST_OFFSET] < log_start_offset:
                del self._producers[pid]
                removed.append(pid)
                continue
            while batches[0][_LAST_OFFSET] < log_start_offset:
                batches.popleft()
        if self._end_offset < log_start_offset:
            self._end_offset = log_start_offset
        return removed

    def clear(self, end_offset: int = 0) -> None:
        self._producers.clear()
        self._end_offset = end_offset

    # --- snapshots -------------------------------------------------------------------------

    def take_snapshot(self, directory: Path | str, offset: int | None = None) -> Path:
        """Write the state as ``<offset>.snapshot`` atomically and keep the newest 2 snapshots.

        ``offset`` (default `end_offset`) is the log end offset; it must not be below
        `end_offset`, since replay after loading starts there. The write fsyncs twice (several
        ms on a real disk); the node may instead call `snapshot_bytes` on its event loop and
        `write_snapshot` in a thread, but must not truncate this partition while that write runs.
        """
        return self.write_snapshot(directory, *self.snapshot_bytes(offset))

    def snapshot_bytes(self, offset: int | None = None) -> tuple[int, bytes]:
        """(offset, file content) of a snapshot of the state now; see `take_snapshot`."""
        if offset is None:
            offset = self._end_offset
        if offset < self._end_offset:
            raise ValueError(
                f"snapshot offset {offset} is below the state's end offset {self._end_offset}"
            )
        self._end_offset = offset
        return offset, encode_snapshot(offset, self.entries().values())

    @classmethod
    def write_snapshot(cls, directory: Path | str, offset: int, data: bytes) -> Path:
        """Atomically write ``data`` (from `snapshot_bytes`) as the snapshot at ``offset``; then
        delete all but the newest `SNAPSHOTS_TO_KEEP`. Touches no in-memory state."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = snapshot_path(directory, offset)
        _write_atomically(path, data)
        cls.delete_old_snapshots(directory)
        return path

    @staticmethod
    def delete_old_snapshots(directory: Path | str, keep: int = SNAPSHOTS_TO_KEEP) -> None:
        snapshots = list_snapshots(directory)
        for _, path in snapshots[: max(0, len(snapshots) - keep)]:
            path.unlink(missing_ok=True)

    @staticmethod
    def delete_snapshots_outside(directory: Path | str, low: int, high: int) -> None:
        """Delete snapshots below ``low`` (data retention removed) or above ``high`` (truncated)."""
        for offset, path in list_snapshots(directory):
            if offset < low or offset > high:
                path.unlink(missing_ok=True)

    def load_latest_snapshot(self, directory: Path | str, max_offset: int) -> int | None:
        """Replace the state with the newest readable snapshot at or below ``max_offset``.

        Returns its offset, or None (state empty, end offset 0) when there is none. A corrupt file
        is logged, deleted, and the next older one is tried: never an exception for bad bytes.
        """
        self.clear()
        for offset, path in reversed(list_snapshots(directory)):
            if offset > max_offset:
                continue
            try:
                data = path.read_bytes()
                stored_offset, entries = decode_snapshot(data)
                if stored_offset != offset:
                    raise SnapshotCorruptError(f"holds offset {stored_offset}, not its name's")
            except (OSError, SnapshotCorruptError) as error:
                _log.warning(
                    "partition %s: ignoring corrupt producer-state snapshot %s (%s); falling back to "
                    "an older snapshot or the log start", self._partition, path, error,
                )
                try:
                    path.unlink(missing_ok=True)
                except OSError:
                    pass
                continue
            for entry in entries:
                state = _Entry(entry.producer_epoch, entry.last_update_ms)
                state.batches.extend(
                    (b.first_seq, b.last_seq, b.base_offset, b.last_offset, b.max_timestamp)
                    for b in entry.batches
                )
                self._producers[entry.producer_id] = state
            self._end_offset = offset
            return offset
        return None

    # --- recovery --------------------------------------------------------------------------

    def rebuild(
        self,
        directory: Path | str | None,
        *,
        log_start_offset: int,
        log_end_offset: int,
        read_batches_from: ReadBatchesFrom,
        now_ms: int,
    ) -> None:
        """State for the log ``[log_start_offset, log_end_offset)``: the newest good snapshot in
        that range plus a replay of the batches after it (Kafka: UnifiedLog.loadProducerState and
        ProducerStateManager.truncateAndReload). Snapshots outside the range are deleted: those
        above describe truncated data, those below data retention removed. ``directory`` None
        means no snapshots: replay the whole log."""
        loaded: int | None = None
        if directory is not None:
            self.delete_snapshots_outside(directory, log_start_offset, log_end_offset)
            self._delete_partial_writes(Path(directory))
            loaded = self.load_latest_snapshot(directory, log_end_offset)
        else:
            self.clear()
        tail: list[BatchHeader] = []
        if loaded is None:
            # The log start may fall inside a batch (DeleteRecords); that batch still counts.
            replay_from = log_start_offset
            for header in read_batches_from(replay_from):
                if header.base_offset >= log_end_offset:
                    break
                if header.base_offset + header.last_offset_delta >= replay_from:
                    tail.append(header)
            self._end_offset = tail[0].base_offset if tail else replay_from
        else:
            # The snapshot may predate the latest retention; forget what it deleted.
            self.remove_before(log_start_offset)
            # A snapshot at offset S holds every batch whose base offset is below S.
            replay_from = loaded
            for header in read_batches_from(replay_from):
                if header.base_offset >= log_end_offset:
                    break
                if header.base_offset >= replay_from:
                    tail.append(header)
        self.update(tail, now_ms)
        self._end_offset = max(self._end_offset, log_end_offset)

    @staticmethod
    def _delete_partial_writes(directory: Path) -> None:
        """Remove ``.snapshot.tmp`` files a crash left behind mid-write."""
        try:
            names = os.listdir(directory)
        except FileNotFoundError:
            return
        for name in names:
            if name.endswith(SNAPSHOT_SUFFIX + _TMP_SUFFIX):
                (directory / name).unlink(missing_ok=True)

    def truncate_to(
        self,
        offset: int,
        directory: Path | str | None,
        *,
        log_start_offset: int,
        read_batches_from: ReadBatchesFrom,
        now_ms: int,
    ) -> None:
        """Drop the state of batches at or after ``offset`` after the log was truncated there.

        Call after the log itself is truncated (``read_batches_from`` reads the truncated log).
        """
        if directory is not None:
            # Before the fast path: a snapshot above the new end must never be loaded later.
            self.delete_snapshots_outside(directory, log_start_offset, offset)
        if offset >= self._end_offset:
            return
        if all(entry.batches[-1][_LAST_OFFSET] < offset for entry in self._producers.values()):
            # No producer has a batch in the dropped tail, so no entry changes.
            self._end_offset = offset
            return
        self.rebuild(
            directory,
            log_start_offset=log_start_offset,
            log_end_offset=offset,
            read_batches_from=read_batches_from,
            now_ms=now_ms,
        )
