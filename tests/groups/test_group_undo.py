"""Taking a call back: `GroupCoordinator.undo` and the host's Batching modes.

A heartbeat's records must commit together; when the log refuses them as too large for one
batch, the host undoes the call instead of reloading the partition. A DeleteGroup's tombstones
need not commit together and go in several batches. The coordinator tests walk random
heartbeats (joins, leaves, static members, subscription changes, revocations) and undo each
call before doing it for real: the state must be exactly the one before.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import types

import pytest

from tidelog.node.group_coordinator import (
    CommittedOffset,
    GroupCoordinator,
    GroupCoordinatorConfig,
    GroupErrorCode,
    HeartbeatResponse,
    Result,
)
from tidelog.node.group_host import Batching, CoordinatorUnavailable, GroupHost
from tidelog.node.group_records import TopicPartition
from tidelog.node.storage import RecordTooLargeError
from tidelog.proto import records as codec
from tidelog.proto.common_pb2 import ErrorCode

from tests.groups.test_group_host import FakePartition, eventually, loaded_host, run

COUNTS = {"a": 4, "b": 3, "c": 2}


def emptiness_dates(coordinator: GroupCoordinator) -> dict[str, int | None]:
    # When each group's metadata record was last written: it dates offset expiry.
    return {group_id: group.epoch_written_ms for group_id, group in coordinator._groups.items()}


def deadlines(coordinator: GroupCoordinator) -> tuple[dict[tuple[str, str], int], dict[tuple[str, str], int]]:
    # Not in the records, so not in snapshot(): the timers must match too.
    return dict(coordinator._session_deadlines), dict(coordinator._rebalance_deadlines)


@pytest.mark.parametrize("seed", range(12))
def test_undo_restores_the_state_before_any_heartbeat(seed: int) -> None:
    rng = random.Random(seed)
    ids = (f"m{i}" for i in itertools.count())
    coordinator = GroupCoordinator(GroupCoordinatorConfig(), new_member_id=lambda: next(ids))
    coordinator.on_loaded(0)
    # member id -> (epoch, owned, instance id); what a well-behaved client would hold.
    members: dict[str, tuple[int, frozenset[TopicPartition], str | None]] = {}
    undone = 0
    for step in range(120):
        now = step * 10
        known = sorted(members)
        kind = rng.choice(["join", "beat", "beat", "beat", "leave", "static-leave", "rejoin", "resubscribe"])
        topics: list[str] | None = sorted(rng.sample(sorted(COUNTS), rng.randint(1, 3)))
        if kind == "join" or not known:
            member_id, epoch, owned, instance = "", 0, frozenset(), rng.choice([None, None, f"i{step}"])
        else:
            member_id = rng.choice(known)
            epoch, owned, instance = members[member_id]
            if kind == "leave":
                epoch = -1
            elif kind == "static-leave":
                if instance is None:
                    continue
                epoch = -2
            elif kind == "rejoin":
                epoch, owned = 0, frozenset()
            elif kind == "beat":
                topics = None

        def call(c: GroupCoordinator) -> Result[HeartbeatResponse]:
            return c.heartbeat("g", member_id, epoch, instance, topics, owned, 5000, now, COUNTS)

        before, timers, dates = coordinator.snapshot(), deadlines(coordinator), emptiness_dates(coordinator)
        coordinator.start_undo_log()
        trial = call(coordinator)
        log = coordinator.stop_undo_log()
        coordinator.undo(log)
        assert coordinator.snapshot() == before, (seed, step, kind)
        assert emptiness_dates(coordinator) == dates, (seed, step, kind)
        if trial.records:  # (a call that writes nothing is never refused, so never undone)
            assert deadlines(coordinator) == timers, (seed, step, kind)
        undone += bool(trial.records)

        result = call(coordinator)
        answer = result.response
        if answer.error != GroupErrorCode.NONE or epoch < 0:
            if epoch < 0 or answer.error in (GroupErrorCode.UNKNOWN_MEMBER_ID, GroupErrorCode.FENCED_MEMBER_EPOCH):
                members.pop(member_id, None)
            continue
        members[answer.member_id] = (answer.member_epoch, answer.assignment or frozenset(), instance)
        # Revocations are acknowledged at the next heartbeat by reporting only the assignment.
    assert undone > 20  # the walk did take back calls that wrote something


def test_undo_of_a_join_that_created_the_group_leaves_no_group_and_no_timer() -> None:
    coordinator = GroupCoordinator(GroupCoordinatorConfig())
    coordinator.on_loaded(0)
    coordinator.start_undo_log()
    joined = coordinator.heartbeat("g", "", 0, None, ["a"], [], 5000, 1, COUNTS)
    assert joined.records
    coordinator.undo(coordinator.stop_undo_log())
    assert coordinator.snapshot() == {} and coordinator.next_deadline() is None


class CountingDeadlines(dict[tuple[str, str], int]):
    """A coordinator's timer table that counts the members whose entries were looked at."""

    def __init__(self, entries: dict[tuple[str, str], int]) -> None:
        super().__init__(entries)
        self.looked_at: set[tuple[str, str]] = set()

    def get(self, key, default=None):  # type: ignore[no-untyped-def, override]
        self.looked_at.add(key)
        return super().get(key, default)

    def __getitem__(self, key):  # type: ignore[no-untyped-def]
        self.looked_at.add(key)
        return super().__getitem__(key)

    def __contains__(self, key):  # type: ignore[no-untyped-def, override]
        self.looked_at.add(key)
        return super().__contains__(key)


