"""Group membership of the consumer, against a fake cluster whose Groups service is the real
GroupCoordinator (tests/support/fake_groups.py). KIP-848's client rules, one per test: revoke
before assign, commit before giving a partition up, rejoin after a fence, re-find a moved
coordinator, leave at once on close."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any, Callable, Iterator

import pytest

from support.fake_groups import FakeGroupCluster
from tidelog.client import AsyncConsumer, Consumer, TidelogError, TopicPartition
from tidelog.proto.common_pb2 import ErrorCode

TOPIC = "events"


@pytest.fixture
def groups() -> Iterator[FakeGroupCluster]:
    cluster = FakeGroupCluster(nodes=2, session_timeout_ms=30_000, heartbeat_interval_ms=100)
    try:
        yield cluster
    finally:
        cluster.close()


def tps(n: int, topic: str = TOPIC) -> set[TopicPartition]:
    return {TopicPartition(topic, p) for p in range(n)}


def wait_until(condition: Callable[[], Any], timeout: float = 15.0, poll: Callable[[], Any] | None = None) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        if poll is not None:
            poll()
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


def member(groups: FakeGroupCluster, **options: Any) -> Consumer:
    options.setdefault("group_id", "g")
    options.setdefault("auto_offset_reset", "earliest")
    options.setdefault("fetch_max_wait_ms", 50)
    return Consumer(groups.bootstrap, **options)


def test_two_members_split_the_partitions_and_none_is_left_out(groups: FakeGroupCluster) -> None:
    groups.create_topic(TOPIC, 6)
    with member(groups) as a, member(groups) as b:
        a.subscribe([TOPIC])
        b.subscribe([TOPIC])

        def settled() -> bool:
            sa, sb = a.assignment(), b.assignment()
            return bool(sa) and bool(sb) and not (sa & sb) and sa | sb == tps(6)

        wait_until(settled, poll=lambda: (a.poll(10), b.poll(10)))
        owners = groups.owners("g")
        assert set(owners) == tps(6)
        assert len(set(owners.values())) == 2


def test_records_flow_from_the_committed_offset_and_the_position_is_committed(groups: FakeGroupCluster) -> None:
    groups.create_topic(TOPIC, 1)
    tp = TopicPartition(TOPIC, 0)
    groups.append(tp, [b"r0", b"r1", b"r2", b"r3"])
    with member(groups, enable_auto_commit=False) as consumer:
        consumer.subscribe([TOPIC])
        got = []
        wait_until(lambda: len(got) >= 4, poll=lambda: got.extend(consumer.poll(50)))
        assert [r.value for r in got] == [b"r0", b"r1", b"r2", b"r3"]
        assert groups.committed("g") == {}
        consumer.commit()
        assert groups.committed("g") == {tp: 4}
        assert consumer.committed([tp]) == {tp: 4}
        consumer.commit({tp: 2})
        assert consumer.committed([tp]) == {tp: 2}
    # A new member starts where the group committed, not at auto_offset_reset.
    with member(groups, enable_auto_commit=False) as again:
        again.subscribe([TOPIC])
        got = []
        wait_until(lambda: len(got) >= 2, poll=lambda: got.extend(again.poll(50)))
        assert [r.offset for r in got] == [2, 3]


def test_revocation_commits_and_calls_on_revoke_before_the_new_owner_starts(groups: FakeGroupCluster) -> None:
    """KIP-848: a partition goes to its new owner only after the old one revoked it; the old
    owner commits its position first, so the new one continues exactly where it stopped."""
    groups.create_topic(TOPIC, 2)
    for p in range(2):
        groups.append(TopicPartition(TOPIC, p), [f"{p}-{i}".encode() for i in range(5)])
    events: list[tuple[str, str, frozenset[TopicPartition]]] = []
    lock = threading.Lock()

    def record(who: str, what: str) -> Callable[[set[TopicPartition]], None]:
        def callback(partitions: set[TopicPartition]) -> None:
            with lock:
                events.append((who, what, frozenset(partitions)))
        return callback

    seen: dict[str, list[tuple[TopicPartition, int]]] = {"a": [], "b": []}
    with member(groups, auto_commit_interval_ms=60_000) as a:
        a.subscribe([TOPIC], on_assign=record("a", "assign"), on_revoke=record("a", "revoke"))
        wait_until(lambda: len(seen["a"]) >= 10,
                   poll=lambda: seen["a"].extend((r.topic_partition, r.offset) for r in a.poll(50)))
        with member(groups) as b:
            b.subscribe([TOPIC], on_assign=record("b", "assign"), on_revoke=record("b", "revoke"))
            wait_until(lambda: b.assignment() and len(a.assignment()) == 1,
                       poll=lambda: (a.poll(10), seen["b"].extend((r.topic_partition, r.offset) for r in b.poll(10))))
            moved = b.assignment()
            assert len(moved) == 1
            # a committed the moved partition's position (5) while revoking it ...
            assert groups.committed("g")[next(iter(moved))] == 5
            revoke_at = events.index(("a", "revoke", frozenset(moved)))
            assign_at = events.index(("b", "assign", frozenset(moved)))
            assert revoke_at < assign_at
            # ... so b reads nothing a already had.
            for tp in moved:
                groups.append(tp, [b"new"])
            wait_until(lambda: seen["b"], poll=lambda: seen["b"].extend(
                (r.topic_partition, r.offset) for r in b.poll(50)))
            assert seen["b"] == [(next(iter(moved)), 5)]


def test_close_commits_and_leaves_at_once(groups: FakeGroupCluster) -> None:
    groups.create_topic(TOPIC, 4)
    b = member(groups)
    try:
        b.subscribe([TOPIC])
        with member(groups, auto_commit_interval_ms=60_000) as a:
            a.subscribe([TOPIC])
            wait_until(lambda: len(a.assignment()) == 2 and len(b.assignment()) == 2,
                       poll=lambda: (a.poll(10), b.poll(10)))
            mine = a.assignment()
            for p in range(4):
                groups.append(TopicPartition(TOPIC, p), [b"x", b"y"])
            got: list[Any] = []
            wait_until(lambda: len(got) >= 4, poll=lambda: (got.extend(a.poll(20)), b.poll(10)))
        # The session timeout is 30 s: b owning everything well before means a left.
        closed_at = time.monotonic()
        wait_until(lambda: b.assignment() == tps(4), timeout=10, poll=lambda: b.poll(10))
        assert time.monotonic() - closed_at < 10
        assert {tp: groups.committed("g")[tp] for tp in mine} == {tp: 2 for tp in mine}
    finally:
        b.close()
    assert groups.owners("g") == {}


def test_a_fenced_member_loses_its_partitions_without_committing_and_rejoins(groups: FakeGroupCluster) -> None:
    groups.create_topic(TOPIC, 2)
    revoked: list[set[TopicPartition]] = []
    with member(groups, auto_commit_interval_ms=60_000) as consumer:
        consumer.subscribe([TOPIC], on_revoke=revoked.append)
        wait_until(lambda: consumer.assignment() == tps(2), poll=lambda: consumer.poll(10))
        first_member = consumer.group_member()
        commits = groups.calls["OffsetCommit"]
        groups.script("ConsumerGroupHeartbeat", [ErrorCode.FENCED_MEMBER_EPOCH])
        wait_until(lambda: revoked, poll=lambda: consumer.poll(10))
        assert revoked[0] == tps(2)
        assert groups.calls["OffsetCommit"] == commits  # lost partitions are not committed
        wait_until(lambda: consumer.assignment() == tps(2), poll=lambda: consumer.poll(10))
        assert consumer.group_member()[0] == first_member[0]  # rejoined with its member id


def test_the_consumer_follows_a_coordinator_that_moved(groups: FakeGroupCluster) -> None:
    """NOT_COORDINATOR makes the member find the coordinator again; the new one replayed the
    log, so membership and committed offsets survive."""
    groups.create_topic(TOPIC, 2)
    tp = TopicPartition(TOPIC, 0)
    with member(groups, enable_auto_commit=False) as consumer:
        consumer.subscribe([TOPIC])
        wait_until(lambda: consumer.assignment() == tps(2), poll=lambda: consumer.poll(10))
        consumer.commit({tp: 0})
        finds = groups.calls["FindCoordinator"]
        groups.move_coordinator(2)
        groups.script("ConsumerGroupHeartbeat", [ErrorCode.COORDINATOR_LOAD_IN_PROGRESS])
        groups.append(tp, [b"a", b"b", b"c"])
        got: list[Any] = []
        wait_until(lambda: len(got) >= 3, poll=lambda: got.extend(consumer.poll(50)))
        consumer.commit()
        assert groups.calls["FindCoordinator"] > finds
        assert groups.committed("g")[tp] == 3
        assert consumer.assignment() == tps(2)


def test_auto_commit_commits_what_poll_returned(groups: FakeGroupCluster) -> None:
    groups.create_topic(TOPIC, 1)
    tp = TopicPartition(TOPIC, 0)
    groups.append(tp, [b"a", b"b", b"c"])
    with member(groups, auto_commit_interval_ms=100) as consumer:
        consumer.subscribe([TOPIC])
        got: list[Any] = []
        wait_until(lambda: len(got) >= 3, poll=lambda: got.extend(consumer.poll(50)))
        wait_until(lambda: groups.committed("g").get(tp) == 3, poll=lambda: consumer.poll(50))


def test_a_member_cut_off_for_a_session_timeout_gives_its_partitions_up(groups: FakeGroupCluster) -> None:
    """By then the coordinator has handed them to someone else: never two owners."""
    groups.create_topic(TOPIC, 2)
    revoked: list[set[TopicPartition]] = []
    with member(groups, session_timeout_ms=1000) as consumer:
        consumer.subscribe([TOPIC], on_revoke=revoked.append)
        wait_until(lambda: consumer.assignment() == tps(2), poll=lambda: consumer.poll(10))
        groups.script("ConsumerGroupHeartbeat", [ErrorCode.COORDINATOR_NOT_AVAILABLE] * 10_000)
        wait_until(lambda: revoked, poll=lambda: consumer.poll(10))
        assert consumer.assignment() == set()
        groups.call(lambda: groups.group_scripts.clear())
        wait_until(lambda: consumer.assignment() == tps(2), poll=lambda: consumer.poll(10))


def test_commit_outside_the_membership_is_refused_while_the_group_has_members(groups: FakeGroupCluster) -> None:
    groups.create_topic(TOPIC, 1)
    tp = TopicPartition(TOPIC, 0)
    with member(groups) as plain:
        plain.assign([tp])
        plain.commit({tp: 1})  # nobody is a member: allowed, as an admin commit
        assert groups.committed("g") == {tp: 1}
        with member(groups) as live:
            live.subscribe([TOPIC])
            wait_until(lambda: live.assignment(), poll=lambda: live.poll(10))
            with pytest.raises(TidelogError) as failure:
                plain.commit({tp: 0})
            assert failure.value.code == ErrorCode.UNKNOWN_MEMBER_ID
            with pytest.raises(RuntimeError):
                live.assign([tp])  # a member cannot also pick partitions by hand


def test_commit_async_reports_through_its_future(groups: FakeGroupCluster) -> None:
    groups.create_topic(TOPIC, 1)
    tp = TopicPartition(TOPIC, 0)
    results: list[Any] = []
    with member(groups, enable_auto_commit=False) as consumer:
        consumer.assign([tp])
        future = consumer.commit_async({tp: 7}, callback=lambda offsets, error: results.append((offsets, error)))
        future.result(timeout=10)
        assert results == [({tp: 7}, None)]
        assert consumer.committed([tp, TopicPartition(TOPIC, 5)]) == {tp: 7, TopicPartition(TOPIC, 5): None}


def test_without_a_group_subscribe_reads_every_partition(groups: FakeGroupCluster) -> None:
    groups.create_topic(TOPIC, 3)
    with Consumer(groups.bootstrap, topics=[TOPIC]) as consumer:
        wait_until(lambda: consumer.assignment() == tps(3), poll=lambda: consumer.poll(10))
        with pytest.raises(ValueError):
            consumer.commit()
    assert groups.calls["ConsumerGroupHeartbeat"] == 0


def test_a_static_member_that_closes_gets_its_partitions_back_without_a_rebalance(groups: FakeGroupCluster) -> None:
    """KIP-848 static membership: close() leaves with epoch -2, so the coordinator keeps the
    assignment for the same group_instance_id instead of moving it to the others."""
    groups.create_topic(TOPIC, 2)
    b_events: list[tuple[str, set[TopicPartition]]] = []
    with member(groups) as b:
        b.subscribe([TOPIC], on_assign=lambda p: b_events.append(("assign", p)),
                    on_revoke=lambda p: b_events.append(("revoke", p)))
        wait_until(lambda: b.assignment() == tps(2), poll=lambda: b.poll(10))
        a = member(groups, group_instance_id="worker-1")
        with a:
            a.subscribe([TOPIC])
            wait_until(lambda: len(a.assignment()) == 1 and len(b.assignment()) == 1,
                       poll=lambda: (a.poll(10), b.poll(10)))
            mine = a.assignment()
            epoch = groups.call(lambda: groups.coordinator.describe_group("g").group_epoch)
        settled = list(b_events)
        with member(groups, group_instance_id="worker-1") as again:
            again.subscribe([TOPIC])
            wait_until(lambda: again.assignment() == mine, poll=lambda: (again.poll(10), b.poll(10)))
            # The group never rebalanced: its epoch did not move ...
            assert groups.call(lambda: groups.coordinator.describe_group("g").group_epoch) == epoch
        assert b_events == settled  # ... and b was never asked to take a's partition


def test_sync_callbacks_run_in_poll_and_may_commit(groups: FakeGroupCluster) -> None:
    """Consumer (sync) runs on_revoke on the application's thread inside poll, as Kafka does,
    so a consumer without auto-commit can commit what it handled there."""
    groups.create_topic(TOPIC, 2)
    for p in range(2):
        groups.append(TopicPartition(TOPIC, p), [b"a", b"b", b"c"])
    threads: list[str] = []
    with member(groups, enable_auto_commit=False) as a:
        def on_revoke(partitions: set[TopicPartition]) -> None:
            threads.append(threading.current_thread().name)
            a.commit({tp: a.position(tp) for tp in partitions})

        a.subscribe([TOPIC], on_revoke=on_revoke)
        got: list[Any] = []
        wait_until(lambda: len(got) >= 6, poll=lambda: got.extend(a.poll(20)))
        with member(groups, enable_auto_commit=False) as b:
            b.subscribe([TOPIC])
            wait_until(lambda: b.assignment() and len(a.assignment()) == 1, poll=lambda: (a.poll(10), b.poll(10)))
            moved = next(iter(b.assignment()))
            assert threads == [threading.current_thread().name]
            assert groups.committed("g")[moved] == 3
            assert b.position(moved) == 3


def test_a_member_that_does_not_poll_keeps_heartbeating_and_revokes_at_its_next_poll() -> None:
    """Reconciliation runs beside the heartbeats: a revocation waiting for the application
    does not cost the member its session (the rebalance timeout bounds the wait instead)."""
    groups = FakeGroupCluster(nodes=1, session_timeout_ms=1000, heartbeat_interval_ms=100)
    try:
        groups.create_topic(TOPIC, 2)
        with member(groups, session_timeout_ms=1000) as a:
            a.subscribe([TOPIC])
            wait_until(lambda: a.assignment() == tps(2), poll=lambda: a.poll(10))
            identity = a.group_member()
            with member(groups, session_timeout_ms=1000) as b:
                b.subscribe([TOPIC])
                # b joins and waits for a partition that a must revoke; a does not poll for
                # longer than a session (heartbeats counted, not time slept).
                beats = groups.calls["ConsumerGroupHeartbeat"]
                wait_until(lambda: groups.calls["ConsumerGroupHeartbeat"] >= beats + 30, poll=lambda: b.poll(10))
                assert b.assignment() == set() and a.assignment() == tps(2)
                assert groups.expired == []
                wait_until(lambda: len(b.assignment()) == 1, poll=lambda: (a.poll(10), b.poll(10)))
                assert a.group_member()[0] == identity[0] and len(a.assignment()) == 1
    finally:
        groups.close()


def test_the_async_consumer_awaits_coroutine_callbacks_on_its_loop(groups: FakeGroupCluster) -> None:
    groups.create_topic(TOPIC, 2)
    groups.append(TopicPartition(TOPIC, 0), [b"a", b"b"])

    async def scenario() -> tuple[list[set[TopicPartition]], dict[TopicPartition, int]]:
        revoked: list[set[TopicPartition]] = []
        async with AsyncConsumer(groups.bootstrap, group_id="g", enable_auto_commit=False,
                                 auto_offset_reset="earliest", fetch_max_wait_ms=50) as consumer:
            async def on_revoke(partitions: set[TopicPartition]) -> None:
                await consumer.commit({tp: await consumer.position(tp) for tp in partitions})
                revoked.append(partitions)

            consumer.subscribe([TOPIC], on_revoke=on_revoke)
            got: list[Any] = []
            deadline = time.monotonic() + 15
            while len(got) < 2:
                got += await consumer.poll(50)
                assert time.monotonic() < deadline
        return revoked, groups.committed("g")

    revoked, committed = asyncio.run(scenario())
    assert revoked == [tps(2)]  # close() revoked everything, after committing in the callback
    assert committed[TopicPartition(TOPIC, 0)] == 2


def test_a_member_cannot_commit_a_partition_it_no_longer_owns(groups: FakeGroupCluster) -> None:
    """Offsets the application computed before a rebalance, committed after it, must not
    overwrite the new owner's progress: the coordinator fences by member epoch only, so the
    member itself refuses partitions it does not own (never two committers of one partition)."""
    groups.create_topic(TOPIC, 2)
    with member(groups, enable_auto_commit=False) as a:
        a.subscribe([TOPIC])
        wait_until(lambda: a.assignment() == tps(2), poll=lambda: a.poll(10))
        with member(groups, enable_auto_commit=False) as b:
            b.subscribe([TOPIC])
            wait_until(lambda: b.assignment() and len(a.assignment()) == 1,
                       poll=lambda: (a.poll(10), b.poll(10)))
            moved = next(iter(b.assignment()))
            kept = next(iter(a.assignment()))
            b.commit({moved: 7})
            with pytest.raises(TidelogError) as refused:
                a.commit({moved: 1, kept: 1})
            assert refused.value.code == ErrorCode.STALE_MEMBER_EPOCH
            assert str(moved) in str(refused.value)
            assert groups.committed("g") == {moved: 7}
            a.commit({kept: 2})  # its own partition, as ever
            assert groups.committed("g") == {moved: 7, kept: 2}


def test_a_slow_auto_commit_cannot_land_after_the_revocation_commit(groups: FakeGroupCluster) -> None:
    """Commits of one member apply in the order it made them: the commit that gives a partition
    up waits for an auto-commit still in flight, or the older offset would land last and the
    group would go back (and replay) after close."""
    groups.create_topic(TOPIC, 1)
    tp = TopicPartition(TOPIC, 0)
    groups.append(tp, [b"0", b"1"])
    with member(groups, auto_commit_interval_ms=0) as consumer:
        consumer.subscribe([TOPIC])
        got: list[Any] = []
        wait_until(lambda: len(got) >= 2, poll=lambda: got.extend(consumer.poll(20)))
        wait_until(lambda: groups.committed("g") == {tp: 2}, poll=lambda: consumer.poll(10))
        groups.delay("OffsetCommit", [1.0])
        commits = groups.calls["OffsetCommit"]
        groups.append(tp, [b"2", b"3"])
        # The auto-commit of position 4 is sent and held up at the coordinator ...
        wait_until(lambda: groups.calls["OffsetCommit"] > commits, poll=lambda: got.extend(consumer.poll(20)))
        groups.append(tp, [b"4", b"5"])
        wait_until(lambda: len(got) >= 6, poll=lambda: got.extend(consumer.poll(20)))
        # ... while close() commits position 6, and leaves only later (until then the old
        # commit is still the member's, and valid).
        groups.delay("leave", [2.0])
    assert [r.offset for r in got] == list(range(6))
    assert groups.committed("g") == {tp: 6}


def test_a_member_whose_coordinator_cannot_be_found_gives_its_partitions_up_in_time(groups: FakeGroupCluster) -> None:
    """Finding the coordinator again is part of the heartbeat: a FindCoordinator that hangs
    (a paused node) must not keep the member consuming past its session, by when the
    coordinator has handed its partitions to someone else."""
    groups.create_topic(TOPIC, 2)
    revoked: list[set[TopicPartition]] = []
    with member(groups, session_timeout_ms=1000) as consumer:  # request_timeout_ms: 30 s
        consumer.subscribe([TOPIC], on_revoke=revoked.append)
        wait_until(lambda: consumer.assignment() == tps(2), poll=lambda: consumer.poll(10))
        groups.delay("FindCoordinator", [60.0] * 100)
        groups.move_coordinator(2)
        wait_until(lambda: revoked, timeout=15, poll=lambda: consumer.poll(10))
        assert revoked == [tps(2)] and consumer.assignment() == set()
        groups.call(lambda: groups.delays.clear())


def test_close_keeps_to_its_timeout_when_no_coordinator_can_be_found() -> None:
    groups = FakeGroupCluster(nodes=3, session_timeout_ms=30_000, heartbeat_interval_ms=100)
    try:
        groups.create_topic(TOPIC, 1)
        consumer = member(groups, request_timeout_ms=2000)
        consumer.subscribe([TOPIC])
        wait_until(lambda: consumer.assignment() == tps(1), poll=lambda: consumer.poll(10))
        groups.delay("FindCoordinator", [60.0] * 100)
        groups.move_coordinator(2)
        started = time.monotonic()
        consumer.close()
        # The commit and the leave each get request_timeout_ms (2 s); a FindCoordinator that
        # waited its own 2 s on each of the 3 nodes, twice, would take 12 s.
        assert time.monotonic() - started < 9
    finally:
        groups.close()


def test_a_retriable_heartbeat_error_is_retried_not_fatal(groups: FakeGroupCluster) -> None:
    """REQUEST_TIMED_OUT (the coordinator's records did not commit within its commit timeout)
    and the like are retriable: the member heartbeats again and keeps its partitions."""
    groups.create_topic(TOPIC, 2)
    revoked: list[set[TopicPartition]] = []
    with member(groups) as consumer:
        consumer.subscribe([TOPIC], on_revoke=revoked.append)
        wait_until(lambda: consumer.assignment() == tps(2), poll=lambda: consumer.poll(10))
        beats = groups.calls["ConsumerGroupHeartbeat"]
        groups.script("ConsumerGroupHeartbeat", [ErrorCode.REQUEST_TIMED_OUT, ErrorCode.NOT_ENOUGH_REPLICAS])
        wait_until(lambda: groups.calls["ConsumerGroupHeartbeat"] >= beats + 4, poll=lambda: consumer.poll(10))
        consumer.poll(10)  # raised the fatal error here
        assert consumer.assignment() == tps(2) and revoked == []
        # A commit, likewise, is retried within its timeout (Kafka's commitSync).
        groups.script("OffsetCommit", [ErrorCode.REQUEST_TIMED_OUT])
        consumer.commit({TopicPartition(TOPIC, 0): 1})
        assert groups.committed("g") == {TopicPartition(TOPIC, 0): 1}


def test_partitions_lost_to_an_expired_session_are_not_delivered_while_a_callback_is_pending(
        groups: FakeGroupCluster) -> None:
    """The session expires while a revocation waits for the application (sync Consumer): every
    partition is lost at that moment, so the next poll must not hand out records of the ones
    not being revoked, although the revocation it unblocks runs first."""
    groups.create_topic(TOPIC, 2)
    with member(groups, session_timeout_ms=1000) as a:
        a.subscribe([TOPIC])
        wait_until(lambda: a.assignment() == tps(2), poll=lambda: a.poll(10))
        with member(groups) as b:
            b.subscribe([TOPIC])

            def a_must_revoke() -> bool:
                group = groups.call(lambda: groups.coordinator.describe_group("g"))
                return any(m.partitions_pending_revocation for m in group.members)

            wait_until(a_must_revoke, poll=lambda: b.poll(10))
            beats = groups.calls["ConsumerGroupHeartbeat"]
            wait_until(lambda: groups.calls["ConsumerGroupHeartbeat"] >= beats + 6)  # a has its target
            for p in range(2):
                groups.append(TopicPartition(TOPIC, p), [b"late"])
            groups.script("ConsumerGroupHeartbeat", [ErrorCode.COORDINATOR_NOT_AVAILABLE] * 10_000)
            beats = groups.calls["ConsumerGroupHeartbeat"]
            # Backoff doubles from 0.1 s: six failed heartbeats of a (and six of b) span more
            # than a's 1 s session.
            wait_until(lambda: groups.calls["ConsumerGroupHeartbeat"] >= beats + 12)
            delivered: list[Any] = []
            for _ in range(5):
                delivered += a.poll(50)
            assert delivered == []
            groups.call(lambda: groups.group_scripts.clear())


@pytest.mark.parametrize("instance_id", [None, "worker-1"])
def test_a_member_that_stops_polling_for_max_poll_interval_leaves_and_rejoins_at_its_next_poll(
        groups: FakeGroupCluster, instance_id: str | None) -> None:
    """Kafka's max.poll.interval.ms (KIP-62): heartbeats alone do not keep a member in the group;
    one whose application has not polled for that long leaves, so its partitions move on (a
    static member too: it leaves with epoch -1, not -2, as Kafka's does), and joins again
    when the application polls."""
    groups.create_topic(TOPIC, 2)
    with member(groups, max_poll_interval_ms=1000, group_instance_id=instance_id) as a, member(groups) as b:
        a.subscribe([TOPIC])
        b.subscribe([TOPIC])
        wait_until(lambda: len(a.assignment()) == 1 and len(b.assignment()) == 1,
                   poll=lambda: (a.poll(10), b.poll(10)))
        # a's application is stuck; b polls on and gets a's partition.
        wait_until(lambda: b.assignment() == tps(2), poll=lambda: b.poll(10))
        wait_until(lambda: len(a.assignment()) == 1 and len(b.assignment()) == 1,
                   poll=lambda: (a.poll(10), b.poll(10)))


def test_a_sync_member_whose_poll_timer_expired_runs_on_revoke_in_its_next_poll_and_rejoins(
        groups: FakeGroupCluster) -> None:
    groups.create_topic(TOPIC, 1)
    revoked: list[set[TopicPartition]] = []
    with member(groups, max_poll_interval_ms=500) as a:
        a.subscribe([TOPIC], on_revoke=revoked.append)
        wait_until(lambda: a.assignment() == tps(1), poll=lambda: a.poll(10))
        wait_until(lambda: groups.owners("g") == {})  # left while the application was away
        wait_until(lambda: revoked and a.assignment() == tps(1), poll=lambda: a.poll(10))
        assert revoked == [tps(1)]


def test_waiting_inside_a_long_poll_does_not_expire_the_poll_timer(groups: FakeGroupCluster) -> None:
    groups.create_topic(TOPIC, 1)
    with member(groups, max_poll_interval_ms=500) as a:
        a.subscribe([TOPIC])
        wait_until(lambda: a.assignment() == tps(1), poll=lambda: a.poll(10))
        beats = groups.calls["ConsumerGroupHeartbeat"]
        while groups.calls["ConsumerGroupHeartbeat"] < beats + 25:  # 2.5 s at 100 ms
            assert a.poll(1000) == []  # each poll waits twice max_poll_interval_ms
        assert a.assignment() == tps(1) and set(groups.owners("g")) == tps(1)


def test_unsubscribe_commits_the_positions_before_leaving(groups: FakeGroupCluster) -> None:
    groups.create_topic(TOPIC, 1)
    tp = TopicPartition(TOPIC, 0)
    groups.append(tp, [b"a", b"b", b"c"])
    revoked: list[set[TopicPartition]] = []
    with member(groups, auto_commit_interval_ms=60_000) as consumer:
        consumer.subscribe([TOPIC], on_revoke=revoked.append)
        got: list[Any] = []
        wait_until(lambda: len(got) >= 3, poll=lambda: got.extend(consumer.poll(20)))
        consumer.unsubscribe()
        wait_until(lambda: groups.owners("g") == {} and revoked)
        assert groups.committed("g") == {tp: 3}



def test_unsubscribe_while_lost_partitions_wait_for_on_revoke_still_gives_them_up(groups: FakeGroupCluster) -> None:
    """Leaving stops the heartbeat task, which may be in the middle of giving lost partitions
    up (here an async on_revoke still running): they must still be revoked, not forgotten."""
    groups.create_topic(TOPIC, 2)

    async def scenario() -> tuple[list[set[TopicPartition]], set[TopicPartition]]:
        revoked: list[set[TopicPartition]] = []
        consumer = AsyncConsumer(groups.bootstrap, group_id="g", session_timeout_ms=1000,
                                 request_timeout_ms=2000, fetch_max_wait_ms=50)
        try:
            started = asyncio.Event()

            async def on_revoke(partitions: set[TopicPartition]) -> None:
                if not started.is_set():
                    started.set()
                    await asyncio.sleep(3600)  # the first call is still running when we leave
                revoked.append(partitions)

            consumer.subscribe([TOPIC], on_revoke=on_revoke)
            deadline = time.monotonic() + 15
            while consumer.assignment() != tps(2):
                await consumer.poll(10)
                assert time.monotonic() < deadline
            groups.script("ConsumerGroupHeartbeat", [ErrorCode.COORDINATOR_NOT_AVAILABLE] * 10_000)
            async with asyncio.timeout(15):
                await started.wait()  # the session ran out: the partitions are being given up
            consumer.unsubscribe()
            assert consumer._leaving is not None
            await consumer._leaving
            return revoked, consumer.assignment()
        finally:
            groups.call(lambda: groups.group_scripts.clear())
            await consumer.close()

    revoked, assignment = asyncio.run(scenario())
    assert revoked == [tps(2)]
    assert assignment == set()
