"""Log compaction (tidelog.node.compaction) on a real PartitionLog: Kafka's log cleaner rules."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tidelog.node.compaction import (
    CLEANER_CHECKPOINT,
    CleanerConfig,
    clean_log,
    finish_clean,
    has_keyless_record,
    prepare_clean,
    read_checkpoint,
    write_checkpoint,
)
from tidelog.node.config import TOPIC_CONFIG_DEFAULTS, ConfigError, build_config, validate_topic_config
from tidelog.node.partitions import cleaner_config, deletes_by_retention, is_compacted
from tidelog.node.replica import RaftLogAdapter
from tidelog.node.storage import LogConfig, PartitionLog, SwapStep
from tidelog.proto.records import Record, decode_batches, encode_batch, scan_batches

SEGMENT = 400
LOG = LogConfig(segment_bytes=SEGMENT, index_interval_bytes=64, recovery_point_interval_bytes=0)
CLEANER = CleanerConfig(delete_retention_ms=1000, min_cleanable_dirty_ratio=0.5,
                        segment_bytes=SEGMENT, index_interval_bytes=64)

Entry = tuple[int, bytes | None, bytes | None]  # (offset, key, value)


class Clock:
    def __init__(self, now: int = 10_000) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


@pytest.fixture
def opened(tmp_path: Path):
    logs: list[PartitionLog] = []

    def opener(directory: Path | None = None, config: LogConfig = LOG) -> PartitionLog:
        plog = PartitionLog.open(directory or tmp_path / "t-0", config, clock=Clock())
        logs.append(plog)
        return plog

    yield opener
    for plog in logs:
        plog._close_files()


def put(plog: PartitionLog, *pairs: tuple[bytes | None, bytes | None], epoch: int = 1,
        ts: int = 1000, **batch: object) -> int:
    """Append one batch of ``pairs`` and flush it (so its segment can become cleanable)."""
    records = [Record(0, ts + i, key, value) for i, (key, value) in enumerate(pairs)]
    result = plog.append(encode_batch(records, **batch), epoch)
    plog.flush()
    return result.base_offset


def contents(plog: PartitionLog, start: int | None = None) -> list[Entry]:
    """Every record from ``start`` as a consumer reads it: batch by batch, across gaps."""
    offset = plog.log_start_offset if start is None else start
    out: list[Entry] = []
    while offset < plog.end_offset:
        data = plog.read(offset, 1 << 20)
        if not data:
            break
        for batch in decode_batches(data):
            if not batch.is_control:  # consumers skip them
                out.extend((r.offset, r.key, r.value) for r in batch.records())
            offset = batch.next_offset
    return out


def batch_ranges(plog: PartitionLog) -> list[tuple[int, int]]:
    """(base offset, next offset) of every batch, empty ones included."""
    offset, out = plog.log_start_offset, []
    while offset < plog.end_offset:
        headers = scan_batches(plog.read(offset, 1 << 20))
        out.extend((h.base_offset, h.next_offset) for h in headers)
        offset = headers[-1].next_offset
    return out


def compacted(entries: list[Entry], limit: int, drop_tombstones: bool = False) -> list[Entry]:
    """The model: below ``limit`` only each key's latest record survives (keyless ones all do)."""
    latest = {key: offset for offset, key, _ in entries if offset < limit and key is not None}
    return [(offset, key, value) for offset, key, value in entries
            if offset >= limit or key is None
            or (latest[key] == offset and not (drop_tombstones and value is None))]


def fill(plog: PartitionLog, count: int, keys: int = 5, start: int = 0) -> list[Entry]:
    entries = []
    for i in range(start, start + count):
        key, value = f"k{i % keys}".encode(), f"v{i}".encode()
        entries.append((put(plog, (key, value)), key, value))
    return entries


def first_uncleanable(plog: PartitionLog) -> int:
    return plog.cleanable_segments(plog.end_offset)[-1].next_offset


# --- what survives -----------------------------------------------------------------------------


def test_latest_record_per_key_survives_with_its_offset(opened, tmp_path: Path) -> None:
    plog = opened()
    entries = fill(plog, 60)
    limit = first_uncleanable(plog)
    stats = clean_log(plog, plog.end_offset, CLEANER, 0)
    assert stats is not None and stats.records_removed > 0 and stats.clean_offset == limit
    want = compacted(entries, limit)
    assert contents(plog) == want
    assert plog.size_bytes < stats.bytes_before + (plog.size_bytes - stats.bytes_after)
    plog.verify()
    assert plog.log_start_offset == 0 and plog.end_offset == 60
    # Durable: a reopen (clean or after a crash) reads the same records.
    plog.close()
    assert contents(opened()) == want
    assert read_checkpoint(tmp_path / "t-0").clean_offset == limit


