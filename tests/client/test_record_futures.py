"""RecordFuture and settle: the sync producer's futures sharing one condition per producer."""

from __future__ import annotations

import concurrent.futures
import gc
import threading

import pytest

from tidelog.client import RecordMetadata
from tidelog.client._futures import RecordFuture, settle, settle_delivered


def test_settle_completes_each_future_with_its_own_result_and_runs_callbacks() -> None:
    condition = threading.Condition()
    futures = [RecordFuture(condition) for _ in range(3)]
    seen: list[object] = []
    futures[1].add_done_callback(lambda f: seen.append(f.result()))
    futures[1].add_done_callback(lambda f: seen.append("again"))
    assert not any(f.done() for f in futures)
    settle(futures, ["a", "b", "c"])
    assert [f.result(0) for f in futures] == ["a", "b", "c"]
    assert seen == ["b", "again"]
    late: list[object] = []
    futures[0].add_done_callback(lambda f: late.append(f.result()))  # done: called at once
    assert late == ["a"]


def test_settle_with_an_exception_fails_every_future_and_skips_cancelled_ones() -> None:
    condition = threading.Condition()
    futures = [RecordFuture(condition) for _ in range(3)]
    assert futures[0].cancel()
    error = ValueError("boom")
    settle(futures, None, error)
    assert futures[0].cancelled()
    with pytest.raises(concurrent.futures.CancelledError):
        futures[0].result(0)
    for future in futures[1:]:
        assert future.exception(0) is error
        with pytest.raises(ValueError, match="boom"):
            future.result(0)


def test_a_waiter_is_not_fooled_by_another_future_completing_on_the_shared_condition() -> None:
    condition = threading.Condition()
    mine, other = RecordFuture(condition), RecordFuture(condition)
    outcome: list[object] = []
    waiting = threading.Event()

    def wait_for_mine() -> None:
        waiting.set()
        try:
            outcome.append(mine.result(timeout=30))
        except BaseException as exc:  # recorded, so the assertion below shows it
            outcome.append(exc)

    waiter = threading.Thread(target=wait_for_mine)
    waiter.start()
    assert waiting.wait(10)
    settle([other], ["not mine"])  # wakes the waiter, whose future is still pending
    waiter.join(0.2)
    assert waiter.is_alive() and outcome == []
    settle([mine], ["mine"])
    waiter.join(10)
    assert outcome == ["mine"]


def test_result_times_out_on_a_pending_future() -> None:
    future = RecordFuture(threading.Condition())
    with pytest.raises(concurrent.futures.TimeoutError):
        future.result(timeout=0.01)
    with pytest.raises(concurrent.futures.TimeoutError):
        future.exception(timeout=0)


def test_concurrent_futures_wait_and_as_completed_see_settled_futures() -> None:
    condition = threading.Condition()
    futures = [RecordFuture(condition) for _ in range(4)]
    timer = threading.Timer(0.05, lambda: settle(futures[:2], [1, 2]))
    timer.start()
    done, pending = concurrent.futures.wait(futures, timeout=30, return_when="FIRST_COMPLETED")
    timer.join()
    assert done and done <= set(futures[:2])
    settle(futures[2:], None, RuntimeError("late"))
    results = []
    for future in concurrent.futures.as_completed(futures, timeout=30):
        results.append(future.exception() or future.result())
    assert sorted(map(str, results)) == ["1", "2", "late", "late"]


def test_a_future_from_another_condition_is_still_completed() -> None:
    mine, stray = RecordFuture(threading.Condition()), RecordFuture(threading.Condition())
    settle([mine, stray], ["x", "y"])
    assert (mine.result(0), stray.result(0)) == ("x", "y")


def test_settle_delivered_builds_each_record_metadata_when_first_read() -> None:
    condition = threading.Condition()
    futures = [RecordFuture(condition) for _ in range(3)]
    cancelled, stray = futures[0], RecordFuture(threading.Condition())
    assert cancelled.cancel()
    seen: list[object] = []
    futures[1].add_done_callback(lambda f: seen.append(f.exception()))
    settle_delivered([*futures, stray], ("t", 4), range(10, 14), [7, 8, 9, 5])
    assert cancelled.cancelled()
    assert seen == [None]
    assert futures[1]._value is None  # not built until read
    first = futures[1].result(0)
    assert first == RecordMetadata("t", 4, 11, 8) and type(first) is RecordMetadata
    assert futures[1].result(0) is first  # built once, then kept
    assert futures[2].result(0) == RecordMetadata("t", 4, 12, 9)
    assert stray.result(0) == RecordMetadata("t", 4, 13, 5)  # another condition: completed alone
    done, _ = concurrent.futures.wait(futures[1:] + [stray], timeout=0)
    assert len(done) == 3


def test_a_delivered_future_holds_no_new_gc_tracked_object_per_record() -> None:
    # The point of settle_delivered: a settled, unread future keeps only ints and its batch's
    # shared tuple, so records in flight and just delivered add nothing for the collector.
    condition = threading.Condition()
    futures = [RecordFuture(condition) for _ in range(200)]
    where = ("t", 0)
    settle_delivered(futures, where, range(200), [1] * 200)
    assert all(f._where is where for f in futures)
    assert not any(gc.is_tracked(f._value) or f._value is not None for f in futures)
    assert not any(gc.is_tracked(f._offset) or gc.is_tracked(f._timestamp) for f in futures)


def test_a_failing_callback_is_logged_and_the_others_still_run(caplog: pytest.LogCaptureFixture) -> None:
    condition = threading.Condition()
    futures = [RecordFuture(condition) for _ in range(2)]
    seen: list[object] = []

    def bad(future: concurrent.futures.Future[object]) -> None:
        raise RuntimeError("callback bug")

    futures[0].add_done_callback(bad)
    futures[0].add_done_callback(lambda f: seen.append(("second", f.result().offset)))
    futures[1].add_done_callback(lambda f: seen.append(("other", f.result().offset)))
    settle_delivered(futures, ("t", 0), [7, 8], [1, 1])
    assert seen == [("second", 7), ("other", 8)]
    assert "exception calling callback" in caplog.text and "callback bug" in caplog.text


def test_futures_with_a_callback_in_flight_get_no_dict_of_their_own() -> None:
    # As tidelog perf uses them: a callback added at send, settled while newer ones are made. A
    # dict per future would be a second GC-tracked object per record in flight.
    make = RecordFuture.bound_to(threading.Condition())
    seen: list[BaseException | None] = []
    in_flight: list[list[RecordFuture]] = []
    for _ in range(6):
        batch = [make() for _ in range(50)]
        for future in batch:
            future.add_done_callback(lambda f: seen.append(f.exception()))
        in_flight.append(batch)
        if len(in_flight) > 2:
            settle_delivered(in_flight.pop(0), ("t", 0), range(50), [1] * 50)
    futures = [f for batch in in_flight for f in batch] + [make()]
    settle_delivered(in_flight[0], ("t", 0), range(50), [1] * 50)
    assert len(seen) == 250 and seen[-1] is None
    with_dict = [f for f in futures if any(type(r) is dict for r in gc.get_referents(f))]
    assert with_dict == []
