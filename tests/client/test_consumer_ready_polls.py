"""The sync Consumer hands out records already fetched on the application's thread, without a
trip to the I/O loop (fake broker): what that must not change. Positions count exactly what was
handed out, a seek or a pause between polls takes effect at the next one, and records arriving
on the loop while the application drains never go out twice, out of order or not at all."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from tidelog.client import Consumer, TopicPartition
from tidelog.proto.records import Record, encode_batch

from tests.client.test_consumer_records import poll_until

TP = TopicPartition("t", 0)


def batch_of(first: int, count: int) -> bytes:
    return encode_batch([Record(0, 1000 + i, None, b"v%d" % i) for i in range(first, first + count)])


def count_loop_polls(consumer: Consumer) -> list[int]:
    """A counter of the polls that went to the loop (the async core's poll)."""
    core: Any = consumer._core
    calls = [0]
    poll = core.poll

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        return poll(*args, **kwargs)

    core.poll = counted
    return calls


def test_polls_of_fetched_records_skip_the_loop_and_positions_count_what_went_out(fake_cluster) -> None:
    fake_cluster.create_topic("t", 1)
    for first in range(0, 60, 10):
        fake_cluster.append(TP, batch_of(first, 10))
    with Consumer(fake_cluster.bootstrap, auto_offset_reset="earliest", max_poll_records=4) as consumer:
        consumer.assign([TP])
        got = poll_until(consumer, 1)  # the first poll starts the fetching, on the loop
        loop_polls = count_loop_polls(consumer)
        polls = 0
        deadline = time.monotonic() + 20
        while len(got) < 60 and time.monotonic() < deadline:
            records = consumer.poll(200)
            polls += 1
            assert len(records) <= 4
            got += records
            if records:
                assert consumer.position(TP) == records[-1].offset + 1
        assert [r.offset for r in got] == list(range(60))
        assert [r.value for r in got] == [b"v%d" % i for i in range(60)]
        # One fetch answer holds them all: every poll after the first is served from it.
        assert loop_polls[0] < polls, (loop_polls[0], polls)


def test_a_seek_or_a_pause_between_ready_polls_takes_effect_at_the_next(fake_cluster) -> None:
    fake_cluster.create_topic("t", 1)
    fake_cluster.append(TP, batch_of(0, 20))
    with Consumer(fake_cluster.bootstrap, auto_offset_reset="earliest", max_poll_records=3) as consumer:
        consumer.assign([TP])
        assert [r.offset for r in poll_until(consumer, 3)] == [0, 1, 2]
        loop_polls = count_loop_polls(consumer)
        assert [r.offset for r in consumer.poll(0)] == [3, 4, 5]
        consumer.seek(TP, 1)  # back, into the answer already buffered: it is dropped and fetched again
        assert [r.offset for r in poll_until(consumer, 3)] == [1, 2, 3]
        consumer.pause(TP)
        assert consumer.poll(100) == []
        assert consumer.position(TP) == 4
        consumer.resume(TP)
        assert [r.offset for r in poll_until(consumer, 3)] == [4, 5, 6]
        assert [r.offset for r in consumer.poll(0)] == [7, 8, 9]
        consumer.seek(TP, 15)
        assert [r.offset for r in poll_until(consumer, 5)] == [15, 16, 17, 18, 19]
        assert loop_polls[0] > 0  # the polls after each seek and while paused went to the loop


def test_records_arriving_while_the_application_drains_go_out_once_each_in_order(fake_cluster) -> None:
    partitions = [TopicPartition("t", p) for p in range(3)]
    fake_cluster.create_topic("t", 3)
    batches, size = 40, 7
    done = threading.Event()

    def produce() -> None:
        # Answers land on the loop while the application's thread drains earlier ones.
        for first in range(0, batches * size, size):
            for tp in partitions:
                fake_cluster.append(tp, batch_of(first, size))
            time.sleep(0.002)  # spread the appends over many fetches
        done.set()

    with Consumer(fake_cluster.bootstrap, auto_offset_reset="earliest", max_poll_records=5,
                  fetch_max_wait_ms=20) as consumer:
        consumer.assign(partitions)
        writer = threading.Thread(target=produce, daemon=True)
        writer.start()
        got = poll_until(consumer, batches * size * len(partitions), timeout=60)
        writer.join(10)
        assert done.is_set()
        for tp in partitions:
            offsets = [r.offset for r in got if r.partition == tp.partition]
            assert offsets == list(range(batches * size)), tp
            assert consumer.position(tp) == batches * size


def test_a_deserializer_that_calls_the_consumer_is_refused_not_left_waiting(fake_cluster) -> None:
    fake_cluster.create_topic("t", 1)
    fake_cluster.append(TP, batch_of(0, 3))
    fake_cluster.append(TP, batch_of(3, 3))
    consumer = Consumer(fake_cluster.bootstrap, auto_offset_reset="earliest", max_poll_records=1,
                        value_deserializer=lambda v: consumer.position(TP) if v == b"v4" else v)
    with consumer:
        consumer.assign([TP])
        assert [r.offset for r in poll_until(consumer, 3)] == [0, 1, 2]  # the last ones on this thread
        # The second batch is decoded on this thread, holding the lock the loop stores answers
        # under: waiting there for the loop is refused at once.
        with pytest.raises(RuntimeError, match="deserializer"):
            poll_until(consumer, 1)
        consumer.seek(TP, 5)
        assert [r.value for r in poll_until(consumer, 1)] == [b"v5"]
