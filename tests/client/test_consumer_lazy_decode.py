"""The consumer keeps fetched answers as raw batches and decodes a batch when poll hands out its
first record (fake broker): what that bounds, and where a batch that cannot be handed out stops
its partition."""

from __future__ import annotations

import gc
import struct
import time

import crc32c
import pytest

from tidelog.client import Consumer, ConsumerRecord, TopicPartition
from tidelog.proto.common_pb2 import ErrorCode
from tidelog.proto.errors import TidelogError
from tidelog.proto.records import BATCH_OVERHEAD, Record, encode_batch

TP = TopicPartition("t", 0)


def batch_of(values: list[bytes], compression: str = "none") -> bytes:
    return encode_batch([Record(0, 1000 + i, None, v) for i, v in enumerate(values)],
                        compression=compression)


def undecodable_batch() -> bytes:
    """A batch whose header and CRC are fine but whose first record's length is impossible."""
    batch = bytearray(batch_of([b"x", b"y"]))
    batch[BATCH_OVERHEAD] = 0x02  # zig-zag 1: shorter than any record
    struct.pack_into(">I", batch, 17, crc32c.crc32c(bytes(batch[21:])))
    return bytes(batch)


def poll_values(consumer: Consumer, count: int, timeout: float = 20.0) -> list[bytes | None]:
    got: list[ConsumerRecord] = []
    deadline = time.monotonic() + timeout
    while len(got) < count and time.monotonic() < deadline:
        got += consumer.poll(200)
    return [r.value for r in got]


def poll_error(consumer: Consumer, timeout: float = 20.0) -> BaseException:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            assert consumer.poll(200) == []
        except Exception as exc:  # noqa: BLE001 - the test inspects it
            return exc
    raise AssertionError("poll never raised")


def test_records_before_an_undecodable_batch_are_delivered_then_poll_raises_until_a_seek(fake_cluster) -> None:
    fake_cluster.create_topic("t", 1)
    fake_cluster.append(TP, batch_of([b"a0", b"a1", b"a2"]))
    fake_cluster.append(TP, undecodable_batch())  # offsets 3 and 4
    fake_cluster.append(TP, batch_of([b"c5"]))
    with Consumer(fake_cluster.bootstrap, auto_offset_reset="earliest") as consumer:
        consumer.assign([TP])
        assert poll_values(consumer, 3) == [b"a0", b"a1", b"a2"]
        for _ in range(2):  # not skipped silently, not once only
            error = poll_error(consumer)
            assert isinstance(error, TidelogError) and error.code == ErrorCode.CORRUPT_MESSAGE
            assert "at offset 3" in str(error)
            assert consumer.position(TP) == 3
        consumer.seek(TP, 5)
        assert poll_values(consumer, 1) == [b"c5"]


def test_a_failing_deserializer_stops_its_partition_at_that_record_until_a_seek(fake_cluster) -> None:
    fake_cluster.create_topic("t", 1)
    fake_cluster.append(TP, batch_of([b"ok0", b"ok1"], "lz4"))
    fake_cluster.append(TP, batch_of([b"bad2"], "lz4"))
    fake_cluster.append(TP, batch_of([b"ok3"], "lz4"))

    def deserialize(value: bytes | None) -> str:
        if value == b"bad2":
            raise ValueError("cannot read bad2")
        return value.decode() if value else ""

    with Consumer(fake_cluster.bootstrap, auto_offset_reset="earliest",
                  value_deserializer=deserialize) as consumer:
        consumer.assign([TP])
        assert poll_values(consumer, 2) == ["ok0", "ok1"]
        for _ in range(2):
            error = poll_error(consumer)
            assert isinstance(error, ValueError) and "bad2" in str(error)
            assert consumer.position(TP) == 2
        consumer.seek(TP, 3)
        assert poll_values(consumer, 1) == ["ok3"]


def test_fetched_answers_wait_as_raw_batches_not_as_records(fake_cluster) -> None:
    """Two buffered answers of 5 batches x 100 records, and a poll of 10: only the batch being
    handed out is decoded (the garbage collector walks every live record, over and over)."""
    tp = TopicPartition("raw", 0)
    fake_cluster.create_topic("raw", 1)
    for i in range(5):
        fake_cluster.append(tp, batch_of([b"%d" % (100 * i + j) for j in range(100)], "lz4"))
    with Consumer(fake_cluster.bootstrap, auto_offset_reset="earliest", max_poll_records=10) as consumer:
        consumer.assign([tp])
        assert poll_values(consumer, 10) == [b"%d" % j for j in range(10)]
        core = consumer._core
        deadline = time.monotonic() + 20
        while core._assignment[tp].fetch_offset != 500:  # every batch is fetched and buffered
            assert time.monotonic() < deadline
            time.sleep(0.01)
        live = sum(1 for o in gc.get_objects() if type(o) is ConsumerRecord and o.topic == "raw")
        assert live <= 100, f"{live} records decoded ahead of poll"
        assert poll_values(consumer, 490) == [b"%d" % j for j in range(10, 500)]


@pytest.mark.parametrize("max_poll_records", [1, 7, 500])
def test_poll_hands_out_every_record_once_across_batch_and_answer_boundaries(
        fake_cluster, max_poll_records: int) -> None:
    fake_cluster.create_topic("t", 1)
    for i in range(6):
        fake_cluster.append(TP, batch_of([b"%d" % (10 * i + j) for j in range(10)]))
    with Consumer(fake_cluster.bootstrap, auto_offset_reset="earliest",
                  max_poll_records=max_poll_records) as consumer:
        consumer.assign([TP])
        consumer.seek(TP, 4)  # mid-batch
        assert poll_values(consumer, 56) == [b"%d" % j for j in range(4, 60)]
        assert consumer.position(TP) == 60
