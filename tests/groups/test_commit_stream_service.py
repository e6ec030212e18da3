"""`GroupsService.OffsetCommitStream` driven directly, with the OffsetCommit behind it scripted:
the stream ends once the client has closed its side and every call is answered, even when the
last answer and the end of the requests both come while the previous answers are being written
(the stream once waited forever there)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from tidelog.node.group_service import GroupsService
from tidelog.proto import api_pb2
from tidelog.proto.common_pb2 import ErrorCode


def call(call_id: int) -> api_pb2.OffsetCommitCall:
    return api_pb2.OffsetCommitCall(id=call_id, commit=api_pb2.OffsetCommitRequest(group_id="g"))


def test_the_stream_ends_when_the_last_answer_and_the_close_come_during_a_write() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        gates = {1: loop.create_future(), 2: loop.create_future()}
        service = GroupsService(node=None)  # type: ignore[arg-type]

        async def offset_commit(request: Any, context: Any) -> api_pb2.OffsetCommitResponse:
            return await gates[request.member_epoch]

        service.OffsetCommit = offset_commit  # type: ignore[method-assign]
        closed = asyncio.Event()

        async def requests() -> AsyncIterator[api_pb2.OffsetCommitStreamRequest]:
            first, second = call(1), call(2)
            first.commit.member_epoch, second.commit.member_epoch = 1, 2
            yield api_pb2.OffsetCommitStreamRequest(calls=[first, second])
            await closed.wait()  # then the client closes its side

        answers = service.OffsetCommitStream(requests(), context=None)  # type: ignore[arg-type]
        gates[1].set_result(api_pb2.OffsetCommitResponse(error=ErrorCode.NONE))
        first = await asyncio.wait_for(answers.__anext__(), 5)
        assert [a.id for a in first.answers] == [1]
        # While the stream is "writing" that answer (the generator is suspended at its yield),
        # the last call is answered and the client closes its side.
        gates[2].set_result(api_pb2.OffsetCommitResponse(error=ErrorCode.NONE))
        closed.set()
        for _ in range(10):
            await asyncio.sleep(0)
        second = await asyncio.wait_for(answers.__anext__(), 5)
        assert [a.id for a in second.answers] == [2]
        try:
            extra = await asyncio.wait_for(answers.__anext__(), 5)
        except StopAsyncIteration:
            return
        raise AssertionError(f"an answer nobody asked for: {extra}")

    asyncio.run(scenario())
