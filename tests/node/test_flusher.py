"""`Flusher`: a node's fsyncs on long-lived threads, results and failures back on the event loop."""

from __future__ import annotations

import asyncio
import threading

import pytest

from tidelog.node.replica import Flusher


def test_results_failures_and_concurrency_reach_the_loop() -> None:
    async def scenario() -> None:
        flusher = Flusher(threads=3)
        loop_thread = threading.get_ident()
        started = threading.Barrier(3, timeout=10)
        seen: list[int] = []

        def flush(value: int) -> int:
            assert threading.get_ident() != loop_thread  # never on the event loop
            started.wait()  # all three run at once: a slow fsync does not hold the others up
            seen.append(value)
            return value

        def broken() -> int:
            raise OSError("disk gone")

        try:
            futures = [flusher.run(lambda v=v: flush(v)) for v in (1, 2, 3)]
            assert await asyncio.wait_for(asyncio.gather(*futures), 10) == [1, 2, 3]
            assert sorted(seen) == [1, 2, 3]
            with pytest.raises(OSError, match="disk gone"):
                await asyncio.wait_for(flusher.run(broken), 10)
            # Many completions, however they interleave with the loop's wake-ups, all arrive.
            many = [flusher.run(lambda v=v: v) for v in range(200)]
            assert await asyncio.wait_for(asyncio.gather(*many), 10) == list(range(200))
        finally:
            flusher.close()

    asyncio.run(scenario())
