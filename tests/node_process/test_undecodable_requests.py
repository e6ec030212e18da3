"""Request bytes that are not the method's message, sent to a real node over a raw channel: the
answer is gRPC INVALID_ARGUMENT with a one-line reason (it was UNKNOWN, "Unexpected <class
...>", indistinguishable from a node failure), nothing is appended or committed, and the node
serves on. Covers the hand-decoded Produce and replication stream, a protobuf-decoded group
call (OffsetCommit) and an admin call (CreateTopics)."""

from __future__ import annotations

import grpc
import pytest

from support.nodes import LocalCluster
from tidelog.proto import api_pb2, api_pb2_grpc
from tidelog.proto import records as codec
from tidelog.proto.common_pb2 import ErrorCode
from tidelog.proto.wire import encode_varint

from tests.node_process.test_groups_process import GroupsClient, create_topic

TOPIC = "t"
GROUP = "g"


@pytest.fixture
def node(cluster: LocalCluster) -> LocalCluster:
    return cluster  # conftest's single node


def field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field."""
    return encode_varint(number << 3 | 2) + encode_varint(len(payload)) + payload


def produce_request(topic: bytes, records: bytes) -> bytes:
    partition = field(1, topic) + bytes([2 << 3, 0]) + field(3, records)
    return bytes([1 << 3]) + encode_varint((1 << 64) - 1) + field(3, partition)  # acks=-1


def refused(channel: grpc.Channel, method: str, data: bytes) -> str:
    call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
    with pytest.raises(grpc.RpcError) as caught:
        call(data, timeout=10)
    error = caught.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, error.code(), error.details())
    details = error.details()
    assert details and "\n" not in details and "not a valid" in details, details
    return details


def end_offset(stub: api_pb2_grpc.BrokerStub) -> int:
    answer = stub.ListOffsets(api_pb2.ListOffsetsRequest(partitions=[
        api_pb2.ListOffsetsPartition(topic=TOPIC, partition=0, timestamp=-1)]), timeout=10)
    assert answer.partitions[0].error == ErrorCode.NONE, answer
    return answer.partitions[0].offset


def test_undecodable_requests_are_invalid_argument_and_change_nothing(node: LocalCluster) -> None:
    create_topic(node, TOPIC, 1)
    batch = codec.encode_batch([codec.Record(offset=0, timestamp=1, key=None, value=b"ok")])
    good = produce_request(TOPIC.encode(), batch)
    groups = GroupsClient(node)
    channel = grpc.insecure_channel(node.bootstrap)
    try:
        broker = api_pb2_grpc.BrokerStub(channel)
        produce = channel.unary_unary("/tidelog.Broker/Produce", request_serializer=None,
                                      response_deserializer=api_pb2.ProduceResponse.FromString)
        assert produce(good, timeout=10).partitions[0].error == ErrorCode.NONE
        before = end_offset(broker)

        # Produce: a truncated varint, a partition whose length runs past the request, a topic
        # that is not UTF-8, and a valid request cut short inside its records.
        runs_past = bytes([3 << 3 | 2]) + encode_varint(1000) + b"abc"
        for bad in (b"\xff\xff\xff", runs_past, produce_request(b"\xff\xfe", batch), good[:len(good) // 2]):
            assert "tidelog.ProduceRequest" in refused(channel, "/tidelog.Broker/Produce", bad)
        assert end_offset(broker) == before  # nothing appended

        # A group call and an admin call, decoded by protobuf.
        assert "tidelog.OffsetCommitRequest" in refused(channel, "/tidelog.Groups/OffsetCommit",
                                                        b"\x0a\xff\xff\xff")
        fetched = groups.call(GROUP, "OffsetFetch", api_pb2.OffsetFetchRequest(group_id=GROUP, member_epoch=-1))
        assert [o for o in fetched.offsets if o.offset >= 0] == []  # nothing committed
        assert "tidelog.CreateTopicsRequest" in refused(channel, "/tidelog.Admin/CreateTopics",
                                                        b"\x0a\x05\x0a\xff")
        listed = api_pb2_grpc.AdminStub(channel).ListTopics(api_pb2.ListTopicsRequest(), timeout=10)
        assert [t.name for t in listed.topics] == [TOPIC]

        # The replication stream (peers only) ends its call the same way.
        stream = channel.stream_stream("/tidelog.internal.Replication/Stream", request_serializer=None,
                                       response_deserializer=None)
        with pytest.raises(grpc.RpcError) as caught:
            for _ in stream(iter([b"\x12\xff"]), timeout=10):
                pass
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()

        # The node serves on: the same good request appends after all that.
        assert produce(good, timeout=10).partitions[0].error == ErrorCode.NONE
        assert end_offset(broker) == before + 1
        assert node.node(1).running()
        log_text = node.node(1).log_path.read_text()
        assert "Traceback" not in log_text, log_text[-3000:]
        assert "refused an undecodable tidelog.ProduceRequest" in log_text
    finally:
        channel.close()
        groups.close()
