"""GroupHost's append linger on uvloop, whose loop clock advances in whole milliseconds: a
batch waiting out its linger is appended when the linger's timer fires, without spinning the
loop through empty turns until the clock ticks (it used to: ~13 turns per batch at 1,000
commits/s in issue #6's bench)."""

from __future__ import annotations

import asyncio

import uvloop
from test_group_host import FakePartition, commit_call, eventually
from tidelog.node.group_coordinator import GroupCoordinatorConfig
from tidelog.node.group_host import GroupHost

LINGER_MS = 20.0


class CountingPartition(FakePartition):
    """Counts the watcher's waits: each is one wake-up of the event loop for the host."""

    def __init__(self) -> None:
        super().__init__(auto_commit=True)
        self.waits = 0

    def wait_change(self) -> asyncio.Future[None]:
        self.waits += 1
        return super().wait_change()


def test_a_lingering_batch_waits_once_for_its_linger_on_a_millisecond_clock() -> None:
    async def scenario() -> None:
        partition = CountingPartition()
        partition.commit()  # the leader-change batch
        host = GroupHost(lambda: {0: partition}, lambda: 1, GroupCoordinatorConfig(), append_linger_ms=LINGER_MS)
        host.refresh()
        await eventually(lambda: any(s.loaded for s in host.describe()), "the coordinator to load")
        for round_ in range(5):
            await host.write("g", commit_call("g", 2 * round_))  # appended at once, lingers after
            batches = len(partition.log.batches)
            waits = partition.waits
            # Within the linger: staged, appended by the watcher once the linger is over.
            await host.write("g", commit_call("g", 2 * round_ + 1))
            assert len(partition.log.batches) == batches + 1
            # One wait for the linger, one for the commit (and one spare for a wake-up that
            # raced them); the spinning watcher waited once per loop turn until the clock ticked.
            assert partition.waits - waits <= 3, f"{partition.waits - waits} waits for one lingering batch"
            await asyncio.sleep(LINGER_MS / 1000)  # the next round's first call goes at once
        await host.close()

    uvloop.run(asyncio.wait_for(scenario(), 30))
