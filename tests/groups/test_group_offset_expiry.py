"""Offset expiry in the group coordinator (Kafka's KIP-211, offsets.retention.minutes).

An empty group's offsets expire once it has been empty for the retention; a group with members
keeps the offsets of the topics it subscribes to and loses the others the retention after their
commit; a group that never had members loses each offset the retention after its commit; an
empty group left without offsets is deleted. Expiry writes tombstones, so a replay (and a
compacted log) agrees.
"""

from __future__ import annotations

from tidelog.node.group_coordinator import CommittedOffset, ExpiredOffsets, GroupCoordinator, GroupErrorCode, Result
from tidelog.node.group_records import GroupRecord, OffsetCommitKey, TopicPartition, decode_key

from tests.groups.test_group_coordinator import OK, Log, Member, new_coordinator, replayed

TP = TopicPartition
RETENTION = 10_000


def coordinator() -> tuple[GroupCoordinator, Log]:
    return new_coordinator(offsets_retention_ms=RETENTION), Log()


def commit(coord: GroupCoordinator, log: Log, member: Member | None, now: int, *tps: TP) -> None:
    member_id, epoch = ("", -1) if member is None else (member.member_id, member.epoch)
    response = log(coord.commit_offsets("g", member_id, epoch, {tp: CommittedOffset(7) for tp in tps}, now))
    assert response.error == GroupErrorCode.NONE


def expire(coord: GroupCoordinator, log: Log, now: int) -> tuple[ExpiredOffsets, ...]:
    result = coord.expire_offsets(now)
    log(result)
    return result.response


def offsets(coord: GroupCoordinator) -> set[TP]:
    return set(coord.fetch_offsets("g").offsets)


def test_an_empty_groups_offsets_expire_once_it_has_been_empty_for_the_retention() -> None:
    coord, log = coordinator()
    member = Member(coord, log, "")
    assert member.heartbeat(0).error == OK
    commit(coord, log, member, 100, TP("t", 0), TP("t", 1))
    member.leave(1_000)  # empty from here on
    assert expire(coord, log, 1_000 + RETENTION - 1) == ()
    assert offsets(coord) == {TP("t", 0), TP("t", 1)}
    before = len(log.records)
    assert expire(coord, log, 1_000 + RETENTION) == (ExpiredOffsets("g", (TP("t", 0), TP("t", 1)), True),)
    assert offsets(coord) == set() and coord.group_ids() == []
    # Tombstones only: for the offsets, and for the group's own records.
    written = log.records[before:]
    assert written and all(r.value is None for r in written)
    assert sum(isinstance(decode_key(r.key), OffsetCommitKey) for r in written) == 2
    assert replayed(log).snapshot() == {}


def test_a_group_with_members_keeps_its_subscribed_topics_and_loses_the_others() -> None:
    # Offsets of a topic no member subscribes to (committed by an admin before the members came).
    coord, log = coordinator()
    commit(coord, log, None, 100, TP("old", 0))
    member = Member(coord, log, "", topics=("t",))
    assert member.heartbeat(200).error == OK
    commit(coord, log, member, 300, TP("t", 0))
    assert expire(coord, log, 100 + RETENTION - 1) == ()
    assert expire(coord, log, 100 + RETENTION) == (ExpiredOffsets("g", (TP("old", 0),), False),)
    # Subscribed offsets never expire while the group has members, however old.
    member.heartbeat(10 * RETENTION)
    assert expire(coord, log, 10 * RETENTION) == ()
    assert offsets(coord) == {TP("t", 0)}
    assert replayed(log).snapshot() == coord.snapshot()


def test_offsets_of_a_group_that_never_had_members_expire_one_by_one_after_their_commit() -> None:
    coord, log = coordinator()
    commit(coord, log, None, 0, TP("t", 0))
    commit(coord, log, None, 5_000, TP("t", 1))
    assert expire(coord, log, RETENTION) == (ExpiredOffsets("g", (TP("t", 0),), False),)
    assert offsets(coord) == {TP("t", 1)}
    assert expire(coord, log, 5_000 + RETENTION) == (ExpiredOffsets("g", (TP("t", 1),), True),)
    assert coord.group_ids() == []


def test_a_commit_to_an_empty_group_is_kept_a_whole_retention() -> None:
    """reset-offsets runs against an empty group: what it writes must not expire at once."""
    coord, log = coordinator()
    member = Member(coord, log, "")
    member.heartbeat(0)
    member.leave(0)
    commit(coord, log, None, 8_000, TP("t", 0))  # an admin commit (reset-offsets)
    assert expire(coord, log, RETENTION) == ()
    assert expire(coord, log, 8_000 + RETENTION)[0].partitions == (TP("t", 0),)


def test_an_empty_group_without_offsets_is_deleted() -> None:
    coord, log = coordinator()
    member = Member(coord, log, "")
    member.heartbeat(0)
    member.leave(10)
    assert coord.group_ids() == ["g"]
    assert expire(coord, log, 20) == (ExpiredOffsets("g", (), True),)
    assert coord.group_ids() == [] and replayed(log).snapshot() == {}


def test_after_a_load_the_emptiness_is_dated_by_the_records_timestamps() -> None:
    """The coordinator that takes over dates the group's emptiness from the record that
    emptied it, so a failover neither resets nor shortens the retention."""
    coord, log = coordinator()
    timed: list[tuple[int, GroupRecord]] = []

    def at(now: int, result: Result) -> None:
        timed.extend((now, r) for r in result.records)
        log(result)

    member = Member(coord, log, "")
    member.heartbeat(0)
    timed.extend((0, r) for r in log.records)
    at(100, coord.commit_offsets("g", member.member_id, member.epoch, {TP("t", 0): CommittedOffset(3)}, 100))
    at(2_000, coord.heartbeat("g", member.member_id, -1, None, None, None, None, 2_000, {"t": 6}))

    fresh = GroupCoordinator(coord.config)
    for now, record in timed:
        fresh.replay(record.key, record.value, now)
    fresh.on_loaded(5_000)
    assert fresh.expire_offsets(2_000 + RETENTION - 1).response == ()
    assert fresh.expire_offsets(2_000 + RETENTION).response[0].partitions == (TP("t", 0),)

    # Replayed without timestamps: the retention starts at the load, never earlier.
    undated = replayed(log, offsets_retention_ms=RETENTION)
    undated.on_loaded(5_000)
    assert undated.expire_offsets(5_000 + RETENTION - 1).response == ()
    assert undated.expire_offsets(5_000 + RETENTION).response[0].partitions == (TP("t", 0),)


def test_the_retention_is_a_node_key_in_minutes_fractions_allowed(tmp_path) -> None:
    from tidelog.node.config import ConfigError, build_config

    base = {"node_id": 1, "data_dir": str(tmp_path)}
    assert build_config(base).offsets_retention_minutes == 10080  # Kafka's 7 days
    assert build_config({**base, "offsets_retention_minutes": "0.05"}).offsets_retention_minutes == 0.05
    for bad in (0, -1, True, "soon", float("inf")):
        try:
            build_config({**base, "offsets_retention_minutes": bad})
        except ConfigError:
            continue
        raise AssertionError(f"{bad!r} accepted")
