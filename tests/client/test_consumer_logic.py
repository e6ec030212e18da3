"""Consumer position handling, leader changes and pipelining, against the in-process fake broker."""

from __future__ import annotations

import time

import pytest

from tidelog.client import Consumer, TidelogError, TopicPartition
from tidelog.proto.common_pb2 import ErrorCode
from tidelog.proto.records import Record, encode_batch

TP = TopicPartition("t", 0)
TP1 = TopicPartition("t", 1)


def batch(values: list[bytes], *, control: bool = False, timestamp: int = 1000) -> bytes:
    records = [Record(i, timestamp + i, None, v, ()) for i, v in enumerate(values)]
    return encode_batch(records, is_control=control)


def poll_until(consumer: Consumer, count: int, timeout: float = 20.0) -> list:
    got: list = []
    deadline = time.monotonic() + timeout
    while len(got) < count and time.monotonic() < deadline:
        got += consumer.poll(200)
    return got


def test_control_batches_and_records_before_the_position_are_skipped(fake_cluster) -> None:
    fake_cluster.create_topic("t", 1)
    fake_cluster.append(TP, batch([b"a0", b"a1", b"a2", b"a3", b"a4"]))  # offsets 0-4
    fake_cluster.append(TP, batch([b"marker"], control=True))  # offset 5
    fake_cluster.append(TP, batch([b"b6", b"b7"]))  # offsets 6-7
    with Consumer(fake_cluster.bootstrap) as consumer:
        consumer.assign([TP])
        consumer.seek(TP, 2)
        records = poll_until(consumer, 5)
        assert [(r.offset, r.value) for r in records] == [
            (2, b"a2"), (3, b"a3"), (4, b"a4"), (6, b"b6"), (7, b"b7")
        ]
        assert consumer.position(TP) == 8
        assert consumer.poll(100) == []


def test_a_trailing_control_batch_still_advances_the_position(fake_cluster) -> None:
    fake_cluster.create_topic("t", 1)
    fake_cluster.append(TP, batch([b"x"]))
    fake_cluster.append(TP, batch([b"marker"], control=True))
    with Consumer(fake_cluster.bootstrap, auto_offset_reset="earliest") as consumer:
        consumer.assign([TP])
        assert [r.value for r in poll_until(consumer, 1)] == [b"x"]
        deadline = time.monotonic() + 10
        while consumer.position(TP) != 2 and time.monotonic() < deadline:
            consumer.poll(50)
        assert consumer.position(TP) == 2


def test_reading_continues_through_a_leader_change(fake_cluster) -> None:
    fake_cluster.create_topic("t", 1, leader=1)
    fake_cluster.append(TP, batch([b"before"]))
    with Consumer(fake_cluster.bootstrap, auto_offset_reset="earliest", retry_backoff_ms=20) as consumer:
        consumer.assign([TP])
        assert [r.value for r in poll_until(consumer, 1)] == [b"before"]
        fake_cluster.move_leader(TP, 2)
        fake_cluster.append(TP, batch([b"after-1", b"after-2"]))
        assert [r.value for r in poll_until(consumer, 2)] == [b"after-1", b"after-2"]


def test_retriable_fetch_errors_are_waited_out_within_poll(fake_cluster) -> None:
    fake_cluster.create_topic("t", 1)
    fake_cluster.append(TP, batch([b"v"]))
    fake_cluster.part(TP).fetch_script.extend([ErrorCode.LEADER_NOT_AVAILABLE] * 3)
    with Consumer(fake_cluster.bootstrap, auto_offset_reset="earliest", retry_backoff_ms=10) as consumer:
        consumer.assign([TP])
        assert [r.value for r in poll_until(consumer, 1)] == [b"v"]


def test_auto_offset_reset_none_raises_until_seek(fake_cluster) -> None:
    fake_cluster.create_topic("t", 1)
    fake_cluster.append(TP, batch([b"v0", b"v1"]))
    with Consumer(fake_cluster.bootstrap, auto_offset_reset="none") as consumer:
        consumer.assign([TP])
        with pytest.raises(TidelogError) as info:
            consumer.poll(1000)
        assert info.value.code == ErrorCode.OFFSET_OUT_OF_RANGE
        consumer.seek(TP, 1)
        assert [r.value for r in poll_until(consumer, 1)] == [b"v1"]


def test_an_out_of_range_position_resets_by_policy(fake_cluster) -> None:
    fake_cluster.create_topic("t", 1)
    fake_cluster.append(TP, batch([b"v0", b"v1"]))
    with Consumer(fake_cluster.bootstrap, auto_offset_reset="earliest") as consumer:
        consumer.assign([TP])
        consumer.seek(TP, 100)
        assert [r.offset for r in poll_until(consumer, 2)] == [0, 1]
    with Consumer(fake_cluster.bootstrap, auto_offset_reset="latest") as consumer:
        consumer.assign([TP])
        assert consumer.poll(300) == []
        assert consumer.position(TP) == 2


def test_pause_holds_a_partition_back_and_resume_releases_it(fake_cluster) -> None:
    fake_cluster.create_topic("t", 2)
    fake_cluster.append(TP, batch([b"p0"]))
    fake_cluster.append(TP1, batch([b"p1"]))
    with Consumer(fake_cluster.bootstrap, auto_offset_reset="earliest") as consumer:
        consumer.assign([TP, TP1])
        consumer.pause(TP1)
        assert consumer.paused() == {TP1}
        assert [r.value for r in poll_until(consumer, 1)] == [b"p0"]
        assert consumer.poll(300) == []
        consumer.resume(TP1)
        assert [r.value for r in poll_until(consumer, 1)] == [b"p1"]


