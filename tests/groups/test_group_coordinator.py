"""The group coordinator, one rule per test.

References: KIP-848 ("The Next Generation of the Consumer Rebalance Protocol"), and Kafka's
group-coordinator sources: GroupMetadataManager.consumerGroupHeartbeat (joins, leaves, static
members, epoch validation), CurrentAssignmentBuilder (reconciliation), ConsumerGroup
(validateOffsetCommit/validateOffsetFetch, group states).
"""

from __future__ import annotations

import itertools
from typing import Iterable

import pytest

from tidelog.node.group_coordinator import (
    MEMBER_TRANSITIONS,
    CommittedOffset,
    CoordinatorNotLoadedError,
    GroupCoordinator,
    GroupCoordinatorConfig,
    GroupErrorCode,
    GroupState,
    HeartbeatResponse,
    IllegalMemberTransition,
    Result,
)
from tidelog.node.group_records import (
    ConsumerGroupCurrentMemberAssignmentValue,
    ConsumerGroupMetadataKey,
    GroupRecord,
    MemberState,
    OffsetCommitKey,
    OffsetCommitValue,
    TopicPartition,
    encode_key,
)
from tidelog.proto.common_pb2 import ErrorCode

TP = TopicPartition
COUNTS = {"t": 6}
OK = GroupErrorCode.NONE


def tps(topic: str, *parts: int) -> frozenset[TopicPartition]:
    return frozenset(TP(topic, p) for p in parts)


class Log:
    """Everything the coordinator asked to append, in order (all of it "committed")."""

    def __init__(self) -> None:
        self.records: list[GroupRecord] = []

    def __call__(self, result: Result) -> object:
        self.records.extend(result.records)
        return result.response


def new_coordinator(**config: int) -> GroupCoordinator:
    ids = (f"member-{i}" for i in itertools.count())
    return GroupCoordinator(GroupCoordinatorConfig(**config), new_member_id=lambda: next(ids))


class Member:
    """A well-behaved KIP-848 client: it owns exactly what the last answer gave it."""

    def __init__(self, coord: GroupCoordinator, log: Log, member_id: str, topics: Iterable[str] = ("t",), instance_id: str | None = None) -> None:
        self.coord, self.log = coord, log
        self.member_id, self.instance_id = member_id, instance_id
        self.topics = tuple(topics)
        self.epoch = 0
        self.owned: frozenset[TopicPartition] = frozenset()

    def heartbeat(self, now: int, counts: dict[str, int] = COUNTS, **kw: object) -> HeartbeatResponse:
        resp = self.log(
            self.coord.heartbeat(
                "g",
                self.member_id,
                self.epoch,
                self.instance_id,
                self.topics if self.epoch == 0 or kw.pop("send_topics", False) else None,
                kw.pop("owned", self.owned),
                kw.pop("rebalance_timeout_ms", None),
                now,
                counts,
                **kw,
            )
        )
        assert isinstance(resp, HeartbeatResponse)
        if resp.error == OK:
            self.member_id, self.epoch = resp.member_id, resp.member_epoch
            if resp.assignment is not None:
                self.owned = resp.assignment
        return resp

    def leave(self, now: int, epoch: int = -1) -> HeartbeatResponse:
        resp = self.log(self.coord.heartbeat("g", self.member_id, epoch, self.instance_id, None, None, None, now, COUNTS))
        assert isinstance(resp, HeartbeatResponse)
        self.owned = frozenset()
        return resp


def settle(members: list[Member], now: int, rounds: int = 6) -> None:
    for _ in range(rounds):
        for m in members:
            assert m.heartbeat(now).error == OK


def replayed(log: Log, records: Iterable[GroupRecord] | None = None, **config: int) -> GroupCoordinator:
    fresh = new_coordinator(**config)
    for r in log.records if records is None else records:
        fresh.replay(r.key, r.value)
    return fresh


def assert_single_owners(members: list[Member]) -> None:
    seen: dict[TopicPartition, str] = {}
    for m in members:
        for tp in m.owned:
            assert tp not in seen, f"{tp} owned by {seen[tp]} and {m.member_id}"
            seen[tp] = m.member_id


# ------------------------------------------------------------------------------- joining


