"""Group calls whose records exceed one batch of `__consumer_offsets` (max.message.bytes, 1 MiB
here) on a real node. They used to be refused by the log after the coordinator had applied
them, which reloaded the whole partition (every group there stalled) and, for DeleteGroup,
could never succeed. Now a DeleteGroup's tombstones go in several batches, and a heartbeat
(whose records must commit together) is taken back and refused with INVALID_REQUEST; the
coordinator is never reloaded.

Group ids of 30,000 bytes (the limit is 32,767) make every record of the group large, so 40
committed offsets are 1.2 MB of tombstones; a subscription to 4,300 249-character topic names
(unknown topics are allowed) makes one member record of about 1.07 MB.
"""

from __future__ import annotations

import pytest

from support.nodes import LocalCluster
from tidelog.node.group_records import coordinator_partition
from tidelog.proto import api_pb2, common_pb2
from tidelog.proto.common_pb2 import ErrorCode

from tests.node_process.test_groups_process import OFFSETS_PARTITIONS, GroupsClient, create_topic

TOPIC = "t"
PARTITIONS = 40


@pytest.fixture
def node(cluster: LocalCluster) -> LocalCluster:
    return cluster  # conftest's single node


def long_group(tag: str) -> str:
    return tag + "-" + "x" * 30000


def heartbeat(client: GroupsClient, group: str, topics: list[str], member_id: str = "", epoch: int = 0,
              owned: list[tuple[str, int]] = ()) -> api_pb2.ConsumerGroupHeartbeatResponse:
    request = api_pb2.ConsumerGroupHeartbeatRequest(
        group_id=group, member_id=member_id, member_epoch=epoch, rebalance_timeout_ms=30000,
        has_subscription=True, subscribed_topics=topics, has_owned_partitions=True,
        owned_partitions=[common_pb2.TopicPartition(topic=t, partition=p) for t, p in owned])
    return client.call(group, "ConsumerGroupHeartbeat", request)


def describe(client: GroupsClient, group: str) -> api_pb2.DescribeGroupResponse:
    return client.call(group, "DescribeGroup", api_pb2.DescribeGroupRequest(group_id=group))


def assert_never_reloaded(local: LocalCluster) -> None:
    text = local.node(1).log_path.read_text()
    assert "dropped" not in text, text[-3000:]


def test_delete_group_with_more_tombstones_than_one_batch_holds(node: LocalCluster) -> None:
    client = GroupsClient(node)
    try:
        create_topic(node, TOPIC, PARTITIONS)
        group = long_group("many-offsets")
        part = api_pb2.OffsetCommitPartition
        for first in range(0, PARTITIONS, 10):  # 10 records of ~30 KB fit one commit's batch
            answer = client.call(group, "OffsetCommit", api_pb2.OffsetCommitRequest(
                group_id=group, member_epoch=-1,
                partitions=[part(topic=TOPIC, partition=p, offset=p + 1) for p in range(first, first + 10)]))
            assert {r.error for r in answer.partitions} == {ErrorCode.NONE}, answer
        assert len(describe(client, group).offsets) == PARTITIONS

        answer = client.call(group, "DeleteGroup", api_pb2.DeleteGroupRequest(group_id=group))
        assert answer.error == ErrorCode.NONE, answer
        assert describe(client, group).error == ErrorCode.GROUP_ID_NOT_FOUND
        fetched = client.call(group, "OffsetFetch", api_pb2.OffsetFetchRequest(group_id=group, member_epoch=-1))
        assert [o for o in fetched.offsets if o.offset >= 0] == []
        assert_never_reloaded(node)
    finally:
        client.close()


def test_a_heartbeat_too_large_for_one_batch_is_refused_and_taken_back(node: LocalCluster) -> None:
    client = GroupsClient(node)
    try:
        create_topic(node, TOPIC, 2)
        huge = [f"{i:05d}" + "s" * 244 for i in range(4300)]
        group = "members"

        # A join with the huge subscription: refused, and no member is left behind.
        refused = heartbeat(client, group, huge)
        assert refused.error == ErrorCode.INVALID_REQUEST, refused
        assert "__consumer_offsets" in refused.error_message and "nothing was changed" in refused.error_message
        assert describe(client, group).error == ErrorCode.GROUP_ID_NOT_FOUND

        # A member that is in the group asks for the huge subscription: refused, and it stays
        # what it was (subscription, epoch, partitions), heartbeating as before.
        joined = heartbeat(client, group, [TOPIC])
        assert joined.error == ErrorCode.NONE, joined
        member, epoch = joined.member_id, joined.member_epoch
        owned = [(tp.topic, tp.partition) for tp in joined.assignment]
        assert len(owned) == 2
        before = describe(client, group)
        refused = heartbeat(client, group, huge, member, epoch, owned)
        assert refused.error == ErrorCode.INVALID_REQUEST, refused
        after = describe(client, group)
        assert (after.group_epoch, after.assignment_epoch, after.state) == (
            before.group_epoch, before.assignment_epoch, before.state)
        assert [(m.member_id, m.member_epoch, list(m.subscribed_topics)) for m in after.members] == [
            (member, epoch, [TOPIC])]
        again = heartbeat(client, group, [TOPIC], member, epoch, owned)
        assert (again.error, again.member_epoch) == (ErrorCode.NONE, epoch), again

        # Another group of the same __consumer_offsets partition was never held up.
        neighbour = next(f"n{i}" for i in range(10_000)
                         if coordinator_partition(f"n{i}", OFFSETS_PARTITIONS) == coordinator_partition(
                             group, OFFSETS_PARTITIONS))
        assert heartbeat(client, neighbour, [TOPIC]).error == ErrorCode.NONE
        assert_never_reloaded(node)
    finally:
        client.close()
