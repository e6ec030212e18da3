"""Model-based test of the segment log: a hypothesis state machine drives a real PartitionLog
and an in-memory list of batches side by side, with clean restarts, crashes that lose what was
not flushed, torn and corrupted tails, and lost index files (DESIGN.md §3, §10).

The disk is modelled by an *image*: a copy of the partition directory taken whenever the log
promises durability (after flush, truncate_to, close and open). A power loss restores the image,
optionally plus part of what was written after it (a torn write); a process crash keeps the
files as they are (the page cache survives).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from tidelog.node.storage import (
    LEADER_EPOCH_CHECKPOINT,
    RECOVERY_POINT,
    EpochEntry,
    LogConfig,
    OffsetOutOfRangeError,
    PartitionLog,
    TimestampOffset,
)
from tidelog.proto.records import (
    CorruptRecordError,
    Record,
    encode_batch,
    scan_batches,
    scan_valid_prefix,
)

logging.getLogger("tidelog.node.storage").setLevel(logging.ERROR)


@dataclass(frozen=True)
class Entry:
    base_offset: int
    last_offset: int
    epoch: int
    max_timestamp: int
    data: bytes  # the bytes the log must hold: encoded at these offsets and this epoch


BatchSpec = tuple[int, int, int]  # (records, first timestamp, value size)

batch_specs = st.lists(
    st.tuples(st.integers(1, 4), st.integers(0, 5000), st.integers(0, 120)), min_size=1, max_size=3
)


def encode(spec: BatchSpec, base_offset: int = 0, epoch: int = 0) -> bytes:
    count, ts, size = spec
    records = [Record(0, ts + (7 * i) % 11, b"k%d" % i, b"v" * size) for i in range(count)]
    return encode_batch(records, base_offset=base_offset, partition_leader_epoch=epoch)


class StorageMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.root = Path(tempfile.mkdtemp(prefix="tidelog-storage-model-"))
        self.directory = self.root / "t-0"
        self.image = self.root / "image"
        self.entries: list[Entry] = []
        self.log_start = 0
        self.durable_end = 0
        self.start_epoch = 0  # the epoch of the last batch before log_start
        self.now = 10_000
        self.plog: PartitionLog | None = None

    # --- model helpers ---------------------------------------------------------------------

    @property
    def end(self) -> int:
        return self.entries[-1].last_offset + 1 if self.entries else self.log_start

    @property
    def latest_epoch(self) -> int:
        return self.entries[-1].epoch if self.entries else -1

    def model_epochs(self) -> tuple[EpochEntry, ...]:
        epochs: list[EpochEntry] = []
        for entry in self.entries:
            if not epochs or entry.epoch > epochs[-1].epoch:
                epochs.append(EpochEntry(entry.epoch, entry.base_offset))
        return tuple(epochs)

    def entry_index(self, offset: int) -> int:
        return next(i for i, e in enumerate(self.entries) if e.last_offset >= offset)

    def clock(self) -> int:
        return self.now

    def open(self) -> None:
        self.plog = PartitionLog.open(self.directory, self.config, clock=self.clock)

    def snapshot(self) -> None:
        shutil.rmtree(self.image, ignore_errors=True)
        shutil.copytree(self.directory, self.image)

    def crash(self) -> None:
        assert self.plog is not None
        self.plog._close_files()
        self.plog = None

    def adopt_recovered(self, lowest: int, highest: int) -> None:
        """After a crash the log ends somewhere in [lowest, highest] at a batch boundary, and
        holds exactly the model's batches up to there."""
        assert self.plog is not None
        end = self.plog.end_offset
        assert lowest <= end <= highest, (lowest, end, highest)
        assert end == self.log_start or any(e.last_offset + 1 == end for e in self.entries)
        self.entries = [e for e in self.entries if e.last_offset < end]
        self.durable_end = end
        self.snapshot()

    # --- setup -----------------------------------------------------------------------------

    @initialize(
        segment_bytes=st.integers(200, 2000),
        index_interval_bytes=st.sampled_from([0, 50, 300, 4096]),
        recovery_interval=st.sampled_from([0, 400, 1 << 30]),
        retention=st.sampled_from(["none", "bytes", "time", "both"]),
        retention_bytes=st.integers(0, 3000),
        segment_ms=st.sampled_from([500, 10**9]),
    )
    def setup(self, segment_bytes: int, index_interval_bytes: int, recovery_interval: int,
              retention: str, retention_bytes: int, segment_ms: int) -> None:
        self.retention = retention
        self.config = LogConfig(
            segment_bytes=segment_bytes,
            segment_ms=segment_ms,
            index_interval_bytes=index_interval_bytes,
            recovery_point_interval_bytes=recovery_interval,
            retention_bytes=retention_bytes if retention in ("bytes", "both") else -1,
            retention_ms=2000 if retention in ("time", "both") else -1,
        )
        self.open()
        self.snapshot()

    def teardown(self) -> None:
        if self.plog is not None:
            self.plog._close_files()
        shutil.rmtree(self.root, ignore_errors=True)

    # --- appends ---------------------------------------------------------------------------

    @rule(specs=batch_specs, epoch_step=st.integers(0, 1))
    def append(self, specs: list[BatchSpec], epoch_step: int) -> None:
        assert self.plog is not None
        epoch = max(self.latest_epoch, 0) + epoch_step
        result = self.plog.append(b"".join(encode(s) for s in specs), epoch)
        assert result.base_offset == self.end
        offset = self.end
        for spec in specs:
            data = encode(spec, offset, epoch)
            (header,) = scan_batches(data)
            self.entries.append(Entry(offset, header.last_offset, epoch, header.max_timestamp, data))
            offset = header.next_offset
        assert result.last_offset == offset - 1 == self.plog.end_offset - 1

    @rule(specs=batch_specs, epoch_steps=st.lists(st.integers(0, 2), min_size=3, max_size=3))
    def append_replicated(self, specs: list[BatchSpec], epoch_steps: list[int]) -> None:
        assert self.plog is not None
        offset, epoch, pieces = self.end, max(self.latest_epoch, 0), []
        for spec, step in zip(specs, epoch_steps):
            epoch += step
            data = encode(spec, offset, epoch)
            (header,) = scan_batches(data)
            pieces.append(Entry(offset, header.last_offset, epoch, header.max_timestamp, data))
            offset = header.next_offset
        result = self.plog.append_replicated(b"".join(p.data for p in pieces))
        assert (result.base_offset, result.last_offset) == (self.end, offset - 1)
        self.entries.extend(pieces)

    @rule(spec=st.tuples(st.integers(1, 3), st.integers(0, 5000), st.integers(0, 50)),
          cut=st.integers(1, 60))
    def append_corrupt(self, spec: BatchSpec, cut: int) -> None:
        assert self.plog is not None
        data = encode(spec)
        before = self.plog.end_offset
        try:
            self.plog.append(data[:-cut], max(self.latest_epoch, 0))
        except CorruptRecordError:
            pass
        else:
            raise AssertionError("a truncated batch was accepted")
        assert self.plog.end_offset == before

    # --- reads -----------------------------------------------------------------------------

    @precondition(lambda self: self.plog is not None and self.entries)
    @rule(pick=st.integers(0, 10**6), max_bytes=st.integers(0, 1500))
    def read_from_an_offset(self, pick: int, max_bytes: int) -> None:
        assert self.plog is not None
        offset = self.log_start + pick % (self.end - self.log_start)
        first = self.entry_index(offset)
        data = self.plog.read(offset, max_bytes)
        headers = scan_batches(data)
        count = len(headers)
        assert count >= 1 and (count == 1 or len(data) <= max_bytes)
        assert data == b"".join(e.data for e in self.entries[first:first + count])

    @precondition(lambda self: self.plog is not None)
    @rule(beyond=st.integers(1, 5))
    def read_out_of_range(self, beyond: int) -> None:
        assert self.plog is not None
        assert self.plog.read(self.end, 100) == b""
        for offset in (self.end + beyond, self.log_start - beyond):
            try:
                self.plog.read(offset, 100)
            except OffsetOutOfRangeError:
                pass
            else:
                raise AssertionError(f"read({offset}) outside the log succeeded")

    # --- truncation, retention, time --------------------------------------------------------

    @precondition(lambda self: self.plog is not None and self.entries)
    @rule(pick=st.integers(0, 10**6))
    def truncate(self, pick: int) -> None:
        assert self.plog is not None
        offset = self.log_start + pick % (self.end - self.log_start + 1)
        kept = [e for e in self.entries if e.last_offset < offset]
        new_end = kept[-1].last_offset + 1 if kept else self.log_start
        assert self.plog.truncate_to(offset) == new_end
        if offset >= self.end:
            return  # a no-op, which promises nothing about durability
        self.entries = kept
        self.durable_end = new_end
        self.snapshot()

    @precondition(lambda self: self.plog is not None)
    @rule(delta=st.integers(-5, 20), start_epoch=st.integers(0, 9))
    def reset(self, delta: int, start_epoch: int) -> None:
        """A follower's log is replaced by an empty one (its leader deleted what it lacks)."""
        assert self.plog is not None
        start = max(0, self.end + delta)
        self.plog.reset_to(start, start_epoch)
        self.start_epoch = start_epoch
        self.entries = []
        self.log_start = self.durable_end = start
        self.snapshot()

    @rule(ms=st.integers(0, 3000))
    def advance_clock(self, ms: int) -> None:
        self.now += ms

    @precondition(lambda self: self.plog is not None)
    @rule()
    def flush(self) -> None:
        assert self.plog is not None
        assert self.plog.flush() == self.end == self.plog.flushed_offset
        self.durable_end = self.end
        self.snapshot()

    @precondition(lambda self: self.plog is not None)
    @rule()
    def retention(self) -> None:
        assert self.plog is not None
        old_start = self.log_start
        deleted = self.plog.enforce_retention()
        new_start = self.plog.log_start_offset
        gone = [e for e in self.entries if e.last_offset < new_start]
        assert (deleted > 0) == (new_start > old_start)
        if deleted:
            assert self.retention != "none"
            assert new_start <= self.durable_end  # only flushed segments go
            assert new_start == self.end or any(e.base_offset == new_start for e in self.entries)
            if self.retention == "time":
                assert all(e.max_timestamp < self.now - self.config.retention_ms for e in gone)
            if self.retention == "bytes":
                assert self.plog.size_bytes >= self.config.retention_bytes
        if gone:
            self.start_epoch = gone[-1].epoch
        self.entries = [e for e in self.entries if e.last_offset >= new_start]
        self.log_start = new_start
        # Retention's effects are durable: deleted files and the rewritten state files.
        for name in os.listdir(self.image):
            if name[:20].isdigit() and not (self.directory / name).exists():
                os.unlink(self.image / name)
        if deleted:
            for name in (LEADER_EPOCH_CHECKPOINT, RECOVERY_POINT):
                shutil.copy2(self.directory / name, self.image / name)

    # --- restarts and crashes --------------------------------------------------------------

    @precondition(lambda self: self.plog is not None)
    @rule()
    def close_and_reopen(self) -> None:
        assert self.plog is not None
        self.plog.close()
        self.open()
        self.durable_end = self.end
        self.snapshot()

    @precondition(lambda self: self.plog is not None)
    @rule()
    def process_crash(self) -> None:
        """The process dies; the kernel still has every written byte."""
        self.crash()
        self.open()
        self.adopt_recovered(self.end, self.end)

    @precondition(lambda self: self.plog is not None)
    @rule(lose_indexes=st.booleans())
    def power_loss(self, lose_indexes: bool) -> None:
        """The machine dies: only what was made durable survives."""
        self.crash()
        shutil.rmtree(self.directory)
        shutil.copytree(self.image, self.directory)
        if lose_indexes:
            for path in self.directory.iterdir():
                if path.suffix in (".index", ".timeindex"):
                    path.unlink()
        self.open()
        self.adopt_recovered(self.durable_end, self.durable_end)

    @precondition(lambda self: self.plog is not None)
    @rule(fraction=st.floats(0, 1))
    def power_loss_with_torn_write(self, fraction: float) -> None:
        """The machine dies mid-writeback: part of the unflushed bytes reached the disk."""
        self.crash()
        lost = [(p, (self.image / p.name).stat().st_size if (self.image / p.name).exists() else 0)
                for p in sorted(self.directory.glob("*.log"))]
        lost = [(p, durable) for p, durable in lost if p.stat().st_size > durable]
        partial = None
        if lost:
            path, durable = lost[0]
            data = path.read_bytes()
            partial = (path.name, data[:durable + int((len(data) - durable) * fraction)])
        shutil.rmtree(self.directory)
        shutil.copytree(self.image, self.directory)
        if partial is not None:
            (self.directory / partial[0]).write_bytes(partial[1])
        self.open()
        self.adopt_recovered(self.durable_end, self.end)

    @precondition(lambda self: self.plog is not None and self.end > self.durable_end)
    @rule(pick=st.integers(0, 10**6), bit=st.integers(0, 7))
    def bit_flip_in_unflushed_tail(self, pick: int, bit: int) -> None:
        """A byte of an unflushed batch is damaged (CRC-covered bytes only: Kafka's format
        leaves baseOffset and partitionLeaderEpoch outside the CRC on purpose)."""
        self.crash()
        candidates = []
        for path in sorted(self.directory.glob("*.log")):
            image_path = self.image / path.name
            durable = image_path.stat().st_size if image_path.exists() else 0
            headers, _ = scan_valid_prefix(path.read_bytes())
            candidates += [(path, h) for h in headers if h.position >= durable]
        assert candidates, "unflushed batches must be somewhere"
        path, header = candidates[pick % len(candidates)]
        position = header.position + 16 + (pick // 7) % (header.size - 16)
        data = bytearray(path.read_bytes())
        data[position] ^= 1 << bit
        path.write_bytes(bytes(data))
        self.open()
        self.adopt_recovered(header.base_offset, header.base_offset)

    # --- invariants ------------------------------------------------------------------------

    @invariant()
    def matches_the_model(self) -> None:
        plog = self.plog
        if plog is None:
            return
        assert plog.end_offset == self.end
        assert plog.log_start_offset == self.log_start
        assert plog.start_epoch == self.start_epoch
        assert self.durable_end <= plog.flushed_offset <= plog.end_offset
        assert plog.epoch_entries == self.model_epochs()
        # Reading forward from the start returns every batch exactly once.
        offset, data = self.log_start, []
        while offset < self.end:
            chunk = plog.read(offset, 700)
            headers = scan_batches(chunk)
            assert headers and headers[0].base_offset == offset
            data.append(chunk)
            offset = headers[-1].next_offset
        assert b"".join(data) == b"".join(e.data for e in self.entries)
        plog.verify()

    @invariant()
    def answers_epoch_and_time_queries(self) -> None:
        plog = self.plog
        if plog is None:
            return
        epochs = self.model_epochs()
        for entry in self.entries[::3]:
            assert plog.epoch_for(entry.last_offset) == entry.epoch
        for i, known in enumerate(epochs):
            next_start = epochs[i + 1].start_offset if i + 1 < len(epochs) else self.end
            assert plog.end_offset_for_epoch(known.epoch) == (known.epoch, next_start)
        if epochs:
            assert plog.end_offset_for_epoch(epochs[-1].epoch + 1) == (epochs[-1].epoch, self.end)
        for ts in (0, 1000, 2500, 4000, 5011):
            found = next((e for e in self.entries if e.max_timestamp >= ts), None)
            want = None if found is None else TimestampOffset(found.base_offset, found.max_timestamp)
            assert plog.offset_for_timestamp(ts) == want


FAST = settings(
    max_examples=50,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)

def no_fsync(monkeypatch: pytest.MonkeyPatch) -> None:
    # Durability is modelled by the image, not by the disk: real fsyncs would only make the
    # machine slow (each costs milliseconds here).
    monkeypatch.setattr(os, "fsync", lambda fd: None)
    monkeypatch.setattr(os, "fdatasync", lambda fd: None)


def test_storage_model(monkeypatch: pytest.MonkeyPatch) -> None:
    no_fsync(monkeypatch)
    run_state_machine_as_test(StorageMachine, settings=FAST)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_storage_model_long(monkeypatch: pytest.MonkeyPatch) -> None:
    no_fsync(monkeypatch)
    run_state_machine_as_test(
        StorageMachine,
        settings=settings(FAST, max_examples=400, stateful_step_count=60),
    )
