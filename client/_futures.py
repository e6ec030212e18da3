"""The sync producer's per-record futures, made cheap to create and to complete in bulk.

A `concurrent.futures.Future` builds its own `threading.Condition` (an RLock, a deque and five
bound methods) when created and takes it again when completed: at hundreds of thousands of
records a second that was half of `Producer.send`'s cost, mostly in the garbage collector
walking those objects. A `RecordFuture` is a real `concurrent.futures.Future` (so
`concurrent.futures.wait`, `as_completed` and callbacks work as usual) whose condition is
shared by all the futures of one producer, as Kafka's Java client shares one latch among the
records of a batch; `settle` completes a batch's futures in one pass under that condition,
with one notify.

With a shared condition a waiter can be woken by another future's completion, so `result` and
`exception` wait in a loop until their own future is done (the base class waits only once).
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from itertools import repeat
from concurrent.futures._base import CANCELLED, CANCELLED_AND_NOTIFIED, FINISHED, LOGGER as _LOGGER, PENDING
from typing import Any, Callable, Iterable, Sequence

from tidelog.client.types import RecordMetadata

_DONE = frozenset({CANCELLED, CANCELLED_AND_NOTIFIED, FINISHED})
# Every attribute a RecordFuture (or the base class's methods) sets on an instance.
_INSTANCE_ATTRIBUTES = ("_state", "_callback", "_done_callbacks", "_waiter_list", "_where", "_offset",
                        "_timestamp", "_value", "_exception")


class RecordFuture(concurrent.futures.Future):  # type: ignore[type-arg]
    # The starting values live on the class (an instance gets its own on the first write), so
    # creating a future sets one attribute. Most futures never get a callback: the list of
    # callbacks is made on the first one, and the list of waiters likewise.
    _state = PENDING
    _value: Any = None
    _exception = None
    # A delivered record's metadata, kept as its parts until asked for (see `settle_delivered`):
    # the topic and partition shared by its batch, its own offset and timestamp as plain ints.
    _where: tuple[str, int] | None = None
    _offset = -1
    _timestamp = -1
    # The first callback is kept as is and a list is made only for a second: applications
    # often add one callback per record, and a list per future is one more object for the
    # garbage collector to walk while the record is in flight.
    _callback: Callable[[Any], object] | None = None
    _done_callbacks: Any = ()
    _waiter_list: list[Any] | None = None

    def __init__(self, condition: threading.Condition) -> None:
        # The base __init__ is skipped on purpose: it would build a Condition per future.
        self._condition = condition

    @classmethod
    def bound_to(cls, condition: threading.Condition) -> Callable[[], RecordFuture]:
        """A maker of futures sharing ``condition``, for a producer's `send`: a subclass with
        the condition on the class and no Python-level __init__, so that making a future is a
        C-level call (a twentieth of `send`'s cost)."""
        bound = type(cls.__name__, (cls,), {"_condition": condition, "__init__": object.__init__,
                                            "__module__": cls.__module__, "__qualname__": cls.__qualname__})
        # CPython keeps instances' attributes in one key table per class, without a dict per
        # instance, only while they fit the table as it was when each instance was made: with
        # the table still growing as futures got their attributes (a callback's first, then a
        # settled record's), every future of `tidelog perf` got a dict of its own, a second
        # GC-tracked object per record in flight. Setting each attribute once on a throwaway
        # instance completes the table before the first real future is made.
        probe = bound()
        for name in _INSTANCE_ATTRIBUTES:
            setattr(probe, name, getattr(probe, name))
        return bound

    @property
    def _result(self) -> Any:
        # The base class reads the result here. A delivered record's RecordMetadata is built on
        # the first read: most applications only ask exception() in a callback, and one more
        # object per record in flight is one more for the garbage collector to count and walk.
        value = self._value
        if value is None and self._where is not None:
            topic, partition = self._where
            value = self._value = RecordMetadata(topic, partition, self._offset, self._timestamp)
        return value

    @_result.setter
    def _result(self, value: Any) -> None:
        self._value = value

    @property
    def _waiters(self) -> list[Any]:
        # Only concurrent.futures.wait/as_completed add waiters, so the list is made on demand;
        # every use is under the shared condition, so two threads cannot both make one.
        if self._waiter_list is None:
            self._waiter_list = []
        return self._waiter_list

    def add_done_callback(self, fn: Callable[[concurrent.futures.Future[Any]], object]) -> None:
        # The condition's acquire and release are its lock's own (C) methods; `with condition`
        # costs two Python-level calls more, and applications add a callback per record.
        condition = self._condition
        condition.acquire()
        try:
            if self._state not in _DONE:
                if self._callback is None:
                    self._callback = fn
                elif self._done_callbacks:
                    self._done_callbacks.append(fn)
                else:
                    self._done_callbacks = [fn]
                return
        finally:
            condition.release()
        super().add_done_callback(fn)  # done already: the base class calls it at once

    def _invoke_callbacks(self) -> None:
        callback = self._callback
        if callback is not None:
            try:
                callback(self)
            except Exception:  # noqa: BLE001 - as the base class: logged, never raised
                _LOGGER.exception("exception calling callback for %r", self)
        super()._invoke_callbacks()  # the rest, in the order they were added

    def _wait_until_done(self, timeout: float | None) -> None:
        with self._condition:
            if self._state in _DONE:
                return
            deadline = None if timeout is None else time.monotonic() + timeout
            while self._state not in _DONE:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return
                self._condition.wait(remaining)

    def result(self, timeout: float | None = None) -> Any:
        if self._state == FINISHED and self._exception is None:
            # Settled (the state is written last, under the condition): no lock needed to read
            # a result that can no longer change; applications often call this per record.
            return self._result
        self._wait_until_done(timeout)
        # Done (or timed out): the base class answers without waiting, and raises
        # TimeoutError or CancelledError as documented.
        return super().result(0)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        if self._state == FINISHED:
            # As in `result`: settled for good, so no lock is needed; a delivery callback
            # typically asks this of every record's future.
            return self._exception
        self._wait_until_done(timeout)
        return super().exception(0)


def settle(
    futures: Sequence[RecordFuture],
    results: Sequence[Any] | None = None,
    exception: BaseException | None = None,
) -> None:
    """Complete ``futures`` with ``results`` (one each) or all with ``exception``, skipping any
    the caller cancelled, holding their shared condition once and notifying once."""
    if not futures:
        return
    condition = futures[0]._condition
    with_callbacks: list[RecordFuture] = []
    strays: list[tuple[RecordFuture, Any]] = []
    outcomes = results if exception is None else repeat(exception)
    condition.acquire()
    try:
        # One pass per record on the client's I/O thread: the success and failure cases share
        # it through ``outcomes``, and the fields are written straight into each future.
        for future, outcome in zip(futures, outcomes):  # type: ignore[call-overload]
            if future._condition is not condition:
                strays.append((future, outcome))
                continue
            if future._state in _DONE:
                continue  # cancelled by the caller
            if exception is None:
                future._result = outcome
            else:
                future._exception = outcome
            future._state = FINISHED
            if future._waiter_list:
                _tell_waiters(future, exception is None)
            if future._callback is not None:
                with_callbacks.append(future)
        condition.notify_all()
    finally:
        condition.release()
    _run_callbacks(with_callbacks)
    for future, outcome in strays:
        try:
            if exception is None:
                future.set_result(outcome)
            else:
                future.set_exception(exception)
        except concurrent.futures.InvalidStateError:
            pass


def _tell_waiters(future: RecordFuture, succeeded: bool) -> None:
    # What concurrent.futures.wait/as_completed registered (rare: only they add waiters).
    for waiter in future._waiter_list or ():
        if succeeded:
            waiter.add_result(future)
        else:
            waiter.add_exception(future)


def settle_delivered(
    futures: Sequence[RecordFuture],
    where: tuple[str, int],
    offsets: Iterable[int],
    timestamps: Iterable[int],
) -> None:
    """Complete a delivered batch's ``futures`` (one offset and timestamp each) without building
    their RecordMetadata, which `RecordFuture._result` makes when first read; otherwise as
    `settle`."""
    if not futures:
        return
    condition = futures[0]._condition
    with_callbacks: list[RecordFuture] = []
    strays: list[RecordFuture] = []
    condition.acquire()
    try:
        for future, offset, timestamp in zip(futures, offsets, timestamps):
            stray = future._condition is not condition
            if not stray and future._state in _DONE:
                continue  # cancelled by the caller
            # Plain ints and a tuple shared by the batch: nothing new per record to track.
            future._where = where
            future._offset = offset
            future._timestamp = timestamp
            if stray:
                strays.append(future)
                continue
            future._state = FINISHED
            if future._waiter_list:
                _tell_waiters(future, True)
            if future._callback is not None:
                with_callbacks.append(future)
        condition.notify_all()
    finally:
        condition.release()
    _run_callbacks(with_callbacks)
    for future in strays:
        try:
            future.set_result(future._result)
        except concurrent.futures.InvalidStateError:
            pass


def _run_callbacks(futures: list[RecordFuture]) -> None:
    """`RecordFuture._invoke_callbacks` of each of ``futures`` (settled, each with a first
    callback), inlined: an application that adds a callback per record pays two Python-level
    calls less per record on the client's I/O thread."""
    invoke_rest = concurrent.futures.Future._invoke_callbacks
    for future in futures:
        try:
            future._callback(future)  # type: ignore[misc]
        except Exception:  # noqa: BLE001 - as the base class: logged, never raised
            _LOGGER.exception("exception calling callback for %r", future)
        if future._done_callbacks:
            invoke_rest(future)  # the rest, in the order they were added
