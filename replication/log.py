"""The log a Raft group replicates: the interface the core needs, and an in-memory implementation.

Offsets are Raft indices and a log entry is a Kafka RecordBatch v2 (DESIGN.md §2). The core calls
these methods synchronously: they are page-cache operations. Durability is separate: the core
asks for a flush with a `Flush` output, the node calls `flush()` (fsync, off the event loop) and
reports `RaftGroup.flush_completed`. `MemoryLog` models exactly that split: what was not flushed
is lost by `crash()`, which may also leave a torn last batch for recovery to cut off.
"""

from __future__ import annotations

import bisect
import random
from typing import Protocol

from tidelog.proto.records import scan_batches, scan_valid_prefix, stamp_batches

from tidelog.replication.messages import NO_EPOCH


class LogAppendError(ValueError):
    """Replicated batches do not continue the log (wrong base offset, gap, or epoch going back)."""


class OffsetOutOfRangeError(ValueError):
    """A read below the log start offset."""


class RaftLog(Protocol):
    """What a `RaftGroup` needs from a replica's log. Every offset given back is a batch boundary."""

    @property
    def start_offset(self) -> int: ...

    @property
    def start_epoch(self) -> int:
        """Epoch of the last batch *before* start_offset (deleted by retention, or the epoch given
        to `reset_to`); NO_EPOCH when the log starts at 0. Kafka's leader-epoch cache keeps it."""
        ...

    @property
    def end_offset(self) -> int:
        """The offset the next batch will get (log end offset)."""
        ...

    @property
    def last_epoch(self) -> int:
        """partitionLeaderEpoch of the last batch; start_epoch for an empty log."""
        ...

    def append(self, batches: bytes, epoch: int) -> tuple[int, int]:
        """Leader append: assign offsets from end_offset and stamp ``epoch``; (base, last offset)."""
        ...

    def append_replicated(self, batches: bytes) -> tuple[int, int]:
        """Follower append of batches that already carry their offsets and epochs (checked)."""
        ...

    def read(self, offset: int, max_bytes: int) -> bytes:
        """Whole batches from the one holding ``offset``; at least one batch if any, else b""."""
        ...

    def truncate_to(self, offset: int) -> int:
        """Drop every batch at or after ``offset``; returns the new end offset."""
        ...

    def epoch_for(self, offset: int) -> int | None:
        """The epoch of the batch holding ``offset``, or None outside the log."""
        ...

    def end_offset_for_epoch(self, epoch: int) -> tuple[int, int]:
        """KIP-101/KIP-595: (largest epoch <= ``epoch`` in the log, the end offset of that epoch).

        start_epoch counts as present, ending at start_offset or later; (NO_EPOCH, start_offset)
        when no such epoch exists.
        """
        ...

    def reset_to(self, start_offset: int, start_epoch: int) -> None:
        """Drop everything and continue as an empty log at ``start_offset`` whose prefix ended
        in ``start_epoch``: a follower whose leader deleted (retention) what it needs."""
        ...

    def flush(self) -> int:
        """Make everything appended so far durable; returns the end offset covered.

        Called by the driver (node or simulator) for a `Flush` output, never by the core.
        """
        ...


