"""OffsetCommitStream against a real node: each call is answered once, with its id, whether it
came alone or with others in one message; the commits of one stream apply in the order sent; per-call errors come back as answers and the
stream carries on; bytes that are not a request end the stream with INVALID_ARGUMENT and change
nothing; and a client that half-closes still gets every answer. tidelog.client commits this way
(client/connection.py `CommitStream`)."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest

from support.nodes import LocalCluster
from tidelog.client import Consumer, TopicPartition
from tidelog.proto import api_pb2, api_pb2_grpc, common_pb2
from tidelog.proto.common_pb2 import ErrorCode

from tests.node_process.test_groups_process import GroupsClient, create_topic

TOPIC = "t"
GROUP = "g"


@pytest.fixture
def coordinator(cluster: LocalCluster) -> Iterator[api_pb2_grpc.GroupsStub]:
    create_topic(cluster, TOPIC, 2)
    groups = GroupsClient(cluster)
    try:
        groups.call(GROUP, "OffsetCommit", commit(GROUP, 0, 0))  # __consumer_offsets exists, loaded
        yield groups.stub(groups.find(GROUP))
    finally:
        groups.close()


def commit(group: str, partition: int, offset: int, topic: str = TOPIC) -> api_pb2.OffsetCommitRequest:
    return api_pb2.OffsetCommitRequest(group_id=group, member_epoch=-1, partitions=[
        api_pb2.OffsetCommitPartition(topic=topic, partition=partition, offset=offset, leader_epoch=-1)])


def committed(stub: api_pb2_grpc.GroupsStub, partition: int) -> int:
    answer = stub.OffsetFetch(api_pb2.OffsetFetchRequest(group_id=GROUP, member_epoch=-1, partitions=[
        common_pb2.TopicPartition(topic=TOPIC, partition=partition)]), timeout=10)
    assert answer.error == ErrorCode.NONE, answer
    return answer.offsets[0].offset


def test_every_call_is_answered_once_and_commits_apply_in_order(coordinator: api_pb2_grpc.GroupsStub) -> None:
    def call(call_id: int, request: api_pb2.OffsetCommitRequest) -> api_pb2.OffsetCommitCall:
        return api_pb2.OffsetCommitCall(id=call_id, commit=request)

    messages = [api_pb2.OffsetCommitStreamRequest(calls=[call(100 + i, commit(GROUP, i % 2, i))]) for i in range(100)]
    # Several calls in one message, among them one naming an unknown topic and one with an
    # invalid group id: per-call errors, and the calls after them are served.
    messages.append(api_pb2.OffsetCommitStreamRequest(calls=[
        call(200 + i, commit(GROUP, i % 2, 100 + i)) for i in range(100)] + [
        call(7, commit(GROUP, 0, 5, topic="no-such-topic")),
        call(8, commit("", 0, 5)),
        call(9, commit(GROUP, 0, 1000))]))
    sent = [c.id for m in messages for c in m.calls]
    # The iterator ends: the client half-closes after its last message, before any answer.
    answers = [a for response in coordinator.OffsetCommitStream(iter(messages), timeout=30) for a in response.answers]
    assert sorted(a.id for a in answers) == sorted(sent)
    by_id = {a.id: a.commit for a in answers}
    for i in range(100):
        assert by_id[100 + i].error == ErrorCode.NONE, by_id[100 + i]
        assert by_id[200 + i].error == ErrorCode.NONE, by_id[200 + i]
    assert by_id[7].partitions[0].error == ErrorCode.UNKNOWN_TOPIC_OR_PARTITION, by_id[7]
    assert by_id[8].error == ErrorCode.INVALID_GROUP_ID, by_id[8]
    # In order: the last commit sent for each partition is the one that stands.
    assert committed(coordinator, 0) == 1000
    assert committed(coordinator, 1) == 199


def test_undecodable_request_ends_the_stream_with_invalid_argument(cluster: LocalCluster,
                                                                    coordinator: api_pb2_grpc.GroupsStub) -> None:
    with grpc.insecure_channel(cluster.nodes[0].address) as channel:
        call = channel.stream_stream("/tidelog.Groups/OffsetCommitStream", request_serializer=None,
                                     response_deserializer=api_pb2.OffsetCommitStreamResponse.FromString)
        good = api_pb2.OffsetCommitStreamRequest(calls=[
            api_pb2.OffsetCommitCall(id=1, commit=commit(GROUP, 1, 42))]).SerializeToString()
        with pytest.raises(grpc.RpcError) as caught:
            list(call(iter([b"\xff\xff\xff", good]), timeout=30))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value
    assert "OffsetCommitStreamRequest" in (caught.value.details() or "")
    assert committed(coordinator, 1) == -1  # the request after the bad bytes was never applied
    # The node serves on.
    assert coordinator.OffsetCommit(commit(GROUP, 1, 43), timeout=10).error == ErrorCode.NONE
    assert committed(coordinator, 1) == 43


def test_a_consumer_commits_again_after_its_coordinator_restarts(cluster: LocalCluster) -> None:
    """tidelog.client's commits go over a stream that ends with its node (which still stops
    cleanly); the next commit opens a new one to the restarted node."""
    create_topic(cluster, TOPIC, 1)
    tp = TopicPartition(TOPIC, 0)
    with Consumer(bootstrap=cluster.bootstrap, group_id=GROUP, enable_auto_commit=False) as consumer:
        consumer.assign([tp])
        consumer.commit({tp: 5})
        assert cluster.nodes[0].stop() == 0
        cluster.nodes[0].start()
        consumer.commit({tp: 6})
        assert consumer.committed([tp]) == {tp: 6}
