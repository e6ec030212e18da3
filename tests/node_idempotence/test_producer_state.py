"""Broker-side idempotent-producer state (issue 7 item 3, DESIGN.md §8).

Each rule test names the rule and the Kafka source it follows: `ProducerAppendInfo.checkSequence` /
`checkProducerEpoch`, `ProducerStateEntry`, `ProducerStateManager`, KIP-98 (idempotent producer) and
KIP-360 (unknown producer ids). Batch headers are built with the real codec (encode_batch, then
scan_batches and stamp_batches), exactly as the node will see them.
"""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Iterable
from pathlib import Path

import crc32c
import pytest

from tidelog.node import producer_state as ps
from tidelog.node.producer_state import (
    BATCHES_TO_RETAIN,
    DEFAULT_PRODUCER_ID_EXPIRATION_MS,
    INT32_MAX,
    BatchMetadata,
    CheckResult,
    ProducerEntry,
    ProducerStateManager,
    Verdict,
    decode_snapshot,
    list_snapshots,
    snapshot_path,
)
from tidelog.proto.common_pb2 import ErrorCode
from tidelog.proto.records import BatchHeader, Record, encode_batch, scan_batches, stamp_batches

NOW = 1_700_000_000_000
PID = 4000


def batch(
    producer_id: int = PID,
    epoch: int = 0,
    seq: int = 0,
    n: int = 1,
    *,
    timestamp: int = 1000,
    is_control: bool = False,
) -> bytes:
    """One client batch of ``n`` records, as a producer sends it (offsets not yet assigned)."""
    records = [Record(i, timestamp + i, None, b"v%d" % i) for i in range(n)]
    return encode_batch(
        records,
        producer_id=producer_id,
        producer_epoch=epoch,
        base_sequence=seq,
        is_control=is_control,
    )


class FakeLog:
    """A partition log in memory: stamped batch bytes plus a log start offset."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.log_start_offset = 0

    @property
    def end_offset(self) -> int:
        headers = scan_batches(self.buf, verify_crc=False)
        return headers[-1].next_offset if headers else self.log_start_offset

    def append(self, data: bytes | bytearray) -> list[BatchHeader]:
        stamped = bytearray(data)
        stamp_batches(stamped, self.end_offset, 1)
        self.buf += stamped
        return scan_batches(stamped)

    def headers(self) -> list[BatchHeader]:
        return [h for h in scan_batches(self.buf, verify_crc=False) if h.last_offset >= self.log_start_offset]

    def read_batches_from(self, offset: int) -> Iterable[BatchHeader]:
        return [h for h in self.headers() if h.last_offset >= offset]

    def truncate_to(self, offset: int) -> None:
        for h in scan_batches(self.buf, verify_crc=False):
            if h.base_offset >= offset:
                del self.buf[h.position :]
                return

    def boundaries(self) -> list[int]:
        return [h.base_offset for h in self.headers()] + [self.end_offset]


def produce(
    state: ProducerStateManager, log: FakeLog, *batches: bytes, now: int = NOW
) -> CheckResult:
    """The node's leader path: check, then (if APPEND) stamp, append and update."""
    data = b"".join(batches)
    headers = scan_batches(data)
    result = state.check(headers, now)
    if result.verdict is Verdict.APPEND:
        first_offset = log.end_offset
        log.append(data)
        state.update(headers, now, first_offset=first_offset)
    return result


def fresh_fold(log: FakeLog, now: int = NOW) -> ProducerStateManager:
    """The state a replica that replayed the whole (retained) log would have."""
    state = ProducerStateManager()
    state.rebuild(
        None,
        log_start_offset=log.log_start_offset,
        log_end_offset=log.end_offset,
        read_batches_from=log.read_batches_from,
        now_ms=now,
    )
    return state


def shape(state: ProducerStateManager) -> dict[int, tuple[int, tuple[BatchMetadata, ...]]]:
    """The state without the idle clock, which a replay resets."""
    return {pid: (e.producer_epoch, e.batches) for pid, e in state.entries().items()}


def assert_rejected(result: CheckResult, code: int) -> None:
    assert result.verdict is Verdict.REJECT, result
    assert result.error == code, (ErrorCode.Name(result.error), result.message)
    assert result.message


