"""The producer's per-partition batching, with a fake clock: no server, no event loop."""

from __future__ import annotations

import threading

import pytest

from tidelog.client.accumulator import (
    RECORD_OVERHEAD,
    BufferExhausted,
    ProducerBatch,
    RecordAccumulator,
    estimate_record_size,
)
from tidelog.client.types import TopicPartition
from tidelog.proto.records import BATCH_OVERHEAD, decode_batches, finish_batch

TP0 = TopicPartition("t", 0)
TP1 = TopicPartition("t", 1)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make(clock: Clock, **overrides: float) -> RecordAccumulator:
    options = dict(batch_size=1000, linger_ms=5, buffer_memory=100_000, delivery_timeout_ms=10_000)
    options.update(overrides)
    return RecordAccumulator(clock=clock, **options)  # type: ignore[arg-type]


def add(acc: RecordAccumulator, tp: TopicPartition, value: bytes, handle: object = None):
    size = estimate_record_size(None, value, ())
    return acc.try_append(tp, (1, None, value, ()), size, handle)


def records(batch: ProducerBatch) -> list[tuple[int, bytes | None]]:
    """(offset, value) of each record the batch's encoded section holds."""
    assert batch.parts is not None
    (decoded,) = decode_batches(finish_batch(batch.parts, batch.timestamps))
    return [(r.offset, r.value) for r in decoded.records()]


def values(batch: ProducerBatch) -> list[bytes | None]:
    return [value for _, value in records(batch)]


def leader_1(tp: TopicPartition) -> int:
    return 1


def test_record_size_estimate_counts_key_value_and_headers() -> None:
    assert estimate_record_size(None, None, ()) == RECORD_OVERHEAD
    assert estimate_record_size(b"k", b"vv", [("h", b"x")]) == RECORD_OVERHEAD + 3 + 10 + 2


def test_a_batch_waits_for_linger_then_drains() -> None:
    clock = Clock()
    acc = make(clock)
    first = add(acc, TP0, b"a")
    assert first is not None and first.wake_sender  # a new batch: the sender must plan its linger
    second = add(acc, TP0, b"b")
    assert second is not None and not second.wake_sender and second.batch is first.batch
    drain = acc.drain(clock(), leader_1)
    assert drain.by_node == {} and drain.next_check == pytest.approx(100.005)
    clock.now += 0.005
    [[batch]] = acc.drain(clock(), leader_1).by_node[1]
    assert records(batch) == [(0, b"a"), (1, b"b")]


def test_a_full_batch_is_sealed_at_once_and_a_new_one_started() -> None:
    clock = Clock()
    acc = make(clock, batch_size=BATCH_OVERHEAD + 3 * (RECORD_OVERHEAD + 10))
    results = [add(acc, TP0, bytes(10)) for _ in range(4)]
    assert all(r is not None for r in results)
    assert results[2].wake_sender and results[2].batch.sealed  # reached batch_size
    assert results[3].batch is not results[0].batch
    [[batch]] = acc.drain(clock(), leader_1).by_node[1]  # the open one still lingers
    assert batch.record_count == 3


def test_one_batch_in_flight_per_partition_and_retries_go_first() -> None:
    clock = Clock()
    acc = make(clock, batch_size=BATCH_OVERHEAD + RECORD_OVERHEAD + 1, linger_ms=0)
    for value in (b"1", b"2", b"3"):
        add(acc, TP0, value)  # each record fills a batch
    add(acc, TP1, b"x")
    drain = acc.drain(clock(), leader_1)
    in_flight = {run[0].tp: run for run in drain.by_node[1]}
    assert [values(b)[0] for b in in_flight[TP0]] == [b"1"] and TP1 in in_flight
    assert acc.drain(clock(), leader_1).by_node == {}  # TP0's next batch waits for the first
    acc.reenqueue(in_flight[TP0], retry_at=clock() + 0.1)
    assert acc.drain(clock(), leader_1).by_node == {}  # backing off; "2" must not overtake "1"
    clock.now += 0.1
    [again] = acc.drain(clock(), leader_1).by_node[1]
    assert [values(b)[0] for b in again] == [b"1"] and again[0].attempts == 1
    acc.complete(again)
    [[second]] = acc.drain(clock(), leader_1).by_node[1]
    assert values(second)[0] == b"2"


def test_partitions_without_a_leader_are_reported_not_sent() -> None:
    clock = Clock()
    acc = make(clock, linger_ms=0)
    add(acc, TP0, b"a")
    drain = acc.drain(clock(), lambda tp: None)
    assert drain.by_node == {} and drain.unknown_leader == {TP0}


