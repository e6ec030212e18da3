"""Every sync client of a process runs on one shared, never-closed event loop (client/_loop.py).

grpc.aio binds its process-wide completion-queue poller to each event loop that ever made a
grpc.aio object and keeps scheduling callbacks on it (grpc/grpc#25364), so a process that closed
a loop per client logged "Exception in callback PollerCompletionQueue._handle_events" /
"Event loop is closed" for the rest of its life.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from support.nodes import LocalCluster
from tidelog.client import AdminClient, Consumer, Producer, TopicPartition
from tidelog.client._loop import LoopThread

TP = TopicPartition("t", 0)

# Threads that each create and close clients of every kind in turn, using each a little, as
# the chaos driver's workers do. Under a loop per client, a consumer closed with a fetch parked
# on the node got the fetch's cancellation back from grpc after its loop had closed, and
# another (live) loop, forwarding it, logged "Event loop is closed".
_CHURN = textwrap.dedent(
    """
    import sys, threading, time
    from tidelog.client import AdminClient, Consumer, Producer, TopicPartition

    bootstrap, workers, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    with AdminClient(bootstrap) as admin:
        admin.create_topic("churn", workers)
    failures = []
    loops = set()  # every loop a client ran on
    # A client that lives through the churn, as a long-running application's would.
    steady = Producer(bootstrap, linger_ms=0)

    def work(w):
        try:
            for i in range(rounds):
                steady.send("churn", b"steady", partition=w)
                with AdminClient(bootstrap) as admin:
                    assert "churn" in {t.name for t in admin.list_topics()}
                    loops.add(admin._thread.loop)
                value = b"w%d-%d" % (w, i)
                with Producer(bootstrap, linger_ms=0) as producer:
                    producer.send("churn", value, partition=w).result(30)
                    loops.add(producer._thread.loop)
                with Consumer(bootstrap, auto_offset_reset="earliest", fetch_max_wait_ms=200) as consumer:
                    consumer.assign([TopicPartition("churn", p) for p in range(workers)])
                    loops.add(consumer._thread.loop)
                    seen = set()
                    deadline = time.monotonic() + 30
                    while value not in seen:
                        assert time.monotonic() < deadline, "a record did not arrive"
                        seen.update(r.value for r in consumer.poll(50))
                    for _ in range(10):  # and close with a fetch parked on the node
                        consumer.poll(50)
        except BaseException as exc:
            failures.append(exc)
            raise

    threads = [threading.Thread(target=work, args=(w,)) for w in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    time.sleep(0.5)  # time for grpc to hand over any late event
    steady.close()
    assert not failures, failures
    print("churned", workers * rounds)
    print("loops", len(loops), "closed", sum(loop.is_closed() for loop in loops))
    """
)


def _churn(bootstrap: str, workers: int, rounds: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", _CHURN, bootstrap, str(workers), str(rounds)],
                          capture_output=True, text=True, timeout=240)


def test_a_process_that_creates_and_closes_many_clients_logs_no_closed_loop_errors(
    cluster: LocalCluster,
) -> None:
    done = _churn(cluster.bootstrap, workers=3, rounds=10)  # 30 clients of each kind
    assert done.returncode == 0, done.stderr[-4000:]
    assert "churned 30" in done.stdout
    # Deterministic, where the tracebacks below depend on grpc's timing: no loop was closed.
    assert "loops 1 closed 0" in done.stdout, done.stdout
    assert "Event loop is closed" not in done.stderr, done.stderr[-4000:]
    assert "Exception in callback" not in done.stderr, done.stderr[-4000:]
    assert "Traceback" not in done.stderr, done.stderr[-4000:]


def test_sync_clients_share_one_loop_thread(fake_cluster) -> None:
    fake_cluster.create_topic("t", 1)
    with Producer(fake_cluster.bootstrap, linger_ms=0) as producer, \
            Consumer(fake_cluster.bootstrap, auto_offset_reset="earliest") as consumer:
        assert producer._thread.loop is consumer._thread.loop
        assert producer._thread.thread is consumer._thread.thread
        loop = producer._thread.loop
    assert not loop.is_closed() and loop.is_running()
    with Producer(fake_cluster.bootstrap) as later:
        assert later._thread.loop is loop


def test_closing_one_client_leaves_another_sending_and_consuming(fake_cluster) -> None:
    fake_cluster.create_topic("t", 1)
    stop = threading.Event()
    errors: list[BaseException] = []
    with Producer(fake_cluster.bootstrap, linger_ms=0) as steady:
        sent: list[int] = []

        def keep_sending() -> None:
            try:
                while not stop.is_set():
                    sent.append(steady.send("t", b"x", partition=0).result(30).offset)
            except BaseException as exc:  # noqa: BLE001 - reported by the test thread
                errors.append(exc)

        sender = threading.Thread(target=keep_sending, daemon=True)
        sender.start()
        try:
            # Others come and go, each with requests in flight when it closes.
            for _ in range(5):
                with Producer(fake_cluster.bootstrap, linger_ms=20) as passing:
                    futures = [passing.send("t", b"y", partition=0) for _ in range(20)]
                    before = len(sent)
                with Consumer(fake_cluster.bootstrap, auto_offset_reset="earliest",
                              fetch_max_wait_ms=5000) as reader:
                    reader.assign([TP])
                    reader.poll(10)  # a long-poll fetch is parked when it closes
                assert all(f.result(30).topic == "t" for f in futures)
                deadline = time.monotonic() + 30
                while len(sent) < before + 3 and not errors:  # the steady producer goes on
                    assert time.monotonic() < deadline, "the steady producer stalled"
                    time.sleep(0.01)
            assert not errors, errors
        finally:
            stop.set()
            sender.join(30)
        with Consumer(fake_cluster.bootstrap, auto_offset_reset="earliest") as consumer:
            consumer.assign([TP])
            assert consumer.position(TP) == 0
        steady.flush(30)
    assert not sender.is_alive() and not errors, errors
    assert sent == sorted(sent)


def test_close_cancels_only_the_closing_clients_tasks() -> None:
    mine, theirs = LoopThread("mine"), LoopThread("theirs")
    forever = 3600

    async def start_background(sleep: float) -> object:
        return asyncio.get_running_loop().create_task(asyncio.sleep(sleep))

    my_task = mine.run(start_background(forever))
    their_task = theirs.run(start_background(forever))
    mine.stop()
    assert my_task.cancelled()  # type: ignore[attr-defined]
    assert not their_task.done()  # type: ignore[attr-defined]
    with pytest.raises(RuntimeError, match="closed"):
        mine.run(start_background(0))
    theirs.stop()
    assert their_task.cancelled()  # type: ignore[attr-defined]


def test_close_also_cancels_what_its_cancelled_tasks_start() -> None:
    handle = LoopThread("cleanup")
    started: list[asyncio.Task[None]] = []

    async def stubborn() -> None:
        try:
            await asyncio.sleep(3600)
        finally:  # cleanup that starts more work, as a leave-the-group-on-cancel might
            started.append(asyncio.get_running_loop().create_task(asyncio.sleep(3600)))

    async def start() -> asyncio.Task[None]:
        return asyncio.get_running_loop().create_task(stubborn())

    first = handle.run(start())
    handle.stop()
    assert first.cancelled() and len(started) == 1 and started[0].cancelled()


def test_a_blocking_call_from_the_shared_loop_thread_raises_at_once(fake_cluster) -> None:
    """A callback on the I/O thread that calls any sync client's blocking method (its own or
    another's: they share the thread) gets a RuntimeError instead of a deadlock."""
    fake_cluster.create_topic("t", 1)
    outcomes: list[BaseException | None] = []
    with Producer(fake_cluster.bootstrap, linger_ms=0) as producer, \
            Consumer(fake_cluster.bootstrap, auto_offset_reset="earliest") as consumer:
        def on_done(_: object) -> None:  # runs on the shared I/O thread
            for blocking in (producer.flush, lambda: consumer.position(TP)):
                try:
                    blocking()
                    outcomes.append(None)
                except RuntimeError as exc:
                    outcomes.append(exc)

        future = producer.send("t", b"a", partition=0)
        future.add_done_callback(on_done)
        assert future.result(30).offset == 0
        deadline = time.monotonic() + 30
        while len(outcomes) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        consumer.assign([TP])
        assert consumer.position(TP) == 0  # both still work from an ordinary thread
    assert all(isinstance(o, RuntimeError) and "I/O thread" in str(o) for o in outcomes), outcomes


def test_a_forked_child_gets_its_own_shared_loop() -> None:
    parent = LoopThread("parent")
    try:
        async def thread_name() -> str:
            return threading.current_thread().name

        assert parent.run(thread_name()) == "tidelog-io"
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: only this thread survives the fork
            code = 1
            try:
                child = LoopThread("child")
                ok = child.loop is not parent.loop and child.run(thread_name()) == "tidelog-io"
                try:
                    parent.run(thread_name())
                except RuntimeError as exc:
                    ok = ok and "fork" in str(exc)
                else:
                    ok = False
                code = 0 if ok else 1
                os.write(write, b"ok" if ok else b"bad")
            finally:
                os._exit(code)
        os.close(write)
        _, status = os.waitpid(pid, 0)
        with os.fdopen(read, "rb") as pipe:
            said = pipe.read()
        assert os.waitstatus_to_exitcode(status) == 0 and said == b"ok", said
    finally:
        parent.stop()