@pytest.fixture
def leader() -> ProducerStateManager:
    return ProducerStateManager(partition="t-0")


@pytest.fixture
def log() -> FakeLog:
    return FakeLog()


# --- sequence and epoch rules ---------------------------------------------------------------


def test_new_producer_starting_at_sequence_zero_is_appended(leader, log):
    """KIP-98: a producer's first batch in a partition carries sequence 0."""
    assert produce(leader, log, batch(seq=0, n=3)).verdict is Verdict.APPEND
    entry = leader.entry(PID)
    assert entry is not None
    assert (entry.producer_epoch, entry.last_seq, entry.last_offset) == (0, 2, 2)
    assert leader.end_offset == 3


def test_next_sequence_in_order_is_appended(leader, log):
    """ProducerAppendInfo.inSequence: nextSeq == lastSeq + 1."""
    produce(leader, log, batch(seq=0, n=3))
    assert produce(leader, log, batch(seq=3, n=2)).verdict is Verdict.APPEND
    assert leader.entry(PID).last_seq == 4


def test_gap_in_sequence_is_out_of_order_sequence_number(leader, log):
    """ProducerAppendInfo.checkSequence: same epoch, not in sequence → OutOfOrderSequenceException."""
    produce(leader, log, batch(seq=0, n=3))
    before = leader.entries()
    assert_rejected(produce(leader, log, batch(seq=4)), ErrorCode.OUT_OF_ORDER_SEQUENCE_NUMBER)
    assert leader.entries() == before
    assert log.end_offset == 3


def test_sequence_behind_the_retained_window_is_out_of_order(leader, log):
    """A repeat of a sequence that is not an exact retained batch is not a duplicate
    (ProducerStateEntry.batchWithSequenceRange matches first and last sequence both)."""
    produce(leader, log, batch(seq=0, n=3))
    produce(leader, log, batch(seq=3, n=3))
    assert_rejected(produce(leader, log, batch(seq=3, n=2)), ErrorCode.OUT_OF_ORDER_SEQUENCE_NUMBER)
    assert_rejected(produce(leader, log, batch(seq=1, n=2)), ErrorCode.OUT_OF_ORDER_SEQUENCE_NUMBER)
    assert log.end_offset == 6


def test_exact_retry_is_duplicate_with_original_offsets_and_timestamp(leader, log):
    """UnifiedLog.analyzeAndValidateProducerState / ProducerStateEntry.findDuplicateBatch: an exact
    retry is answered with the original batch's offsets and is not appended again (KIP-98)."""
    produce(leader, log, batch(PID + 1, seq=0, n=2))  # someone else first, so offsets are not 0
    first = batch(seq=0, n=3, timestamp=5000)
    assert produce(leader, log, first).verdict is Verdict.APPEND
    produce(leader, log, batch(seq=3, n=1))
    end = log.end_offset
    result = produce(leader, log, first)
    assert result.verdict is Verdict.DUPLICATE
    assert result.error == ErrorCode.NONE
    assert (result.base_offset, result.last_offset, result.max_timestamp) == (2, 4, 5002)
    assert log.end_offset == end


def test_any_of_the_last_five_batches_is_a_duplicate_but_not_the_sixth(leader, log):
    """ProducerStateEntry.NUM_BATCHES_TO_RETAIN = 5, aligned with the client's 5 in-flight batches."""
    sent = [batch(seq=i * 2, n=2) for i in range(BATCHES_TO_RETAIN + 1)]
    for data in sent:
        assert produce(leader, log, data).verdict is Verdict.APPEND
    assert len(leader.entry(PID).batches) == BATCHES_TO_RETAIN
    for i, data in enumerate(sent[1:], start=1):
        result = produce(leader, log, data)
        assert result.verdict is Verdict.DUPLICATE
        assert result.base_offset == i * 2
    assert_rejected(produce(leader, log, sent[0]), ErrorCode.OUT_OF_ORDER_SEQUENCE_NUMBER)
    assert log.end_offset == 12