def test_epoch_zero_joins_and_the_first_member_gets_every_partition() -> None:
    """KIP-848: a member joins with epoch 0; the group epoch bumps; the member gets epoch = target epoch."""
    coord, log = new_coordinator(), Log()
    a = Member(coord, log, "a")
    resp = a.heartbeat(0)
    assert resp.error == OK and resp.member_epoch == 1
    assert resp.assignment == tps("t", *range(6))
    assert resp.heartbeat_interval_ms == 5000
    d = coord.describe_group("g")
    assert (d.group_epoch, d.assignment_epoch, d.state) == (1, 1, GroupState.STABLE)


def test_a_steady_heartbeat_writes_nothing() -> None:
    """Only changes are written: a stable member's heartbeat appends no record (and client
    details sent once are kept when later heartbeats omit them)."""
    coord, log = new_coordinator(), Log()
    a = Member(coord, log, "a")
    a.heartbeat(0, client_id="cli-1", client_host="10.0.0.1")
    result = coord.heartbeat("g", "a", a.epoch, None, None, a.owned, None, 1, COUNTS)
    assert result.response.error == OK and result.records == ()
    m = coord.describe_group("g").members[0]
    assert (m.client_id, m.client_host) == ("cli-1", "10.0.0.1")


def test_a_join_without_a_member_id_gets_one() -> None:
    coord, log = new_coordinator(), Log()
    resp = log(coord.heartbeat("g", "", 0, None, ["t"], [], None, 0, COUNTS))
    assert resp.error == OK and resp.member_id == "member-0"


def test_a_join_must_carry_the_subscription() -> None:
    coord = new_coordinator()
    assert coord.heartbeat("g", "a", 0, None, None, [], None, 0, COUNTS).response.error == GroupErrorCode.INVALID_REQUEST
    assert coord.heartbeat("", "a", 0, None, ["t"], [], None, 0, COUNTS).response.error == GroupErrorCode.INVALID_GROUP_ID
    assert coord.heartbeat("g", "", 3, None, None, [], None, 0, COUNTS).response.error == GroupErrorCode.INVALID_REQUEST
    assert coord.heartbeat("g", "a", -3, None, None, [], None, 0, COUNTS).response.error == GroupErrorCode.INVALID_REQUEST


def test_a_partition_moves_only_after_its_owner_revoked_it() -> None:
    """KIP-848 / CurrentAssignmentBuilder: the new owner gets a partition only once the previous
    owner acknowledged its revocation (owned partitions in a later heartbeat); the revoking
    member stays in its epoch (UNREVOKED_PARTITIONS), the new one waits (UNRELEASED_PARTITIONS)."""
    coord, log = new_coordinator(), Log()
    a, b = Member(coord, log, "a"), Member(coord, log, "b")
    a.heartbeat(0)
    rb = b.heartbeat(1)
    assert rb.member_epoch == 2 and rb.assignment == frozenset()  # all of b's target is still a's
    assert coord.describe_group("g").members[1].state == MemberState.UNRELEASED_PARTITIONS

    ra = a.heartbeat(2, owned=a.owned)  # a still reports all six: it has not revoked yet
    assert ra.member_epoch == 1  # held back in its epoch
    assert len(ra.assignment) == 3
    desc = {m.member_id: m for m in coord.describe_group("g").members}
    assert desc["a"].state == MemberState.UNREVOKED_PARTITIONS
    assert len(desc["a"].partitions_pending_revocation) == 3
    assert coord.describe_group("g").state == GroupState.RECONCILING

    rb = b.heartbeat(3)
    assert rb.assignment == frozenset(), "b must not get partitions a has not revoked"
    a.owned = ra.assignment  # a's client revokes, then reports it
    ra = a.heartbeat(4)
    assert ra.member_epoch == 2
    rb = b.heartbeat(5)
    assert rb.assignment == tps("t", *range(6)) - a.owned and len(rb.assignment) == 3
    assert_single_owners([a, b])
    assert coord.describe_group("g").state == GroupState.STABLE


def test_not_reporting_owned_partitions_never_counts_as_revoking() -> None:
    """ConsumerGroupHeartbeat: null TopicPartitions means "unchanged", not "owns nothing"."""
    coord, log = new_coordinator(), Log()
    a, b = Member(coord, log, "a"), Member(coord, log, "b")
    a.heartbeat(0)
    b.heartbeat(1)
    a.heartbeat(2, owned=None)
    a.heartbeat(3, owned=None)
    assert coord.describe_group("g").members[0].state == MemberState.UNREVOKED_PARTITIONS
    assert b.heartbeat(4).assignment == frozenset()