def test_the_undo_log_of_a_heartbeat_looks_only_at_the_timers_it_moves() -> None:
    # Every heartbeat runs with the undo log. It used to copy the timers of every member of
    # the group at the call's first write: O(group size) per heartbeat that writes, so each
    # member's heartbeats in a rebalance of a large group cost that group's size again.
    ids = (f"m{i}" for i in itertools.count())
    coordinator = GroupCoordinator(GroupCoordinatorConfig(), new_member_id=lambda: next(ids))
    coordinator.on_loaded(0)
    joined = [coordinator.heartbeat("g", "", 0, None, ["a"], [], 5000, 1, {"a": 64}).response for _ in range(40)]
    first = joined[0]  # it owns every partition, and must now give most of them up
    coordinator._session_deadlines = CountingDeadlines(coordinator._session_deadlines)
    coordinator._rebalance_deadlines = CountingDeadlines(coordinator._rebalance_deadlines)
    before, timers = coordinator.snapshot(), deadlines(coordinator)
    coordinator.start_undo_log()
    beat = coordinator.heartbeat("g", first.member_id, first.member_epoch, None, None, first.assignment or [], 5000,
                                 2, {"a": 64})
    log = coordinator.stop_undo_log()
    assert beat.records  # a heartbeat that writes (its member now owes a revocation)
    looked_at = coordinator._session_deadlines.looked_at | coordinator._rebalance_deadlines.looked_at
    assert looked_at <= {("g", first.member_id)}, f"{len(looked_at)} members' timers looked at"
    coordinator.undo(log)
    assert coordinator.snapshot() == before and deadlines(coordinator) == timers


class LimitedPartition(FakePartition):
    """A fake `__consumer_offsets` replica that refuses batches over ``limit`` bytes."""

    def __init__(self, limit: int, auto_commit: bool = True) -> None:
        super().__init__(auto_commit=auto_commit)
        self.limit = limit
        self.log.config = types.SimpleNamespace(max_message_bytes=limit)  # as a PartitionLog's

    def append(self, batches: bytes):  # type: ignore[no-untyped-def]
        if len(batches) > self.limit:
            raise RecordTooLargeError(f"batch of {len(batches)} bytes exceeds max_message_bytes {self.limit}")
        return super().append(batches)


LIMIT = 200_000
BIG = ["t" * 240 + f"{i:04d}" for i in range(1000)]  # a ~250 KB subscription


def heartbeat_call(member_id: str, epoch: int, topics: list[str] | None, owned: frozenset[TopicPartition]):  # type: ignore[no-untyped-def]
    return lambda c, now: c.heartbeat("g", member_id, epoch, None, topics, owned, 5000, now, COUNTS)


def test_an_atomic_call_too_large_for_one_batch_is_undone_and_the_coordinator_stays() -> None:
    async def scenario() -> None:
        partition = LimitedPartition(LIMIT)
        host = await loaded_host({0: partition})
        joined = await host.write("g", heartbeat_call("", 0, ["a"], frozenset()), Batching.ATOMIC)
        loaded = host.describe()
        end = partition.end_offset
        with pytest.raises(CoordinatorUnavailable) as refused:
            await host.write("g", heartbeat_call(joined.member_id, joined.member_epoch, BIG, joined.assignment),
                             Batching.ATOMIC)
        assert refused.value.code == ErrorCode.INVALID_REQUEST
        assert partition.end_offset == end and host.describe() == loaded  # nothing appended, no reload
        member = (await host.read("g", lambda c: c.describe_group("g"))).members[0]
        assert (member.member_id, member.member_epoch, member.subscribed_topics) == (
            joined.member_id, joined.member_epoch, ("a",))
        again = await host.write("g", heartbeat_call(joined.member_id, joined.member_epoch, None, joined.assignment),
                                 Batching.ATOMIC)
        assert again.error == GroupErrorCode.NONE
        await host.close()

    run(scenario)