def test_the_next_fetch_is_in_flight_while_the_application_works(fake_cluster) -> None:
    fake_cluster.create_topic("t", 1)
    fake_cluster.append(TP, batch([b"v"]))
    with Consumer(fake_cluster.bootstrap, auto_offset_reset="earliest", fetch_max_wait_ms=5000) as consumer:
        consumer.assign([TP])
        assert len(poll_until(consumer, 1)) == 1
        # poll() has returned; the application is "working" now, and a fetch should be out.
        assert consumer._call(lambda: bool(consumer._core._fetches))  # noqa: SLF001
        fake_cluster.append(TP, batch([b"w"]))
        assert [r.value for r in poll_until(consumer, 1)] == [b"w"]


def test_subscribe_reads_every_partition_and_iteration_stops_by_consumer_timeout(fake_cluster) -> None:
    fake_cluster.create_topic("t", 3)
    for p in range(3):
        fake_cluster.append(TopicPartition("t", p), batch([f"v{p}".encode()]))
    with Consumer(fake_cluster.bootstrap, topics=["t"], auto_offset_reset="earliest",
                  consumer_timeout_ms=500) as consumer:
        values = sorted(r.value for r in consumer)
        assert consumer.assignment() == {TopicPartition("t", p) for p in range(3)}
    assert values == [b"v0", b"v1", b"v2"]


def test_seek_to_beginning_and_end_and_offsets(fake_cluster) -> None:
    fake_cluster.create_topic("t", 1)
    fake_cluster.append(TP, batch([b"a", b"b", b"c"]))
    with Consumer(fake_cluster.bootstrap, value_deserializer=lambda v: v.decode()) as consumer:
        consumer.assign([TP])
        consumer.seek_to_end()
        assert consumer.position(TP) == 3
        consumer.seek_to_beginning(TP)
        assert consumer.position(TP) == 0
        assert [r.value for r in poll_until(consumer, 3)] == ["a", "b", "c"]
        assert consumer.beginning_offsets([TP]) == {TP: 0}
        assert consumer.end_offsets([TP]) == {TP: 3}
        with pytest.raises(ValueError):
            consumer.seek(TopicPartition("other", 0), 1)


def test_seek_during_iteration_drops_records_buffered_for_that_partition(fake_cluster) -> None:
    fake_cluster.create_topic("t", 1)
    fake_cluster.append(TP, batch([b"a", b"b", b"c", b"d"]))
    with Consumer(fake_cluster.bootstrap, auto_offset_reset="earliest", consumer_timeout_ms=5000) as consumer:
        consumer.assign([TP])
        iterator = iter(consumer)
        assert next(iterator).value == b"a"  # b, c, d are buffered by now
        consumer.seek(TP, 3)
        assert next(iterator).value == b"d"
        consumer.seek_to_beginning()
        assert [next(iterator).value for _ in range(4)] == [b"a", b"b", b"c", b"d"]


def test_a_fetch_abandoned_before_it_started_does_not_stall_its_partitions(fake_cluster) -> None:
    """A leader move noticed between creating a fetch task and its first step cancels a
    coroutine that never ran; its partitions must still be fetched again."""
    fake_cluster.create_topic("t", 1)
    fake_cluster.append(TP, batch([b"before"]))
    with Consumer(fake_cluster.bootstrap, auto_offset_reset="earliest", fetch_max_wait_ms=100) as consumer:
        consumer.assign([TP])
        assert [r.value for r in poll_until(consumer, 1)] == [b"before"]
        loop = consumer._thread.loop
        create_task = loop.create_task
        abandoned = []

        def create_and_abandon(coro, **kwargs):
            task = create_task(coro, **kwargs)
            if not abandoned and getattr(coro, "__name__", "") == "_fetch":
                abandoned.append(task)
                task.cancel()  # what _on_metadata does, before the task's first step
            return task

        loop.create_task = create_and_abandon  # type: ignore[method-assign]
        try:
            # The long-poll in flight now ends empty within fetch_max_wait_ms; the next one is
            # abandoned at birth.
            deadline = time.monotonic() + 20
            while not abandoned and time.monotonic() < deadline:
                assert consumer.poll(100) == []
            assert abandoned
            fake_cluster.append(TP, batch([b"after"]))
            assert [r.value for r in poll_until(consumer, 1, timeout=20)] == [b"after"]
        finally:
            loop.create_task = create_task  # type: ignore[method-assign]
        assert abandoned and abandoned[0].cancelled()


def test_a_fetch_stuck_on_an_unresponsive_old_leader_is_abandoned(fake_cluster) -> None:
    fake_cluster.create_topic("t", 1, leader=1)
    fake_cluster.append(TP, batch([b"before"]))
    with Consumer(fake_cluster.bootstrap, auto_offset_reset="earliest", fetch_max_wait_ms=100,
                  request_timeout_ms=120_000) as consumer:
        consumer.assign([TP])
        assert [r.value for r in poll_until(consumer, 1)] == [b"before"]
        fake_cluster.unresponsive.add(1)  # node 1 stops answering, as if paused
        fake_cluster.move_leader(TP, 2)
        fake_cluster.append(TP, batch([b"after"]))
        # Far sooner than request_timeout_ms: the late fetch makes the consumer look again.
        assert [r.value for r in poll_until(consumer, 1, timeout=20)] == [b"after"]