def test_memory_is_reserved_per_record_and_released_on_completion() -> None:
    clock = Clock()
    size = estimate_record_size(None, bytes(100), ())
    acc = make(clock, buffer_memory=2 * size, linger_ms=0)
    assert add(acc, TP0, bytes(100)) is not None
    assert add(acc, TP0, bytes(100)) is not None
    assert add(acc, TP0, bytes(100)) is None  # full
    assert acc.used_memory == 2 * size
    with pytest.raises(BufferExhausted):
        acc.append(TP0, (1, None, bytes(100), ()), size, None, timeout=0.01)
    [run] = acc.drain(clock(), leader_1).by_node[1]
    acc.complete(run)
    assert acc.used_memory == 0 and acc.is_empty()


def test_a_blocked_append_resumes_when_memory_is_freed() -> None:
    clock = Clock()
    size = estimate_record_size(None, bytes(100), ())
    acc = make(clock, buffer_memory=size, linger_ms=0)
    add(acc, TP0, bytes(100))
    appended = threading.Event()

    def blocked() -> None:
        acc.append(TP1, (1, None, bytes(100), ()), size, None, timeout=30)
        appended.set()

    thread = threading.Thread(target=blocked)
    thread.start()
    assert not appended.wait(0.05)
    [run] = acc.drain(clock(), leader_1).by_node[1]
    acc.complete(run)
    assert appended.wait(10)
    thread.join()


def test_expired_batches_are_removed_unless_in_flight() -> None:
    clock = Clock()
    acc = make(clock, linger_ms=0, delivery_timeout_ms=1000)
    add(acc, TP0, b"a")
    add(acc, TP1, b"b")
    [in_flight] = acc.drain(clock(), lambda tp: 1 if tp == TP0 else None).by_node[1]
    clock.now += 1.0
    expired = acc.expire(clock())
    assert [b.tp for b in expired] == [TP1]
    assert in_flight[0].tp == TP0 and not acc.is_empty()


def test_flush_seals_open_batches_and_tracks_what_is_incomplete() -> None:
    clock = Clock()
    acc = make(clock, linger_ms=60_000)
    add(acc, TP0, b"a")
    last = acc.last_batch_id()
    acc.seal_all()
    add(acc, TP0, b"later")
    [run] = acc.drain(clock(), leader_1).by_node[1]
    assert [values(b)[0] for b in run] == [b"a"]
    assert acc.any_incomplete_up_to(last)
    acc.complete(run)
    assert not acc.any_incomplete_up_to(last) and not acc.is_empty()


def test_abort_keeps_only_in_flight_batches() -> None:
    clock = Clock()
    acc = make(clock, linger_ms=0, batch_size=BATCH_OVERHEAD + RECORD_OVERHEAD + 1)
    for value in (b"1", b"2"):
        add(acc, TP0, value)
    [in_flight] = acc.drain(clock(), leader_1).by_node[1]
    aborted = acc.abort_all()
    assert [values(b)[0] for b in aborted] == [b"2"]
    acc.complete(in_flight)
    assert acc.is_empty() and acc.used_memory == 0


def test_queued_batches_of_a_partition_travel_together_up_to_max_bytes() -> None:
    clock = Clock()
    one = BATCH_OVERHEAD + RECORD_OVERHEAD + 1
    acc = make(clock, linger_ms=0, batch_size=one)
    for value in (b"1", b"2", b"3", b"4", b"5"):
        add(acc, TP0, value)  # five full batches
    [run] = acc.drain(clock(), leader_1, max_bytes=3 * one).by_node[1]
    assert [values(b)[0] for b in run] == [b"1", b"2", b"3"]
    acc.reenqueue(run, retry_at=clock())  # retried whole, still first in line
    [again] = acc.drain(clock(), leader_1, max_bytes=10 * one).by_node[1]
    assert [values(b)[0] for b in again] == [b"1", b"2", b"3", b"4", b"5"]
    acc.complete(again[:2])  # a prefix may finish on its own (expired batches)
    acc.reenqueue(again[2:], retry_at=clock())
    [rest] = acc.drain(clock(), leader_1, max_bytes=10 * one).by_node[1]
    assert [values(b)[0] for b in rest] == [b"3", b"4", b"5"]


