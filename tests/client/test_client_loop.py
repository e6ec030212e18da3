"""The sync clients' shared I/O loop is uvloop's when it is installed, made for that thread only."""

from __future__ import annotations

import asyncio

import pytest

from tidelog.client._loop import LoopThread


def test_the_io_loop_is_uvloops_and_the_applications_policy_is_left_alone() -> None:
    uvloop = pytest.importorskip("uvloop")
    policy = asyncio.get_event_loop_policy()
    handle = LoopThread("loop-kind")
    try:
        assert isinstance(handle.loop, uvloop.Loop)
        assert handle.run(_running_loop()) is handle.loop
        # A library must not choose the application's loops: its policy is the one it had.
        assert asyncio.get_event_loop_policy() is policy
        loop = asyncio.new_event_loop()
        try:
            assert not isinstance(loop, uvloop.Loop)
        finally:
            loop.close()
    finally:
        handle.stop()


async def _running_loop() -> asyncio.AbstractEventLoop:
    return asyncio.get_running_loop()
