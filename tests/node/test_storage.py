"""Unit tests of the segment log (tidelog.node.storage, DESIGN.md §3)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import struct
import threading
from pathlib import Path

import pytest
from tidelog.node import storage
from tidelog.node.storage import (
    CLEAN_SHUTDOWN,
    LEADER_EPOCH_CHECKPOINT,
    RECOVERY_POINT,
    CorruptLogError,
    EpochEntry,
    InvalidAppendError,
    LogClosedError,
    LogConfig,
    OffsetOutOfRangeError,
    PartitionLog,
    RecordTooLargeError,
    TimestampOffset,
    segment_name,
)
from tidelog.proto.records import (
    CorruptRecordError,
    Record,
    decode_batches,
    encode_batch,
    scan_batches,
)

SMALL = LogConfig(segment_bytes=1024, index_interval_bytes=64, recovery_point_interval_bytes=0)


def batch(records: int = 1, ts: int = 1000, size: int = 10, **kwargs: object) -> bytes:
    return encode_batch([Record(0, ts + i, b"k", b"v" * size) for i in range(records)], **kwargs)


def expected(records: int, ts: int, size: int, base: int, epoch: int) -> bytes:
    """What the log must store: the same batch encoded at its offsets and epoch."""
    return batch(records, ts, size, base_offset=base, partition_leader_epoch=epoch)


class Clock:
    def __init__(self, now: int = 10_000) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


def crash(plog: PartitionLog) -> None:
    """The process dies: file descriptors go, nothing else is written."""
    plog._close_files()


def files(directory: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(directory.iterdir())}


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def open_log(tmp_path: Path, clock: Clock):
    opened: list[PartitionLog] = []

    def opener(config: LogConfig = SMALL, directory: Path | None = None) -> PartitionLog:
        plog = PartitionLog.open(directory or tmp_path / "t-0", config, clock=clock)
        opened.append(plog)
        return plog

    yield opener
    for plog in opened:
        plog._close_files()


# --- append and read ---------------------------------------------------------------------


def test_append_assigns_offsets_and_stamps_epoch(open_log) -> None:
    plog = open_log()
    first = plog.append(batch(3, ts=100), epoch=5)
    second = plog.append(batch(1, ts=200) + batch(2, ts=300), epoch=5)
    assert (first.base_offset, first.last_offset, first.max_timestamp) == (0, 2, 102)
    assert (second.base_offset, second.last_offset, second.next_offset) == (3, 5, 6)
    assert plog.end_offset == 6 and plog.log_start_offset == 0
    assert plog.read(0, 1 << 20) == (expected(3, 100, 10, 0, 5) + expected(1, 200, 10, 3, 5)
                                     + expected(2, 300, 10, 4, 5))


def test_corrupt_append_raises_and_writes_nothing(open_log, tmp_path: Path) -> None:
    plog = open_log()
    plog.append(batch(), epoch=0)
    good = batch(2)
    damaged = bytearray(good + good)
    damaged[len(good) + 70] ^= 0xFF  # a record byte of the second batch: CRC mismatch
    before = files(tmp_path / "t-0")
    with pytest.raises(CorruptRecordError):
        plog.append(bytes(damaged), epoch=0)
    with pytest.raises(CorruptRecordError):
        plog.append(good[:-1], epoch=0)
    assert plog.end_offset == 1 and files(tmp_path / "t-0") == before


def test_append_rejects_large_batches_stale_epochs_and_nothing(open_log) -> None:
    plog = open_log(LogConfig(max_message_bytes=200))
    with pytest.raises(RecordTooLargeError):
        plog.append(batch(size=300), epoch=1)
    plog.append(batch(), epoch=3)
    with pytest.raises(InvalidAppendError, match="older"):
        plog.append(batch(), epoch=2)
    with pytest.raises(InvalidAppendError):
        plog.append(b"", epoch=3)
    with pytest.raises(ValueError):
        plog.append(batch(), epoch=-1)
    assert plog.end_offset == 1


def test_append_of_more_batches_than_iovecs_takes_the_copying_path(open_log) -> None:
    plog = open_log(LogConfig())
    many = b"".join(batch(1, ts=i) for i in range(storage._IOV_MAX))
    result = plog.append(many, epoch=2)
    assert (result.base_offset, result.last_offset) == (0, storage._IOV_MAX - 1)
    headers = scan_batches(plog.read(0, 1 << 30))
    assert [h.base_offset for h in headers] == list(range(storage._IOV_MAX))
    assert {h.partition_leader_epoch for h in headers} == {2}


def test_append_replicated_keeps_leader_offsets_and_epochs(open_log) -> None:
    plog = open_log()
    plog.append_replicated(expected(2, 0, 10, 0, 1) + expected(1, 0, 10, 2, 3))
    assert plog.end_offset == 3
    assert plog.epoch_entries == (EpochEntry(1, 0), EpochEntry(3, 2))
    with pytest.raises(InvalidAppendError, match="expected at least 3"):
        plog.append_replicated(expected(1, 0, 10, 2, 3))
    with pytest.raises(InvalidAppendError, match="expected"):
        plog.append_replicated(expected(1, 0, 10, 3, 3) + expected(1, 0, 10, 3, 3))
    with pytest.raises(InvalidAppendError, match="epoch"):
        plog.append_replicated(expected(1, 0, 10, 3, 2))
    with pytest.raises(CorruptRecordError):
        plog.append_replicated(expected(1, 0, 10, 3, 3)[:-2])
    assert plog.end_offset == 3
    # Offsets may skip forward: a compacted leader's gaps (tidelog.node.compaction).
    assert plog.append_replicated(expected(1, 0, 10, 5, 3)).base_offset == 5
    assert plog.end_offset == 6


def test_read_returns_whole_batches_from_the_one_containing_the_offset(open_log) -> None:
    plog = open_log(LogConfig(index_interval_bytes=0))
    for i in range(10):
        plog.append(batch(3, ts=i * 10), epoch=0)
    one = expected(3, 0, 10, 0, 0)
    for offset in range(30):
        data = plog.read(offset, 1)  # smaller than a batch: still one whole batch
        (header,) = scan_batches(data)
        assert header.base_offset <= offset <= header.last_offset
    data = plog.read(4, 3 * len(one) + 5)
    assert [h.base_offset for h in scan_batches(data)] == [3, 6, 9]
    assert plog.read(30, 100) == b""
    with pytest.raises(OffsetOutOfRangeError):
        plog.read(31, 100)
    with pytest.raises(OffsetOutOfRangeError):
        plog.read(-1, 100)


def test_read_stops_at_a_segment_boundary_and_continues_in_the_next(open_log) -> None:
    plog = open_log()
    while len(plog.segment_base_offsets) < 3:
        plog.append(batch(2, size=40), epoch=0)
    second = plog.segment_base_offsets[1]
    data = plog.read(0, 1 << 20)
    assert scan_batches(data)[-1].next_offset == second
    assert scan_batches(plog.read(second, 1 << 20))[0].base_offset == second


def test_sequential_reads_cover_the_log_exactly(open_log) -> None:
    plog = open_log()
    for i in range(40):
        plog.append(batch(1 + i % 3, size=i), epoch=i // 10)
    offset, seen = 0, []
    while offset < plog.end_offset:
        headers = scan_batches(plog.read(offset, 150))
        seen.extend(h.base_offset for h in headers)
        offset = headers[-1].next_offset
    assert seen == [h.base_offset for h in scan_batches(b"".join(
        plog.read(b, 1) for b in seen))]
    assert offset == plog.end_offset


# --- segments and indexes ------------------------------------------------------------------


def test_segments_roll_by_size_with_kafka_file_names(open_log, tmp_path: Path) -> None:
    plog = open_log()
    for _ in range(30):
        plog.append(batch(2, size=40), epoch=0)
    bases = plog.segment_base_offsets
    assert len(bases) > 2 and bases[0] == 0
    names = set(os.listdir(tmp_path / "t-0"))
    for base in bases:
        for suffix in (".log", ".index", ".timeindex"):
            assert f"{base:020d}{suffix}" in names
    for base in bases[:-1]:
        assert (tmp_path / "t-0" / segment_name(base)).stat().st_size <= SMALL.segment_bytes


def test_segments_roll_by_age_of_the_first_batch(open_log, clock: Clock, tmp_path: Path) -> None:
    plog = open_log(LogConfig(segment_ms=1000))
    plog.append(batch(ts=5), epoch=0)
    plog.append(batch(ts=1005), epoch=0)  # Kafka ages by the incoming batch's timestamp
    assert plog.segment_base_offsets == (0,)
    plog.append(batch(ts=1006), epoch=0)
    assert plog.segment_base_offsets == (0, 2)
    # A first batch without a timestamp: the wall clock since the segment was created decides.
    plog = open_log(LogConfig(segment_ms=1000), directory=tmp_path / "t-1")
    plog.append(batch(ts=-1), epoch=0)
    clock.now += 1000
    plog.append(batch(ts=-1), epoch=0)
    assert plog.segment_base_offsets == (0,)
    clock.now += 1
    plog.append(batch(ts=-1), epoch=0)
    assert plog.segment_base_offsets == (0, 2)


def test_index_files_use_kafkas_layout(open_log, tmp_path: Path) -> None:
    plog = open_log(LogConfig(index_interval_bytes=1))
    sizes = []
    for i in range(5):
        sizes.append(plog.append(batch(2, ts=100 * i), epoch=0).size)
    plog.close()
    directory = tmp_path / "t-0"
    index = (directory / segment_name(0, ".index")).read_bytes()
    entries = list(struct.iter_unpack(">II", index))
    # Every batch after the first is indexed by its last offset and its start position.
    assert entries == [(2 * i + 1, sum(sizes[:i])) for i in range(1, 5)]
    time_index = list(struct.iter_unpack(">qI", (directory / segment_name(0, ".timeindex")).read_bytes()))
    assert time_index == [(100 * i + 1, 2 * i + 1) for i in range(1, 5)]


def test_offset_for_timestamp_finds_the_first_batch_at_or_after(open_log) -> None:
    plog = open_log()
    timestamps = [50, 10, 300, 200, 400, 350, 900]  # not monotonic, as producers send them
    for ts in timestamps * 3:
        plog.append(batch(2, ts=ts, size=30), epoch=0)
    assert len(plog.segment_base_offsets) > 1
    assert plog.offset_for_timestamp(0) == TimestampOffset(0, 51)
    assert plog.offset_for_timestamp(52) == TimestampOffset(4, 301)
    assert plog.offset_for_timestamp(302) == TimestampOffset(8, 401)
    assert plog.offset_for_timestamp(901) == TimestampOffset(12, 901)
    assert plog.offset_for_timestamp(902) is None
    plog.close()


# --- leader epochs -------------------------------------------------------------------------


def test_epochs_answer_kip101_queries_and_persist_in_kafkas_format(open_log, tmp_path: Path) -> None:
    plog = open_log()
    assert plog.end_offset_for_epoch(0) == (-1, -1) and plog.epoch_for(0) is None
    for epoch, count in ((2, 3), (4, 2), (7, 1)):
        for _ in range(count):
            plog.append(batch(2), epoch=epoch)
    assert plog.epoch_entries == (EpochEntry(2, 0), EpochEntry(4, 6), EpochEntry(7, 10))
    assert [plog.epoch_for(o) for o in (0, 5, 6, 9, 10, 11)] == [2, 2, 4, 4, 7, 7]
    assert plog.epoch_for(12) is None
    assert plog.end_offset_for_epoch(2) == (2, 6)
    assert plog.end_offset_for_epoch(3) == (2, 6)  # largest epoch <= 3, start of the next one
    assert plog.end_offset_for_epoch(4) == (4, 10)
    assert plog.end_offset_for_epoch(7) == (7, 12)
    assert plog.end_offset_for_epoch(9) == (7, 12)
    assert plog.end_offset_for_epoch(1) == (1, 0)  # below every epoch: Kafka's answer
    plog.close()
    text = (tmp_path / "t-0" / LEADER_EPOCH_CHECKPOINT).read_text()
    assert text == "0\n3\n2 0\n4 6\n7 10\n"


def test_epochs_past_the_recovered_end_are_dropped_from_the_checkpoint_file(tmp_path: Path, open_log) -> None:
    """A checkpoint written after an epoch began (retention rewrites it) can reach the disk
    while that epoch's data never does; recovery drops the epoch, and must also rewrite the file,
    or a later clean reopen reads the dead epoch back over what was appended since."""
    plog = open_log()
    plog.append(batch(2), epoch=0)
    plog.close()
    directory = tmp_path / "t-0"
    os.unlink(directory / CLEAN_SHUTDOWN)  # as after a power loss
    (directory / LEADER_EPOCH_CHECKPOINT).write_text("0\n2\n0 0\n1 2\n")  # epoch 1 from offset 2
    plog = open_log()
    assert plog.end_offset == 2 and plog.epoch_entries == (EpochEntry(0, 0),)
    plog.append(batch(1), epoch=0)
    plog.close()
    plog = open_log()
    assert plog.epoch_for(2) == 0
    assert plog.end_offset_for_epoch(0) == (0, 3)


# --- truncation ----------------------------------------------------------------------------


def test_truncate_removes_the_batch_containing_the_offset(open_log) -> None:
    plog = open_log()
    for epoch in (1, 1, 2, 3):
        plog.append(batch(3), epoch=epoch)
    assert plog.truncate_to(9) == 9
    assert plog.epoch_entries == (EpochEntry(1, 0), EpochEntry(2, 6))
    assert plog.truncate_to(7) == 6  # offset 7 is inside batch 6..8: the whole batch goes
    assert plog.end_offset == 6 and plog.flushed_offset == 6
    assert plog.epoch_entries == (EpochEntry(1, 0),)
    assert plog.truncate_to(6) == 6 and plog.truncate_to(100) == 6
    assert plog.truncate_to(3) == 3
    assert plog.epoch_entries == (EpochEntry(1, 0),)
    assert plog.append(batch(), epoch=4).base_offset == 3
    assert plog.read(0, 1 << 20) == expected(3, 1000, 10, 0, 1) + expected(1, 1000, 10, 3, 4)


def test_truncate_across_segments_and_to_the_start(open_log, tmp_path: Path) -> None:
    plog = open_log()
    for i in range(40):
        plog.append(batch(2, ts=i, size=40), epoch=i // 10)
    bases = plog.segment_base_offsets
    assert len(bases) > 3
    assert plog.truncate_to(bases[2]) == bases[2]
    assert plog.segment_base_offsets == bases[:2]
    assert not (tmp_path / "t-0" / segment_name(bases[2])).exists()
    assert plog.offset_for_timestamp(0) == TimestampOffset(0, 1)
    plog.append(batch(ts=5000), epoch=9)
    assert plog.offset_for_timestamp(4000) == TimestampOffset(bases[2], 5000)
    assert plog.truncate_to(0) == 0
    assert plog.segment_base_offsets == (0,) and plog.epoch_entries == ()
    assert plog.read(0, 100) == b""
    plog.append(batch(), epoch=10)
    assert plog.end_offset == 1


def test_truncate_below_log_start_is_out_of_range(open_log) -> None:
    plog = open_log(LogConfig(segment_bytes=300, retention_bytes=0,
                              recovery_point_interval_bytes=0))
    for _ in range(6):
        plog.append(batch(size=100), epoch=0)
    plog.flush()
    assert plog.enforce_retention() > 0
    with pytest.raises(OffsetOutOfRangeError):
        plog.truncate_to(plog.log_start_offset - 1)


def test_truncation_is_durable_without_close(open_log, tmp_path: Path) -> None:
    plog = open_log()
    for _ in range(10):
        plog.append(batch(2, size=40), epoch=1)
    plog.truncate_to(9)
    crash(plog)
    plog = open_log()
    assert plog.end_offset == 8 and plog.epoch_entries == (EpochEntry(1, 0),)


# --- retention -----------------------------------------------------------------------------


def test_retention_by_bytes_deletes_whole_old_segments(open_log, tmp_path: Path) -> None:
    plog = open_log(LogConfig(segment_bytes=1024, retention_bytes=2500, retention_ms=-1,
                              recovery_point_interval_bytes=0))
    for i in range(60):
        plog.append(batch(2, size=40), epoch=i // 20)
    assert plog.enforce_retention() == 0  # nothing flushed yet: nothing is deleted
    plog.flush()
    segments = plog.segment_base_offsets
    deleted = plog.enforce_retention()
    assert deleted > 0
    assert plog.segment_base_offsets == segments[deleted:]
    assert plog.log_start_offset == segments[deleted]
    assert plog.size_bytes >= 2500
    assert not (tmp_path / "t-0" / segment_name(0)).exists()
    with pytest.raises(OffsetOutOfRangeError):
        plog.read(0, 100)
    assert scan_batches(plog.read(plog.log_start_offset, 1))[0].base_offset == plog.log_start_offset
    assert plog.epoch_entries[0].start_offset == plog.log_start_offset
    plog.close()
    plog = open_log(LogConfig(segment_bytes=1024))
    assert plog.log_start_offset == segments[deleted]


def test_retention_by_time_respects_max_offset_and_the_active_segment(open_log, clock: Clock) -> None:
    plog = open_log(LogConfig(segment_bytes=1024, retention_ms=1000,
                              recovery_point_interval_bytes=0))
    for i in range(30):
        plog.append(batch(2, ts=i, size=40), epoch=0)
    plog.flush()
    clock.now = 1000
    assert plog.enforce_retention() == 0  # newest timestamps are 59: not older than 1000 ms
    clock.now = 5000
    bases = plog.segment_base_offsets
    assert plog.enforce_retention(max_offset=bases[1]) == 1
    assert plog.log_start_offset == bases[1]
    assert plog.enforce_retention() == len(bases) - 2
    assert plog.segment_base_offsets == (bases[-1],)  # the active segment stays


# --- durability and recovery ----------------------------------------------------------------


def test_clean_reopen_trusts_the_files_without_scanning(open_log, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    plog = open_log()
    for i in range(30):
        plog.append(batch(2, ts=i, size=40), epoch=i // 10)
    contents = plog.read(0, 1 << 30)
    plog.close()
    assert (tmp_path / "t-0" / CLEAN_SHUTDOWN).exists()
    with pytest.raises(LogClosedError):
        plog.append(batch(), epoch=3)

    def no_scan(*args: object, **kwargs: object) -> object:
        raise AssertionError("a cleanly closed log must not be scanned")

    monkeypatch.setattr(storage, "_scan_valid", no_scan)
    monkeypatch.setattr(storage, "_walk_headers", no_scan)
    plog = open_log()
    assert not (tmp_path / "t-0" / CLEAN_SHUTDOWN).exists()
    assert plog.end_offset == 60 and plog.flushed_offset == 60
    assert plog.epoch_entries == (EpochEntry(0, 0), EpochEntry(1, 20), EpochEntry(2, 40))
    monkeypatch.undo()
    assert plog.read(0, 1 << 30) == contents
    assert plog.append(batch(), epoch=2).base_offset == 60


def test_flush_makes_data_durable_and_a_crash_loses_only_the_rest(open_log, tmp_path: Path) -> None:
    plog = open_log()
    for _ in range(10):
        plog.append(batch(2, size=40), epoch=1)
    assert plog.flushed_offset == 0
    assert plog.flush() == 20 and plog.flushed_offset == 20
    image = tmp_path / "image"
    shutil.copytree(tmp_path / "t-0", image)  # what the disk holds after the fdatasync
    for _ in range(10):
        plog.append(batch(2, size=40), epoch=2)
    crash(plog)
    shutil.rmtree(tmp_path / "t-0")
    shutil.copytree(image, tmp_path / "t-0")
    plog = open_log()
    assert plog.end_offset == 20 and plog.epoch_entries == (EpochEntry(1, 0),)
    assert plog.append(batch(), epoch=2).base_offset == 20


def test_process_crash_keeps_written_batches_and_rebuilds_their_indexes(open_log) -> None:
    plog = open_log()
    for i in range(10):
        plog.append(batch(2, ts=i, size=40), epoch=1)
    plog.flush()
    for i in range(10, 40):
        plog.append(batch(2, ts=i, size=40), epoch=2)
    contents = plog.read(0, 1 << 30) + plog.read(plog.segment_base_offsets[-1], 1 << 30)
    crash(plog)
    plog = open_log()
    assert plog.end_offset == 80 and plog.flushed_offset == 80
    assert plog.epoch_entries == (EpochEntry(1, 0), EpochEntry(2, 20))
    assert plog.read(0, 1 << 30) + plog.read(plog.segment_base_offsets[-1], 1 << 30) == contents
    assert plog.offset_for_timestamp(30) == TimestampOffset(58, 30)


@pytest.mark.parametrize("damage", ["cut", "flip", "garbage"])
def test_torn_or_corrupt_tail_is_truncated_and_logged(open_log, tmp_path: Path, damage: str,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    plog = open_log(LogConfig(recovery_point_interval_bytes=0))
    for _ in range(5):
        plog.append(batch(2, size=40), epoch=1)
    plog.flush()
    last = plog.append(batch(2, size=40), epoch=1)
    crash(plog)
    path = tmp_path / "t-0" / segment_name(0)
    data = bytearray(path.read_bytes())
    if damage == "cut":
        data = data[:-last.size // 2]
    elif damage == "flip":
        data[-5] ^= 0x01
    else:
        data += os.urandom(100)
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="tidelog.node.storage"):
        plog = open_log()
    expected_end = 12 if damage == "garbage" else 10
    assert plog.end_offset == expected_end
    assert any("torn or corrupt tail" in r.getMessage() for r in caplog.records)
    assert path.stat().st_size == len(plog.read(0, 1 << 30))
    assert plog.append(batch(), epoch=1).base_offset == expected_end


def test_tail_scan_is_limited_to_after_the_recovery_point(open_log, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    plog = open_log(LogConfig(recovery_point_interval_bytes=0))
    for _ in range(20):
        plog.append(batch(2, size=40), epoch=1)
    plog.flush()
    flushed_end = plog.segment_base_offsets[-1], os.path.getsize(
        tmp_path / "t-0" / segment_name(plog.segment_base_offsets[-1]))
    plog.append(batch(2, size=40), epoch=1)
    crash(plog)
    starts = []
    real_scan = storage._scan_valid

    def recording_scan(fd: int, start: int, end: int, max_batch: int):
        starts.append((start, end))
        return real_scan(fd, start, end, max_batch)

    monkeypatch.setattr(storage, "_scan_valid", recording_scan)
    plog = open_log()
    recovery_point = flushed_end[1]
    # The tail after the recovery point, plus a CRC check of the seam just below it (from the
    # last index entry: at most index.interval.bytes and one batch).
    (seam_start, seam_end), (tail_start, _) = starts
    assert seam_end == tail_start == recovery_point
    assert recovery_point - seam_start <= 4096 + 200
    assert plog.end_offset == 42


def test_corruption_before_the_recovery_point_is_an_error(open_log, tmp_path: Path) -> None:
    plog = open_log(LogConfig(recovery_point_interval_bytes=0))
    for _ in range(10):
        plog.append(batch(2, size=40), epoch=1)
    plog.close()
    path = tmp_path / "t-0" / segment_name(0)
    size = path.stat().st_size
    with open(path, "r+b") as f:  # flushed data vanished: the file is shorter than promised
        f.truncate(size - 10)
    with pytest.raises(CorruptLogError, match="flushed"):
        open_log()
    with open(path, "r+b") as f:
        f.truncate(size)
        f.seek(size - 10)
        f.write(b"\xff" * 10)
    plog = open_log()  # before the recovery point nothing is read at open ...
    with pytest.raises(CorruptLogError, match="CRC"):
        plog.verify()  # ... but verification finds it and never skips it


def test_damaged_index_of_an_old_segment_is_rebuilt(open_log, tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    plog = open_log()
    for i in range(30):
        plog.append(batch(2, ts=i, size=40), epoch=1)
    first_segment = plog.read(0, 1 << 30)
    plog.close()
    index = tmp_path / "t-0" / segment_name(0, ".index")
    good_index = index.read_bytes()
    index.write_bytes(good_index[:-3])
    (tmp_path / "t-0" / segment_name(0, ".timeindex")).unlink()
    with caplog.at_level(logging.WARNING, logger="tidelog.node.storage"):
        plog = open_log()
        assert plog.read(0, 1 << 30) == first_segment
        assert plog.read(3, 1) == scan_batches_bytes(first_segment, 1)
    assert any("rebuilding" in r.getMessage() for r in caplog.records)
    assert index.read_bytes() == good_index
    assert plog.offset_for_timestamp(0) == TimestampOffset(0, 1)


def scan_batches_bytes(data: bytes, index: int) -> bytes:
    header = scan_batches(data)[index]
    return data[header.position:header.position + header.size]


def test_missing_state_files_are_rebuilt_from_the_segments(open_log, tmp_path: Path) -> None:
    plog = open_log()
    for i in range(30):
        plog.append(batch(2, ts=i, size=40), epoch=i // 10)
    contents = plog.read(0, 1 << 30)
    plog.close()
    (tmp_path / "t-0" / RECOVERY_POINT).unlink()
    (tmp_path / "t-0" / LEADER_EPOCH_CHECKPOINT).unlink()
    (tmp_path / "t-0" / CLEAN_SHUTDOWN).unlink()
    plog = open_log()
    assert plog.end_offset == 60 and plog.read(0, 1 << 30) == contents
    assert plog.epoch_entries == (EpochEntry(0, 0), EpochEntry(1, 20), EpochEntry(2, 40))
    assert (tmp_path / "t-0" / RECOVERY_POINT).exists()


def test_missing_epoch_checkpoint_with_a_recovery_point_is_rebuilt(open_log, tmp_path: Path) -> None:
    plog = open_log()
    for i in range(30):
        plog.append(batch(2, size=40), epoch=i // 10)
    plog.close()
    (tmp_path / "t-0" / LEADER_EPOCH_CHECKPOINT).write_text("garbage")
    plog = open_log()
    assert plog.epoch_entries == (EpochEntry(0, 0), EpochEntry(1, 20), EpochEntry(2, 40))


def test_flush_runs_safely_beside_appends(open_log) -> None:
    plog = open_log(LogConfig(segment_bytes=4096, recovery_point_interval_bytes=1000))
    stop = threading.Event()
    flushed: list[int] = []
    errors: list[BaseException] = []

    def flusher() -> None:
        try:
            while not stop.is_set():
                flushed.append(plog.flush())
        except BaseException as exc:  # surfaced by the assertion below
            errors.append(exc)

    thread = threading.Thread(target=flusher)
    thread.start()
    try:
        for i in range(400):
            plog.append(batch(2, ts=i, size=30), epoch=i // 100)
    finally:
        stop.set()
        thread.join()
    assert not errors
    assert flushed == sorted(flushed) and all(f <= 800 for f in flushed)
    assert plog.flush() == 800
    contents = b"".join(plog.read(b, 1 << 30) for b in plog.segment_base_offsets)
    crash(plog)
    plog = open_log(LogConfig(segment_bytes=4096))
    assert b"".join(plog.read(b, 1 << 30) for b in plog.segment_base_offsets) == contents


def test_delete_removes_the_directory(open_log, tmp_path: Path) -> None:
    plog = open_log()
    plog.append(batch(), epoch=0)
    plog.delete()
    assert not (tmp_path / "t-0").exists()
    with pytest.raises(LogClosedError):
        plog.read(0, 10)


def test_config_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        LogConfig(segment_bytes=1 << 31)
    with pytest.raises(ValueError):
        LogConfig(retention_ms=-2)
    with pytest.raises(ValueError):
        LogConfig(max_message_bytes=10)


def test_records_survive_a_round_trip_through_the_log(open_log) -> None:
    plog = open_log()
    records = [Record(0, 5, b"key", b"value", (("h", b"x"),)), Record(0, 6, None, None)]
    plog.append(encode_batch(records, compression="lz4"), epoch=3)
    (decoded,) = list(decode_batches(plog.read(0, 100)))
    assert [(r.offset, r.key, r.value) for r in decoded.records()] == [(0, b"key", b"value"), (1, None, None)]
    assert decoded.partition_leader_epoch == 3


def test_recovery_point_is_rewritten_per_interval_and_on_roll(open_log, tmp_path: Path) -> None:
    plog = open_log(LogConfig(segment_bytes=2000, recovery_point_interval_bytes=1000))
    point = tmp_path / "t-0" / RECOVERY_POINT
    plog.append(batch(size=40), epoch=0)
    plog.flush()
    first = point.read_text()
    plog.append(batch(size=40), epoch=0)
    plog.flush()
    assert point.read_text() == first  # less than the interval since the last rewrite
    while plog.size_bytes < 1200:
        plog.append(batch(size=40), epoch=0)
    plog.flush()
    second = point.read_text()
    assert second != first
    while len(plog.segment_base_offsets) == 1:
        plog.append(batch(size=40), epoch=0)
    plog.flush()
    assert f'"segment": {plog.segment_base_offsets[-1]}' in point.read_text()  # a roll moves it
    plog.verify()


@pytest.mark.parametrize("start", [0, 7, 500])
def test_reset_to_empties_the_log_at_any_offset(open_log, tmp_path: Path, start: int) -> None:
    plog = open_log()
    for i in range(20):
        plog.append(batch(2, size=40), epoch=i // 10)
    assert 0 in plog.segment_base_offsets
    plog.reset_to(start)
    assert (plog.log_start_offset, plog.end_offset, plog.flushed_offset) == (start, start, start)
    assert plog.epoch_entries == () and plog.read(start, 100) == b""
    assert sorted(p.name for p in (tmp_path / "t-0").glob("*.log")) == [segment_name(start)]
    plog.append_replicated(expected(2, 0, 10, start, 5))
    crash(plog)
    plog = open_log()
    assert (plog.log_start_offset, plog.end_offset) == (start, start + 2)
    assert plog.epoch_entries == (EpochEntry(5, start),)


def test_an_interrupted_reset_is_finished_on_open(open_log, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    plog = open_log()
    for _ in range(20):
        plog.append(batch(2, size=40), epoch=1)
    plog.flush()

    def power_cut(self: PartitionLog, segment: object) -> None:
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr(PartitionLog, "_delete_segment_files", power_cut)
    with pytest.raises(KeyboardInterrupt):
        plog.reset_to(10)
    monkeypatch.undo()
    crash(plog)
    plog = open_log()
    assert (plog.log_start_offset, plog.end_offset, plog.epoch_entries) == (10, 10, ())
    assert sorted(p.name for p in (tmp_path / "t-0").glob("*.log")) == [segment_name(10)]
    crash(plog)
    plog = open_log()  # the finished reset is itself durable
    assert (plog.log_start_offset, plog.end_offset) == (10, 10)


def test_damage_just_below_the_recovery_point_is_an_error_after_a_crash(open_log, tmp_path: Path) -> None:
    plog = open_log(LogConfig(recovery_point_interval_bytes=0))
    for _ in range(10):
        plog.append(batch(2, size=40), epoch=1)
    plog.flush()
    plog.append(batch(2, size=40), epoch=1)
    crash(plog)
    point = json.loads((tmp_path / "t-0" / RECOVERY_POINT).read_text())
    path = tmp_path / "t-0" / segment_name(0)
    data = bytearray(path.read_bytes())
    data[point["position"] - 3] ^= 0x40  # inside the last flushed batch
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptLogError, match="recovery point"):
        open_log()


def test_start_epoch_survives_retention_reset_and_reopen(open_log, tmp_path: Path) -> None:
    config = LogConfig(segment_bytes=400, retention_bytes=0, recovery_point_interval_bytes=0)
    plog = open_log(config)
    assert plog.start_epoch == 0
    for epoch in range(1, 9):
        plog.append(batch(2, size=100), epoch=epoch)
    plog.flush()
    plog.enforce_retention()
    start = plog.log_start_offset
    assert start > 0 and plog.start_epoch == plog.epoch_entries[0].epoch - 1
    crash(plog)
    plog = open_log(config)
    assert plog.log_start_offset == start and plog.start_epoch == plog.epoch_entries[0].epoch - 1
    plog.reset_to(100, start_epoch=42)
    plog.close()
    plog = open_log(config)
    assert (plog.log_start_offset, plog.start_epoch, plog.epoch_entries) == (100, 42, ())


def test_an_interrupted_retention_is_finished_on_open(open_log, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    config = LogConfig(segment_bytes=400, retention_bytes=0, recovery_point_interval_bytes=0)
    plog = open_log(config)
    for epoch in range(1, 9):
        plog.append(batch(2, size=100), epoch=epoch)
    plog.flush()
    bases = plog.segment_base_offsets

    def power_cut(self: PartitionLog, segment: object) -> None:
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr(PartitionLog, "_delete_segment_files", power_cut)
    with pytest.raises(KeyboardInterrupt):
        plog.enforce_retention()
    monkeypatch.undo()
    crash(plog)
    plog = open_log(config)
    assert plog.segment_base_offsets == (bases[-1],)
    assert plog.epoch_entries[0].start_offset == bases[-1]
    assert sorted(p.name for p in (tmp_path / "t-0").glob("*.log")) == [segment_name(bases[-1])]
