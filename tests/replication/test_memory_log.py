"""MemoryLog: the RaftLog contract (offsets, epochs, KIP-101 lookups) and its crash model."""

from __future__ import annotations

import random

import pytest

from tidelog.proto.records import scan_batches
from tidelog.replication.log import LogAppendError, MemoryLog, OffsetOutOfRangeError
from tidelog.replication.testing import batch


def test_leader_append_assigns_offsets_and_stamps_the_epoch() -> None:
    log = MemoryLog()
    assert (log.start_offset, log.end_offset, log.last_epoch) == (0, 0, 0)
    assert log.append(batch(b"a", b"b"), 3) == (0, 1)
    assert log.append(batch(b"c") + batch(b"d", b"e", b"f"), 4) == (2, 5)
    headers = scan_batches(log.read(0, 1 << 20))
    assert [(h.base_offset, h.last_offset, h.partition_leader_epoch) for h in headers] == [
        (0, 1, 3),
        (2, 2, 4),
        (3, 5, 4),
    ]
    assert (log.end_offset, log.last_epoch) == (6, 4)
    assert [log.epoch_for(o) for o in (0, 1, 2, 5, 6)] == [3, 3, 4, 4, None]


def test_leader_append_refuses_an_older_epoch() -> None:
    log = MemoryLog()
    log.append(batch(b"a"), 5)
    with pytest.raises(LogAppendError):
        log.append(batch(b"b"), 4)


def test_replicated_append_keeps_offsets_and_checks_continuity() -> None:
    leader = MemoryLog()
    leader.append(batch(b"a"), 1)
    leader.append(batch(b"b", b"c"), 2)
    follower = MemoryLog()
    with pytest.raises(LogAppendError):
        follower.append_replicated(leader.read(1, 1 << 20))  # starts at 1, follower ends at 0
    assert follower.append_replicated(leader.read(0, 1 << 20)) == (0, 2)
    assert follower.read(0, 1 << 20) == leader.read(0, 1 << 20)
    with pytest.raises(LogAppendError):
        follower.append_replicated(leader.read(0, 1 << 20))


def test_read_returns_whole_batches_and_at_least_one() -> None:
    log = MemoryLog()
    for value in (b"a", b"b", b"c"):
        log.append(batch(value), 1)
    one = log.read(1, 1)
    assert [h.base_offset for h in scan_batches(one)] == [1]
    assert [h.base_offset for h in scan_batches(log.read(0, len(one) * 2))] == [0, 1]
    assert log.read(3, 1 << 20) == b""
    with pytest.raises(OffsetOutOfRangeError):
        MemoryLog(start_offset=5).read(4, 100)


@pytest.mark.parametrize(
    "epoch, expected",
    [(0, (0, 0)), (1, (1, 2)), (2, (1, 2)), (3, (3, 3)), (4, (4, 6)), (9, (4, 6))],
)
def test_end_offset_for_epoch_follows_kip_101(epoch: int, expected: tuple[int, int]) -> None:
    """KIP-101/KIP-595: the largest epoch <= the one asked for, and where that epoch ends."""
    log = MemoryLog()
    for e in (1, 1, 3, 4, 4, 4):
        log.append(batch(b"x"), e)
    assert log.end_offset_for_epoch(epoch) == expected


def test_truncate_drops_batches_and_epochs() -> None:
    log = MemoryLog()
    for e in (1, 1, 2, 3):
        log.append(batch(b"x"), e)
    assert log.truncate_to(2) == 2
    assert (log.end_offset, log.last_epoch) == (2, 1)
    assert log.end_offset_for_epoch(3) == (1, 2)
    log.append(batch(b"y"), 5)
    assert log.end_offset_for_epoch(4) == (1, 2)


