"""The hand-framed ProduceRequest parses as the protobuf-built one would."""

from __future__ import annotations

import pytest

from tidelog.client.accumulator import ProducerBatch
from tidelog.client.producer import encode_produce_request
from tidelog.client.types import TopicPartition
from tidelog.proto import api_pb2


def batch(tp: TopicPartition, data: bytes) -> ProducerBatch:
    b = ProducerBatch(tp, 0, 0.0, 0.0)
    b.encoded = data
    return b


@pytest.mark.parametrize("sizes", [[1], [3, 200], [70_000, 5, 130_000]])
def test_encoded_request_matches_protobuf(sizes: list[int]) -> None:
    runs = [
        [batch(TopicPartition("topic-a", 0), bytes([i % 251]) * size) for i, size in enumerate(sizes)],
        [batch(TopicPartition("b" * 200, 70_000), b"xyz")],
    ]
    expected = api_pb2.ProduceRequest(
        acks=-1,
        timeout_ms=30000,
        partitions=[
            api_pb2.ProducePartitionData(
                topic=run[0].tp.topic,
                partition=run[0].tp.partition,
                records=b"".join(b.encoded for b in run),  # type: ignore[misc]
            )
            for run in runs
        ],
    )
    wire = encode_produce_request(-1, 30000, runs)
    assert api_pb2.ProduceRequest.FromString(wire) == expected
    assert wire == expected.SerializeToString()  # the same bytes, field for field


def test_acks_zero_and_one_run() -> None:
    runs = [[batch(TopicPartition("t", 0), b"\x00" * 10)]]
    parsed = api_pb2.ProduceRequest.FromString(encode_produce_request(0, 1, runs))
    assert (parsed.acks, parsed.timeout_ms, len(parsed.partitions)) == (0, 1, 1)
    assert parsed.partitions[0].records == b"\x00" * 10
