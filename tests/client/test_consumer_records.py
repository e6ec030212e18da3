"""The ConsumerRecords a consumer builds, with and without deserializers (fake broker)."""

from __future__ import annotations

import time

import pytest

from tidelog.client import Consumer, ConsumerRecord, TopicPartition
from tidelog.proto.records import Record, encode_batch

TP = TopicPartition("t", 0)


def poll_until(consumer: Consumer, count: int, timeout: float = 20.0) -> list[ConsumerRecord]:
    got: list[ConsumerRecord] = []
    deadline = time.monotonic() + timeout
    while len(got) < count and time.monotonic() < deadline:
        got += consumer.poll(200)
    return got


@pytest.mark.parametrize("deserialize", [False, True])
def test_records_carry_every_field_from_the_position_on(fake_cluster, deserialize: bool) -> None:
    fake_cluster.create_topic("t", 1)
    fake_cluster.append(TP, encode_batch([
        Record(0, 1000, b"k0", b"v0", ()),
        Record(1, 1001, None, b"v1", (("h", b"x"),)),
        Record(2, 1002, b"k2", None, (("h", None), ("g", b"y"))),
    ]))
    fake_cluster.append(TP, encode_batch([Record(0, 2000, b"k3", b"v3", ())]))
    options = (
        {"key_deserializer": lambda k: k and k.decode(), "value_deserializer": lambda v: v and v.decode()}
        if deserialize else {}
    )
    with Consumer(fake_cluster.bootstrap, **options) as consumer:
        consumer.assign([TP])
        consumer.seek(TP, 1)  # mid-batch: offset 0 must be skipped
        records = poll_until(consumer, 3)
    text = (lambda b: b and b.decode()) if deserialize else (lambda b: b)
    assert records == [
        ConsumerRecord("t", 0, 1, 1001, None, text(b"v1"), (("h", b"x"),)),
        ConsumerRecord("t", 0, 2, 1002, text(b"k2"), None, (("h", None), ("g", b"y"))),
        ConsumerRecord("t", 0, 3, 2000, text(b"k3"), text(b"v3"), ()),
    ]
    assert all(type(r) is ConsumerRecord for r in records)
    assert records[1].topic_partition == TP and records[1].headers[1] == ("g", b"y")