def test_only_committed_whole_segments_below_the_active_one_are_cleaned(opened) -> None:
    plog = opened()
    entries = fill(plog, 60)
    below = plog.segment_base_offsets[3]  # pretend the high watermark is here
    clean_log(plog, below, CLEANER, 0)
    assert contents(plog) == compacted(entries, below)
    # The active segment is never cleaned, whatever the high watermark.
    active = plog.segment_base_offsets[-1]
    assert all(s.base_offset < active for s in plog.cleanable_segments(plog.end_offset))


def test_a_second_pass_rewrites_nothing_without_new_dirty_data(opened, tmp_path: Path) -> None:
    plog = opened()
    fill(plog, 60)
    assert clean_log(plog, plog.end_offset, CLEANER, 0) is not None
    # Below min.cleanable.dirty.ratio: no pass at all.
    assert clean_log(plog, plog.end_offset, CLEANER, 0) is None
    # Forced passes may still merge segments (and drop the empty batches that merging makes
    # unnecessary), but that settles; then a pass writes nothing.
    writes = [clean_log(plog, plog.end_offset, CLEANER, 0, force=True) for _ in range(3)]
    assert all(s is not None and s.records_removed == 0 for s in writes)
    assert writes[-1] is not None and writes[-1].segments_written == 0
    files = {p.name: p.stat().st_ino for p in (tmp_path / "t-0").iterdir() if p.suffix == ".log"}
    stats = clean_log(plog, plog.end_offset, CLEANER, 0, force=True)
    assert stats is not None and stats.segments_written == 0
    after = {p.name: p.stat().st_ino for p in (tmp_path / "t-0").iterdir() if p.suffix == ".log"}
    assert {n: i for n, i in after.items() if n in files} == {n: i for n, i in files.items() if n in after}


def test_new_dirty_data_shadows_records_in_the_clean_section(opened) -> None:
    plog = opened()
    entries = fill(plog, 40)
    clean_log(plog, plog.end_offset, CLEANER, 0)
    entries += fill(plog, 60, keys=3, start=40)  # k0..k2 again: older k0..k2 must go
    limit = first_uncleanable(plog)
    assert clean_log(plog, plog.end_offset, CLEANER, 0) is not None
    assert contents(plog) == compacted(entries, limit)


def test_keyless_records_and_control_batches_are_kept(opened) -> None:
    plog = opened()
    entries = []
    for i in range(30):
        key = None if i % 3 == 0 else b"k"
        entries.append((put(plog, (key, b"v%d" % i)), key, b"v%d" % i))
    control = put(plog, (b"\x00\x00\x00\x02", b"leader"), is_control=True)
    entries += fill(plog, 20, start=100)
    clean_log(plog, plog.end_offset, CLEANER, 0)
    assert control < first_uncleanable(plog)
    assert contents(plog) == compacted(entries, first_uncleanable(plog))
    data = plog.read(control, 1 << 20)
    assert scan_batches(data)[0].is_control and scan_batches(data)[0].base_offset == control


# --- tombstones ----------------------------------------------------------------------------------


def test_tombstone_is_kept_then_removed(opened) -> None:
    plog = opened()
    entries = fill(plog, 10)
    tomb = put(plog, (b"k1", None))
    entries.append((tomb, b"k1", None))
    entries += fill(plog, 40, keys=1, start=100)  # only k0 afterwards: k1's tombstone is its latest
    limit = first_uncleanable(plog)
    assert tomb < limit
    # First clean: the tombstone's segment was dirty; every older k1 goes, the tombstone stays.
    clean_log(plog, plog.end_offset, CLEANER, now_ms=50_000)
    assert contents(plog) == compacted(entries, limit)
    assert (tomb, b"k1", None) in contents(plog)
    assert read_checkpoint(plog.directory).tombstones_due_ms == 50_000 + CLEANER.delete_retention_ms
    # Still within delete.retention.ms of that clean: kept (and no pass is due).
    assert clean_log(plog, plog.end_offset, CLEANER, now_ms=50_999) is None
    clean_log(plog, plog.end_offset, CLEANER, now_ms=50_999, force=True)
    assert (tomb, b"k1", None) in contents(plog)
    # Due now: a pass runs without new dirty data and removes it.
    assert clean_log(plog, plog.end_offset, CLEANER, now_ms=51_000) is not None
    assert contents(plog) == compacted(entries, limit, drop_tombstones=True)
    assert all(key != b"k1" for _, key, _ in contents(plog))


