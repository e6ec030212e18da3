"""Server-side partition assignors for consumer groups (KIP-848 `group.consumer.assignors`).

An assignor turns the members' subscriptions, the partition counts of the subscribed topics and
the current target assignment into the next target assignment. It is a pure function: the
coordinator records its output, so replaying the log never runs an assignor again.

* `uniform` (the default, as in Kafka): total partition counts balanced across members, sticky —
  a member keeps the partitions it already has unless balance requires moving them, so a member
  joining takes only ⌊P/(M+1)⌋ partitions from the others and a member leaving moves only its own.
* `range`: Kafka's per-topic range assignment — for each topic the subscribed members, sorted by
  instance id (static members first, so their ranges survive a restart) and then member id, get
  contiguous ranges, the first `P mod M` one partition more. Co-partitioned topics line up.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Protocol

from tidelog.node.group_records import TopicPartition

Assignment = dict[str, frozenset[TopicPartition]]


@dataclass(frozen=True, slots=True)
class MemberSubscription:
    member_id: str
    instance_id: str | None
    subscribed_topics: frozenset[str]
    # The member's current *target* assignment: what stickiness tries to keep.
    current: frozenset[TopicPartition] = frozenset()


class Assignor(Protocol):
    name: str

    def assign(
        self, members: Mapping[str, MemberSubscription], topic_partition_counts: Mapping[str, int]
    ) -> Assignment: ...


class UnknownAssignorError(ValueError):
    pass


def _subscribed_partitions(
    members: Mapping[str, MemberSubscription], counts: Mapping[str, int]
) -> dict[TopicPartition, list[str]]:
    """Every partition of a subscribed, existing topic -> the members that may own it (sorted)."""
    subscribers: dict[str, list[str]] = {}
    for member_id in sorted(members):
        for topic in members[member_id].subscribed_topics:
            subscribers.setdefault(topic, []).append(member_id)
    eligible: dict[TopicPartition, list[str]] = {}
    for topic in sorted(subscribers):
        for p in range(max(0, counts.get(topic, 0))):
            eligible[TopicPartition(topic, p)] = subscribers[topic]
    return eligible


class UniformAssignor:
    """Balanced and sticky; see the module docstring."""

    name = "uniform"

    def assign(
        self, members: Mapping[str, MemberSubscription], topic_partition_counts: Mapping[str, int]
    ) -> Assignment:
        if not members:
            return {}
        eligible = _subscribed_partitions(members, topic_partition_counts)
        owned: dict[str, set[TopicPartition]] = {m: set() for m in members}
        owner: dict[TopicPartition, str] = {}

        # 1. Keep every current partition that is still valid (the topic still exists with that
        #    partition and the member is still subscribed). A partition claimed by two members
        #    (it cannot happen with our own output, but the input is not ours to trust) goes to
        #    the smaller member id.
        for member_id in sorted(members):
            for tp in sorted(members[member_id].current):
                if tp in eligible and tp not in owner and tp.topic in members[member_id].subscribed_topics:
                    owner[tp] = member_id
                    owned[member_id].add(tp)

        homogeneous = len({m.subscribed_topics for m in members.values()}) == 1
        if homogeneous:
            self._balance_homogeneous(sorted(members), eligible, owned, owner)
        else:
            self._balance_general(eligible, owned, owner)
        return {m: frozenset(ps) for m, ps in owned.items()}

    @staticmethod
    def _balance_homogeneous(
        member_ids: list[str],
        eligible: Mapping[TopicPartition, list[str]],
        owned: dict[str, set[TopicPartition]],
        owner: dict[TopicPartition, str],
    ) -> None:
        # Every member may own every partition: quotas are exact. The `P mod M` larger quotas go
        # to the members that already hold the most, which is what makes a join move only
        # ⌊P/(M+1)⌋ partitions.
        total = len(eligible)
        base, extra = divmod(total, len(member_ids))
        by_size = sorted(member_ids, key=lambda m: (-len(owned[m]), m))
        quota = {m: base + (1 if i < extra else 0) for i, m in enumerate(by_size)}
        for m in member_ids:
            surplus = len(owned[m]) - quota[m]
            if surplus > 0:
                # Give back the highest partitions: deterministic, and keeps low ones stable.
                for tp in sorted(owned[m])[-surplus:]:
                    owned[m].discard(tp)
                    del owner[tp]
        free = [tp for tp in eligible if tp not in owner]
        needy = [m for m in member_ids if len(owned[m]) < quota[m]]
        i = 0
        for tp in free:
            while len(owned[needy[i]]) >= quota[needy[i]]:
                i += 1
            owned[needy[i]].add(tp)
            owner[tp] = needy[i]

    @staticmethod
    def _balance_general(
        eligible: Mapping[TopicPartition, list[str]],
        owned: dict[str, set[TopicPartition]],
        owner: dict[TopicPartition, str],
    ) -> None:
        # Unequal subscriptions: place the free partitions most-constrained first on the least
        # loaded eligible member, then move single partitions from a member to an eligible one
        # that has at least two fewer until no such move exists. Each move lowers the sum of
        # squared loads, so this ends; it balances within 1 whenever single moves can.
        free = sorted((tp for tp in eligible if tp not in owner), key=lambda tp: (len(eligible[tp]), tp))
        for tp in free:
            target = min(eligible[tp], key=lambda m: (len(owned[m]), m))
            owned[target].add(tp)
            owner[tp] = target
        moved = True
        while moved:
            moved = False
            for source in sorted(owned, key=lambda m: (-len(owned[m]), m)):
                load = len(owned[source])
                for tp in sorted(owned[source], reverse=True):
                    target = min(eligible[tp], key=lambda m: (len(owned[m]), m))
                    if len(owned[target]) <= load - 2:
                        owned[source].discard(tp)
                        owned[target].add(tp)
                        owner[tp] = target
                        moved = True
                        break
                if moved:
                    break


class RangeAssignor:
    """Kafka's per-topic range assignment; see the module docstring."""

    name = "range"

    def assign(
        self, members: Mapping[str, MemberSubscription], topic_partition_counts: Mapping[str, int]
    ) -> Assignment:
        out: dict[str, set[TopicPartition]] = {m: set() for m in members}
        topics = sorted({t for m in members.values() for t in m.subscribed_topics})
        for topic in topics:
            count = max(0, topic_partition_counts.get(topic, 0))
            subscribers = sorted(
                (m for m in members.values() if topic in m.subscribed_topics),
                key=lambda m: (0, m.instance_id, m.member_id)
                if m.instance_id is not None
                else (1, m.member_id, m.member_id),
            )
            base, extra = divmod(count, len(subscribers))
            start = 0
            for i, member in enumerate(subscribers):
                n = base + (1 if i < extra else 0)
                out[member.member_id].update(TopicPartition(topic, p) for p in range(start, start + n))
                start += n
        return {m: frozenset(ps) for m, ps in out.items()}


ASSIGNOR_NAMES: tuple[str, ...] = ("uniform", "range")  # the first is the default


def assignor_named(name: str) -> Assignor:
    if name == "uniform":
        return UniformAssignor()
    if name == "range":
        return RangeAssignor()
    raise UnknownAssignorError(f"unknown assignor {name!r}; known: {', '.join(ASSIGNOR_NAMES)}")