def test_a_member_that_revoked_before_being_asked_is_not_held_back() -> None:
    """CurrentAssignmentBuilder: partitions to revoke that the member no longer owns need no wait."""
    coord, log = new_coordinator(), Log()
    a, b = Member(coord, log, "a"), Member(coord, log, "b")
    a.heartbeat(0)
    b.heartbeat(1)
    resp = a.heartbeat(2, owned=frozenset())  # e.g. it dropped everything on its own
    assert resp.member_epoch == 2 and coord.describe_group("g").members[0].state == MemberState.STABLE


# ------------------------------------------------------------------------------- leaving


def test_epoch_minus_one_leaves_and_frees_the_partitions_at_once() -> None:
    """KIP-848: epoch -1 leaves; the group epoch bumps and the partitions move without waiting."""
    coord, log = new_coordinator(), Log()
    a, b = Member(coord, log, "a"), Member(coord, log, "b")
    a.heartbeat(0)
    settle([a, b], 1)
    epoch = coord.describe_group("g").group_epoch
    resp = b.leave(2)
    assert resp.error == OK and resp.member_epoch == -1
    assert coord.describe_group("g").group_epoch == epoch + 1
    assert a.heartbeat(3).assignment == tps("t", *range(6))
    assert [m.member_id for m in coord.describe_group("g").members] == ["a"]


def test_the_last_member_leaving_empties_the_group() -> None:
    coord, log = new_coordinator(), Log()
    a = Member(coord, log, "a")
    a.heartbeat(0)
    a.leave(1)
    assert coord.describe_group("g").state == GroupState.EMPTY
    assert coord.owners("g") == {}


def test_leaving_twice_is_unknown_member() -> None:
    coord, log = new_coordinator(), Log()
    a = Member(coord, log, "a")
    a.heartbeat(0)
    a.leave(1)
    assert a.leave(2).error == GroupErrorCode.UNKNOWN_MEMBER_ID


# ------------------------------------------------------------------------- member epochs


def test_an_epoch_ahead_of_the_coordinator_is_fenced() -> None:
    """GroupMetadataManager.throwIfConsumerGroupMemberEpochIsInvalid: received > current -> FENCED_MEMBER_EPOCH."""
    coord, log = new_coordinator(), Log()
    a = Member(coord, log, "a")
    a.heartbeat(0)
    a.epoch = 7
    assert a.heartbeat(1).error == GroupErrorCode.FENCED_MEMBER_EPOCH


def test_an_older_epoch_is_fenced_unless_it_is_a_lost_response() -> None:
    """Received < current is accepted only if it is the previous epoch and the member owns a
    subset of its assignment (the answer that moved it on was lost); else FENCED_MEMBER_EPOCH."""
    coord, log = new_coordinator(), Log()
    a, b = Member(coord, log, "a"), Member(coord, log, "b")
    a.heartbeat(0)
    settle([a, b], 1)
    c = Member(coord, log, "c")
    c.heartbeat(2)
    epoch_before = b.epoch
    moved_on = log(coord.heartbeat("g", "b", b.epoch, None, None, frozenset(), None, 3, COUNTS))
    assert moved_on.error == OK and moved_on.member_epoch > epoch_before  # pretend this answer was lost
    resp = log(coord.heartbeat("g", "b", epoch_before, None, None, moved_on.assignment, None, 4, COUNTS))
    assert resp.error == OK and resp.member_epoch == moved_on.member_epoch
    assert log(coord.heartbeat("g", "b", epoch_before - 1, None, None, [], None, 5, COUNTS)).error == GroupErrorCode.FENCED_MEMBER_EPOCH
    # The previous epoch while claiming a partition it must not own is fenced too.
    foreign = next(iter(a.owned))
    assert log(coord.heartbeat("g", "b", epoch_before, None, None, {foreign}, None, 6, COUNTS)).error == GroupErrorCode.FENCED_MEMBER_EPOCH


def test_an_unknown_member_is_told_so() -> None:
    coord, log = new_coordinator(), Log()
    assert log(coord.heartbeat("g", "ghost", 3, None, None, [], None, 0, COUNTS)).error == GroupErrorCode.UNKNOWN_MEMBER_ID
    Member(coord, log, "a").heartbeat(0)
    assert log(coord.heartbeat("g", "ghost", 3, None, None, [], None, 0, COUNTS)).error == GroupErrorCode.UNKNOWN_MEMBER_ID