def test_older_epoch_is_fenced_with_invalid_producer_epoch(leader, log):
    """ProducerAppendInfo.checkProducerEpoch: epoch below the current one from a client →
    InvalidProducerEpochException (a zombie producer is fenced)."""
    produce(leader, log, batch(epoch=3, seq=0))
    assert_rejected(produce(leader, log, batch(epoch=2, seq=1)), ErrorCode.INVALID_PRODUCER_EPOCH)
    assert_rejected(produce(leader, log, batch(epoch=2, seq=0)), ErrorCode.INVALID_PRODUCER_EPOCH)
    assert log.end_offset == 1


def test_new_epoch_must_start_at_sequence_zero(leader, log):
    """ProducerAppendInfo.checkSequence: "Invalid sequence number for new epoch" unless it is 0."""
    produce(leader, log, batch(epoch=0, seq=0, n=5))
    assert_rejected(produce(leader, log, batch(epoch=1, seq=5)), ErrorCode.OUT_OF_ORDER_SEQUENCE_NUMBER)
    assert produce(leader, log, batch(epoch=1, seq=0)).verdict is Verdict.APPEND
    assert leader.entry(PID).producer_epoch == 1


def test_epoch_bump_clears_the_window_so_old_epoch_retries_are_fenced(leader, log):
    """ProducerStateEntry.maybeUpdateProducerEpoch clears batch metadata on a new epoch (KIP-360
    client-side bump): a retry from the old epoch is then fenced, never taken as a duplicate."""
    old = batch(epoch=0, seq=0, n=2)
    produce(leader, log, old)
    produce(leader, log, batch(epoch=1, seq=0, n=2))
    assert [b.base_offset for b in leader.entry(PID).batches] == [2]
    assert_rejected(produce(leader, log, old), ErrorCode.INVALID_PRODUCER_EPOCH)


def test_sequence_wraps_to_zero_after_int32_max():
    """ProducerAppendInfo.inSequence: nextSeq == 0 && lastSeq == Integer.MAX_VALUE; a batch's last
    sequence wraps too (DefaultRecordBatch.incrementSequence)."""
    # 2^31 records cannot be sent in a test, so the history near the wrap comes in by replication.
    state = ProducerStateManager()
    near_end = scan_batches(batch(seq=INT32_MAX - 1, n=2))
    assert near_end[0].last_sequence == INT32_MAX
    state.update(near_end, NOW, first_offset=0)
    assert state.check(scan_batches(batch(seq=0, n=2)), NOW).verdict is Verdict.APPEND
    assert_rejected(state.check(scan_batches(batch(seq=1)), NOW), ErrorCode.OUT_OF_ORDER_SEQUENCE_NUMBER)
    # A batch that itself spans the wrap: INT32_MAX-1 .. 1, so the next one starts at 2.
    spanning = ProducerStateManager()
    header = scan_batches(batch(seq=INT32_MAX - 1, n=4))
    assert header[0].last_sequence == 1
    spanning.update(header, NOW, first_offset=0)
    assert spanning.check(scan_batches(batch(seq=2)), NOW).verdict is Verdict.APPEND
    assert spanning.check(scan_batches(batch(seq=0)), NOW).verdict is Verdict.REJECT
    assert spanning.check(header, NOW).verdict is Verdict.DUPLICATE


def test_unknown_producer_with_nonzero_sequence_is_unknown_producer_id(leader, log):
    """Deliberate deviation from Kafka >= 2.5 (KIP-360 accepts any sequence when there is no state):
    tidelog answers UNKNOWN_PRODUCER_ID as Kafka 1.0-2.4 did, because accepting a producer's second
    batch after its first was lost in a failover would reorder the partition (DESIGN.md §8)."""
    assert_rejected(produce(leader, log, batch(seq=7)), ErrorCode.UNKNOWN_PRODUCER_ID)
    assert_rejected(produce(leader, log, batch(epoch=5, seq=1)), ErrorCode.UNKNOWN_PRODUCER_ID)
    assert len(leader) == 0 and log.end_offset == 0
    assert produce(leader, log, batch(epoch=5, seq=0)).verdict is Verdict.APPEND


def test_failover_reorder_is_prevented(leader, log):
    """The scenario behind the deviation above: batch 0 is lost with the old leader, batch 1 reaches
    the new leader first and must wait for batch 0's retry."""
    first, second = batch(seq=0, n=2), batch(seq=2, n=2)
    assert_rejected(produce(leader, log, second), ErrorCode.UNKNOWN_PRODUCER_ID)
    assert produce(leader, log, first).verdict is Verdict.APPEND
    assert produce(leader, log, second).verdict is Verdict.APPEND
    assert [h.base_sequence for h in log.headers()] == [0, 2]


