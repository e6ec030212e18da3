"""Producer retry, ordering, back-pressure and error delivery, against the in-process fake broker."""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections import deque

import pytest

from tidelog.client import AsyncProducer, Producer, TidelogError, TopicPartition
from tidelog.client.partitioner import partition_for_key
from tidelog.proto.common_pb2 import ErrorCode

TP = TopicPartition("t", 0)


def wait_all(futures, timeout: float = 30.0):
    return [f.result(timeout) for f in futures]


def test_order_and_offsets_survive_retriable_errors(fake_cluster) -> None:
    fake_cluster.create_topic("t", 1)
    fake_cluster.part(TP).produce_script.extend(
        [ErrorCode.NOT_ENOUGH_REPLICAS, ErrorCode.NOT_ENOUGH_REPLICAS, ErrorCode.REQUEST_TIMED_OUT]
    )
    with Producer(fake_cluster.bootstrap, batch_size=300, linger_ms=0, retry_backoff_ms=5) as producer:
        values = [str(i).encode() for i in range(300)]
        futures = [producer.send("t", v) for v in values]
        producer.flush(30)
        results = wait_all(futures)
    assert fake_cluster.part(TP).values() == values  # several batches queued behind the failing one
    assert [m.offset for m in results] == list(range(300))
    assert fake_cluster.part(TP).produce_requests > len(fake_cluster.part(TP).batches)


def test_not_leader_takes_the_leader_hint(fake_cluster) -> None:
    fake_cluster.create_topic("t", 1, leader=1)
    with Producer(fake_cluster.bootstrap, linger_ms=0, retry_backoff_ms=5,
                  metadata_max_age_ms=3_600_000) as producer:
        producer.partitions_for("t")  # metadata now says node 1 leads
        fake_cluster.move_leader(TP, 2)
        requests_before = fake_cluster.metadata_requests
        values = [b"a", b"b", b"c"]
        results = wait_all([producer.send("t", v) for v in values])
    assert fake_cluster.part(TP).values() == values
    assert [m.offset for m in results] == [0, 1, 2]
    # The first attempt hit the old leader; the retry went to the hinted one.
    assert fake_cluster.part(TP).produce_requests >= 2
    assert fake_cluster.metadata_requests - requests_before <= 2


def test_an_oversized_record_fails_at_once(fake_cluster) -> None:
    fake_cluster.create_topic("t", 1)
    with Producer(fake_cluster.bootstrap, max_request_size=1000) as producer:
        future = producer.send("t", bytes(2000))
        assert future.done()
        error = future.exception()
        assert isinstance(error, TidelogError) and error.code == ErrorCode.MESSAGE_TOO_LARGE
        assert producer.send("t", b"small").result(30).offset == 0


def test_a_non_retriable_error_reaches_only_its_records(fake_cluster) -> None:
    fake_cluster.create_topic("t", 1)
    fake_cluster.part(TP).produce_script.append(ErrorCode.INVALID_REQUEST)
    with Producer(fake_cluster.bootstrap, linger_ms=0) as producer:
        failed = producer.send("t", b"rejected")
        with pytest.raises(TidelogError) as info:
            failed.result(30)
        assert info.value.code == ErrorCode.INVALID_REQUEST
        assert producer.send("t", b"accepted").result(30).offset == 0


def test_delivery_timeout_fails_with_the_last_error(fake_cluster) -> None:
    fake_cluster.create_topic("t", 1)
    fake_cluster.part(TP).produce_script.extend([ErrorCode.NOT_ENOUGH_REPLICAS] * 10_000)
    with Producer(fake_cluster.bootstrap, linger_ms=0, retry_backoff_ms=10,
                  delivery_timeout_ms=300) as producer:
        future = producer.send("t", b"x")
        with pytest.raises(TidelogError) as info:
            future.result(30)
    assert info.value.code == ErrorCode.NOT_ENOUGH_REPLICAS


