"""The node's RaftLog over segment storage answers the epoch queries as the core's MemoryLog does.

The simulator proves the core safe against MemoryLog's answers; an adapter that answered
differently (NO_EPOCH for an emptied log) would let a replica vote for a candidate missing
committed entries (KIP-101, KIP-595 "DivergingEpoch").
"""

from __future__ import annotations

from pathlib import Path

from tidelog.node.replica import RaftLogAdapter
from tidelog.node.storage import PartitionLog
from tidelog.proto.records import Record, encode_batch
from tidelog.replication.log import MemoryLog


def _batch(n: int = 1) -> bytes:
    return encode_batch([Record(0, 1_700_000_000_000, None, b"v")] * n)


def _same_answers(adapter: RaftLogAdapter, model: MemoryLog) -> None:
    assert (adapter.start_offset, adapter.end_offset) == (model.start_offset, model.end_offset)
    assert adapter.last_epoch == model.last_epoch
    for epoch in range(0, 7):
        assert adapter.end_offset_for_epoch(epoch) == model.end_offset_for_epoch(epoch), epoch


def test_epoch_answers_match_memory_log_through_appends_truncation_and_reset(tmp_path: Path) -> None:
    adapter = RaftLogAdapter(PartitionLog.open(tmp_path / "p"))
    model = MemoryLog()
    _same_answers(adapter, model)
    for epoch, count in ((1, 2), (1, 1), (3, 3), (5, 1)):
        adapter.append(_batch(count), epoch)
        model.append(_batch(count), epoch)
        _same_answers(adapter, model)
    adapter.truncate_to(4)
    model.truncate_to(4)
    _same_answers(adapter, model)
    adapter.reset_to(20, 3)
    model.reset_to(20, 3)
    _same_answers(adapter, model)
    assert adapter.last_epoch == 3, "an emptied log still ended its prefix in epoch 3"
    adapter.append(_batch(2), 4)
    model.append(_batch(2), 4)
    _same_answers(adapter, model)