def test_rejoining_with_epoch_zero_resets_the_member_and_reconciles_it_again() -> None:
    """tidelog decision: a known member joining again owns nothing; it gets its target back."""
    coord, log = new_coordinator(), Log()
    a, b = Member(coord, log, "a"), Member(coord, log, "b")
    a.heartbeat(0)
    settle([a, b], 1)
    epoch = coord.describe_group("g").group_epoch
    target = coord.describe_group("g").members[0].target_assignment
    a.epoch, a.owned = 0, frozenset()
    resp = a.heartbeat(2)
    assert resp.error == OK and resp.assignment == target
    assert coord.describe_group("g").group_epoch == epoch  # no rebalance for anyone else


# ----------------------------------------------------------------------------- timeouts


def test_a_member_missing_its_session_timeout_is_removed() -> None:
    """KIP-848: a member that does not heartbeat within the session timeout is fenced out."""
    coord, log = new_coordinator(session_timeout_ms=1000), Log()
    a, b = Member(coord, log, "a"), Member(coord, log, "b")
    a.heartbeat(0)
    settle([a, b], 0)
    assert coord.next_deadline() == 1000
    a.heartbeat(900)
    assert log(coord.tick(999)) == ()
    expired = log(coord.tick(1000))
    assert [(e.member_id, e.reason) for e in expired] == [("b", "session")]
    assert coord.describe_group("g").state == GroupState.ASSIGNING  # epoch bumped, target not yet
    assert a.heartbeat(1001).assignment == tps("t", *range(6))
    assert b.heartbeat(1002).error == GroupErrorCode.UNKNOWN_MEMBER_ID


def test_a_member_that_does_not_revoke_within_its_rebalance_timeout_is_fenced() -> None:
    """KIP-848: the rebalance timeout bounds how long a member may hold partitions it must revoke."""
    coord, log = new_coordinator(session_timeout_ms=10_000), Log()
    a, b = Member(coord, log, "a"), Member(coord, log, "b")
    a.heartbeat(0, rebalance_timeout_ms=500)
    b.heartbeat(100)
    a.heartbeat(200, owned=a.owned)  # a is asked to revoke at 200 ...
    a.heartbeat(600, owned=tps("t", *range(6)))  # ... and keeps heartbeating without revoking
    assert log(coord.tick(699)) == ()
    expired = log(coord.tick(700))
    assert [(e.member_id, e.reason) for e in expired] == [("a", "rebalance")]
    assert b.heartbeat(701).assignment == tps("t", *range(6))


# ---------------------------------------------------------------------- static members


def test_a_static_member_leaving_with_minus_two_keeps_its_partitions_for_its_return() -> None:
    """KIP-848 static membership: epoch -2 leaves temporarily; the same instance id rejoining
    (with a new member id) takes over the assignment without a group epoch bump."""
    coord, log = new_coordinator(), Log()
    a = Member(coord, log, "a1", instance_id="inst-a")
    b = Member(coord, log, "b")
    a.heartbeat(0)
    settle([a, b], 1)
    had, epoch = a.owned, coord.describe_group("g").group_epoch
    assert a.leave(2, epoch=-2).member_epoch == -2
    assert b.heartbeat(3).assignment == b.owned  # nothing moves to b meanwhile
    assert coord.owners("g") and all(coord.owners("g")[tp] == "a1" for tp in had)

    a2 = Member(coord, log, "a2", instance_id="inst-a")
    resp = a2.heartbeat(4)
    assert resp.error == OK and resp.assignment == had
    assert coord.describe_group("g").group_epoch == epoch
    assert [m.member_id for m in coord.describe_group("g").members] == ["a2", "b"]
    assert coord.describe_group("g").state == GroupState.STABLE


def test_a_static_instance_still_held_by_a_live_member_is_unreleased() -> None:
    """GroupMetadataManager.throwIfInstanceIdIsUnreleased: the old member must leave (-2) first."""
    coord, log = new_coordinator(), Log()
    Member(coord, log, "a1", instance_id="inst-a").heartbeat(0)
    assert Member(coord, log, "a2", instance_id="inst-a").heartbeat(1).error == GroupErrorCode.UNRELEASED_INSTANCE_ID