def test_a_record_after_a_tombstone_shadows_it_at_once(opened) -> None:
    plog = opened()
    entries = fill(plog, 10)
    tomb = put(plog, (b"k1", None))
    entries.append((tomb, b"k1", None))
    entries += fill(plog, 40, start=11)
    limit = first_uncleanable(plog)
    clean_log(plog, plog.end_offset, CLEANER, now_ms=0)
    assert (tomb, b"k1", None) not in contents(plog)
    assert contents(plog) == compacted(entries, limit)


# --- batches keep their identity -------------------------------------------------------------


@pytest.mark.parametrize("codec", ["lz4", "gzip", "none"])
def test_rewritten_batches_keep_header_fields_and_codec(opened, codec: str) -> None:
    plog = opened()
    pairs = [(b"a", b"1"), (b"b", b"2"), (b"a", b"3"), (b"c", b"4"), (b"b", b"5")]
    base = put(plog, *pairs, compression=codec, producer_id=7, producer_epoch=2, base_sequence=40)
    put(plog, (b"c", b"6"), compression=codec, producer_id=7, producer_epoch=2, base_sequence=45)
    for i in range(12):
        put(plog, (b"c" if i == 0 else b"z", b"%d" % i))  # roll past both; c again at 6
    original = scan_batches(plog.read(base, 1))[0]
    clean_log(plog, plog.end_offset, CLEANER, 0)
    (header,) = decode_batches(plog.read(base, 1))
    assert [(r.offset, r.key, r.value) for r in header.records()] == [(2, b"a", b"3"), (4, b"b", b"5")]
    assert [r.timestamp for r in header.records()] == [1002, 1004]
    for name in ("base_offset", "last_offset_delta", "partition_leader_epoch", "attributes",
                 "producer_id", "producer_epoch", "base_sequence", "base_timestamp", "max_timestamp"):
        assert getattr(header, name) == getattr(original, name), name
    assert header.record_count == 2 and header.compression.name.lower() == codec
    # The producer's last batch in the segment lost its only record but stays, empty.
    (empty,) = decode_batches(plog.read(5, 1))
    assert (empty.base_offset, empty.record_count, empty.base_sequence, empty.producer_id) == (5, 0, 45, 7)
    assert list(empty.records()) == []


def test_an_emptied_batch_goes_unless_last_of_its_producer_or_segment(opened) -> None:
    plog = opened()
    put(plog, (b"a", b"1"), producer_id=1, producer_epoch=0, base_sequence=0)  # 0: dropped
    put(plog, (b"a", b"2"), producer_id=1, producer_epoch=0, base_sequence=1)  # 1: last of pid 1
    put(plog, (b"b", b"3"))  # 2: no producer id, emptied: dropped
    put(plog, (b"b", b"4"), producer_id=2, producer_epoch=0, base_sequence=0)  # 3: last of pid 2
    for i in range(12):
        put(plog, (b"a" if i % 2 else b"b", b"x%d" % i))
    clean_log(plog, plog.end_offset, CLEANER, 0)
    headers = scan_batches(plog.read(0, 1 << 20))
    kept = [(h.base_offset, h.record_count) for h in headers]
    assert kept[:2] == [(1, 0), (3, 0)]
    # The segment's last batch stays too, so its batches end where the next segment begins.
    assert headers[-1].next_offset == plog.segment_base_offsets[1]


@pytest.mark.parametrize("codec", ["lz4", "none"])
def test_keyless_records_are_found_for_the_produce_check(codec: str) -> None:
    keyed = encode_batch([Record(0, 1, b"k", b"v"), Record(0, 2, b"k2", None)], compression=codec)
    keyless = encode_batch([Record(0, 1, b"k", b"v"), Record(0, 2, None, b"v")], compression=codec)
    assert not has_keyless_record(keyed, scan_batches(keyed))
    assert has_keyless_record(keyed + keyless, scan_batches(keyed + keyless))


# --- reads across gaps, replication from a compacted log --------------------------------------