def test_a_partition_without_leader_expires_by_delivery_timeout(fake_cluster) -> None:
    fake_cluster.create_topic("t", 1, leader=-1)
    with Producer(fake_cluster.bootstrap, linger_ms=0, retry_backoff_ms=10,
                  delivery_timeout_ms=300) as producer:
        future = producer.send("t", b"x")
        with pytest.raises(TidelogError) as info:
            future.result(30)
    assert info.value.code == ErrorCode.REQUEST_TIMED_OUT
    assert "expired" in info.value.message


def test_a_full_buffer_blocks_send_up_to_max_block_ms(fake_cluster) -> None:
    fake_cluster.create_topic("t", 1, leader=-1)  # nothing can be sent: the buffer only fills
    with Producer(fake_cluster.bootstrap, buffer_memory=2000, max_block_ms=200,
                  delivery_timeout_ms=60_000) as producer:
        accepted = [producer.send("t", bytes(500)) for _ in range(3)]
        started = time.monotonic()
        blocked = producer.send("t", bytes(500))
        assert time.monotonic() - started >= 0.15  # it waited for memory
        error = blocked.exception(0)
        assert isinstance(error, TidelogError) and error.code == ErrorCode.REQUEST_TIMED_OUT
        assert not any(f.done() for f in accepted)
        producer.close(timeout=0.1)
    assert all(isinstance(f.exception(0), TidelogError) for f in accepted)  # closed: not lost silently


def test_an_unknown_topic_fails_the_future_after_max_block_ms(fake_cluster) -> None:
    with Producer(fake_cluster.bootstrap, max_block_ms=300) as producer:
        error = producer.send("missing", b"x").exception(30)
    assert isinstance(error, TidelogError) and error.code == ErrorCode.UNKNOWN_TOPIC_OR_PARTITION


def test_keys_go_to_their_murmur2_partition_and_null_keys_stick(fake_cluster) -> None:
    fake_cluster.create_topic("t", 5)
    keys = [f"key-{i}".encode() for i in range(50)]
    with Producer(fake_cluster.bootstrap) as producer:
        keyed = wait_all([producer.send("t", b"v", key=k) for k in keys])
        unkeyed = wait_all([producer.send("t", b"v") for _ in range(20)])
        explicit = producer.send("t", b"v", key=b"key-0", partition=4).result(30)
        with pytest.raises(TidelogError):
            producer.send("t", b"v", partition=5).result(30)
    assert [m.partition for m in keyed] == [partition_for_key(k, 5) for k in keys]
    assert len({m.partition for m in unkeyed}) == 1  # far less than a batch: one sticky partition
    assert explicit.partition == 4


def test_acks_zero_reports_no_offset(fake_cluster) -> None:
    fake_cluster.create_topic("t", 1)
    with Producer(fake_cluster.bootstrap, acks=0) as producer:
        assert producer.send("t", b"x").result(30).offset == -1


def test_async_producer_send_returns_a_future_and_send_and_wait_metadata(fake_cluster) -> None:
    fake_cluster.create_topic("t", 1)

    async def main() -> tuple[int, int, list[int]]:
        async with AsyncProducer(fake_cluster.bootstrap, linger_ms=1) as producer:
            future = await producer.send("t", b"first", headers={"h": "1"})
            second = await producer.send_and_wait("t", b"second")
            first = await future
            batch = [await producer.send("t", str(i)) for i in range(10)]
            await producer.flush()
            return first.offset, second.offset, [f.result().offset for f in batch]

    first, second, rest = asyncio.run(main())
    assert (first, second, rest) == (0, 1, list(range(2, 12)))