def test_a_static_member_gone_past_its_session_timeout_is_removed() -> None:
    """The instance id is kept only within the session timeout; then the partitions move on."""
    coord, log = new_coordinator(session_timeout_ms=1000), Log()
    a = Member(coord, log, "a1", instance_id="inst-a")
    b = Member(coord, log, "b")
    a.heartbeat(0)
    settle([a, b], 0)
    a.leave(100, epoch=-2)
    b.heartbeat(900)
    log(coord.tick(1099))
    assert "a1" in {m.member_id for m in coord.describe_group("g").members}
    expired = log(coord.tick(1100))
    assert [e.member_id for e in expired] == ["a1"]
    assert b.heartbeat(1101).assignment == tps("t", *range(6))
    resp = Member(coord, log, "a2", instance_id="inst-a").heartbeat(1102)
    assert resp.error == OK and resp.assignment == frozenset()  # a newcomer now: b must revoke first


def test_another_member_id_using_an_instance_id_is_fenced() -> None:
    """GroupMetadataManager.throwIfInstanceIdIsFenced: FENCED_INSTANCE_ID."""
    coord, log = new_coordinator(), Log()
    a = Member(coord, log, "a1", instance_id="inst-a")
    a.heartbeat(0)
    resp = log(coord.heartbeat("g", "intruder", 1, "inst-a", None, [], None, 1, COUNTS))
    assert resp.error == GroupErrorCode.FENCED_INSTANCE_ID
    assert log(coord.heartbeat("g", "x", 1, "inst-unknown", None, [], None, 1, COUNTS)).error == GroupErrorCode.UNKNOWN_MEMBER_ID
    assert log(coord.heartbeat("g", "a1", -2, None, None, [], None, 1, COUNTS)).error == GroupErrorCode.INVALID_REQUEST


# ------------------------------------------------------------- subscriptions and metadata


def test_a_subscription_change_bumps_the_group_epoch_and_revokes_unsubscribed_topics() -> None:
    """KIP-848: the group epoch bumps when a member's subscription changes."""
    coord, log = new_coordinator(), Log()
    counts = {"t": 2, "u": 2}
    a = Member(coord, log, "a", topics=("t", "u"))
    a.heartbeat(0, counts)
    assert a.owned == tps("t", 0, 1) | tps("u", 0, 1)
    epoch = coord.describe_group("g").group_epoch
    a.topics = ("t",)
    resp = a.heartbeat(1, counts, send_topics=True)
    assert coord.describe_group("g").group_epoch == epoch + 1
    assert resp.assignment == tps("t", 0, 1) and resp.member_epoch == epoch  # revoking u first
    resp = a.heartbeat(2, counts)
    assert resp.member_epoch == epoch + 1


def test_new_partitions_of_a_subscribed_topic_bump_the_epoch_and_get_assigned() -> None:
    """KIP-848: the group epoch bumps when the subscribed topics' metadata changes."""
    coord, log = new_coordinator(), Log()
    a = Member(coord, log, "a")
    a.heartbeat(0, {"t": 2})
    resp = a.heartbeat(1, {"t": 4})
    assert resp.assignment == tps("t", 0, 1, 2, 3) and resp.member_epoch == 2
    # A topic that does not exist yet assigns nothing, and its creation triggers a rebalance.
    b = Member(coord, log, "b", topics=("later",))
    assert b.heartbeat(2, {"t": 4}).assignment == frozenset()
    assert b.heartbeat(3, {"t": 4, "later": 1}).assignment == tps("later", 0)


def test_members_choose_the_server_assignor() -> None:
    coord, log = new_coordinator(), Log()
    counts = {"t": 4, "u": 4}
    a, b = Member(coord, log, "a", topics=("t", "u")), Member(coord, log, "b", topics=("t", "u"))
    a.heartbeat(0, counts, server_assignor="range")
    b.heartbeat(1, counts, server_assignor="range")
    for now in range(2, 8):
        a.heartbeat(now, counts)
        b.heartbeat(now, counts)
    assert coord.describe_group("g").assignor == "range"
    assert a.owned == tps("t", 0, 1) | tps("u", 0, 1)  # range: co-partitioned ranges
    resp = log(coord.heartbeat("g", "c", 0, None, ["t"], [], None, 9, counts, server_assignor="sticky"))
    assert resp.error == GroupErrorCode.UNSUPPORTED_ASSIGNOR


def test_the_group_size_limit_admits_no_new_member() -> None:
    coord, log = new_coordinator(max_group_size=1), Log()
    Member(coord, log, "a").heartbeat(0)
    assert Member(coord, log, "b").heartbeat(1).error == GroupErrorCode.GROUP_MAX_SIZE_REACHED


