"""Group commit in `tidelog.node.partitions.Partition`, in-process with a log whose fsync we control."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass
from pathlib import Path

from tidelog.node.config import FlushPolicy
from tidelog.node.partitions import Partition
from tidelog.proto import records as codec


@dataclass(frozen=True)
class _Appended:
    base_offset: int
    last_offset: int


class GatedLog:
    """Appends in memory; flush() blocks until the test opens the gate, and counts calls."""

    def __init__(self) -> None:
        self.end_offset = 0
        self.log_start_offset = 0
        self.flushes = 0
        self.gate = threading.Event()
        self.flush_started = threading.Event()

    def append(self, batches: bytearray, epoch: int) -> _Appended:
        headers = codec.scan_batches(batches)
        base = self.end_offset
        self.end_offset = codec.stamp_batches(batches, base, epoch)
        assert len(headers) >= 1
        return _Appended(base, self.end_offset - 1)

    def flush(self) -> int:
        self.flush_started.set()
        assert self.gate.wait(10), "test never opened the flush gate"
        self.flushes += 1
        return self.end_offset

    def close(self) -> None:
        pass


def _batch() -> bytearray:
    return bytearray(codec.encode_batch([codec.Record(0, 0, None, b"v")]))


def test_one_fsync_covers_every_append_waiting_on_it(tmp_path: Path) -> None:
    async def scenario() -> None:
        log = GatedLog()
        partition = Partition("t", 0, "id", tmp_path, log, FlushPolicy.ALWAYS)
        first = partition.append(_batch())
        # The first flush is now in progress (blocked); these appends all wait for the next one.
        await asyncio.to_thread(log.flush_started.wait, 10)
        waiting = [partition.append(_batch()) for _ in range(50)]
        commits = [asyncio.ensure_future(partition.wait_committed(a.last_offset)) for a in [first, *waiting]]
        await asyncio.sleep(0)
        assert partition.high_watermark == 0 and not any(c.done() for c in commits)
        log.gate.set()
        await asyncio.wait_for(asyncio.gather(*commits), 10)
        assert partition.high_watermark == 51
        # One flush for the first append, one for the 50 that queued behind it.
        assert log.flushes == 2
        await partition.close()

    asyncio.run(scenario())


def test_interval_policy_commits_on_append_without_fsync(tmp_path: Path) -> None:
    async def scenario() -> None:
        log = GatedLog()
        partition = Partition("t", 0, "id", tmp_path, log, FlushPolicy.INTERVAL)
        appended = partition.append(_batch())
        await asyncio.wait_for(partition.wait_committed(appended.last_offset), 5)
        assert log.flushes == 0 and partition.high_watermark == 1
        log.gate.set()
        await partition.close()
        assert log.flushes == 1  # close flushes what the interval timer had not

    asyncio.run(scenario())