def test_batches_of_one_producer_in_one_request_are_checked_in_order(leader, log):
    """ProducerAppendInfo is updated batch by batch, so later batches of a request are checked
    against earlier ones."""
    assert produce(leader, log, batch(seq=0, n=2), batch(seq=2, n=3)).verdict is Verdict.APPEND
    assert leader.entry(PID).last_seq == 4
    assert_rejected(produce(leader, log, batch(seq=5), batch(seq=7)), ErrorCode.OUT_OF_ORDER_SEQUENCE_NUMBER)
    assert_rejected(produce(leader, log, batch(seq=5), batch(seq=5)), ErrorCode.OUT_OF_ORDER_SEQUENCE_NUMBER)
    assert_rejected(
        produce(leader, log, batch(epoch=1, seq=0), batch(epoch=0, seq=5)), ErrorCode.INVALID_PRODUCER_EPOCH
    )
    assert produce(leader, log, batch(epoch=1, seq=0), batch(epoch=1, seq=1)).verdict is Verdict.APPEND
    assert log.end_offset == 7


def test_one_bad_batch_rejects_the_whole_request(leader, log):
    """Kafka fails a partition's append as a whole: nothing of the request is stored."""
    produce(leader, log, batch(PID, seq=0))
    result = produce(leader, log, batch(PID + 1, seq=0), batch(PID, seq=9))
    assert_rejected(result, ErrorCode.OUT_OF_ORDER_SEQUENCE_NUMBER)
    assert leader.entry(PID + 1) is None and log.end_offset == 1


def test_retry_of_a_multi_batch_request_is_one_duplicate(leader, log):
    """A resent request whose batches are all retained answers with the first base offset and the
    last offset, and appends nothing."""
    request = (batch(seq=0, n=2, timestamp=10), batch(seq=2, n=2, timestamp=20))
    produce(leader, log, *request)
    result = produce(leader, log, *request)
    assert result.verdict is Verdict.DUPLICATE
    assert (result.base_offset, result.last_offset, result.max_timestamp) == (0, 3, 21)
    assert [d.first_seq for d in result.duplicates] == [0, 2]
    assert log.end_offset == 4


def test_request_mixing_a_retry_with_new_batches_is_invalid_request(leader, log):
    """Kafka would answer the whole request as the duplicate and drop the new batch silently;
    tidelog refuses the request instead."""
    retried = batch(seq=0, n=2)
    produce(leader, log, retried)
    assert_rejected(produce(leader, log, retried, batch(seq=2)), ErrorCode.INVALID_REQUEST)
    assert_rejected(produce(leader, log, retried, batch(PID + 1, seq=0)), ErrorCode.INVALID_REQUEST)
    assert_rejected(produce(leader, log, retried, batch(-1, -1, -1)), ErrorCode.INVALID_REQUEST)
    assert log.end_offset == 2


def test_batch_with_producer_id_but_no_sequence_is_invalid_request(leader, log):
    """Kafka's LogValidator.validateBatch: "Invalid sequence number ... in record batch with producerId"."""
    assert_rejected(produce(leader, log, batch(seq=-1)), ErrorCode.INVALID_REQUEST)
    assert_rejected(produce(leader, log, batch(epoch=-1, seq=0)), ErrorCode.INVALID_REQUEST)


def test_batches_without_producer_id_and_control_batches_are_not_tracked(leader, log):
    """Only batches with a producer id take part (DefaultRecordBatch.hasProducerId); the Raft
    leader-change marker is a control batch."""
    assert produce(leader, log, batch(-1, -1, -1, n=3), batch(-1, -1, -1)).verdict is Verdict.APPEND
    assert produce(leader, log, batch(-1, -1, -1, n=3)).verdict is Verdict.APPEND  # not a duplicate
    leader.update(log.append(batch(PID, 0, 5, is_control=True)), NOW)
    assert len(leader) == 0
    assert leader.end_offset == log.end_offset == 8


