"""Review of the sync Consumer's poll served on the application's thread (`drain_ready`, issue #5).

Each test forces one interleaving of the application's thread and the clients' shared I/O loop
(a fake broker; the drain's lock watched, or a deserializer that acts at a chosen record), so its
outcome does not depend on the machine's speed. Tests marked xfail(strict) pin a defect found in
the review: they fail today, and start passing (so strict xfail fails) once it is fixed.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any, Callable

import pytest

from tidelog.client import Consumer, TopicPartition

from tests.client.test_consumer_ready_polls import batch_of, count_loop_polls

TP = TopicPartition("t", 0)


def wait_for(condition: Callable[[], bool], timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.005)
    return True


class WatchedLock:
    """Stands in for the consumer's drain lock (an RLock) and tells when the loop thread has to
    wait for it because another thread holds it."""

    def __init__(self, loop_thread: threading.Thread) -> None:
        self._inner = threading.RLock()
        self._loop_thread = loop_thread
        self.loop_blocked = threading.Event()
        # Set by a test: that thread, the next time it comes to the lock, says so (``arrived``)
        # and waits for ``go`` before taking it.
        self.stop_thread: threading.Thread | None = None
        self.arrived = threading.Event()
        self.go = threading.Event()

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        if threading.current_thread() is self._loop_thread:
            if self._inner.acquire(False):
                return True
            self.loop_blocked.set()
            return self._inner.acquire(blocking, timeout)
        if threading.current_thread() is self.stop_thread:
            self.stop_thread = None
            self.arrived.set()
            assert self.go.wait(20)
        return self._inner.acquire(blocking, timeout)

    def release(self) -> None:
        self._inner.release()

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc_info: object) -> None:
        self.release()


def watch_drain_lock(consumer: Consumer) -> WatchedLock:
    lock = WatchedLock(consumer._thread.thread)
    # Swapped on the loop, between two of its steps: nobody holds the old lock then.
    consumer._call(lambda: setattr(consumer._core, "_delivery_lock", lock))
    return lock


def buffer_two_answers(fake_cluster: Any, consumer: Consumer) -> None:
    """After records 0-2 were polled: answers 3-5 and 6-8 buffered (the most a partition holds),
    so no fetch is in flight and the loop has nothing of this consumer's to do."""
    core: Any = consumer._core
    fake_cluster.append(TP, batch_of(3, 3))
    assert wait_for(lambda: core.highwater(TP) == 6)
    fake_cluster.append(TP, batch_of(6, 3))
    assert wait_for(lambda: core.highwater(TP) == 9)
    assert wait_for(lambda: not core._fetches)
    assert len(core._assignment[TP].buffered) == 2


# --- pinned behaviours (pass today) -----------------------------------------------------------


def test_a_group_consumers_polls_all_go_to_the_loop(fake_cluster) -> None:
    """Its membership counts polls, auto-commits from them and revokes partitions on the loop."""
    fake_cluster.create_topic("t", 1)
    fake_cluster.append(TP, batch_of(0, 12))
    with Consumer(fake_cluster.bootstrap, group_id="g", enable_auto_commit=False,
                  auto_offset_reset="earliest", max_poll_records=3) as consumer:
        consumer.assign([TP])  # a group's consumer without membership: still the loop's poll
        got = consumer.poll(20_000)
        assert got
        loop_polls = count_loop_polls(consumer)
        polls = 0
        while len(got) < 12 and polls < 100:
            got += consumer.poll(2_000)
            polls += 1
        assert [r.offset for r in got] == list(range(12))
        assert loop_polls[0] == polls