def test_reads_at_removed_offsets_return_the_next_surviving_batch(opened) -> None:
    plog = opened()
    entries = fill(plog, 60)
    limit = first_uncleanable(plog)
    clean_log(plog, plog.end_offset, CLEANER, 0)
    survivors = compacted(entries, limit)
    for offset in range(60):
        first = next(e for e in survivors if e[0] >= offset)
        batch = next(decode_batches(plog.read(offset, 1)))
        got = [(r.offset, r.key, r.value) for r in batch.records()]
        assert batch.next_offset > offset
        assert got == [] or got[0] == first or got[0][0] >= offset
        assert contents(plog, offset) == [e for e in survivors if e[0] >= offset]
    found = plog.offset_for_timestamp(1000)
    assert found is not None and found.offset == batch_ranges(plog)[0][0] > 0


def test_a_follower_copies_a_compacted_leader_and_recovers_its_gaps(opened, tmp_path: Path) -> None:
    leader = opened()
    fill(leader, 60)
    clean_log(leader, leader.end_offset, CLEANER, 0)
    follower = opened(tmp_path / "f-0")
    adapter = RaftLogAdapter(follower)
    while adapter.end_offset < leader.end_offset:
        adapter.append_replicated(leader.read(adapter.end_offset, 300))
        follower.flush()
    assert contents(follower) == contents(leader)
    assert follower.end_offset == leader.end_offset
    # Its own active segment now holds gaps; a crash-recovery scan must accept them.
    follower._close_files()
    reopened = opened(tmp_path / "f-0")
    assert contents(reopened) == contents(leader)
    reopened.verify()
    first = contents(leader)[0][0]
    assert reopened.epoch_for(first) == 1 and reopened.epoch_entries[0].start_offset <= first


def test_a_follower_records_the_leaders_epoch_starts_since_control_batches_survive(opened, tmp_path: Path) -> None:
    # Each Raft epoch opens with the new leader's control batch (KIP-595's leader change),
    # which compaction never removes: a follower copying a compacted log sees every epoch
    # start where the leader does, so KIP-101 truncation answers stay exact.
    leader = opened()
    for epoch in (1, 2, 3):
        put(leader, (b"\x00\x00\x00\x02", b"leader %d" % epoch), epoch=epoch, is_control=True)
        for i in range(8):
            put(leader, (b"k%d" % (i % 2), b"v%d-%d" % (epoch, i)), epoch=epoch)
    for i in range(10):
        put(leader, (b"k%d" % (i % 2), b"late%d" % i), epoch=3)
    clean_log(leader, leader.end_offset, CLEANER, 0)
    assert len(contents(leader)) < 34
    follower = opened(tmp_path / "f-0")
    while follower.end_offset < leader.end_offset:
        follower.append_replicated(leader.read(follower.end_offset, 300))
    assert follower.epoch_entries == leader.epoch_entries
    for epoch in (0, 1, 2, 3):
        assert follower.end_offset_for_epoch(epoch) == leader.end_offset_for_epoch(epoch)


def test_truncation_into_a_gap_keeps_the_batches_before_it(opened, tmp_path: Path) -> None:
    leader = opened()
    fill(leader, 30, keys=2)
    clean_log(leader, leader.end_offset, CLEANER, 0)
    follower = opened(tmp_path / "f-0", LogConfig(index_interval_bytes=64))  # one big segment
    follower.append_replicated(leader.read(0, 1 << 20))
    while follower.end_offset < leader.end_offset:
        follower.append_replicated(leader.read(follower.end_offset, 1 << 20))
    ranges = batch_ranges(follower)
    gap = next(end for (_, end), (base, _) in zip(ranges, ranges[1:]) if base > end)
    survivors = [e[0] for e in contents(follower)]
    assert follower.truncate_to(gap) == gap
    assert [e[0] for e in contents(follower)] == [o for o in survivors if o < gap]
    follower._close_files()
    assert opened(tmp_path / "f-0", LogConfig(index_interval_bytes=64)).end_offset == gap


# --- concurrency and crashes --------------------------------------------------------------------