def test_misuse_raises_immediately(fake_cluster) -> None:
    fake_cluster.create_topic("t", 1)
    producer = Producer(fake_cluster.bootstrap)
    with pytest.raises(TypeError):
        producer.send("t", 12345)
    with pytest.raises(TypeError, match="timestamp"):
        producer.send("t", b"x", timestamp=1.5)
    # Nothing of the refused records went into a batch: the next one is delivered alone.
    assert producer.send("t", b"ok", timestamp=7).result(10).offset == 0
    producer.close()
    with pytest.raises(RuntimeError):
        producer.send("t", b"x")
    with pytest.raises(ValueError):
        Producer(fake_cluster.bootstrap, acks=2)


def test_callbacks_run_on_the_io_thread_and_cannot_block_it(fake_cluster) -> None:
    fake_cluster.create_topic("t", 1, leader=-1)  # nothing is delivered: the buffer fills
    outcomes: list[object] = []
    with Producer(fake_cluster.bootstrap, buffer_memory=600, max_block_ms=60_000,
                  delivery_timeout_ms=200, retry_backoff_ms=10) as producer:
        first = producer.send("t", bytes(500))

        def on_done(future) -> None:  # runs on the client's I/O thread
            # A blocking call from there would deadlock; it fails at once instead.
            try:
                producer.flush()
            except RuntimeError as exc:
                outcomes.append(exc)
            # send() must not wait here either; its future is looked at from the test's thread.
            outcomes.append(producer.send("t", bytes(500)))

        first.add_done_callback(on_done)
        assert isinstance(first.exception(30), TidelogError)  # expired: no leader
        deadline = time.monotonic() + 30
        while len(outcomes) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
    assert isinstance(outcomes[0], RuntimeError)
    second = outcomes[1]
    assert isinstance(second, concurrent.futures.Future)
    assert isinstance(second.exception(30), TidelogError)  # expired too, or failed at close


def test_a_request_stuck_on_an_unresponsive_old_leader_is_retried_at_the_new_one(fake_cluster) -> None:
    fake_cluster.create_topic("t", 1, leader=1)
    with Producer(fake_cluster.bootstrap, linger_ms=0, request_timeout_ms=120_000,
                  retry_backoff_ms=20) as producer:
        assert producer.send("t", b"first").result(30).offset == 0
        fake_cluster.unresponsive.add(1)  # node 1 stops answering, as if paused
        stuck = producer.send("t", b"second")
        fake_cluster.move_leader(TP, 2)
        # Far sooner than request_timeout_ms: the late request makes the producer look again.
        assert stuck.result(20).offset == 1
        assert producer.send("t", b"third").result(20).offset == 2
    assert fake_cluster.part(TP).values() == [b"first", b"second", b"third"]


def test_a_request_abandoned_before_it_started_is_still_retried(fake_cluster) -> None:
    """A leader move noticed between the sender creating a produce task and the task's first
    step cancels a coroutine that never ran: its own except/finally cannot settle its batches,
    so the producer must (the chaos runs' stuck sends to one partition)."""
    fake_cluster.create_topic("t", 1, leader=1)
    with Producer(fake_cluster.bootstrap, linger_ms=0, retry_backoff_ms=5,
                  delivery_timeout_ms=60_000) as producer:
        assert producer.send("t", b"first").result(30).offset == 0
        inner = producer._core  # the AsyncProducer the facade drives
        loop = inner._loop
        create_task = loop.create_task
        abandoned = []

        def create_and_abandon(coro, **kwargs):
            task = create_task(coro, **kwargs)
            if not abandoned and getattr(coro, "__name__", "") == "_send_request":
                abandoned.append(task)
                task.tidelog_abandoned = True  # what _on_metadata does, before the first step
                task.cancel()
            return task

        loop.create_task = create_and_abandon  # type: ignore[method-assign]
        try:
            second = producer.send("t", b"second")
            assert second.result(30).offset == 1
            assert producer.send("t", b"third").result(30).offset == 2
        finally:
            loop.create_task = create_task  # type: ignore[method-assign]
        assert abandoned and abandoned[0].cancelled()
    assert fake_cluster.part(TP).values() == [b"first", b"second", b"third"]