def test_check_changes_nothing(leader, log):
    """check is a pure verdict; only update folds batches in (the leader calls it after the append)."""
    produce(leader, log, batch(seq=0))
    before = (leader.entries(), leader.end_offset)
    leader.check(scan_batches(batch(seq=1)), NOW)
    leader.check(scan_batches(batch(PID + 1, seq=0)), NOW)
    assert (leader.entries(), leader.end_offset) == before


# --- the follower path ------------------------------------------------------------------------


def test_follower_update_yields_the_leaders_state(leader, log):
    """Kafka: followers append with REPLICATION origin and still update producer state, so a new
    leader has it at once (issue 7 item 3)."""
    follower = ProducerStateManager(partition="t-0")
    sends = [
        batch(PID, 0, 0, 3),
        batch(PID + 1, 2, 0, 1),
        batch(PID, 0, 3, 2),
        batch(PID, 0, 3, 2),  # duplicate: answered, not appended, not replicated
        batch(PID, 1, 0, 1),  # epoch bump
        batch(-1, -1, -1, 2),
        *[batch(PID + 1, 2, i, 1) for i in range(1, 8)],
    ]
    for i, data in enumerate(sends):
        start = len(log.buf)
        produce(leader, log, data, now=NOW + i)
        if len(log.buf) > start:
            follower.update(scan_batches(log.buf[start:]), NOW + i)
    assert follower.entries() == leader.entries()
    assert follower.end_offset == leader.end_offset == log.end_offset
    # The follower, promoted, answers a retry and fences exactly as the old leader would.
    retry = scan_batches(batch(PID + 1, 2, 7, 1))
    assert follower.check(retry, NOW) == leader.check(retry, NOW)
    assert follower.check(retry, NOW).verdict is Verdict.DUPLICATE


def test_follower_follows_an_older_epoch_in_the_log_with_a_warning(caplog):
    """ProducerAppendInfo.checkProducerEpoch for REPLICATION origin only logs; the log is the truth."""
    follower = ProducerStateManager(partition="t-0")
    log = FakeLog()
    follower.update(log.append(batch(epoch=3, seq=0)), NOW)
    with caplog.at_level(logging.WARNING, logger=ps.__name__):
        follower.update(log.append(batch(epoch=2, seq=0)), NOW)
    assert "older than the known epoch 3" in caplog.text
    assert follower.entry(PID).producer_epoch == 2
    assert shape(follower) == shape(fresh_fold(log))


def test_update_below_the_end_offset_is_refused(leader, log):
    """Replaying a batch twice would corrupt the window; the node must truncate_to first."""
    headers = log.append(batch(seq=0))
    leader.update(headers, NOW)
    with pytest.raises(ValueError, match="truncate_to first"):
        leader.update(headers, NOW)


# --- expiry and retention --------------------------------------------------------------------


def test_idle_producers_expire_after_producer_id_expiration_ms(leader, log):
    """ProducerStateManager.removeExpiredProducers; default producer.id.expiration.ms is one day."""
    assert DEFAULT_PRODUCER_ID_EXPIRATION_MS == 86_400_000
    produce(leader, log, batch(PID, seq=0), now=NOW)
    produce(leader, log, batch(PID + 1, seq=0), now=NOW + 1000)
    assert leader.expire(NOW + DEFAULT_PRODUCER_ID_EXPIRATION_MS - 1) == []
    assert leader.expire(NOW + DEFAULT_PRODUCER_ID_EXPIRATION_MS) == [PID]
    assert set(leader.entries()) == {PID + 1}
    assert leader.expire(NOW + 5000, producer_id_expiration_ms=4000) == [PID + 1]
    # An expired producer is unknown again: it must restart at sequence 0.
    assert_rejected(produce(leader, log, batch(PID, seq=1)), ErrorCode.UNKNOWN_PRODUCER_ID)


def test_activity_keeps_a_producer_alive(leader, log):
    """Idleness counts from the last batch this replica saw, on the broker's clock."""
    produce(leader, log, batch(seq=0), now=NOW)
    produce(leader, log, batch(seq=1), now=NOW + 10_000)
    assert leader.expire(NOW + 15_000, producer_id_expiration_ms=10_000) == []
    assert leader.expire(NOW + 20_000, producer_id_expiration_ms=10_000) == [PID]