def test_appends_and_reads_continue_while_a_pass_is_prepared(opened) -> None:
    plog = opened()
    entries = fill(plog, 60)
    segments = plog.cleanable_segments(plog.end_offset)
    limit = segments[-1].next_offset
    result: list[object] = []
    worker = threading.Thread(target=lambda: result.append(
        prepare_clean(plog.directory, segments, CLEANER, 0)))
    worker.start()
    more = fill(plog, 40, start=60)  # rolls segments and flushes meanwhile
    worker.join(timeout=60)
    assert not worker.is_alive() and result and result[0] is not None
    assert finish_clean(plog, result[0])  # type: ignore[arg-type]
    write_checkpoint(plog.directory, result[0].checkpoint)  # type: ignore[union-attr]
    assert contents(plog) == compacted(entries + more, limit)
    plog.verify()


def test_a_pass_is_abandoned_when_retention_removed_its_segments(opened, tmp_path: Path) -> None:
    plog = opened(config=LogConfig(segment_bytes=SEGMENT, index_interval_bytes=64,
                                   recovery_point_interval_bytes=0, retention_bytes=1))
    fill(plog, 60)
    segments = plog.cleanable_segments(plog.end_offset)
    prepared = prepare_clean(plog.directory, segments, CLEANER, 0)
    assert prepared is not None
    plog.enforce_retention()
    assert not finish_clean(plog, prepared)
    assert not [p for p in (tmp_path / "t-0").iterdir() if p.name.endswith((".cleaned", ".swap"))]
    plog.verify()


@pytest.mark.parametrize("step", list(SwapStep))
def test_a_crash_at_any_step_of_a_swap_leaves_old_or_new_segments(opened, tmp_path: Path,
                                                                  step: SwapStep) -> None:
    plog = opened()
    entries = fill(plog, 60)
    before = contents(plog)
    limit = first_uncleanable(plog)
    prepared = prepare_clean(plog.directory, plog.cleanable_segments(plog.end_offset), CLEANER, 0)
    # Two groups, the second merging several segments (so deleting them is a step too).
    assert prepared is not None and len(prepared.cleaned) >= 2 and len(prepared.cleaned[1].replaces) > 1

    class Crash(Exception):
        pass

    swaps: list[SwapStep] = []

    def stop_at(at: SwapStep) -> None:
        swaps.append(at)
        if at is step and swaps.count(SwapStep.CHECKED) == 2:  # during the second swap
            raise Crash(at.value)

    with pytest.raises(Crash):
        finish_clean(plog, prepared, stop_at)
    plog._close_files()  # the process dies here
    reopened = opened()
    after = contents(reopened)
    reopened.verify()
    assert not [p for p in (tmp_path / "t-0").iterdir() if p.name.endswith((".cleaned", ".swap"))]
    # The first group was swapped; the second is old or new as a whole, never lost records.
    want = compacted(entries, limit)
    assert set(want) <= set(after) <= set(before)
    second = prepared.cleaned[1]
    in_second = [e for e in after if second.base_offset <= e[0] < second.next_offset]
    new_second = [e for e in want if second.base_offset <= e[0] < second.next_offset]
    old_second = [e for e in before if second.base_offset <= e[0] < second.next_offset]
    committed = step in (SwapStep.COMMITTED, SwapStep.OLD_DELETED, SwapStep.INDEX_FINAL)
    assert in_second == (new_second if committed else old_second)
    # And the next pass finishes the job.
    clean_log(reopened, reopened.end_offset, CLEANER, 0, force=True)
    assert contents(reopened) == want


def test_leftovers_of_a_pass_that_died_before_its_swap_are_discarded(opened, tmp_path: Path) -> None:
    plog = opened()
    fill(plog, 60)
    before = contents(plog)
    assert prepare_clean(plog.directory, plog.cleanable_segments(plog.end_offset), CLEANER, 0)
    assert [p for p in (tmp_path / "t-0").iterdir() if p.name.endswith(".cleaned")]
    plog._close_files()
    reopened = opened()
    assert contents(reopened) == before
    assert not [p for p in (tmp_path / "t-0").iterdir() if p.name.endswith(".cleaned")]


def test_a_damaged_cleaner_checkpoint_means_everything_is_dirty(opened, tmp_path: Path) -> None:
    plog = opened()
    entries = fill(plog, 60)
    (tmp_path / "t-0" / CLEANER_CHECKPOINT).write_text("{nonsense")
    limit = first_uncleanable(plog)
    assert read_checkpoint(plog.directory).clean_offset == 0
    clean_log(plog, plog.end_offset, CLEANER, 0)
    assert contents(plog) == compacted(entries, limit)
    assert os.path.exists(tmp_path / "t-0" / CLEANER_CHECKPOINT)


# --- a model: the log read as a table equals a dict of the writes ---------------------------------

