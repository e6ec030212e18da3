"""AdminClient's group calls against the fake cluster whose Groups service is the real
GroupCoordinator: list (asks every node), describe with lag, delete, reset-offsets planning and
execution (refused while members live, as kafka-consumer-groups refuses)."""

from __future__ import annotations

import time
from typing import Iterator

import pytest

from support.fake_groups import FakeGroupCluster
from tidelog.client import AdminClient, Consumer, ResetScenario, ResetSpec, TidelogError, TopicPartition
from tidelog.proto.common_pb2 import ErrorCode

TOPIC = "events"
TP0, TP1 = TopicPartition(TOPIC, 0), TopicPartition(TOPIC, 1)


@pytest.fixture
def groups() -> Iterator[FakeGroupCluster]:
    cluster = FakeGroupCluster(nodes=3, session_timeout_ms=30_000, heartbeat_interval_ms=100)
    cluster.create_topic(TOPIC, 2)
    try:
        yield cluster
    finally:
        cluster.close()


@pytest.fixture
def admin(groups: FakeGroupCluster) -> Iterator[AdminClient]:
    with AdminClient(groups.bootstrap, default_api_timeout_ms=10_000) as client:
        yield client


def wait_member(consumer: Consumer, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not consumer.assignment():
        consumer.poll(20)
        assert time.monotonic() < deadline, "the consumer never got partitions"


def test_describe_reports_members_and_lag_and_list_finds_the_group_on_its_coordinator(
    groups: FakeGroupCluster, admin: AdminClient
) -> None:
    groups.append(TP0, [b"x"] * 10)
    groups.append(TP1, [b"y"] * 3)
    admin.alter_group_offsets("g", {TP0: 4})
    with Consumer(groups.bootstrap, group_id="g", enable_auto_commit=False) as consumer:
        consumer.subscribe([TOPIC])
        wait_member(consumer)
        description = admin.describe_group("g")
        assert [m.member_id for m in description.members] == [consumer.group_member()[0]]
        assert set(description.members[0].assignment) == {TP0, TP1}
        rows = {o.topic_partition: (o.committed, o.end, o.lag) for o in description.offsets}
        assert rows == {TP0: (4, 10, 6), TP1: (None, 3, None)}
        listed = admin.list_groups()
        assert [(g.group_id, g.coordinator_id) for g in listed] == [("g", groups.coordinator_id)]
        with pytest.raises(TidelogError) as refused:
            admin.delete_group("g")
        assert refused.value.code == ErrorCode.NON_EMPTY_GROUP
    assert admin.describe_group("g").state == "empty"
    admin.delete_group("g")
    with pytest.raises(TidelogError) as gone:
        admin.describe_group("g")
    assert gone.value.code == ErrorCode.GROUP_ID_NOT_FOUND


def test_reset_plans_change_nothing_until_executed(groups: FakeGroupCluster, admin: AdminClient) -> None:
    groups.append(TP0, [b"a"] * 5, timestamp_ms=1_000)
    groups.append(TP0, [b"b"] * 5, timestamp_ms=2_000)
    groups.append(TP1, [b"c"] * 4, timestamp_ms=3_000)
    admin.alter_group_offsets("g", {TP0: 7, TP1: 1})

    def plan(spec: ResetSpec, **kw: object) -> dict[TopicPartition, int]:
        return {e.topic_partition: e.new_offset for e in admin.plan_reset_offsets("g", spec, **kw)}

    assert plan(ResetSpec(ResetScenario.TO_EARLIEST), topics=[TOPIC]) == {TP0: 0, TP1: 0}
    assert plan(ResetSpec(ResetScenario.TO_LATEST), partitions=[TP1]) == {TP1: 4}
    assert plan(ResetSpec(ResetScenario.SHIFT_BY, -3)) == {TP0: 4, TP1: 0}  # every committed one
    assert plan(ResetSpec(ResetScenario.TO_DATETIME, 1_500), topics=[TOPIC]) == {TP0: 5, TP1: 0}
    assert plan(ResetSpec(ResetScenario.TO_DATETIME, 2_500), topics=[TOPIC]) == {TP0: 10, TP1: 0}
    assert groups.committed("g") == {TP0: 7, TP1: 1}  # planning commits nothing
    admin.reset_offsets("g", ResetSpec(ResetScenario.TO_OFFSET, 2), topics=[TOPIC], execute=True)
    assert groups.committed("g") == {TP0: 2, TP1: 2}


def test_executing_a_reset_is_refused_while_the_group_has_live_members(
    groups: FakeGroupCluster, admin: AdminClient
) -> None:
    groups.append(TP0, [b"a"] * 3)
    with Consumer(groups.bootstrap, group_id="g") as consumer:
        consumer.subscribe([TOPIC])
        wait_member(consumer)
        with pytest.raises(TidelogError) as refused:
            admin.reset_offsets("g", ResetSpec(ResetScenario.TO_EARLIEST), topics=[TOPIC], execute=True)
        assert refused.value.code == ErrorCode.NON_EMPTY_GROUP
        assert "live member" in refused.value.message
        # The plan alone is fine while members live.
        assert admin.reset_offsets("g", ResetSpec(ResetScenario.TO_LATEST), partitions=[TP0])[0].new_offset == 3
