"""Producer-state snapshots as the node takes them (DESIGN.md §8): on every segment roll and on
clean close, so a restart replays only the log after the newest one; deleted with the data they
describe (truncation, retention); never left behind by a write that raced a truncation."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from tidelog.node.producer_state import ProducerStateManager, list_snapshots
from tidelog.node.replica import RaftLogAdapter, read_headers_from
from tidelog.node.storage import LogConfig, PartitionLog
from tidelog.proto.records import BatchHeader, Record, encode_batch

SEGMENT_BYTES = 1000


def _batch(producer_id: int, sequence: int) -> bytes:
    return encode_batch([Record(0, 1_700_000_000_000, None, bytes(150))], producer_id=producer_id,
                        producer_epoch=0, base_sequence=sequence)


class _Replica:
    """A partition replica's log, producer state and snapshots, opened the way the node opens them."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.snapshots = directory / "producer-state"
        self.log = PartitionLog.open(directory, LogConfig(segment_bytes=SEGMENT_BYTES))
        self.producers = ProducerStateManager(partition="t-0")
        self.headers_read = 0
        self.producers.rebuild(self.snapshots, log_start_offset=self.log.log_start_offset,
                               log_end_offset=self.log.end_offset, read_batches_from=self._read, now_ms=0)
        self.adapter = RaftLogAdapter(self.log, self.producers, self.snapshots)

    def _read(self, offset: int) -> Iterator[BatchHeader]:
        for header in read_headers_from(self.log, offset):
            self.headers_read += 1
            yield header

    def close(self, clean: bool) -> None:
        self.log.flush()
        if clean:  # what Replica.close does
            offset, data = self.producers.snapshot_bytes(self.log.end_offset)
            ProducerStateManager.write_snapshot(self.snapshots, offset, data)
        self.log.close()


def _state(replica: _Replica) -> dict[int, tuple[int, tuple[object, ...]]]:
    # Idle times differ (a replay counts as seen at the rebuild's clock); the rest must not.
    return {pid: (e.producer_epoch, e.batches) for pid, e in replica.producers.entries().items()}


def _append(replica: _Replica, sequences: dict[int, int], count: int) -> None:
    for i in range(count):
        producer_id = 100 + i % 3
        sequence = sequences.get(producer_id, 0)
        replica.adapter.append(_batch(producer_id, sequence), epoch=1)
        sequences[producer_id] = sequence + 1


def test_a_snapshot_at_every_roll_and_at_close_so_a_restart_replays_only_the_tail(tmp_path: Path) -> None:
    replica = _Replica(tmp_path / "t-0")
    sequences: dict[int, int] = {}
    _append(replica, sequences, 30)
    bases = replica.log.segment_base_offsets
    assert len(bases) > 4
    # One snapshot per roll, at the new segment's base; the newest two are kept.
    assert [offset for offset, _ in list_snapshots(replica.snapshots)] == list(bases[-2:])
    state = _state(replica)
    replica.close(clean=True)

    reopened = _Replica(tmp_path / "t-0")
    assert reopened.headers_read == 0  # the close snapshot covers the whole log
    assert _state(reopened) == state

    # A crash: no close snapshot, so the roll snapshot plus the active segment's batches.
    _append(reopened, sequences, 7)
    state = _state(reopened)
    total = reopened.log.end_offset
    newest_snapshot = list_snapshots(reopened.snapshots)[-1][0]
    reopened.close(clean=False)
    crashed = _Replica(tmp_path / "t-0")
    assert _state(crashed) == state
    assert crashed.headers_read == total - newest_snapshot  # one record per batch
    assert 0 < crashed.headers_read < total
    crashed.close(clean=False)


def test_truncation_and_retention_delete_the_snapshots_outside_the_log(tmp_path: Path) -> None:
    replica = _Replica(tmp_path / "t-0")
    sequences: dict[int, int] = {}
    _append(replica, sequences, 30)
    below, newest = [offset for offset, _ in list_snapshots(replica.snapshots)]
    replica.adapter.truncate_to(newest - 1)
    assert [offset for offset, _ in list_snapshots(replica.snapshots)] == [below]
    # A write that raced the truncation (bytes built before it) is dropped, not left behind.
    stale_truncations = replica.adapter._truncations - 1
    replica.adapter._write_snapshot(newest + 5, b"stale", stale_truncations)
    assert [offset for offset, _ in list_snapshots(replica.snapshots)] == [below]
    replica.adapter.delete_snapshots_below(below + 1)
    assert list_snapshots(replica.snapshots) == []
    replica.close(clean=False)
