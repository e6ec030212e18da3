"""A sequence error answered after the batch it overtook was acknowledged (brief H19).

Two produce requests of one partition travel on separate gRPC streams, so the node may check a
later batch B before an earlier batch A that was sent first, refuse B (its predecessor is not
there yet), then store A; and B's refusal can reach the producer after A's success, since a
response waits for every partition of its request to commit (acks=all). When B's answer is
handled nothing earlier is outstanding any more, yet B was refused only for having overtaken A.
Failing B for good there lost its records (and its whole batch: 250 records in `tidelog perf`)
and moved the producer to a new id, which is what made a `perf_cli_bench` consume come up
2-3 batches short. The fake below forces that order: B is checked before A, and B's answer is
held until the application has A's acknowledgement.
"""

from __future__ import annotations

import asyncio
from typing import Any, Iterator

import pytest

from tidelog.client import TidelogError
from tidelog.client._loop import LoopThread
from tidelog.proto import api_pb2
from tidelog.proto import records as codec
from tidelog.proto.common_pb2 import ErrorCode

from test_producer_idempotence import TOPIC, IdempotentBroker, _producer, _values, serving

EARLY, LATE = _values(2)


class OvertakingBroker(IdempotentBroker):
    """Checks the batch whose first value is LATE before the one with EARLY, and holds the
    answer to LATE until ``release`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.late_checked = asyncio.Event()
        self.release = asyncio.Event()

    async def Produce(self, request: api_pb2.ProduceRequest, context: Any) -> api_pb2.ProduceResponse:
        firsts = {next(batch.records()).value for data in request.partitions
                  for batch in codec.decode_batches(data.records)}
        if EARLY in firsts and not self.late_checked.is_set():
            await self.late_checked.wait()  # the later batch reaches the check first
        if LATE in firsts and not self.late_checked.is_set():
            response = await super().Produce(request, context)
            self.late_checked.set()
            await self.release.wait()  # its refusal arrives after the earlier batch's success
            return response
        return await super().Produce(request, context)


@pytest.fixture
def overtaking() -> Iterator[tuple[OvertakingBroker, LoopThread]]:
    with serving(OvertakingBroker, "overtaking-broker") as (fake, thread):
        try:
            yield fake, thread
        finally:
            thread.call_soon(fake.release.set)


def test_a_refusal_that_arrives_after_the_overtaken_batch_succeeded_is_retried_not_failed(
        overtaking: tuple[OvertakingBroker, LoopThread]) -> None:
    fake, thread = overtaking
    with _producer(fake) as producer:
        producer.send(TOPIC, b"warm-up").result(20)  # the producer id is known
        first = producer.send(TOPIC, EARLY)
        second = producer.send(TOPIC, LATE)
        assert first.result(20).offset == 1
        thread.call_soon(fake.release.set)
        try:
            outcome: object = second.result(20).offset
        except TidelogError as exc:
            outcome = exc.code
        after = producer.send(TOPIC, b"after").result(20)
    # The refusal was the overtaking's, not a lost predecessor's: the batch is resent and stored.
    assert (LATE, ErrorCode.OUT_OF_ORDER_SEQUENCE_NUMBER) in fake.answers
    assert outcome == 2
    assert after.offset == 3
    assert fake.values() == [b"warm-up", EARLY, LATE, b"after"]
    # One producer id throughout: nothing failed for good.
    assert len({pid for pid, _ in fake.stored[0]}) == 1
    assert [seq for _, seq in fake.stored[0]] == [0, 1, 2, 3]
