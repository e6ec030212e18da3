"""Group commit in the replica driver (tidelog.node.replica), in-process, with a gated fsync."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

from tidelog.node.config import FlushPolicy
from tidelog.node.replica import Replica
from tidelog.node.storage import PartitionLog
from tidelog.proto import records as codec
from tidelog.replication.raft import Role


class GatedLog:
    """A real PartitionLog whose flush() blocks while the gate is closed, and counts calls."""

    def __init__(self, directory: Path) -> None:
        self._log = PartitionLog.open(directory)
        self.flushes = 0
        self.gate = threading.Event()
        self.gate.set()
        self.flush_started = threading.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._log, name)

    def flush(self) -> int:
        self.flush_started.set()
        assert self.gate.wait(10), "the test never opened the flush gate"
        self.flushes += 1
        return self._log.flush()


def _batch() -> bytes:
    return codec.encode_batch([codec.Record(0, 0, None, b"v")])


async def _single_voter(tmp_path: Path, policy: str) -> tuple[Replica, GatedLog]:
    log = GatedLog(tmp_path)
    replica = Replica("t-0", 1, (1,), tmp_path, log, lambda messages: None, policy)  # type: ignore[arg-type]
    deadline = asyncio.get_running_loop().time() + 10
    while not (replica.role is Role.LEADER and replica.high_watermark > 0):
        assert asyncio.get_running_loop().time() < deadline, "a single voter never became leader"
        await asyncio.wait([replica.wait_change()], timeout=0.1)
    return replica, log


def test_one_fsync_covers_every_append_waiting_on_it(tmp_path: Path) -> None:
    async def scenario() -> None:
        replica, log = await _single_voter(tmp_path, FlushPolicy.ALWAYS)
        log.gate.clear()
        log.flush_started.clear()
        flushes_before = log.flushes
        first = replica.propose(_batch())[1]
        # The first flush is now in progress (blocked); these appends all wait for the next one.
        await asyncio.to_thread(log.flush_started.wait, 10)
        rest = [replica.propose(_batch())[1] for _ in range(50)]
        await asyncio.sleep(0.05)
        assert not first.done() and not any(f.done() for f in rest)
        log.gate.set()
        committed = await asyncio.wait_for(asyncio.gather(first, *rest), 10)
        assert replica.high_watermark == committed[-1].last_offset + 1
        # One flush for the first append, about one more for the 50 that queued behind it
        # (not one each).
        assert 1 <= log.flushes - flushes_before <= 3
        await replica.close()

    asyncio.run(scenario())


def test_interval_policy_commits_without_waiting_for_fsync(tmp_path: Path) -> None:
    async def scenario() -> None:
        replica, log = await _single_voter(tmp_path, FlushPolicy.INTERVAL)
        log.gate.clear()
        proposal, committed = replica.propose(_batch())
        await asyncio.wait_for(committed, 5)
        assert replica.high_watermark == proposal.last_offset + 1
        log.gate.set()
        await replica.close()

    asyncio.run(scenario())