def test_no_wake_for_a_partition_whose_run_is_in_flight_until_the_run_completes() -> None:
    # The sender drains again after every completed run, so a batch created or sealed behind an
    # in-flight run needs no wake of its own; once the run is done, waking is back.
    clock = Clock()
    acc = make(clock, batch_size=BATCH_OVERHEAD + 2 * (RECORD_OVERHEAD + 10))
    assert add(acc, TP0, bytes(10)).wake_sender
    clock.now += 0.005
    [run] = acc.drain(clock(), leader_1).by_node[1]
    created = add(acc, TP0, bytes(10))
    sealed = add(acc, TP0, bytes(10))
    assert created.index == 0 and not created.wake_sender
    assert sealed.batch.sealed and not sealed.wake_sender
    assert acc.add(TP0, (1, None, bytes(10), ()), RECORD_OVERHEAD + 10, None) is False  # created
    assert add(acc, TP1, bytes(10)).wake_sender  # another partition: nothing in flight there
    acc.complete(run)
    assert acc.add(TP0, (1, None, bytes(10), ()), RECORD_OVERHEAD + 10, None) is True  # sealed
    [first, second] = acc.drain(clock(), leader_1, max_bytes=10_000).by_node[1][0]
    assert first is sealed.batch and second.sealed and second.record_count == 2


def test_equal_topic_partition_objects_share_one_queue() -> None:
    clock = Clock()
    acc = make(clock)
    first = add(acc, TopicPartition("t", 0), b"a")
    second = add(acc, TP1, b"b")
    third = add(acc, TopicPartition("t", 0), b"c")  # another object, equal to the first
    assert third.batch is first.batch and second.batch is not first.batch
    assert values(third.batch) == [b"a", b"c"]


def _numbered(run, producer_id: int) -> None:
    # What the producer does to a run it sends idempotently: number it under its id.
    for batch in run:
        batch.producer_id = producer_id


def test_idempotent_pipelining_resync_and_retries_keep_their_runs() -> None:
    clock = Clock()
    one = BATCH_OVERHEAD + RECORD_OVERHEAD + 1
    acc = make(clock, linger_ms=0, batch_size=one, max_in_flight_batches=5)
    for value in b"123456789":
        add(acc, TP0, bytes([value]))  # nine full batches
    first = acc.drain(clock(), leader_1, max_bytes=2 * one, producer_id=7).by_node[1][0]
    _numbered(first, 7)
    second = acc.drain(clock(), leader_1, max_bytes=2 * one, producer_id=7).by_node[1][0]
    _numbered(second, 7)
    third = acc.drain(clock(), leader_1, max_bytes=10 * one, producer_id=7).by_node[1][0]
    _numbered(third, 7)
    assert [len(first), len(second), len(third)] == [2, 2, 1]  # five batches in flight at most
    assert acc.drain(clock(), leader_1, max_bytes=10 * one, producer_id=7).by_node == {}
    acc.complete(first)
    # The second run failed retriably; the third, sent after it, is refused and comes back too.
    acc.reenqueue(second, retry_at=clock())
    assert acc.drain(clock(), leader_1, max_bytes=10 * one, producer_id=7).by_node == {}  # resync
    acc.reenqueue(third, retry_at=clock())
    [again] = acc.drain(clock(), leader_1, max_bytes=10 * one, producer_id=7).by_node[1]
    assert again == second  # resent as first sent: not merged with the third or with new batches
    assert acc.drain(clock(), leader_1, max_bytes=10 * one, producer_id=7).by_node == {}  # one at a time
    acc.complete(again)
    [resent] = acc.drain(clock(), leader_1, max_bytes=10 * one, producer_id=7).by_node[1]
    assert resent == third
    [fresh] = acc.drain(clock(), leader_1, max_bytes=10 * one, producer_id=7).by_node[1]
    assert [values(b)[0] for b in fresh] == [b"6", b"7", b"8", b"9"]  # pipelined again


def test_batches_of_a_new_producer_id_wait_for_the_old_ids_and_renumbering_covers_later_ones() -> None:
    clock = Clock()
    one = BATCH_OVERHEAD + RECORD_OVERHEAD + 1
    acc = make(clock, linger_ms=0, batch_size=one, max_in_flight_batches=5)
    for value in b"1234":
        add(acc, TP0, bytes([value]))
    runs = [acc.drain(clock(), leader_1, producer_id=7).by_node[1][0] for _ in range(3)]
    for run in runs:
        _numbered(run, 7)
    # The id changed (7 was dropped): "4" gets the new id, so it waits while 7's batches fly.
    assert acc.drain(clock(), leader_1, producer_id=8).by_node == {}
    acc.complete(runs[0])
    assert acc.has_earlier_outstanding(runs[2])  # "2" of the same id is still unanswered
    acc.reenqueue(runs[2], retry_at=clock())  # "3" overtook "2": retried as it is
    assert [b.producer_id for b in runs[2]] == [7]
    acc.reenqueue(runs[1], retry_at=clock(), renumber=True)  # "2" was never written under 7
    assert [b.producer_id for b in runs[1] + runs[2]] == [-1, -1]  # nor the later "3"
    [renumbered] = acc.drain(clock(), leader_1, max_bytes=10 * one, producer_id=8).by_node[1]
    assert [values(b)[0] for b in renumbered] == [b"2", b"3", b"4"]  # now one new run