# ----------------------------------------------------------------------------- offsets


def test_commits_are_fenced_by_member_epoch() -> None:
    """ConsumerGroup.validateOffsetCommit: unknown member -> UNKNOWN_MEMBER_ID; epoch behind ->
    STALE_MEMBER_EPOCH; epoch ahead -> FENCED_MEMBER_EPOCH; the member's epoch -> committed."""
    coord, log = new_coordinator(), Log()
    a = Member(coord, log, "a")
    a.heartbeat(0)
    offsets = {TP("t", 0): CommittedOffset(42, 3, "meta")}
    assert log(coord.commit_offsets("g", "a", a.epoch - 1, offsets, 10)).error == GroupErrorCode.STALE_MEMBER_EPOCH
    assert log(coord.commit_offsets("g", "a", a.epoch + 1, offsets, 10)).error == GroupErrorCode.FENCED_MEMBER_EPOCH
    assert log(coord.commit_offsets("g", "zz", a.epoch, offsets, 10)).error == GroupErrorCode.UNKNOWN_MEMBER_ID
    before = len(log.records)
    resp = log(coord.commit_offsets("g", "a", a.epoch, offsets, 10))
    assert resp.error == OK and resp.partition_errors == {TP("t", 0): OK}
    [rec] = log.records[before:]
    assert rec.typed_key == OffsetCommitKey("g", "t", 0)
    assert rec.typed_value == OffsetCommitValue(42, 3, "meta", 10)
    assert coord.fetch_offsets("g", [TP("t", 0), TP("t", 1)]).offsets == {
        TP("t", 0): CommittedOffset(42, 3, "meta", 10),
        TP("t", 1): None,
    }


def test_admin_commits_are_allowed_only_while_the_group_has_no_members() -> None:
    """KIP-848: member id "" with epoch -1 (admin, simple consumer) commits only to an empty group."""
    coord, log = new_coordinator(), Log()
    offsets = {TP("t", 0): CommittedOffset(5)}
    assert log(coord.commit_offsets("g", "", -1, offsets, 0)).error == OK
    assert coord.describe_group("g").state == GroupState.EMPTY  # an offsets-only group exists
    a = Member(coord, log, "a")
    a.heartbeat(1)
    assert log(coord.commit_offsets("g", "", -1, offsets, 2)).error == GroupErrorCode.UNKNOWN_MEMBER_ID
    a.leave(3)
    assert log(coord.commit_offsets("g", "", -1, offsets, 4)).error == OK


def test_oversized_commit_metadata_fails_that_partition_only() -> None:
    coord, log = new_coordinator(offset_metadata_max_bytes=4), Log()
    resp = log(coord.commit_offsets("g", "", -1, {TP("t", 0): CommittedOffset(1, metadata="12345"), TP("t", 1): CommittedOffset(2)}, 0))
    assert resp.partition_errors == {TP("t", 0): GroupErrorCode.OFFSET_METADATA_TOO_LARGE, TP("t", 1): OK}
    assert set(coord.fetch_offsets("g").offsets) == {TP("t", 1)}


def test_member_fetches_are_fenced_by_epoch() -> None:
    """ConsumerGroup.validateOffsetFetch: a member's fetch must carry its current epoch."""
    coord, log = new_coordinator(), Log()
    a = Member(coord, log, "a")
    a.heartbeat(0)
    assert coord.fetch_offsets("g", member_id="a", member_epoch=a.epoch).error == OK
    assert coord.fetch_offsets("g", member_id="a", member_epoch=a.epoch - 1).error == GroupErrorCode.STALE_MEMBER_EPOCH
    assert coord.fetch_offsets("g", member_id="b", member_epoch=1).error == GroupErrorCode.UNKNOWN_MEMBER_ID
    assert coord.fetch_offsets("g").error == OK  # admins read any time
    assert coord.fetch_offsets("nope", [TP("t", 0)]).offsets == {TP("t", 0): None}


# ------------------------------------------------------------------------------- admin


