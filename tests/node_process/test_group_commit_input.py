"""What a node answers for malformed or oversized OffsetCommit input (real process).

A commit carries no record batches, so there is nothing for CORRUPT_MESSAGE: bytes that do not
parse are refused with gRPC INVALID_ARGUMENT before the service sees them, and each field gets Kafka's per-partition answer. A commit too
large for one batch of __consumer_offsets gets INVALID_COMMIT_OFFSET_SIZE, as Kafka's
coordinator answers, without the coordinator reloading its partition (which a batch refused by
the log used to cause, holding up every group of that partition).
"""

from __future__ import annotations

from pathlib import Path

import grpc
from support.nodes import start_cluster
from tidelog.proto import api_pb2
from tidelog.proto.common_pb2 import ErrorCode

from tests.node_process.test_groups_process import GroupsClient, create_topic

GROUP = "malformed"


def commit(client: GroupsClient, *partitions: api_pb2.OffsetCommitPartition) -> api_pb2.OffsetCommitResponse:
    request = api_pb2.OffsetCommitRequest(group_id=GROUP, member_id="", member_epoch=-1, partitions=partitions)
    return client.call(GROUP, "OffsetCommit", request)


def committed(client: GroupsClient) -> dict[tuple[str, int], int]:
    answer = client.call(GROUP, "OffsetFetch", api_pb2.OffsetFetchRequest(group_id=GROUP, member_epoch=-1))
    return {(o.topic, o.partition): o.offset for o in answer.offsets}


def test_malformed_and_oversized_commits_get_kafkas_answers(tmp_path: Path) -> None:
    # A small max.message.bytes (it applies to __consumer_offsets too) makes "too large" cheap.
    local = start_cluster(tmp_path, nodes=1, topic_defaults={"max.message.bytes": "20000"})
    client = GroupsClient(local)
    try:
        create_topic(local, "t", 6)
        part = api_pb2.OffsetCommitPartition
        assert commit(client, part(topic="t", partition=0, offset=5)).partitions[0].error == ErrorCode.NONE

        # Six 4000-byte metadata strings: each within offset.metadata.max.bytes, together
        # over the batch limit.
        big = [part(topic="t", partition=p, offset=10 + p, metadata="m" * 4000) for p in range(6)]
        answer = commit(client, *big)
        assert answer.error == ErrorCode.INVALID_COMMIT_OFFSET_SIZE, answer
        assert {r.error for r in answer.partitions} == {ErrorCode.INVALID_COMMIT_OFFSET_SIZE}
        assert "max.message.bytes" in answer.error_message
        # Nothing was applied, and the coordinator answers at once (it was not reloaded).
        assert committed(client) == {("t", 0): 5}
        log_text = local.node(1).log_path.read_text()
        assert "dropped" not in log_text, log_text[-2000:]
        # Half of it fits.
        assert {r.error for r in commit(client, *big[:3]).partitions} == {ErrorCode.NONE}

        # Per-partition answers for bad fields; the good partition of the same request commits.
        answer = commit(client, part(topic="t", partition=-1, offset=1), part(topic="t", partition=9, offset=1),
                        part(topic="nope", partition=0, offset=1), part(topic="t", partition=4, offset=1,
                                                                        metadata="m" * 4097),
                        part(topic="t", partition=5, offset=77))
        assert [r.error for r in answer.partitions] == [
            ErrorCode.UNKNOWN_TOPIC_OR_PARTITION, ErrorCode.UNKNOWN_TOPIC_OR_PARTITION,
            ErrorCode.UNKNOWN_TOPIC_OR_PARTITION, ErrorCode.OFFSET_METADATA_TOO_LARGE, ErrorCode.NONE]
        assert committed(client)[("t", 5)] == 77

        # Bytes that are not an OffsetCommitRequest never reach the service: they are refused
        # with INVALID_ARGUMENT (Kafka closes the connection on a request it cannot parse) and
        # the node serves on.
        good = api_pb2.OffsetCommitRequest(group_id=GROUP, partitions=[part(topic="t", partition=0, offset=1,
                                                                             metadata="ab")]).SerializeToString()
        node_id = client.find(GROUP)
        raw = client.channels[node_id].unary_unary(
            "/tidelog.Groups/OffsetCommit", request_serializer=lambda b: b,
            response_deserializer=api_pb2.OffsetCommitResponse.FromString)
        for bad in (good.replace(b"ab", b"\xff\xfe"), b"\x0a\xff\xff\xff"):
            try:
                raw(bad, timeout=10)
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, exc.details()
            else:
                raise AssertionError("undecodable bytes were answered")
        assert committed(client)[("t", 0)] == 10  # (from the half that fit)
    finally:
        client.close()
        local.stop_all()
