"""The sync facades' engine: one event loop in one daemon thread, shared by every sync client of
the process (and by the in-process fakes of the tests), and never closed while the process runs.

Why one loop: grpc.aio binds its process-wide completion-queue poller to every event loop that
ever made a grpc.aio object (a reader on one shared socket per loop, kept until grpc shuts
down), so every live loop is woken on each grpc event, and an event whose call belonged to
another loop is handed over with ``call_soon_threadsafe``. With a loop per client, closed with
the client, a call's completion arriving after its loop closed (a fetch cancelled at close, say)
made a live loop log "Exception in callback PollerCompletionQueue._handle_events ...
RuntimeError: Event loop is closed" (grpc/grpc#25364). A loop that is never closed cannot be
the target of that error, and one loop is one wake-up per event.

What is a client's own: each client holds a `LoopThread` handle. The coroutines it runs on the
loop run in a context naming the handle; tasks inherit their creator's context, and the loop's
task factory files every task created under a handle with that handle (grpc's own call tasks
included). Closing a handle cancels its leftover tasks only; the loop and everyone else's tasks
run on. Channels are the client's to close (its core's close does; `stop` takes a fallback).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import logging
import os
import threading
from typing import Any, Awaitable, Callable, Coroutine, TypeVar

T = TypeVar("T")

log = logging.getLogger(__name__)

# A closing client waits this long for its cancelled tasks to finish, per round of cancelling
# (a task's cleanup may start another). A task that outlives it is logged and left alone.
_CANCEL_WAIT_S = 10.0
_CANCEL_ROUNDS = 3

_OWNER: contextvars.ContextVar[LoopThread | None] = contextvars.ContextVar(
    "tidelog_loop_owner", default=None
)


def _owned_task_factory(
    loop: asyncio.AbstractEventLoop, coro: Any, *, context: contextvars.Context | None = None
) -> asyncio.Task[Any]:
    task: asyncio.Task[Any] = asyncio.Task(coro, loop=loop, context=context)
    owner = _OWNER.get() if context is None else context.get(_OWNER)
    if owner is not None:
        owner._adopt(task)
    return task


def _new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop's loop when it is installed (the node uses it too): a producer's I/O thread spends
    a fifth less CPU per record in the loop's own machinery. Made for this thread only, never
    through the event loop policy, which is the application's."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


class _SharedLoop:
    """The loop and its thread. Not stopped, not closed: daemon, it ends with the process."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.loop = _new_event_loop()
        self.loop.set_task_factory(_owned_task_factory)  # type: ignore[arg-type]
        started = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(started,), name="tidelog-io", daemon=True)
        self.thread.start()
        started.wait()

    def _run(self, started: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(started.set)
        self.loop.run_forever()


class _ProcessLoop:
    """Makes the shared loop on first use, and again in a forked child: only the forking thread
    survives a fork, so the child's copy of the parent's loop has no thread to run it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._shared: _SharedLoop | None = None

    def get(self) -> _SharedLoop:
        shared = self._shared
        if shared is not None and shared.pid == os.getpid():
            return shared
        with self._lock:
            if self._shared is None or self._shared.pid != os.getpid():
                self._shared = _SharedLoop()
            return self._shared

    def after_fork_in_child(self) -> None:
        # The lock may have been held, at the fork, by a thread the child does not have.
        self._lock = threading.Lock()


# Module-level state on purpose (the one exception to the house rule): grpc's poller is
# per process, so the loop it is bound to has to be per process too.
_PROCESS_LOOP = _ProcessLoop()
os.register_at_fork(after_in_child=_PROCESS_LOOP.after_fork_in_child)


class LoopThread:
    """One client's handle on the process's shared loop thread (``loop``, ``thread``).

    ``run`` and ``submit`` run coroutines there as this client's; ``stop`` cancels what of the
    client's is still running and leaves the loop to the others.
    """

    def __init__(self, name: str = "tidelog-client") -> None:
        shared = _PROCESS_LOOP.get()
        self.name = name
        self.loop = shared.loop
        self.thread = shared.thread
        self._pid = shared.pid
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False  # no new calls
        self._released = False  # cleaned up: tasks started from here on are not filed
        # Callbacks handed to the loop run in this context, so the tasks they start are ours.
        # Only the loop thread enters it, one callback at a time.
        self._context = contextvars.Context()
        self._context.run(_OWNER.set, self)

    def __repr__(self) -> str:
        return f"<LoopThread {self.name} tasks={len(self._tasks)}{' closed' if self._closed else ''}>"

    def _adopt(self, task: asyncio.Task[Any]) -> None:
        # After the cleanup, neither filed nor cancelled: a context captured long ago can start
        # work that is not ours (grpc's poller reader runs in the context of the client that
        # first made a grpc object on the loop), and cancelling another's task would be silent.
        if not self._released:
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _as_owner(self, coro: Coroutine[Any, Any, T]) -> T:
        _OWNER.set(self)  # this task's own context: what it starts is ours
        task = asyncio.current_task()
        assert task is not None
        self._adopt(task)
        return await coro

    def in_loop_thread(self) -> bool:
        return threading.current_thread() is self.thread

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        if self._pid != os.getpid():
            coro.close()
            raise RuntimeError(
                "this tidelog client was created before os.fork() and cannot be used in the child; "
                "create clients in the process that uses them"
            )
        if self._closed:
            coro.close()
            raise RuntimeError("the client is closed")
        return asyncio.run_coroutine_threadsafe(self._as_owner(coro), self.loop)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coro`` on the loop and wait for it from the calling thread."""
        if self.in_loop_thread():
            coro.close()
            # Waiting here would wait for this very thread: every sync client's work, and every
            # callback they run (delivery callbacks, commit_async's), shares it.
            raise RuntimeError(
                "a blocking tidelog client call was made from the clients' shared I/O thread "
                "(e.g. inside a delivery callback or a key/value deserializer); use the Async* "
                "classes there, or call it after poll() returns"
            )
        future = self.submit(coro)
        try:
            return future.result(timeout)
        except (KeyboardInterrupt, concurrent.futures.TimeoutError):
            future.cancel()
            raise

    def call_soon(self, callback: Any, *args: Any) -> None:
        if self.in_loop_thread():
            if _OWNER.get() is self:
                callback(*args)
            else:
                self.loop.call_soon(callback, *args, context=self._context)
        else:
            self.loop.call_soon_threadsafe(callback, *args, context=self._context)

    def stop(self, cleanup: Callable[[], Awaitable[object]] | None = None) -> None:
        """Close this handle: cancel the client's tasks still running and wait for them, then
        await ``cleanup`` (a client passes its channels' close, for when its own close failed
        before it got there). The loop runs on. From the loop thread itself this cannot wait,
        so it only starts the cleanup."""
        if self._closed:
            return
        self._closed = True
        if self._pid != os.getpid():
            return  # the parent's loop: nothing of it runs here
        if self.in_loop_thread():
            self.loop.create_task(self._clean_up(cleanup), context=contextvars.Context())
            return
        asyncio.run_coroutine_threadsafe(self._clean_up(cleanup), self.loop).result()

    async def _clean_up(self, cleanup: Callable[[], Awaitable[object]] | None) -> None:
        current = asyncio.current_task()
        for _ in range(_CANCEL_ROUNDS):
            pending = [t for t in self._tasks if not t.done() and t is not current]
            if not pending:
                break
            for task in pending:
                task.cancel()
            done, stuck = await asyncio.wait(pending, timeout=_CANCEL_WAIT_S)
            for task in done:
                if not task.cancelled():
                    task.exception()  # retrieved: the client is gone, nobody else will
            if stuck:
                log.warning("%s: %d task(s) did not stop when cancelled: %s", self.name, len(stuck),
                            ", ".join(sorted(t.get_name() for t in stuck)))
                break
        if cleanup is not None:
            try:
                await cleanup()
            except Exception:  # noqa: BLE001 - closing regardless; said, not raised
                log.warning("%s: cleanup on close failed", self.name, exc_info=True)
        self._released = True
        self._tasks.clear()


async def wait_event(event: asyncio.Event, timeout: float | None) -> bool:
    """Wait for ``event`` up to ``timeout`` seconds; True if it was set.

    Uses `asyncio.timeout` rather than `asyncio.wait_for`, which on Python 3.11 can swallow a
    cancellation that arrives as the event is set, leaving a task that will not stop.
    """
    if event.is_set():
        return True
    if timeout is None:
        await event.wait()
        return True
    if timeout <= 0:
        return False
    try:
        async with asyncio.timeout(timeout):
            await event.wait()
        return True
    except TimeoutError:
        return False
