"""Server-side assignors: exactly-once coverage, balance, stickiness (KIP-848 `uniform`, `range`)."""

from __future__ import annotations

from typing import Mapping

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tidelog.node.group_assignors import (
    MemberSubscription,
    RangeAssignor,
    UniformAssignor,
    UnknownAssignorError,
    assignor_named,
)
from tidelog.node.group_records import TopicPartition

TP = TopicPartition
TOPICS = ["t0", "t1", "t2", "t3"]


def check_exactly_once(
    members: Mapping[str, MemberSubscription], counts: Mapping[str, int], result: Mapping[str, frozenset[TopicPartition]]
) -> None:
    """Every partition of a subscribed topic goes to exactly one member subscribed to it."""
    assert set(result) == set(members)
    seen: dict[TopicPartition, str] = {}
    for member_id, parts in result.items():
        for tp in parts:
            assert tp not in seen, f"{tp} assigned to {seen.get(tp)} and {member_id}"
            seen[tp] = member_id
            assert tp.topic in members[member_id].subscribed_topics
            assert 0 <= tp.partition < counts.get(tp.topic, 0)
    subscribed = {t for m in members.values() for t in m.subscribed_topics}
    expected = {TP(t, p) for t in subscribed for p in range(counts.get(t, 0))}
    assert set(seen) == expected


@st.composite
def groups(draw: st.DrawFn, *, homogeneous: bool) -> tuple[dict[str, MemberSubscription], dict[str, int]]:
    counts = {t: draw(st.integers(0, 12)) for t in TOPICS}
    n = draw(st.integers(1, 8))
    common = frozenset(draw(st.lists(st.sampled_from(TOPICS), min_size=1, max_size=4)))
    members = {}
    for i in range(n):
        subs = common if homogeneous else frozenset(draw(st.lists(st.sampled_from(TOPICS), min_size=1, max_size=4)))
        # Arbitrary, possibly invalid and overlapping "current" assignments: the assignor must
        # cope with input it did not produce.
        current = frozenset(
            draw(st.lists(st.builds(TP, st.sampled_from(TOPICS), st.integers(0, 14)), max_size=6))
        )
        instance = draw(st.none() | st.sampled_from(["i1", "i2", "i3"]))
        members[f"m{i}"] = MemberSubscription(f"m{i}", instance, subs, current)
    return members, counts


@settings(max_examples=100, deadline=None)
@given(groups(homogeneous=False), st.sampled_from(["uniform", "range"]))
def test_every_subscribed_partition_is_assigned_exactly_once(
    group: tuple[dict[str, MemberSubscription], dict[str, int]], name: str
) -> None:
    members, counts = group
    result = assignor_named(name).assign(members, counts)
    check_exactly_once(members, counts, result)
    assert assignor_named(name).assign(members, counts) == result  # deterministic


@settings(max_examples=100, deadline=None)
@given(groups(homogeneous=True))
def test_uniform_balances_within_one_for_equal_subscriptions(
    group: tuple[dict[str, MemberSubscription], dict[str, int]]
) -> None:
    members, counts = group
    result = UniformAssignor().assign(members, counts)
    sizes = [len(p) for p in result.values()]
    assert max(sizes) - min(sizes) <= 1


@settings(max_examples=100, deadline=None)
@given(groups(homogeneous=False))
def test_uniform_leaves_no_single_move_that_would_improve_balance(
    group: tuple[dict[str, MemberSubscription], dict[str, int]]
) -> None:
    """Unequal subscriptions: no partition could move to an eligible member with 2 fewer."""
    members, counts = group
    result = UniformAssignor().assign(members, counts)
    for member_id, parts in result.items():
        for tp in parts:
            for other, sub in members.items():
                if tp.topic in sub.subscribed_topics:
                    assert len(result[other]) >= len(parts) - 1