def test_a_split_call_goes_in_batches_each_within_the_limit() -> None:
    async def scenario() -> None:
        partition = LimitedPartition(LIMIT)
        host = await loaded_host({0: partition})
        group = "g" * 20_000  # every record of the group carries 20 KB of key
        for first in range(0, 30, 5):
            offsets = {TopicPartition("a", p): CommittedOffset(p) for p in range(first, first + 5)}
            await host.write(group, lambda c, now: c.commit_offsets(group, "", -1, offsets, now))
        batches_before = len(partition.log.batches)
        deleted = await host.write(group, lambda c, now: c.delete_group(group), Batching.SPLIT)
        assert deleted.error == GroupErrorCode.NONE
        new_batches = [data for _, data in partition.log.batches[batches_before:]]
        assert len(new_batches) > 1 and all(len(data) <= LIMIT for data in new_batches)
        assert sum(h.record_count for data in new_batches for h in codec.scan_batches(data)) == 30
        assert (await host.read(group, lambda c: c.describe_group(group))).error == GroupErrorCode.GROUP_ID_NOT_FOUND
        await host.close()

    run(scenario)


def test_members_expiring_together_beyond_one_batch_are_removed_without_a_reload() -> None:
    # Each removal (the member's tombstones, then the group epoch bump) commits whole; many at
    # once went as one batch, which the log refused: the reload restarted every session and
    # the same removals failed again at the next timeout, forever.
    async def scenario() -> None:
        partition = LimitedPartition(LIMIT)
        clock = [1_000_000]  # every member joins at the same ms, so all expire in one tick
        host = GroupHost(lambda: {0: partition}, lambda: 1, GroupCoordinatorConfig(session_timeout_ms=300),
                         now_ms=lambda: clock[0])
        host.refresh()
        await eventually(lambda: any(s.loaded for s in host.describe()), "the load")
        coordinator = host._hosted[0].coordinator
        group = "g" * 20_000  # each removal writes ~80 KB of keys
        for _ in range(6):
            joined = await host.write(group, lambda c, now: c.heartbeat(group, "", 0, None, ["a"], [], 5000, now, COUNTS),
                                      Batching.ATOMIC)
            assert joined.error == GroupErrorCode.NONE
        batches_before = len(partition.log.batches)
        clock[0] += 1000

        async def members() -> int:
            return len((await host.read(group, lambda c: c.describe_group(group))).members)

        deadline = asyncio.get_running_loop().time() + 5
        while await members():
            assert asyncio.get_running_loop().time() < deadline, "the members were never removed"
            await asyncio.sleep(0.02)
        assert host._hosted[0].coordinator is coordinator  # never reloaded
        new_batches = [data for _, data in partition.log.batches[batches_before:]]
        assert len(new_batches) > 1 and all(len(data) <= LIMIT for data in new_batches)
        await host.close()

    run(scenario)


def test_calls_staged_together_stay_within_a_small_max_message_bytes() -> None:
    # A cluster-wide max.message.bytes below the 64 KiB staging bound applies to
    # __consumer_offsets too: commits staged behind a batch in flight went out as one batch
    # over the limit, refused, and every one of them got NOT_COORDINATOR with a reload.
    async def scenario() -> None:
        partition = LimitedPartition(3000, auto_commit=False)
        host = await loaded_host({0: partition})
        partition.commit()
        coordinator = host._hosted[0].coordinator
        first = asyncio.ensure_future(host.write("g", lambda c, now: c.commit_offsets(
            "g", "", -1, {TopicPartition("a", 0): CommittedOffset(0)}, now)))
        await asyncio.sleep(0)
        calls = [asyncio.ensure_future(host.write("g", lambda c, now, p=p: c.commit_offsets(
            "g", "", -1, {TopicPartition("a", p): CommittedOffset(p)}, now))) for p in range(1, 101)]
        batches_before = len(partition.log.batches)
        partition.auto_commit = True
        partition.commit()
        answers = await asyncio.gather(first, *calls)
        assert all(a.error == GroupErrorCode.NONE for a in answers)
        assert host._hosted[0].coordinator is coordinator  # never reloaded
        new_batches = [data for _, data in partition.log.batches[batches_before:]]
        assert len(new_batches) > 1 and all(len(data) <= 3000 for data in new_batches)
        await host.close()

    run(scenario)
