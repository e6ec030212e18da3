"""RecordFuture and settle: the sync producer's futures sharing one condition per producer."""

from __future__ import annotations

import concurrent.futures
import threading

import pytest

from tidelog.client._futures import RecordFuture, settle


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