def test_describe_and_list_show_each_group_state() -> None:
    """ConsumerGroup states: Empty, Assigning, Reconciling, Stable, Dead."""
    coord, log = new_coordinator(session_timeout_ms=100), Log()
    assert coord.describe_group("g").state == GroupState.DEAD
    assert coord.describe_group("g").error == GroupErrorCode.GROUP_ID_NOT_FOUND
    a, b = Member(coord, log, "a"), Member(coord, log, "b")
    a.heartbeat(0)
    assert coord.describe_group("g").state == GroupState.STABLE
    b.heartbeat(0)
    assert coord.describe_group("g").state == GroupState.RECONCILING
    settle([a, b], 50)
    assert coord.describe_group("g").state == GroupState.STABLE
    a.heartbeat(140)
    log(coord.tick(150))  # b expires: epoch bumped, no heartbeat has computed the target yet
    assert coord.describe_group("g").state == GroupState.ASSIGNING
    log(coord.commit_offsets("other", "", -1, {TP("t", 0): CommittedOffset(1)}, 150))
    assert [(g.group_id, g.state) for g in coord.list_groups()] == [("g", GroupState.ASSIGNING), ("other", GroupState.EMPTY)]
    d = coord.describe_group("g")
    assert [m.member_id for m in d.members] == ["a"] and d.members[0].subscribed_topics == ("t",)


def test_only_an_empty_group_can_be_deleted_and_deletion_writes_tombstones() -> None:
    """DeleteGroups: NON_EMPTY_GROUP while members remain; GROUP_ID_NOT_FOUND for none; tombstones."""
    coord, log = new_coordinator(), Log()
    assert log(coord.delete_group("g")).error == GroupErrorCode.GROUP_ID_NOT_FOUND
    a = Member(coord, log, "a")
    a.heartbeat(0)
    log(coord.commit_offsets("g", "a", a.epoch, {TP("t", 0): CommittedOffset(3), TP("t", 1): CommittedOffset(4)}, 1))
    assert log(coord.delete_group("g")).error == GroupErrorCode.NON_EMPTY_GROUP
    a.leave(2)
    before = len(log.records)
    assert log(coord.delete_group("g")).error == OK
    deleted = log.records[before:]
    assert all(r.value is None for r in deleted)
    assert {type(r.typed_key).__name__ for r in deleted} == {
        "OffsetCommitKey",
        "ConsumerGroupTargetAssignmentMetadataKey",
        "ConsumerGroupPartitionMetadataKey",
        "ConsumerGroupMetadataKey",
    }
    assert coord.describe_group("g").state == GroupState.DEAD and coord.list_groups() == []
    assert replayed(log).snapshot() == {}


def test_reset_offsets_is_refused_while_the_group_has_live_members() -> None:
    """kafka-consumer-groups: offsets "can only be reset if the group is inactive"."""
    coord, log = new_coordinator(), Log()
    a = Member(coord, log, "a")
    a.heartbeat(0)
    assert log(coord.reset_offsets("g", {TP("t", 0): 0}, 1)).error == GroupErrorCode.NON_EMPTY_GROUP
    a.leave(2)
    assert log(coord.reset_offsets("g", {TP("t", 0): 7}, 3)).error == OK
    assert coord.fetch_offsets("g").offsets == {TP("t", 0): CommittedOffset(7, -1, "", 3)}


# ------------------------------------------------------------------------------ replay


def test_replaying_the_emitted_records_rebuilds_the_same_state() -> None:
    """The coordinator's state is a function of its records: a new leader replays the partition."""
    coord, log = new_coordinator(session_timeout_ms=1000), Log()
    a, b = Member(coord, log, "a"), Member(coord, log, "b", instance_id="ib")
    c = Member(coord, log, "c", topics=("t", "u"))
    a.heartbeat(0)
    b.heartbeat(1)
    c.heartbeat(2, {"t": 6, "u": 3})
    a.heartbeat(3)
    log(coord.commit_offsets("g", "a", a.epoch, {TP("t", 0): CommittedOffset(9)}, 4))
    b.leave(5, epoch=-2)
    log(coord.tick(2000))
    log(coord.commit_offsets("h", "", -1, {TP("x", 1): CommittedOffset(1)}, 6))
    assert replayed(log).snapshot() == coord.snapshot()