def test_remove_before_forgets_producers_whose_last_batch_was_deleted(leader, log):
    """ProducerStateManager.onLogStartOffsetIncremented: entries whose last offset is below the new
    log start go; the rest equal a replay from the log start."""
    produce(leader, log, batch(PID, seq=0, n=2))  # 0-1
    produce(leader, log, batch(PID + 1, seq=0, n=2))  # 2-3
    produce(leader, log, batch(PID + 1, seq=2, n=2))  # 4-5
    log.log_start_offset = 4
    assert leader.remove_before(4) == [PID]
    assert [b.base_offset for b in leader.entry(PID + 1).batches] == [4]
    assert shape(leader) == shape(fresh_fold(log))
    assert_rejected(produce(leader, log, batch(PID, seq=2)), ErrorCode.UNKNOWN_PRODUCER_ID)


# --- snapshots --------------------------------------------------------------------------------


def _populated(log: FakeLog) -> ProducerStateManager:
    state = ProducerStateManager(partition="t-0")
    for i in range(7):
        produce(state, log, batch(PID, 0, i * 2, 2), now=NOW + i)
    produce(state, log, batch(PID + 1, 3, 0, 1), now=NOW + 100)
    produce(state, log, batch(-1, -1, -1, 1))
    return state


def test_snapshot_round_trip(tmp_path, log):
    """ProducerStateManager.takeSnapshot / loadFromSnapshot: every retained batch, epoch and idle
    clock survives; the file is named by the 20-digit offset."""
    state = _populated(log)
    path = state.take_snapshot(tmp_path, log.end_offset)
    assert path.name == f"{log.end_offset:020d}.snapshot"
    assert not list(tmp_path.glob("*.tmp"))
    loaded = ProducerStateManager()
    assert loaded.load_latest_snapshot(tmp_path, log.end_offset) == log.end_offset
    assert loaded.entries() == state.entries()
    assert loaded.end_offset == state.end_offset
    assert len(loaded.entry(PID).batches) == BATCHES_TO_RETAIN


def test_snapshot_layout_is_the_documented_one(tmp_path, log):
    """The module docstring's format: magic, version, CRC-32C of the rest, offset, entries."""
    state = _populated(log)
    data = state.take_snapshot(tmp_path).read_bytes()
    magic, version, crc = struct.unpack_from(">4shI", data)
    assert (magic, version) == (b"TLPS", 1)
    assert crc == crc32c.crc32c(data[10:])
    offset, count = struct.unpack_from(">qi", data, 10)
    assert (offset, count) == (log.end_offset, 2)
    pid, epoch, last_update, batches = struct.unpack_from(">qhqb", data, 22)
    assert (pid, epoch, last_update, batches) == (PID, 0, NOW + 6, 5)
    first_seq, last_seq, base, last, max_ts = struct.unpack_from(">iiqqq", data, 41)
    assert (first_seq, last_seq, base, last, max_ts) == (4, 5, 4, 5, 1001)
    assert len(data) == 22 + 2 * 19 + 6 * 32


def test_snapshot_can_be_encoded_on_the_loop_and_written_elsewhere(tmp_path, log):
    """snapshot_bytes captures the state now; later updates do not leak into the file."""
    state = _populated(log)
    offset, data = state.snapshot_bytes()
    before = state.entries()
    produce(state, log, batch(PID + 7, 0, 0))
    ProducerStateManager.write_snapshot(tmp_path, offset, data)
    loaded = ProducerStateManager()
    assert loaded.load_latest_snapshot(tmp_path, offset) == offset
    assert loaded.entries() == before


def test_snapshot_offset_below_the_state_is_refused(tmp_path, log):
    state = _populated(log)
    with pytest.raises(ValueError):
        state.take_snapshot(tmp_path, log.end_offset - 1)


def test_only_the_last_two_snapshots_are_kept(tmp_path, log):
    state = _populated(log)
    for i in range(4):
        produce(state, log, batch(PID + 2, 0, i))
        state.take_snapshot(tmp_path, log.end_offset)
    end = log.end_offset
    assert [offset for offset, _ in list_snapshots(tmp_path)] == [end - 1, end]