def test_ready_polls_honour_max_records_and_rotate_over_partitions(fake_cluster) -> None:
    partitions = [TopicPartition("t", p) for p in range(3)]
    fake_cluster.create_topic("t", 3)
    for tp in partitions:
        fake_cluster.append(tp, batch_of(0, 6))
    with Consumer(fake_cluster.bootstrap, auto_offset_reset="earliest", max_poll_records=4) as consumer:
        consumer.assign(partitions)
        core: Any = consumer._core
        consumer.pause(*partitions)  # so that one answer brings all three, before any poll drains
        consumer.poll(0)  # on the loop: looks up the positions
        assert wait_for(lambda: all(core._assignment[tp].position == 0 for tp in partitions))
        consumer.resume(*partitions)
        assert consumer.poll(0) == []  # on the loop: sends the fetch, returns before its answer
        assert wait_for(lambda: all(core.highwater(tp) == 6 for tp in partitions))
        loop_polls = count_loop_polls(consumer)
        got = [consumer.poll(0, max_records=2) for _ in range(3)] + [consumer.poll(0) for _ in range(3)]
        assert loop_polls[0] == 0  # all of them served from what was fetched
        assert [len(g) for g in got] == [2, 2, 2, 4, 4, 4]
        # Each poll starts at the next partition: one that always has records cannot starve the others.
        assert sorted(g[0].partition for g in got[:3]) == [0, 1, 2]
        for tp in partitions:
            assert [r.offset for g in got for r in g if r.partition == tp.partition] == list(range(6))
            assert consumer.position(tp) == 6


def test_a_deserializer_error_on_the_application_thread_hands_out_the_records_before_it(fake_cluster) -> None:
    fake_cluster.create_topic("t", 1)
    fake_cluster.append(TP, batch_of(0, 3))

    def value(v: bytes | None) -> bytes | None:
        if v == b"v4":
            raise ValueError("undecodable v4")
        return v

    with Consumer(fake_cluster.bootstrap, auto_offset_reset="earliest",
                  value_deserializer=value) as consumer:
        consumer.assign([TP])
        assert [r.offset for r in consumer.poll(20_000)] == [0, 1, 2]  # on the loop
        fake_cluster.append(TP, batch_of(3, 3))
        core: Any = consumer._core
        assert wait_for(lambda: core.highwater(TP) == 6)
        loop_polls = count_loop_polls(consumer)
        with pytest.raises(ValueError, match="v4"):
            consumer.poll(0)  # the batch 3-5 fails at its second record: nothing of it goes out
        assert loop_polls[0] == 0
        with pytest.raises(ValueError, match="v4"):
            consumer.poll(0)  # again, until a seek past it
        assert consumer.position(TP) == 3
        consumer.seek(TP, 5)
        assert [r.offset for r in consumer.poll(20_000)] == [5]


def test_a_seek_from_another_thread_during_a_ready_poll_is_not_undone_by_it(fake_cluster) -> None:
    """The poll may hand out what it drained before the seek, but never moves the position
    after the seek has set it: the next poll starts where the seek said."""
    fake_cluster.create_topic("t", 1)
    fake_cluster.append(TP, batch_of(0, 3))
    seeker: list[threading.Thread] = []
    holder: dict[str, Any] = {}

    def value(v: bytes | None) -> bytes | None:
        consumer = holder["consumer"]
        if v != b"v4" or seeker or threading.current_thread() is consumer._thread.thread:
            return v
        seeker.append(threading.Thread(target=consumer.seek, args=(TP, 0), daemon=True))
        seeker[0].start()
        # The seek either completes now, or (today) its loop waits for this drain's lock.
        assert wait_for(lambda: not seeker[0].is_alive() or holder["lock"].loop_blocked.is_set())
        return v

    with Consumer(fake_cluster.bootstrap, auto_offset_reset="earliest", value_deserializer=value) as consumer:
        holder["consumer"] = consumer
        consumer.assign([TP])
        assert [r.offset for r in consumer.poll(20_000)] == [0, 1, 2]
        # No fetch in flight: the seek is the only thing of this consumer's the loop does.
        buffer_two_answers(fake_cluster, consumer)
        holder["lock"] = watch_drain_lock(consumer)
        first = consumer.poll(0)
        assert seeker, "the ready poll did not decode on this thread"
        seeker[0].join(20)
        assert not seeker[0].is_alive()
        assert {r.offset for r in first} <= set(range(3, 9))
        assert [r.offset for r in consumer.poll(20_000)][:1] == [0]
        assert consumer.position(TP) > 0


