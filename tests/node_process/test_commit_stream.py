"""OffsetCommitStream against a real node: each request is answered once, with its id; the
commits of one stream apply in the order sent; per-call errors come back as answers and the
stream carries on; bytes that are not a request end the stream with INVALID_ARGUMENT and change
nothing; and a client that half-closes still gets every answer. tidelog.client commits this way
(client/connection.py `CommitStream`)."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest

from support.nodes import LocalCluster
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


def test_every_request_is_answered_once_and_commits_apply_in_order(coordinator: api_pb2_grpc.GroupsStub) -> None:
    requests = [api_pb2.OffsetCommitStreamRequest(id=100 + i, commit=commit(GROUP, i % 2, i)) for i in range(200)]
    # A request naming an unknown topic and one with an invalid group id: per-call errors.
    requests.append(api_pb2.OffsetCommitStreamRequest(id=7, commit=commit(GROUP, 0, 5, topic="no-such-topic")))
    requests.append(api_pb2.OffsetCommitStreamRequest(id=8, commit=commit("", 0, 5)))
    # Sent after the errors: the stream still serves it.
    requests.append(api_pb2.OffsetCommitStreamRequest(id=9, commit=commit(GROUP, 0, 1000)))
    # The iterator ends: the client half-closes after its last request, before any answer.
    answers = {a.id: a.commit for a in coordinator.OffsetCommitStream(iter(requests), timeout=30)}
    assert sorted(answers) == sorted(r.id for r in requests)
    for i in range(200):
        assert answers[100 + i].error == ErrorCode.NONE, answers[100 + i]
    assert answers[7].partitions[0].error == ErrorCode.UNKNOWN_TOPIC_OR_PARTITION, answers[7]
    assert answers[8].error == ErrorCode.INVALID_GROUP_ID, answers[8]
    # In order: the last commit sent for each partition is the one that stands.
    assert committed(coordinator, 0) == 1000
    assert committed(coordinator, 1) == 199


def test_undecodable_request_ends_the_stream_with_invalid_argument(cluster: LocalCluster,
                                                                    coordinator: api_pb2_grpc.GroupsStub) -> None:
    with grpc.insecure_channel(cluster.nodes[0].address) as channel:
        call = channel.stream_stream("/tidelog.Groups/OffsetCommitStream", request_serializer=None,
                                     response_deserializer=api_pb2.OffsetCommitStreamResponse.FromString)
        good = api_pb2.OffsetCommitStreamRequest(id=1, commit=commit(GROUP, 1, 42)).SerializeToString()
        with pytest.raises(grpc.RpcError) as caught:
            list(call(iter([b"\xff\xff\xff", good]), timeout=30))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value
    assert "OffsetCommitStreamRequest" in (caught.value.details() or "")
    assert committed(coordinator, 1) == -1  # the request after the bad bytes was never applied
    # The node serves on.
    assert coordinator.OffsetCommit(commit(GROUP, 1, 43), timeout=10).error == ErrorCode.NONE
    assert committed(coordinator, 1) == 43
