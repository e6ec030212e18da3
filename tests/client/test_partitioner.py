"""Key placement must match Kafka's own clients bit for bit (issue 5)."""

from __future__ import annotations

import random

from hypothesis import given, strategies as st
from kafka.partitioner.default import murmur2 as kafka_python_murmur2

from tidelog.client.partitioner import StickyPartitioner, murmur2, partition_for_key

# Expected values from Kafka's own UtilsTest.testMurmur2 (org.apache.kafka.common.utils).
KAFKA_JAVA_MURMUR2 = {
    b"21": -973932308,
    b"foobar": -790332482,
    b"a-little-bit-long-string": -985981536,
    b"a-little-bit-longer-string": -1486304829,
    b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8": -58897971,
    b"abc": 479470107,
}


def test_murmur2_matches_kafkas_java_test_vectors() -> None:
    for key, expected in KAFKA_JAVA_MURMUR2.items():
        assert murmur2(key) == expected, key


@given(st.binary(max_size=64))
def test_murmur2_matches_kafka_python(key: bytes) -> None:
    # kafka-python returns the same 32 bits unsigned.
    assert murmur2(key) & 0xFFFFFFFF == kafka_python_murmur2(key) & 0xFFFFFFFF


@given(st.binary(min_size=0, max_size=32), st.integers(min_value=1, max_value=1000))
def test_key_partition_is_kafkas_default_partitioner(key: bytes, partitions: int) -> None:
    # kafka-python's DefaultPartitioner: (murmur2(key) & 0x7fffffff) % len(all_partitions)
    expected = (kafka_python_murmur2(key) & 0x7FFFFFFF) % partitions
    assert partition_for_key(key, partitions) == expected


def test_known_key_placements() -> None:
    # Independent of both implementations above: toPositive(murmur2) % n by hand.
    assert partition_for_key(b"foobar", 10) == (-790332482 & 0x7FFFFFFF) % 10 == 6
    assert partition_for_key(b"21", 3) == (-973932308 & 0x7FFFFFFF) % 3


def test_sticky_partitioner_sticks_for_a_batch_then_moves() -> None:
    sticky = StickyPartitioner(batch_size=1000, rng=random.Random(7))
    first = sticky.choose("t", 6, 100)
    for _ in range(9):  # up to 1000 bytes in all: the batch's worth still goes to one partition
        assert sticky.choose("t", 6, 100) == first
    assert sticky.choose("t", 6, 100) != first


def test_sticky_partitioner_spreads_over_time_and_prefers_available() -> None:
    sticky = StickyPartitioner(batch_size=100, rng=random.Random(1))
    assert {sticky.choose("t", 4, 100, lambda: [1, 3]) for _ in range(200)} == {1, 3}
    sticky = StickyPartitioner(batch_size=100, rng=random.Random(1))
    assert {sticky.choose("u", 4, 100) for _ in range(200)} == {0, 1, 2, 3}
    assert sticky.choose("u", 2, 1) in (0, 1)  # fewer partitions than before: choose again