_KEYS = [b"a", b"b", b"c", b"d", None]
_record = st.tuples(st.sampled_from(_KEYS), st.one_of(st.none(), st.binary(min_size=1, max_size=12)))
_op = st.one_of(
    st.tuples(st.just("append"), st.lists(_record, min_size=1, max_size=3), st.sampled_from(["none", "lz4"])),
    st.tuples(st.just("clean"), st.integers(0, 3000), st.booleans()),
    st.tuples(st.just("crash_in_swap"), st.sampled_from(list(SwapStep)), st.integers(0, 3000)),
    st.tuples(st.just("reopen"), st.booleans(), st.none()),
)


def _table(entries: list[Entry]) -> dict[bytes, bytes]:
    table: dict[bytes, bytes] = {}
    for _, key, value in entries:
        if key is None:
            continue
        if value is None:
            table.pop(key, None)
        else:
            table[key] = value
    return table


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(_op, min_size=5, max_size=40))
def test_compaction_model(tmp_path_factory: pytest.TempPathFactory, ops: list[tuple]) -> None:
    directory = tmp_path_factory.mktemp("model") / "t-0"
    config = LogConfig(segment_bytes=200, index_interval_bytes=32, recovery_point_interval_bytes=0)
    cleaner = CleanerConfig(delete_retention_ms=1000, min_cleanable_dirty_ratio=0.3, segment_bytes=200,
                            index_interval_bytes=32)
    plog = PartitionLog.open(directory, config, clock=Clock())
    written: list[Entry] = []  # everything ever appended, in offset order
    now = 0
    try:
        for op in ops:
            if op[0] == "append":
                _, pairs, codec = op
                base = put(plog, *pairs, compression=codec)
                written += [(base + i, key, value) for i, (key, value) in enumerate(pairs)]
            elif op[0] == "clean":
                now += op[1]
                clean_log(plog, plog.end_offset, cleaner, now, force=op[2])
            elif op[0] == "crash_in_swap":
                now += op[2]
                prepared = prepare_clean(plog.directory, plog.cleanable_segments(plog.end_offset), cleaner, now)

                def stop(at: SwapStep, step: SwapStep = op[1]) -> None:
                    if at is step:
                        raise InterruptedError(at.value)

                if prepared is not None and prepared.cleaned:
                    with pytest.raises(InterruptedError):
                        finish_clean(plog, prepared, stop)
                plog._close_files()
                plog = PartitionLog.open(directory, config, clock=Clock())
            else:
                if op[1]:
                    plog.close()
                else:
                    plog._close_files()
                plog = PartitionLog.open(directory, config, clock=Clock())
            survivors = contents(plog)
            # Offsets never change: each survivor is exactly what was written at its offset...
            originals = {offset: (offset, key, value) for offset, key, value in written}
            assert all(originals[e[0]] == e for e in survivors)
            # ...and read as a table, the log is the table of everything written.
            assert _table(survivors) == _table(written)
            assert plog.end_offset == (written[-1][0] + 1 if written else 0)
        plog.verify()
    finally:
        plog._close_files()


def test_compaction_configs_are_validated_and_mapped() -> None:
    assert validate_topic_config("min.cleanable.dirty.ratio", " 0.25 ") == "0.25"
    for bad in ("1.5", "-0.1", "half"):
        with pytest.raises(ConfigError, match="min.cleanable.dirty.ratio"):
            validate_topic_config("min.cleanable.dirty.ratio", bad)
    configs = {**TOPIC_CONFIG_DEFAULTS, "cleanup.policy": "compact,delete", "delete.retention.ms": "5",
               "min.cleanable.dirty.ratio": "0.25", "segment.bytes": "2048"}
    assert cleaner_config(configs) == CleanerConfig(delete_retention_ms=5, min_cleanable_dirty_ratio=0.25,
                                                    segment_bytes=2048, index_interval_bytes=4096)
    assert is_compacted(configs) and deletes_by_retention(configs)
    assert not deletes_by_retention({**configs, "cleanup.policy": "compact"})
    assert not is_compacted(TOPIC_CONFIG_DEFAULTS)
    node = build_config({"node_id": 1, "data_dir": "/tmp/x", "log_cleaner_interval_ms": 250})
    assert node.log_cleaner_interval_ms == 250
    assert build_config({"node_id": 1, "data_dir": "/tmp/x"}).log_cleaner_interval_ms == 15000