class MemoryLog:
    """A `RaftLog` in memory, with a model of what a crash keeps (tests and the simulator).

    The durable image is the first ``_synced`` batches plus ``_disk_tail`` (batches flushed once
    and then truncated away in memory: a truncation is only durable after the next flush, as
    with a file whose new length was not yet fsynced), starting at ``_durable_start``.
    """

    def __init__(self, start_offset: int = 0, start_epoch: int = NO_EPOCH) -> None:
        self._start = start_offset
        self._start_epoch = start_epoch
        self._bases: list[int] = []
        self._nexts: list[int] = []
        self._epochs: list[int] = []
        self._data: list[bytes] = []
        # (epoch, start offset) for each run of batches of one epoch: the leader-epoch cache. Its
        # first entry may be (start_epoch, start_offset), the run that began before the start.
        self._epoch_starts: list[tuple[int, int]] = []
        self._synced = 0
        self._disk_tail: list[tuple[int, int, int, bytes]] = []
        self._durable_start = (start_offset, start_epoch)
        self._rebuild_epoch_starts()

    # --- the RaftLog interface ------------------------------------------------------------

    @property
    def start_offset(self) -> int:
        return self._start

    @property
    def start_epoch(self) -> int:
        return self._start_epoch

    @property
    def end_offset(self) -> int:
        return self._nexts[-1] if self._nexts else self._start

    @property
    def last_epoch(self) -> int:
        return self._epochs[-1] if self._epochs else self._start_epoch

    def append(self, batches: bytes, epoch: int) -> tuple[int, int]:
        if epoch < self.last_epoch:
            raise LogAppendError(f"leader append at epoch {epoch} after epoch {self.last_epoch}")
        headers = scan_batches(batches)
        if not headers:
            raise LogAppendError("nothing to append")
        buf = bytearray(batches)
        base = self.end_offset
        stamp_batches(buf, base, epoch)
        data = bytes(buf)
        offset = base
        for header in headers:
            next_offset = offset + header.last_offset_delta + 1
            self._push(offset, next_offset, epoch, data[header.position : header.position + header.size])
            offset = next_offset
        return base, offset - 1

    def append_replicated(self, batches: bytes) -> tuple[int, int]:
        headers = scan_batches(batches)
        if not headers:
            raise LogAppendError("nothing to append")
        expected = self.end_offset
        epoch = self.last_epoch
        for header in headers:
            if header.base_offset != expected:
                raise LogAppendError(f"batch at offset {header.base_offset}, log ends at {expected}")
            if header.partition_leader_epoch < epoch:
                raise LogAppendError(f"batch of epoch {header.partition_leader_epoch} after epoch {epoch}")
            expected = header.next_offset
            epoch = header.partition_leader_epoch
        base = self.end_offset
        view = memoryview(batches)
        for header in headers:
            self._push(
                header.base_offset,
                header.next_offset,
                header.partition_leader_epoch,
                bytes(view[header.position : header.position + header.size]),
            )
        return base, expected - 1

    def read(self, offset: int, max_bytes: int) -> bytes:
        if offset < self._start:
            raise OffsetOutOfRangeError(f"offset {offset} is below the log start {self._start}")
        index = bisect.bisect_right(self._bases, offset) - 1
        if index < 0:
            index = 0
        if index >= len(self._data) or offset >= self.end_offset:
            return b""
        chunks = [self._data[index]]
        size = len(chunks[0])
        for data in self._data[index + 1 :]:
            size += len(data)
            if size > max_bytes:
                break
            chunks.append(data)
        return b"".join(chunks)

    def truncate_to(self, offset: int) -> int:
        keep = bisect.bisect_right(self._nexts, offset)
        if keep < len(self._nexts):
            if keep < self._synced:
                self._disk_tail = self._entries()[keep : self._synced] + self._disk_tail
                self._synced = keep
            del self._bases[keep:], self._nexts[keep:], self._epochs[keep:], self._data[keep:]
            self._rebuild_epoch_starts()
        return self.end_offset

    def epoch_for(self, offset: int) -> int | None:
        if offset < self._start or offset >= self.end_offset:
            return None
        return self._epochs[bisect.bisect_right(self._bases, offset) - 1]

    def end_offset_for_epoch(self, epoch: int) -> tuple[int, int]:
        starts = self._epoch_starts
        for i in range(len(starts) - 1, -1, -1):
            found_epoch = starts[i][0]
            if found_epoch <= epoch:
                end = starts[i + 1][1] if i + 1 < len(starts) else self.end_offset
                return found_epoch, end
        return NO_EPOCH, self._start

    def reset_to(self, start_offset: int, start_epoch: int) -> None:
        # Not durable until the next flush: a crash before it brings the old log back.
        self._disk_tail = self._entries()[: self._synced] + self._disk_tail
        self._synced = 0
        self._start = start_offset
        self._start_epoch = start_epoch
        self._bases, self._nexts, self._epochs, self._data = [], [], [], []
        self._rebuild_epoch_starts()

    def delete_before(self, offset: int) -> int:
        """Retention: drop the whole batches that end at or before ``offset``, but never the last
        one (Kafka never deletes the active segment); returns the new log start."""
        drop = max(0, min(bisect.bisect_right(self._nexts, offset), len(self._nexts) - 1))
        assert drop <= self._synced, "retention deletes only flushed (committed) data"
        if drop:
            self._start = self._nexts[drop - 1]
            self._start_epoch = self._epochs[drop - 1]
            del self._bases[:drop], self._nexts[:drop], self._epochs[:drop], self._data[:drop]
            self._synced -= drop
            self._durable_start = (self._start, self._start_epoch)
            self._rebuild_epoch_starts()
        return self._start

    def flush(self) -> int:
        self._synced = len(self._data)
        self._disk_tail = []
        self._durable_start = (self._start, self._start_epoch)
        return self.end_offset

    # --- the crash model --------------------------------------------------------------------

    @property
    def flushed_end_offset(self) -> int:
        """End of the durable prefix that the in-memory log still shares (for assertions)."""
        return self._nexts[self._synced - 1] if self._synced else self._start

    def crash(self, rng: random.Random, *, tear: bool = True) -> None:
        """Lose what a power cut would, then recover the way storage does on start.

        Unflushed batches may each have reached the disk or not (a prefix of them survives),
        and with ``tear`` the next one may be cut anywhere; recovery keeps the longest valid
        prefix (`scan_valid_prefix`) and discards the torn rest. A truncation or reset that was
        not flushed is undone: the batches it removed come back.
        """
        entries = self._entries()
        unflushed = entries[self._synced :]
        survivors: list[tuple[int, int, int, bytes]] = []
        if self._disk_tail:
            survivors = list(self._disk_tail)
        elif unflushed and (self._start, self._start_epoch) == self._durable_start:
            whole = rng.randrange(len(unflushed) + 1)
            written = b"".join(entry[3] for entry in unflushed[:whole])
            if tear and whole < len(unflushed):
                torn = unflushed[whole][3]
                written += torn[: rng.randrange(1, len(torn))]
            headers, _ = scan_valid_prefix(written)
            survivors = unflushed[: len(headers)]
        durable = entries[: self._synced]
        self._start, self._start_epoch = self._durable_start
        self._bases, self._nexts, self._epochs, self._data = [], [], [], []
        self._rebuild_epoch_starts()
        for entry in durable + survivors:
            self._push(*entry)
        # What recovery found is on disk now.
        self._synced = len(self._data)
        self._disk_tail = []

    # --- internals --------------------------------------------------------------------------

    def _entries(self) -> list[tuple[int, int, int, bytes]]:
        return list(zip(self._bases, self._nexts, self._epochs, self._data, strict=True))

    def _rebuild_epoch_starts(self) -> None:
        starts: list[tuple[int, int]] = []
        if self._start_epoch != NO_EPOCH:
            starts.append((self._start_epoch, self._start))
        for base, epoch in zip(self._bases, self._epochs, strict=True):
            if not starts or starts[-1][0] != epoch:
                starts.append((epoch, base))
        self._epoch_starts = starts

    def _push(self, base: int, next_offset: int, epoch: int, data: bytes) -> None:
        assert base == self.end_offset, (base, self.end_offset)
        if not self._epoch_starts or self._epoch_starts[-1][0] != epoch:
            assert not self._epoch_starts or self._epoch_starts[-1][0] < epoch
            self._epoch_starts.append((epoch, base))
        self._bases.append(base)
        self._nexts.append(next_offset)
        self._epochs.append(epoch)
        self._data.append(data)

    def batch_count(self) -> int:
        return len(self._data)

    def batch(self, index: int) -> tuple[int, int, int, bytes]:
        """(base offset, next offset, epoch, bytes) of the index-th batch."""
        return self._bases[index], self._nexts[index], self._epochs[index], self._data[index]