def test_replaying_a_compacted_partition_rebuilds_the_same_state() -> None:
    """Compaction keeps the latest record per key (tombstones included): the state must not
    depend on the records compaction removes."""
    coord, log = new_coordinator(), Log()
    members = [Member(coord, log, m) for m in "abc"]
    for now in range(8):
        for m in members:
            m.heartbeat(now)
        log(coord.commit_offsets("g", "a", members[0].epoch, {TP("t", now % 3): CommittedOffset(now)}, now))
    members[1].leave(9)
    settle([members[0], members[2]], 10)
    latest: dict[bytes, GroupRecord] = {}
    for r in log.records:
        latest.pop(r.key, None)
        latest[r.key] = r  # re-inserting keeps dict order = offset order of the latest record
    compacted = sorted(latest.values(), key=log.records.index)
    assert len(compacted) < len(log.records)
    assert replayed(log, compacted).snapshot() == coord.snapshot()
    # Once tombstones are gone too (after delete.retention.ms), still the same state.
    assert replayed(log, [r for r in compacted if r.value is not None]).snapshot() == coord.snapshot()


def test_after_a_load_timers_start_from_on_loaded() -> None:
    coord, log = new_coordinator(session_timeout_ms=1000), Log()
    Member(coord, log, "a").heartbeat(0)
    fresh = replayed(log, session_timeout_ms=1000)
    assert fresh.next_deadline() is None
    fresh.on_loaded(5000)
    assert fresh.next_deadline() == 6000
    assert [e.member_id for e in fresh.tick(6000).response] == ["a"]


def test_a_replayed_coordinator_refuses_writes_until_on_loaded() -> None:
    """Fail fast: without on_loaded the loaded members would have no session timers."""
    coord, log = new_coordinator(), Log()
    Member(coord, log, "a").heartbeat(0)
    fresh = replayed(log)
    with pytest.raises(CoordinatorNotLoadedError):
        fresh.tick(1)
    with pytest.raises(CoordinatorNotLoadedError):
        fresh.commit_offsets("g", "", -1, {TP("t", 0): CommittedOffset(1)}, 1)
    fresh.on_loaded(1)
    assert fresh.heartbeat("g", "a", 1, None, None, tps("t", *range(6)), None, 2, COUNTS).response.error == OK


def test_error_codes_are_kafkas_and_agree_with_the_wire_enum() -> None:
    """Every group error the wire enum (common.proto ErrorCode) knows has the same number."""
    for code in GroupErrorCode:
        if code.name in ErrorCode.keys():
            assert ErrorCode.Value(code.name) == code.value, code
    assert GroupErrorCode.UNRELEASED_INSTANCE_ID == 111 and GroupErrorCode.FENCED_INSTANCE_ID == 82


def test_unknown_record_types_are_skipped_on_load() -> None:
    """Kafka's loader skips record types it does not know (e.g. a newer version's share groups)."""
    coord = new_coordinator()
    coord.replay(b"\x00\x0a\x00\x01g", b"\x00\x00")
    assert coord.skipped_records == 1 and coord.snapshot() == {}
    coord.replay(encode_key(ConsumerGroupMetadataKey("g")), b"\x00\x00\x00\x00\x00\x05\x00")
    coord.on_loaded(0)
    assert coord.describe_group("g").group_epoch == 5


# ------------------------------------------------------------------- the transition table


def test_the_transition_table_holds_revoking_members_in_their_epoch() -> None:
    """h11-style table: entering or staying in UNREVOKED_PARTITIONS keeps the epoch; every other
    move lands on the target epoch; a violation is a named error at once."""
    stable = ConsumerGroupCurrentMemberAssignmentValue(3, 2, MemberState.STABLE, tps("t", 0, 1))
    unrevoked_bumped = ConsumerGroupCurrentMemberAssignmentValue(4, 3, MemberState.UNREVOKED_PARTITIONS, tps("t", 0), tps("t", 1))
    with pytest.raises(IllegalMemberTransition):
        GroupCoordinator._transition(stable, unrevoked_bumped, 4)
    unrevoked_gaining = ConsumerGroupCurrentMemberAssignmentValue(3, 2, MemberState.UNREVOKED_PARTITIONS, tps("t", 0, 5), tps("t", 1))
    with pytest.raises(IllegalMemberTransition):
        GroupCoordinator._transition(stable, unrevoked_gaining, 4)
    stable_behind = ConsumerGroupCurrentMemberAssignmentValue(3, 2, MemberState.STABLE, tps("t", 0))
    with pytest.raises(IllegalMemberTransition):
        GroupCoordinator._transition(stable, stable_behind, 4)
    GroupCoordinator._transition(stable, ConsumerGroupCurrentMemberAssignmentValue(3, 2, MemberState.UNREVOKED_PARTITIONS, tps("t", 0), tps("t", 1)), 4)
    assert len(MEMBER_TRANSITIONS) == 9
