"""`CommitStream` (client/connection.py), the client's OffsetCommit transport, against scripted
in-process servers: answers reach their callers whatever their order; a stream that ends or
breaks fails the calls it carried as a unary call would fail (so `GroupCoordinatorClient`
retries them alike) and the next commit opens a new stream; an unanswered commit times out;
a node without the method gets unary calls."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import pytest

from tidelog.client.connection import CommitStream
from tidelog.proto import api_pb2, api_pb2_grpc
from tidelog.proto.common_pb2 import ErrorCode

Behaviour = Callable[[AsyncIterator[api_pb2.OffsetCommitCall]], AsyncIterator[api_pb2.OffsetCommitAnswer]]


def request(offset: int) -> api_pb2.OffsetCommitRequest:
    return api_pb2.OffsetCommitRequest(group_id="g", member_epoch=-1, partitions=[
        api_pb2.OffsetCommitPartition(topic="t", partition=0, offset=offset, leader_epoch=-1)])


def answer(message: api_pb2.OffsetCommitCall) -> api_pb2.OffsetCommitAnswer:
    # The answer's error_message names the offset committed, so a test can tell answers apart.
    return api_pb2.OffsetCommitAnswer(id=message.id, commit=api_pb2.OffsetCommitResponse(
        error=ErrorCode.NONE, error_message=str(message.commit.partitions[0].offset)))


class Scripted(api_pb2_grpc.GroupsServicer):
    def __init__(self, stream: Behaviour | None) -> None:
        self.stream = stream
        self.unary_calls = 0
        self.streams_opened = 0

    async def OffsetCommit(self, request: Any, context: Any) -> api_pb2.OffsetCommitResponse:
        self.unary_calls += 1
        return api_pb2.OffsetCommitResponse(error=ErrorCode.NONE, error_message=str(request.partitions[0].offset))


def run(stream: Behaviour | None, scenario: Callable[[CommitStream, Scripted], Awaitable[None]]) -> Scripted:
    """Serve ``stream`` as OffsetCommitStream (None: the node lacks the method; else it maps
    the calls the client sends to answers, each answer sent in a message of its own) and run
    ``scenario`` with a CommitStream to it."""
    servicer = Scripted(stream)

    async def main() -> None:
        server = grpc.aio.server()
        handlers = {"OffsetCommit": grpc.unary_unary_rpc_method_handler(
            servicer.OffsetCommit, request_deserializer=api_pb2.OffsetCommitRequest.FromString,
            response_serializer=api_pb2.OffsetCommitResponse.SerializeToString)}
        if stream is not None:
            async def handle(requests: Any, context: Any) -> AsyncIterator[Any]:
                servicer.streams_opened += 1

                async def calls() -> AsyncIterator[api_pb2.OffsetCommitCall]:
                    async for request in requests:
                        for call in request.calls:
                            yield call

                async for one in stream(calls()):
                    yield api_pb2.OffsetCommitStreamResponse(answers=[one])
            handlers["OffsetCommitStream"] = grpc.stream_stream_rpc_method_handler(
                handle, request_deserializer=api_pb2.OffsetCommitStreamRequest.FromString,
                response_serializer=api_pb2.OffsetCommitStreamResponse.SerializeToString)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("tidelog.Groups", handlers),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        commits = CommitStream(api_pb2_grpc.GroupsStub(channel))
        try:
            await asyncio.wait_for(scenario(commits, servicer), 30)
        finally:
            await commits.close()
            await channel.close()
            await server.stop(None)

    asyncio.run(main())
    return servicer


def test_answers_in_any_order_reach_their_callers() -> None:
    async def reversed_answers(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
        held = []
        async for message in requests:
            held.append(message)
            if len(held) == 5:
                for m in reversed(held):
                    yield answer(m)
                held.clear()

    async def scenario(commits: CommitStream, servicer: Scripted) -> None:
        results = await asyncio.gather(*(commits.commit(request(i), 10) for i in range(10)))
        assert [r.error_message for r in results] == [str(i) for i in range(10)]
        assert servicer.streams_opened == 1 and servicer.unary_calls == 0

    run(reversed_answers, scenario)


def test_a_stream_that_ends_fails_its_calls_and_the_next_commit_opens_another() -> None:
    async def answer_first_then_end(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
        async for message in requests:
            if message.commit.partitions[0].offset == 1:
                return  # the node went away with this call unanswered
            yield answer(message)

    async def scenario(commits: CommitStream, servicer: Scripted) -> None:
        assert (await commits.commit(request(0), 10)).error_message == "0"
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await commits.commit(request(1), 10)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE  # retriable, as a lost unary call
        assert (await commits.commit(request(2), 10)).error_message == "2"
        assert servicer.streams_opened == 2

    run(answer_first_then_end, scenario)


def test_an_unanswered_commit_times_out_and_a_late_answer_is_dropped() -> None:

    async def answer_late(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
        held = []
        async for message in requests:
            held.append(message)
            if message.commit.partitions[0].offset == 1:
                for m in held:  # offset 0's answer comes after its caller gave up
                    yield answer(m)
                held.clear()

    async def scenario(commits: CommitStream, servicer: Scripted) -> None:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await commits.commit(request(0), 0.2)
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert (await commits.commit(request(1), 10)).error_message == "1"

    run(answer_late, scenario)


def test_a_node_without_the_stream_gets_unary_calls() -> None:
    async def scenario(commits: CommitStream, servicer: Scripted) -> None:
        assert (await commits.commit(request(0), 10)).error_message == "0"
        assert (await commits.commit(request(1), 10)).error_message == "1"
        assert servicer.unary_calls == 2

    run(None, scenario)