# --- defects found in the review (xfail, strict) -------------------------------------------------


@pytest.mark.xfail(strict=True, reason=(
    "AsyncConsumer.drain_ready (client/consumer.py) tests _closed before taking _delivery_lock and "
    "close never takes it: a poll on one thread hands out records after close() returned on another"))
def test_no_records_are_handed_out_after_close_returned_on_another_thread(fake_cluster) -> None:
    fake_cluster.create_topic("t", 1)
    fake_cluster.append(TP, batch_of(0, 3))
    consumer = Consumer(fake_cluster.bootstrap, auto_offset_reset="earliest", max_poll_records=3)
    try:
        consumer.assign([TP])
        assert [r.offset for r in consumer.poll(20_000)] == [0, 1, 2]
        fake_cluster.append(TP, batch_of(3, 3))
        assert wait_for(lambda: consumer._core.highwater(TP) == 6)
        lock = watch_drain_lock(consumer)
        outcome: list[Any] = []

        def poll() -> None:
            try:
                outcome.append([r.offset for r in consumer.poll(0)])
            except RuntimeError as exc:
                outcome.append(exc)

        poller = threading.Thread(target=poll, daemon=True)
        lock.stop_thread = poller
        poller.start()
        assert lock.arrived.wait(20)  # past drain_ready's closed test, not yet at the lock
        consumer.close()
        lock.go.set()
        poller.join(20)
        assert outcome and (isinstance(outcome[0], RuntimeError) or outcome[0] == []), outcome
    finally:
        consumer.close()


@pytest.mark.xfail(strict=True, reason=(
    "drain_ready (client/consumer.py) runs key/value deserializers on the application's thread "
    "while holding _delivery_lock; _fetch stores every answer under that lock on the process's "
    "shared I/O loop, so the loop (every tidelog client of the process) waits for the deserializers"))
def test_a_deserializer_on_the_application_thread_never_holds_up_the_shared_loop(fake_cluster) -> None:
    fake_cluster.create_topic("t", 1)
    fake_cluster.append(TP, batch_of(0, 3))
    outcome: dict[str, Any] = {}
    armed = threading.Event()
    holder: dict[str, Any] = {}

    def value(v: bytes | None) -> bytes | None:
        consumer = holder["consumer"]
        loop_thread = consumer._thread.thread
        if v != b"v3" or not armed.is_set() or threading.current_thread() is loop_thread:
            return v
        armed.clear()
        outcome["on_application_thread"] = True
        lock, core = holder["lock"], consumer._core
        fake_cluster.append(TP, batch_of(6, 3))  # the loop's next fetch answer comes meanwhile
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if lock.loop_blocked.is_set():
                outcome["loop"] = "waited for the drain's lock"
                # Held by this very thread: nothing else runs on the loop until this returns, so
                # a blocking call of any other tidelog client made here would never return.
                other = asyncio.run_coroutine_threadsafe(asyncio.sleep(0), consumer._thread.loop)
                outcome["other_client_ran"] = wait_for(other.done, timeout=0.5)
                break
            if core.highwater(TP) == 9:
                outcome["loop"] = "stored the answer"
                break
            lock.loop_blocked.wait(0.01)
        return v

    with Consumer(fake_cluster.bootstrap, auto_offset_reset="earliest", value_deserializer=value) as consumer:
        holder["consumer"] = consumer
        consumer.assign([TP])
        assert [r.offset for r in consumer.poll(20_000)] == [0, 1, 2]  # decoded on the loop
        core: Any = consumer._core
        fake_cluster.append(TP, batch_of(3, 3))
        assert wait_for(lambda: core.highwater(TP) == 6)  # buffered, a fetch at 6 in flight
        holder["lock"] = watch_drain_lock(consumer)
        armed.set()
        assert [r.offset for r in consumer.poll(0)] == [3, 4, 5]
        assert outcome.get("on_application_thread"), "the ready poll did not decode on this thread"
        assert outcome.get("loop") == "stored the answer", outcome