def test_crash_keeps_flushed_data_and_loses_unflushed() -> None:
    log = MemoryLog()
    log.append(batch(b"a"), 1)
    log.flush()
    for value in (b"b", b"c", b"d"):
        log.append(batch(value), 1)
    survivors = set()
    for seed in range(50):
        copy = MemoryLog()
        copy.append_replicated(log.read(0, 1 << 20)[: len(batch(b"a"))])
        copy.flush()
        copy.append_replicated(log.read(1, 1 << 20))
        copy.crash(random.Random(seed), tear=True)
        assert copy.end_offset >= 1
        assert copy.read(0, 1 << 20) == log.read(0, 1 << 20)[: len(copy.read(0, 1 << 20))]
        scan_batches(copy.read(0, 1 << 20))  # no torn batch left behind
        survivors.add(copy.end_offset)
    assert survivors == {1, 2, 3, 4}  # every prefix of the unflushed tail can survive


def test_unflushed_truncation_is_undone_by_a_crash() -> None:
    """A truncation is a change to the file like any other: not durable until the next flush."""
    log = MemoryLog()
    for value in (b"a", b"b", b"c"):
        log.append(batch(value), 1)
    log.flush()
    before = log.read(0, 1 << 20)
    log.truncate_to(1)
    log.append(batch(b"z"), 2)
    log.crash(random.Random(0))
    assert log.read(0, 1 << 20) == before
    log.truncate_to(1)
    log.flush()
    log.crash(random.Random(0))
    assert log.end_offset == 1


def test_retention_moves_the_log_start_and_keeps_epochs() -> None:
    log = MemoryLog()
    for e in (1, 1, 2, 2, 3):
        log.append(batch(b"x"), e)
    log.flush()
    assert log.delete_before(3) == 3
    assert (log.start_offset, log.end_offset) == (3, 5)
    assert log.end_offset_for_epoch(2) == (2, 4)
    assert log.end_offset_for_epoch(1) == (0, 3)
    with pytest.raises(OffsetOutOfRangeError):
        log.read(2, 100)


def test_reset_starts_an_empty_log_further_on_and_is_undone_by_a_crash_before_a_flush() -> None:
    log = MemoryLog()
    log.append(batch(b"a"), 1)
    log.flush()
    before = log.read(0, 1 << 20)
    log.reset_to(10, 1)
    assert (log.start_offset, log.end_offset, log.last_epoch) == (10, 10, 1)
    log.crash(random.Random(0))
    assert (log.start_offset, log.read(0, 1 << 20)) == (0, before)
    log.reset_to(10, 1)
    leader = MemoryLog()
    for _ in range(12):
        leader.append(batch(b"y"), 2)
    log.append_replicated(leader.read(10, 1 << 20))
    log.flush()
    log.crash(random.Random(0))
    assert (log.start_offset, log.end_offset) == (10, 12)


def test_crash_after_an_unflushed_reset_brings_back_the_old_log_only() -> None:
    log = MemoryLog()
    log.reset_to(13, 1)
    leader = MemoryLog()
    for _ in range(15):
        leader.append(batch(b"y"), 1)
    log.append_replicated(leader.read(13, 1 << 20))
    for seed in range(10):
        copy = MemoryLog()
        copy.reset_to(13, 1)
        copy.append_replicated(leader.read(13, 1 << 20))
        copy.crash(random.Random(seed))
        assert (copy.start_offset, copy.end_offset) == (0, 0)


def test_an_emptied_log_keeps_the_epoch_its_prefix_ended_in() -> None:
    """A log emptied down to its start (retention then truncation, or a reset) must still say
    which epoch its prefix ended in: votes and fetch validation compare (last epoch, end offset)."""
    log = MemoryLog()
    for e in (1, 2, 2, 3):
        log.append(batch(b"x"), e)
    log.flush()
    log.delete_before(2)
    assert (log.start_offset, log.start_epoch) == (2, 2)
    log.truncate_to(2)
    assert (log.end_offset, log.last_epoch) == (2, 2)
    assert log.end_offset_for_epoch(2) == (2, 2) and log.end_offset_for_epoch(1) == (0, 2)
    log.append_replicated(_batch_at(2, 4))
    assert log.end_offset_for_epoch(3) == (2, 2) and log.end_offset_for_epoch(4) == (4, 3)


def _batch_at(offset: int, epoch: int) -> bytes:
    leader = MemoryLog(start_offset=offset, start_epoch=epoch)
    leader.append(batch(b"z"), epoch)
    return leader.read(offset, 1 << 20)