def _stable(members: dict[str, MemberSubscription], counts: dict[str, int]) -> dict[str, MemberSubscription]:
    """Members whose current assignment is what the assignor gave them."""
    result = UniformAssignor().assign(members, counts)
    return {m: MemberSubscription(m, s.instance_id, s.subscribed_topics, result[m]) for m, s in members.items()}


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 8), st.dictionaries(st.sampled_from(TOPICS), st.integers(0, 20), min_size=1))
def test_uniform_join_moves_only_the_newcomers_share(n: int, counts: dict[str, int]) -> None:
    """Stickiness: from a balanced assignment, a joining member takes ⌊P/(M+1)⌋ partitions and
    nothing else moves — the minimum any balanced assignment must move."""
    topics = frozenset(counts)
    members = _stable({f"m{i}": MemberSubscription(f"m{i}", None, topics) for i in range(n)}, counts)
    members["new"] = MemberSubscription("new", None, topics)
    result = UniformAssignor().assign(members, counts)
    total = sum(counts.values())
    moved = {tp for m, s in members.items() if m != "new" for tp in s.current - result[m]}
    assert moved == result["new"]
    assert len(moved) == total // (n + 1)


@settings(max_examples=200, deadline=None)
@given(st.integers(2, 8), st.dictionaries(st.sampled_from(TOPICS), st.integers(0, 20), min_size=1), st.data())
def test_uniform_leave_moves_only_the_leavers_partitions(n: int, counts: dict[str, int], data: st.DataObject) -> None:
    topics = frozenset(counts)
    members = _stable({f"m{i}": MemberSubscription(f"m{i}", None, topics) for i in range(n)}, counts)
    leaver = data.draw(st.sampled_from(sorted(members)))
    del members[leaver]
    result = UniformAssignor().assign(members, counts)
    for m, s in members.items():
        assert s.current <= result[m], f"{m} lost partitions although only {leaver} left"


def test_range_is_kafkas_per_topic_range() -> None:
    """Kafka's RangeAssignor javadoc: 2 consumers, 2 topics of 3 partitions ->
    C0: [t0p0, t0p1, t1p0, t1p1], C1: [t0p2, t1p2]."""
    members = {m: MemberSubscription(m, None, frozenset({"t0", "t1"})) for m in ("C0", "C1")}
    result = RangeAssignor().assign(members, {"t0": 3, "t1": 3})
    assert result == {
        "C0": frozenset({TP("t0", 0), TP("t0", 1), TP("t1", 0), TP("t1", 1)}),
        "C1": frozenset({TP("t0", 2), TP("t1", 2)}),
    }


def test_range_orders_static_members_by_instance_id() -> None:
    """Static members keep their ranges across restarts (new member ids, same instance ids)."""
    a = {
        "zzz": MemberSubscription("zzz", "inst-a", frozenset({"t"})),
        "aaa": MemberSubscription("aaa", "inst-b", frozenset({"t"})),
    }
    result = RangeAssignor().assign(a, {"t": 4})
    assert result["zzz"] == frozenset({TP("t", 0), TP("t", 1)})
    assert result["aaa"] == frozenset({TP("t", 2), TP("t", 3)})


@settings(max_examples=100, deadline=None)
@given(groups(homogeneous=False))
def test_range_gives_contiguous_ranges_differing_by_at_most_one_per_topic(
    group: tuple[dict[str, MemberSubscription], dict[str, int]]
) -> None:
    members, counts = group
    result = RangeAssignor().assign(members, counts)
    for topic in TOPICS:
        subscribers = [m for m, s in members.items() if topic in s.subscribed_topics]
        if not subscribers:
            continue
        per_member = [sorted(tp.partition for tp in result[m] if tp.topic == topic) for m in subscribers]
        sizes = [len(p) for p in per_member]
        assert max(sizes) - min(sizes) <= 1
        for ps in per_member:
            assert ps == list(range(ps[0], ps[0] + len(ps))) if ps else True


def test_assignors_are_found_by_name() -> None:
    assert assignor_named("uniform").name == "uniform"
    assert assignor_named("range").name == "range"
    with pytest.raises(UnknownAssignorError):
        assignor_named("roundrobin")


def test_no_members_and_missing_topics() -> None:
    assert UniformAssignor().assign({}, {"t": 3}) == {}
    members = {"m": MemberSubscription("m", None, frozenset({"missing"}))}
    assert UniformAssignor().assign(members, {}) == {"m": frozenset()}
    assert RangeAssignor().assign(members, {}) == {"m": frozenset()}