@pytest.mark.xfail(strict=True, reason=(
    "Consumer.close (client/consumer.py) sets _closed and, in its finally, stops the loop handle "
    "even when _serve refuses it inside a deserializer: the refused close leaves the consumer "
    "half closed (its handle stopped, the core never closed)"))
def test_a_close_refused_inside_a_deserializer_leaves_the_consumer_usable(fake_cluster) -> None:
    fake_cluster.create_topic("t", 1)
    fake_cluster.append(TP, batch_of(0, 3))
    refused: list[BaseException] = []
    holder: dict[str, Consumer] = {}

    def value(v: bytes | None) -> bytes | None:
        consumer = holder["consumer"]
        if v == b"v3" and threading.current_thread() is not consumer._thread.thread and not refused:
            try:
                consumer.close()
            except RuntimeError as exc:
                refused.append(exc)
        return v

    consumer = Consumer(fake_cluster.bootstrap, auto_offset_reset="earliest", value_deserializer=value)
    holder["consumer"] = consumer
    try:
        consumer.assign([TP])
        assert [r.offset for r in consumer.poll(20_000)] == [0, 1, 2]
        # Nothing in flight: the loop never needs the drain's lock while close runs below (else
        # the refused close's stop() would wait for the loop for ever, the loop for this thread).
        buffer_two_answers(fake_cluster, consumer)
        assert [r.offset for r in consumer.poll(0)] == list(range(3, 9))
        assert len(refused) == 1 and "deserializer" in str(refused[0])
        assert consumer.position(TP) == 9  # today: RuntimeError("the client is closed")
    finally:
        consumer.close()
        if not consumer._core._closed:  # the half-closed consumer's fetches still run on the loop
            asyncio.run_coroutine_threadsafe(consumer._core.close(0), consumer._thread.loop).result(20)


@pytest.mark.xfail(strict=True, reason=(
    "Consumer.poll (client/consumer.py) calls drain_ready before anything refuses a call from the "
    "I/O loop: a deserializer run there by the loop's poll re-enters _drain (the drain lock is an "
    "RLock) in the middle of _decode_next, so a record goes out twice and a batch is skipped"))
def test_a_poll_from_a_deserializer_on_the_loop_is_refused(fake_cluster) -> None:
    fake_cluster.create_topic("t", 1)
    fake_cluster.append(TP, batch_of(0, 3))
    fake_cluster.append(TP, batch_of(3, 3))
    inner: dict[str, Any] = {}
    holder: dict[str, Consumer] = {}

    def value(v: bytes | None) -> bytes | None:
        consumer = holder["consumer"]
        if v == b"v0" and threading.current_thread() is consumer._thread.thread and not inner:
            inner["asked"] = True  # once: the inner poll decodes this record again
            try:
                inner["records"] = consumer.poll(0, max_records=1)
            except RuntimeError as exc:
                inner["refused"] = exc
        return v

    with Consumer(fake_cluster.bootstrap, auto_offset_reset="earliest", value_deserializer=value) as consumer:
        holder["consumer"] = consumer
        consumer.assign([TP])
        # Nothing fetched yet: this poll goes to the loop and decodes both batches there.
        got = consumer.poll(20_000)
        assert inner, "the first batch was not decoded on the loop"
        inner_offsets = [r.offset for r in inner.get("records", [])]
        # Today: the inner poll hands out [0], this one [0, 1, 2]; 3-5 are skipped (position 6).
        assert ("refused" in inner, inner_offsets, [r.offset for r in got]) == (True, [], list(range(6)))
