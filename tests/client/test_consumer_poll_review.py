"""Review of the sync Consumer's poll served on the application's thread (`drain_ready`, issue #5).

Each test forces one interleaving of the application's thread and the clients' shared I/O loop
(a fake broker; the drain's lock watched, or a deserializer or the drain itself acting at a
chosen record), so its outcome does not depend on the machine's speed. The last two pin defects
the review found (records after close; a poll from a deserializer re-entering the drain), which
failed before their fix; the deserializer tests pin the fix of two more (a deserializer holding
the shared loop up from the application's thread; a refused close leaving the consumer half
closed).
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


def test_a_deserializer_error_hands_out_the_records_before_it(fake_cluster) -> None:
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
        assert loop_polls[0] == 1  # with a deserializer, polls go to the loop (see below)
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

    with Consumer(fake_cluster.bootstrap, auto_offset_reset="earliest") as consumer:
        consumer.assign([TP])
        assert [r.offset for r in consumer.poll(20_000)] == [0, 1, 2]
        # No fetch in flight: the seek is the only thing of this consumer's the loop does.
        buffer_two_answers(fake_cluster, consumer)
        lock = watch_drain_lock(consumer)
        core: Any = consumer._core
        decode_next = core._decode_next

        def decode_then_seek(*args: Any) -> None:
            decode_next(*args)
            if seeker or threading.current_thread() is consumer._thread.thread:
                return
            # In the middle of the ready poll's drain, holding its lock: a seek from another
            # thread, whose loop has to wait for the lock.
            seeker.append(threading.Thread(target=consumer.seek, args=(TP, 0), daemon=True))
            seeker[0].start()
            assert lock.loop_blocked.wait(20)

        core._decode_next = decode_then_seek
        first = consumer.poll(0)
        assert seeker, "the ready poll did not decode on this thread"
        seeker[0].join(20)
        assert not seeker[0].is_alive()
        assert {r.offset for r in first} <= set(range(3, 9))
        assert [r.offset for r in consumer.poll(20_000)][:1] == [0]
        assert consumer.position(TP) > 0


def test_deserializers_never_run_on_the_application_thread(fake_cluster) -> None:
    """A ready poll decodes on the application's thread holding the drain's lock, which the
    clients' shared I/O loop takes to store every fetch answer: a key/value deserializer there
    would hold up every client of the process, and one that waited for a client would wait for
    ever. So a consumer with one polls through the loop, where its deserializers always ran."""
    fake_cluster.create_topic("t", 1)
    fake_cluster.append(TP, batch_of(0, 3))
    threads: set[threading.Thread] = set()

    def value(v: bytes | None) -> bytes | None:
        threads.add(threading.current_thread())
        return v

    with Consumer(fake_cluster.bootstrap, auto_offset_reset="earliest", value_deserializer=value) as consumer:
        consumer.assign([TP])
        assert [r.offset for r in consumer.poll(20_000)] == [0, 1, 2]
        buffer_two_answers(fake_cluster, consumer)  # records ready: a ready poll could serve them
        loop_polls = count_loop_polls(consumer)
        assert [r.offset for r in consumer.poll(0)] == list(range(3, 9))
        assert loop_polls[0] == 1
        assert threads == {consumer._thread.thread}


def test_a_close_refused_inside_a_deserializer_leaves_the_consumer_usable(fake_cluster) -> None:
    fake_cluster.create_topic("t", 1)
    fake_cluster.append(TP, batch_of(0, 3))
    refused: list[BaseException] = []
    holder: dict[str, Consumer] = {}

    def value(v: bytes | None) -> bytes | None:
        if v == b"v1" and not refused:
            try:
                holder["consumer"].close()
            except RuntimeError as exc:
                refused.append(exc)
        return v

    with Consumer(fake_cluster.bootstrap, auto_offset_reset="earliest", value_deserializer=value) as consumer:
        holder["consumer"] = consumer
        consumer.assign([TP])
        assert [r.offset for r in consumer.poll(20_000)] == [0, 1, 2]
        assert len(refused) == 1 and "deserializer" in str(refused[0])
        assert consumer.position(TP) == 3  # not half closed: it answers, and consumes on
        fake_cluster.append(TP, batch_of(3, 3))
        assert [r.offset for r in consumer.poll(20_000)] == [3, 4, 5]


# --- defects found in the review, fixed ----------------------------------------------------------



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
        # Before the fix: the inner poll handed out [0], this one [0, 1, 2]; 3-5 were skipped.
        assert ("refused" in inner, inner_offsets, [r.offset for r in got]) == (True, [], list(range(6)))
