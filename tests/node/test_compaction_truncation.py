"""Compaction after a truncation below the cleaner checkpoint (tidelog.node.compaction).

A follower can be truncated below its clean offset (a majority crash under flush=interval, or a
`reset_to`) and then written again, maybe by another leader. The re-written range must be
compacted as dirty data: otherwise its duplicate keys are never in an offset map, and its
tombstones are dropped at once by an old segment's cleaning time, so a deleted key comes back.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tidelog.node.compaction import (
    CLEANER_CHECKPOINT,
    CleanerCheckpoint,
    clean_log,
    read_checkpoint,
    write_checkpoint,
)
from tidelog.node.storage import PartitionLog
from tidelog.proto.records import Record, encode_batch

from tests.node.test_compaction import CLEANER, LOG, Clock, Entry, compacted, contents, put


@pytest.fixture
def plog(tmp_path: Path):
    log = PartitionLog.open(tmp_path / "t-0", LOG, clock=Clock())
    yield log
    log._close_files()


def write(log: PartitionLog, pairs: list[tuple[bytes, bytes | None]], epoch: int) -> list[Entry]:
    return [(put(log, (key, value), epoch=epoch), key, value) for key, value in pairs]


def test_a_range_rewritten_below_the_checkpoint_is_compacted_as_dirty(plog: PartitionLog) -> None:
    old = write(plog, [(b"k1", b"old")] + [(b"k%d" % (i % 4 + 2), b"v%d" % i) for i in range(40)],
                epoch=1)
    assert clean_log(plog, plog.end_offset, CLEANER, now_ms=1_000) is not None
    clean_offset = read_checkpoint(plog.directory).clean_offset
    # Truncate well inside the clean section: what stays is the compacted prefix.
    cut = plog.segment_base_offsets[1] + 1
    assert cut < clean_offset
    plog.truncate_to(cut)
    kept = [entry for entry in contents(plog)]
    assert kept and all(offset < cut for offset, _, _ in kept)
    # Until the log reaches the clean offset again it cannot be told apart: no pass at all.
    assert clean_log(plog, plog.end_offset, CLEANER, now_ms=100_000, force=True) is None

    # Another leader's data at the same offsets: x twice, and a delete of k1, whose older
    # values sit in the prefix the truncation kept.
    assert any(key == b"k1" for _, key, _ in kept)
    new = write(plog, [(b"x", b"x1"), (b"x", b"x2"), (b"k1", None)], epoch=2)
    new += write(plog, [(b"y%d" % i, b"w%d" % i) for i in range(40)], epoch=2)
    assert new[2][0] < clean_offset  # the tombstone lies in the old clean section
    limit = plog.cleanable_segments(plog.end_offset)[-1].next_offset
    assert limit > clean_offset

    # Long past the old segments' cleaning time plus delete.retention.ms.
    now = 1_000 + 10 * CLEANER.delete_retention_ms
    assert clean_log(plog, plog.end_offset, CLEANER, now_ms=now) is not None
    after = contents(plog)
    assert after == compacted(kept + new, limit)
    assert (new[0][0], b"x", b"x1") not in after
    # The delete is kept (its lifetime starts now) and no older k1 comes back.
    assert [(o, v) for o, k, v in after if k == b"k1"] == [(new[2][0], None)]
    assert read_checkpoint(plog.directory).tombstones_due_ms == now + CLEANER.delete_retention_ms
    assert old  # the first pass had data to clean


def test_a_checkpoint_without_its_last_batch_means_everything_is_dirty(plog: PartitionLog) -> None:
    """A checkpoint that cannot prove its clean section (an older one without the last batch,
    or one naming a batch that is not there) is not trusted."""
    entries = write(plog, [(b"k%d" % (i % 5), b"v%d" % i) for i in range(40)], epoch=1)
    limit = plog.cleanable_segments(plog.end_offset)[-1].next_offset
    write_checkpoint(plog.directory, CleanerCheckpoint(clean_offset=limit, cleaned_ms=((0, 0),)))
    assert clean_log(plog, plog.end_offset, CLEANER, now_ms=5_000) is not None
    assert contents(plog) == compacted(entries, limit)
    checkpoint = read_checkpoint(plog.directory)
    assert checkpoint.clean_offset == limit and checkpoint.last_batch is not None
    # The checkpoint the pass wrote is confirmed: the next pass has nothing dirty to do.
    assert clean_log(plog, plog.end_offset, CLEANER, now_ms=5_000) is None


def test_a_segment_cut_inside_a_gap_is_confirmed_at_its_next_pass(plog: PartitionLog) -> None:
    """A follower copies its leader's compaction gaps; truncated inside one and rolled at once,
    its segment's last batch ends before the next segment's base. The checkpoint a pass writes
    for it must still be confirmed, or every pass re-cleans the whole log and restarts every
    tombstone's lifetime, so no tombstone ever expires."""
    def replicate(offset: int, key: bytes, value: bytes | None) -> None:
        plog.append_replicated(encode_batch([Record(0, 1000, key, value)], base_offset=offset,
                                            partition_leader_epoch=1))
        plog.flush()

    replicate(0, b"a", b"a0")
    replicate(1, b"b", None)
    replicate(5, b"c", b"c5")  # the leader's cleaner removed offsets 2-4
    assert plog.truncate_to(3) == 3  # inside the gap
    # The next append rolls at once: the new segment starts at 3, its predecessor's last batch
    # (the tombstone) ends at 2.
    put(plog, (b"d", b"x" * LOG.segment_bytes), epoch=2)
    assert plog.segment_base_offsets == (0, 3)
    assert [s.next_offset for s in plog.cleanable_segments(plog.end_offset)] == [3]

    assert clean_log(plog, plog.end_offset, CLEANER, now_ms=1_000) is not None
    checkpoint = read_checkpoint(plog.directory)
    assert checkpoint.clean_offset == 3
    assert checkpoint.tombstones_due_ms == 1_000 + CLEANER.delete_retention_ms
    # Confirmed: nothing is dirty and the tombstone is not due, so no pass, same lifetime.
    assert clean_log(plog, plog.end_offset, CLEANER, now_ms=1_500) is None
    assert read_checkpoint(plog.directory) == checkpoint
    # Once due, the tombstone goes (its batch stays, empty, as the segment's last).
    assert clean_log(plog, plog.end_offset, CLEANER, now_ms=2_000) is not None
    assert contents(plog, 0)[:2] == [(0, b"a", b"a0"), (3, b"d", b"x" * LOG.segment_bytes)]


def test_a_checkpoint_naming_its_last_batch_without_last_offset_is_still_confirmed(
        plog: PartitionLog) -> None:
    """Checkpoints written before the last offset was recorded named a batch ending at the clean
    offset; an upgrade must not re-clean every compacted log once."""
    write(plog, [(b"k%d" % (i % 5), b"v%d" % i) for i in range(40)], epoch=1)
    assert clean_log(plog, plog.end_offset, CLEANER, now_ms=5_000) is not None
    path = Path(plog.directory) / CLEANER_CHECKPOINT
    body = json.loads(path.read_bytes())
    assert body["last_batch"][4] == body["clean_offset"] - 1
    del body["last_batch"][4]
    path.write_text(json.dumps(body))
    assert clean_log(plog, plog.end_offset, CLEANER, now_ms=5_000) is None