def test_rebuild_from_snapshot_plus_log_tail_equals_a_full_replay(tmp_path, log):
    """UnifiedLog.loadProducerState: the latest snapshot, then the batches after it."""
    state = _populated(log)
    state.take_snapshot(tmp_path, log.end_offset)
    for i in range(3):
        produce(state, log, batch(PID, 0, 14 + i), now=NOW)
    produce(state, log, batch(PID + 3, 0, 0), now=NOW)
    restarted = ProducerStateManager()
    calls: list[int] = []

    def read(offset: int) -> Iterable[BatchHeader]:
        calls.append(offset)
        return log.read_batches_from(offset)

    restarted.rebuild(
        tmp_path, log_start_offset=0, log_end_offset=log.end_offset, read_batches_from=read, now_ms=NOW
    )
    assert calls == [16]  # replay starts at the snapshot, not at the log start
    assert shape(restarted) == shape(state) == shape(fresh_fold(log))
    assert restarted.end_offset == log.end_offset


@pytest.mark.parametrize(
    "damage",
    ["flip_byte", "truncate", "empty", "garbage", "wrong_offset", "bad_version", "trailing_bytes"],
)
def test_corrupt_snapshot_falls_back_to_older_snapshot_with_a_warning(tmp_path, log, caplog, damage):
    """A corrupt snapshot is skipped with a warning and deleted (Kafka removes it too); the older
    one plus a longer replay gives the same state, never a crash."""
    state = _populated(log)
    older = state.take_snapshot(tmp_path, log.end_offset)
    produce(state, log, batch(PID, 0, 14))
    newest = state.take_snapshot(tmp_path, log.end_offset)
    data = bytearray(newest.read_bytes())
    if damage == "flip_byte":
        data[len(data) // 2] ^= 0x40
    elif damage == "truncate":
        del data[-7:]
    elif damage == "empty":
        data = bytearray()
    elif damage == "garbage":
        data = bytearray(os.urandom(200))
    elif damage == "wrong_offset":
        os.replace(older, snapshot_path(tmp_path, log.end_offset - 1))
        older = snapshot_path(tmp_path, log.end_offset - 1)
        data = bytearray(ps.encode_snapshot(12345, state.entries().values()))
    elif damage == "bad_version":
        struct.pack_into(">h", data, 4, 2)
    elif damage == "trailing_bytes":
        data = bytearray(ps.encode_snapshot(log.end_offset, state.entries().values()))
        data += b"\0"  # the CRC covers it, so only the length check catches it
        struct.pack_into(">I", data, 6, crc32c.crc32c(bytes(data[10:])))
    newest.write_bytes(bytes(data))
    restarted = ProducerStateManager(partition="t-0")
    with caplog.at_level(logging.WARNING, logger=ps.__name__):
        restarted.rebuild(
            tmp_path,
            log_start_offset=0,
            log_end_offset=log.end_offset,
            read_batches_from=log.read_batches_from,
            now_ms=NOW,
        )
    assert "corrupt producer-state snapshot" in caplog.text
    assert shape(restarted) == shape(state)
    assert not newest.exists() and older.exists()


def test_all_snapshots_corrupt_rebuilds_from_the_log_start(tmp_path, log, caplog):
    state = _populated(log)
    for _ in range(2):
        produce(state, log, batch(PID + 5, 0, state.entry(PID + 5).last_seq + 1 if state.entry(PID + 5) else 0))
        state.take_snapshot(tmp_path, log.end_offset).write_bytes(b"TLPS\0\1broken")
    restarted = ProducerStateManager()
    with caplog.at_level(logging.WARNING, logger=ps.__name__):
        restarted.rebuild(
            tmp_path,
            log_start_offset=0,
            log_end_offset=log.end_offset,
            read_batches_from=log.read_batches_from,
            now_ms=NOW,
        )
    assert caplog.text.count("corrupt producer-state snapshot") == 2
    assert shape(restarted) == shape(state)
    assert list_snapshots(tmp_path) == []


def test_rebuild_ignores_snapshots_outside_the_log_and_leftover_temp_files(tmp_path, log):
    """ProducerStateManager.truncateAndReload deletes snapshots outside [logStart, logEnd]."""
    state = _populated(log)
    state.take_snapshot(tmp_path, log.end_offset)  # its PID window still holds offsets 0-1
    ps._write_atomically(snapshot_path(tmp_path, 1), ps.encode_snapshot(1, []))
    ps._write_atomically(snapshot_path(tmp_path, 999), ps.encode_snapshot(999, []))
    (tmp_path / f"{5:020d}.snapshot.tmp").write_bytes(b"half")
    log.log_start_offset = 6  # retention after the snapshot: PID's window loses offsets 4-5
    restarted = ProducerStateManager()
    restarted.rebuild(
        tmp_path,
        log_start_offset=6,
        log_end_offset=log.end_offset,
        read_batches_from=log.read_batches_from,
        now_ms=NOW,
    )
    assert [offset for offset, _ in list_snapshots(tmp_path)] == [log.end_offset]
    assert not list(tmp_path.glob("*.tmp"))
    assert shape(restarted) == shape(fresh_fold(log))
    assert [b.base_offset for b in restarted.entry(PID).batches] == [6, 8, 10, 12]


def test_rebuild_counts_a_batch_holding_the_log_start(log):
    """DeleteRecords can move the log start inside a batch; that batch still exists for consumers
    and for producer state."""
    produce(ProducerStateManager(), log, batch(seq=0, n=4))
    log.log_start_offset = 2
    state = fresh_fold(log)
    assert state.entry(PID).batches[0].base_offset == 0
    assert state.end_offset == 4


# --- truncation -----------------------------------------------------------------------------


def test_truncation_drops_the_state_of_truncated_batches(tmp_path, log):
    """UnifiedLog.truncateTo → rebuildProducerState: state from batches at or after the truncation
    offset is gone, so the lost batch's retry is appended again rather than answered as a duplicate,
    and a snapshot above the truncation point is deleted."""
    state = _populated(log)
    state.take_snapshot(tmp_path, log.end_offset)
    offset = log.end_offset
    lost = batch(PID, 0, 14, 2)
    produce(state, log, lost)
    produce(state, log, batch(PID + 9, 0, 0))
    state.take_snapshot(tmp_path, log.end_offset)
    log.truncate_to(offset)
    state.truncate_to(offset, tmp_path, log_start_offset=0, read_batches_from=log.read_batches_from, now_ms=NOW)
    assert [o for o, _ in list_snapshots(tmp_path)] == [offset]
    assert shape(state) == shape(fresh_fold(log))
    assert state.entry(PID + 9) is None and state.end_offset == offset
    assert produce(state, log, lost).verdict is Verdict.APPEND
    assert log.end_offset == offset + 2


def test_truncation_that_touches_no_producer_is_cheap(tmp_path, log):
    """No producer has a batch in the dropped tail: nothing is replayed, but a snapshot above the
    truncation point still goes, or a later restart would load truncated state."""
    state = _populated(log)
    produce(state, log, batch(-1, -1, -1, 3))
    end = log.end_offset
    state.take_snapshot(tmp_path, end)

    def refuse(offset: int) -> Iterable[BatchHeader]:
        raise AssertionError("no replay needed")

    log.truncate_to(end - 3)
    state.truncate_to(end - 3, tmp_path, log_start_offset=0, read_batches_from=refuse, now_ms=NOW)
    assert state.end_offset == end - 3
    assert list_snapshots(tmp_path) == []
    state.truncate_to(end + 10, None, log_start_offset=0, read_batches_from=refuse, now_ms=NOW)
    assert state.end_offset == end - 3


def test_truncation_restores_a_window_evicted_by_the_dropped_batches(log):
    """The sixth batch evicted the first from the window; truncating it away brings the first back,
    which only a replay can do."""
    state = ProducerStateManager()
    sent = [batch(seq=i) for i in range(6)]
    for data in sent:
        produce(state, log, data)
    log.truncate_to(5)
    state.truncate_to(5, None, log_start_offset=0, read_batches_from=log.read_batches_from, now_ms=NOW)
    assert produce(state, log, sent[0]).verdict is Verdict.DUPLICATE


def test_check_result_and_entry_views_are_values():
    entry = ProducerEntry(1, 0, NOW, (BatchMetadata(0, 0, 0, 0, 0),))
    with pytest.raises(AttributeError):
        entry.producer_epoch = 2  # type: ignore[misc]
    assert ps.APPEND == CheckResult(Verdict.APPEND)
    assert decode_snapshot(ps.encode_snapshot(7, [entry])) == (7, [entry])
