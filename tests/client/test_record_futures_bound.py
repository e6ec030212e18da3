"""`RecordFuture.bound_to`: the producer's maker of futures that share its condition."""

from __future__ import annotations

import concurrent.futures
import threading

from tidelog.client._futures import RecordFuture, settle


def test_bound_futures_share_the_condition_and_behave_as_futures() -> None:
    condition = threading.Condition()
    make = RecordFuture.bound_to(condition)
    futures = [make() for _ in range(3)]
    assert all(isinstance(f, RecordFuture) and isinstance(f, concurrent.futures.Future) for f in futures)
    assert all(f._condition is condition for f in futures)
    assert "RecordFuture" in repr(futures[0]) and "pending" in repr(futures[0])
    waiter = threading.Thread(target=lambda: settle(futures, ["a", "b", "c"]))
    waiter.start()
    done, _ = concurrent.futures.wait(futures, timeout=10)
    waiter.join()
    assert done == set(futures)
    assert [f.result(0) for f in futures] == ["a", "b", "c"]
    assert [f.exception(0) for f in futures] == [None, None, None]


def test_exception_of_a_settled_future_answers_at_once_without_the_lock() -> None:
    condition = threading.Condition()
    make = RecordFuture.bound_to(condition)
    ok, failed = make(), make()
    settle([ok], ["x"])
    error = ValueError("boom")
    settle([failed], None, error)
    with condition:  # held by another thread in real use: the settled answer needs no lock
        outcome: list[object] = []
        reader = threading.Thread(target=lambda: outcome.extend([ok.exception(), failed.exception()]))
        reader.start()
        reader.join(10)
        assert not reader.is_alive()
    assert outcome == [None, error]
