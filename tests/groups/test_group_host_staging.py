"""GroupHost's group commit: calls made while a batch is in flight share the next batch.

The fake partition commits only when told to, so which batch holds which call, and that no
answer leaves before the batch holding its records commits, are observable (DESIGN.md §7).
"""

from __future__ import annotations

import asyncio

import pytest
from test_group_host import (
    TP0,
    FakePartition,
    commit_call,
    eventually,
    fetch_call,
    loaded_host,
    offsets_of,
    run,
    settle,
)
from tidelog.node import group_host
from tidelog.node.group_coordinator import GroupCoordinatorConfig, GroupErrorCode
from tidelog.node.group_host import CoordinatorUnavailable, GroupHost
from tidelog.node.group_records import TopicPartition
from tidelog.proto import records as codec
from tidelog.proto.common_pb2 import ErrorCode


async def host_for(partition: FakePartition, linger_ms: float = 0,
                   config: GroupCoordinatorConfig | None = None) -> GroupHost:
    """A loaded host over ``partition`` (no append linger unless asked: the batching asserted
    here is then the in-flight rule's alone)."""
    host = GroupHost(lambda: {0: partition}, lambda: 1, config or GroupCoordinatorConfig(),
                     append_linger_ms=linger_ms)
    host.refresh()
    await eventually(lambda: any(s.loaded for s in host.describe()), "the coordinator to load")
    return host


def records_per_batch(partition: FakePartition, since: int) -> list[int]:
    """How many records each batch appended at or after offset ``since`` holds."""
    return [len(list(b.records())) for base, data in partition.log.batches if base >= since
            for b in codec.decode_batches(data)]


def test_calls_during_an_uncommitted_batch_share_one_batch_appended_when_it_commits() -> None:
    async def scenario() -> None:
        partition = FakePartition()
        host = await host_for(partition)
        partition.commit()  # the leader-change batch
        start = partition.end_offset
        first = asyncio.ensure_future(host.write("g", commit_call("g", 1)))
        await settle()
        assert records_per_batch(partition, start) == [1]  # nothing in flight: appended at once
        later = [asyncio.ensure_future(host.write("g", commit_call("g", o, TopicPartition("orders", o))))
                 for o in (2, 3)]
        await settle()
        read = asyncio.ensure_future(host.read("g", fetch_call("g")))
        await settle()
        assert records_per_batch(partition, start) == [1]  # staged behind the batch in flight
        assert not first.done() and not any(w.done() for w in later) and not read.done()

        partition.commit()
        await first
        await settle()
        # The first batch committed: the staged calls went out as ONE batch, still unanswered.
        assert records_per_batch(partition, start) == [1, 2]
        assert not any(w.done() for w in later) and not read.done()

        partition.commit()
        assert [(await w).error for w in later] == [GroupErrorCode.NONE] * 2
        # The read came after the staged writes: it saw them, and only once they committed.
        assert offsets_of(await read) == {TP0: 1, TopicPartition("orders", 2): 2, TopicPartition("orders", 3): 3}
        await host.close()

    run(scenario)


def test_losing_leadership_fails_staged_calls_and_their_records_never_reach_the_log() -> None:
    async def scenario() -> None:
        partition = FakePartition()
        host = await host_for(partition)
        partition.commit()
        first = asyncio.ensure_future(host.write("g", commit_call("g", 1)))
        staged = asyncio.ensure_future(host.write("g", commit_call("g", 2)))
        await settle()
        end = partition.end_offset
        partition.lose_leadership()
        for call in (first, staged):
            with pytest.raises(CoordinatorUnavailable) as lost:
                await call
            assert lost.value.code == ErrorCode.NOT_COORDINATOR
        assert partition.end_offset == end
        # A new epoch replays the log: the unappended commit of offset 2 is not there.
        partition.become_leader(partition.leader_epoch + 1)
        host.refresh()
        await eventually(lambda: any(s.loaded and s.epoch == 2 for s in host.describe()), "the reload")
        partition.commit()
        assert offsets_of(await host.read("g", fetch_call("g"))) == {TP0: 1}
        await host.close()

    run(scenario)


def test_a_full_staged_batch_is_appended_without_waiting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(group_host, "STAGED_BATCH_BYTES", 1)  # every call's records fill it

    async def scenario() -> None:
        partition = FakePartition()
        host = await host_for(partition)
        partition.commit()
        start = partition.end_offset
        writes = [asyncio.ensure_future(host.write("g", commit_call("g", o))) for o in (1, 2, 3)]
        await settle()
        assert records_per_batch(partition, start) == [1, 1, 1]
        partition.commit()
        assert [(await w).error for w in writes] == [GroupErrorCode.NONE] * 3
        await host.close()

    run(scenario)


def test_a_timer_expiry_staged_without_a_waiting_call_is_appended_when_the_batch_in_flight_commits() -> None:
    async def scenario() -> None:
        partition = FakePartition(auto_commit=True)
        host = await host_for(partition, config=GroupCoordinatorConfig(session_timeout_ms=300))
        joined = await host.write("g", lambda c, now: c.heartbeat("g", "", 0, None, ["orders"], [], 1000, now,
                                                                   {"orders": 1}))
        assert joined.error == GroupErrorCode.NONE
        # Keep a batch in flight until the member has expired, so the expiry's records stage.
        partition.auto_commit = False
        in_flight = asyncio.ensure_future(host.write("other", commit_call("other", 1)))
        await settle()
        end = partition.end_offset
        await eventually(lambda: not host._hosted[0].coordinator.describe_group("g").members,  # noqa: SLF001
                         "the member to expire")
        assert partition.end_offset == end  # staged, not appended
        partition.commit()
        await in_flight
        await eventually(lambda: partition.end_offset > end, "the staged expiry to be appended")
        partition.commit()
        assert (await host.read("g", lambda c: c.describe_group("g"))).members == ()
        await host.close()
        # The expiry is in the log: a replay agrees.
        new = FakePartition(partition.log, leader=False)
        new.become_leader(2)
        successor = await loaded_host({0: new})
        new.commit()
        assert (await successor.read("g", lambda c: c.describe_group("g"))).members == ()
        await successor.close()

    run(scenario)


def test_a_call_soon_after_an_append_waits_for_the_linger_even_when_that_batch_committed() -> None:
    async def scenario() -> None:
        partition = FakePartition()
        host = await host_for(partition, linger_ms=200)
        partition.commit()
        start = partition.end_offset
        first = asyncio.ensure_future(host.write("g", commit_call("g", 1)))
        await settle()
        appended_at = asyncio.get_running_loop().time()
        partition.commit()
        assert (await first).error == GroupErrorCode.NONE
        later = [asyncio.ensure_future(host.write("g", commit_call("g", o))) for o in (2, 3)]
        await settle()
        assert records_per_batch(partition, start) == [1]  # committed, but within the linger
        await eventually(lambda: len(records_per_batch(partition, start)) == 2, "the lingering batch")
        assert asyncio.get_running_loop().time() - appended_at >= 0.2
        assert records_per_batch(partition, start) == [1, 2]
        partition.commit()
        assert [(await w).error for w in later] == [GroupErrorCode.NONE] * 2
        await host.close()

    run(scenario)
