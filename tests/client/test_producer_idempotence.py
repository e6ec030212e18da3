"""The idempotent producer's pipelining (up to 5 batches in flight per partition) and its order
across retries (DESIGN.md §8), against an in-process broker that applies the node's own
producer-state rules (`tidelog.node.producer_state`), so duplicates and sequence gaps are
answered exactly as the real leader answers them.

Faults are scripted per batch, by the batch's first record value (a fault of one batch is the
answer to its whole run, which is one partition entry of a request): ``"lost"`` stores the batch and
then answers REQUEST_TIMED_OUT (a response lost on the way back); an `ErrorCode` answers that
error without storing anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import defaultdict, deque
from typing import Callable, Iterator, TypeVar

import grpc
import pytest

from tidelog.client import Producer, TidelogError
from tidelog.client._loop import LoopThread
from tidelog.client.producer import AsyncProducer
from tidelog.node.producer_state import ProducerStateManager, Verdict
from tidelog.proto import api_pb2, api_pb2_grpc
from tidelog.proto import records as codec
from tidelog.proto.common_pb2 import ErrorCode
from tidelog.proto.errors import is_retriable

TOPIC = "t"


class IdempotentBroker(api_pb2_grpc.BrokerServicer):
    """One node leading every partition of TOPIC, checking sequences as the node's leader does."""

    def __init__(self, partitions: int = 1) -> None:
        self.states = [ProducerStateManager(partition=f"{TOPIC}-{i}") for i in range(partitions)]
        self.logs: list[list[codec.Record]] = [[] for _ in range(partitions)]
        self.stored: list[list[tuple[int, int]]] = [[] for _ in range(partitions)]  # (pid, seq)
        self.faults: dict[bytes, deque[object]] = defaultdict(deque)
        # (first value, error) of every batch answered, in order
        self.answers: list[tuple[bytes, int]] = []
        self.gate: asyncio.Event | None = None  # set: requests are answered; clear: they wait
        self.in_flight = [0] * partitions
        self.max_in_flight = [0] * partitions
        self.next_producer_id = 1000
        self.port = 0

    async def InitProducerId(self, request, context):
        self.next_producer_id += 1
        return api_pb2.InitProducerIdResponse(producer_id=self.next_producer_id, producer_epoch=0)

    async def Metadata(self, request, context):
        return api_pb2.MetadataResponse(
            cluster_id="fake", controller_id=1,
            nodes=[api_pb2.NodeInfo(node_id=1, host="127.0.0.1", port=self.port, alive=True)],
            topics=[api_pb2.TopicMetadata(name=TOPIC, partitions=[
                api_pb2.PartitionMetadata(partition=i, leader_id=1, leader_epoch=1, replicas=[1])
                for i in range(len(self.states))])])

    async def Produce(self, request, context):
        counts = [(data.partition, len(codec.scan_batches(data.records))) for data in request.partitions]
        for partition, count in counts:
            self.in_flight[partition] += count
            self.max_in_flight[partition] = max(self.max_in_flight[partition], self.in_flight[partition])
        try:
            assert self.gate is not None
            await self.gate.wait()
        finally:
            for partition, count in counts:
                self.in_flight[partition] -= count
        results = []
        for data in request.partitions:
            p = data.partition
            result = api_pb2.ProducePartitionResult(topic=TOPIC, partition=p, base_offset=-1,
                                                    log_append_time_ms=-1)
            results.append(result)
            # A run of batches travels as one entry: a fault of any of them is the entry's.
            firsts = [next(batch.records()).value or b"" for batch in codec.decode_batches(data.records)]
            fault = next((self.faults[v].popleft() for v in firsts if self.faults[v]), None)
            buf = bytearray(data.records)
            headers = codec.scan_batches(buf)
            verdict = self.states[p].check(headers, 0)
            # A definite refusal of batches already stored is not what a broker answers (it
            # answers their retry as a duplicate), so such a script entry is skipped.
            if isinstance(fault, int) and (is_retriable(fault) or verdict.verdict is not Verdict.DUPLICATE):
                result.error = fault
            else:
                if verdict.verdict is Verdict.REJECT:
                    result.error = verdict.error
                    result.error_message = verdict.message
                elif verdict.verdict is Verdict.DUPLICATE:
                    result.base_offset = verdict.base_offset
                else:
                    base = len(self.logs[p])
                    codec.stamp_batches(buf, base, 1)
                    self.states[p].update(headers, 0, first_offset=base)
                    self.logs[p].extend(codec.decode_records(bytes(buf)))
                    self.stored[p].extend((h.producer_id, h.base_sequence) for h in headers)
                    result.base_offset = base
                if fault == "lost":
                    result.error = ErrorCode.REQUEST_TIMED_OUT
                    result.base_offset = -1
            self.answers.extend((value, result.error) for value in firsts)
        return api_pb2.ProduceResponse(partitions=results)

    def values(self, partition: int = 0) -> list[bytes | None]:
        return [r.value for r in self.logs[partition]]


B = TypeVar("B", bound=IdempotentBroker)


@contextlib.contextmanager
def serving(make: Callable[[], B], name: str) -> Iterator[tuple[B, LoopThread]]:
    """A fake broker made by ``make`` and served on loopback from its own loop thread (made on
    that loop, so its events belong to it); stopped on exit."""
    thread = LoopThread(name)
    servers: list[grpc.aio.Server] = []

    async def start() -> B:
        fake = make()
        server = grpc.aio.server()
        servers.append(server)
        fake.gate = asyncio.Event()
        fake.gate.set()
        api_pb2_grpc.add_BrokerServicer_to_server(fake, server)
        fake.port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return fake

    fake = thread.run(start())
    try:
        yield fake, thread
    finally:
        thread.run(servers[0].stop(None))
        thread.stop()


@pytest.fixture
def broker() -> Iterator[tuple[IdempotentBroker, LoopThread]]:
    with serving(IdempotentBroker, "idempotent-broker") as served:
        yield served


def _values(n: int) -> list[bytes]:
    # 100-byte values with batch_size=200: one record per batch, so batches are easy to count.
    return [b"v%03d" % i + bytes(96) for i in range(n)]


def _producer(fake: IdempotentBroker, **options: object) -> Producer:
    # max_request_size=300: one batch per request, so each batch is its own run in flight.
    defaults: dict[str, object] = dict(batch_size=200, linger_ms=0, retry_backoff_ms=5, compression="none",
                                       request_timeout_ms=5000, max_request_size=300)
    defaults.update(options)
    return Producer(f"127.0.0.1:{fake.port}", **defaults)


def _wait_until(condition, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def _hold(fake: IdempotentBroker, thread: LoopThread) -> None:
    thread.call_soon(fake.gate.clear)  # type: ignore[union-attr]


def _release(fake: IdempotentBroker, thread: LoopThread) -> None:
    thread.call_soon(fake.gate.set)  # type: ignore[union-attr]


def test_up_to_five_batches_of_a_partition_are_in_flight_and_land_in_order(broker) -> None:
    fake, thread = broker
    values = _values(40)
    # Runs of several batches per request count batch by batch.
    with _producer(fake, max_request_size=1 << 20) as producer:
        producer.send(TOPIC, b"warm-up").result(20)  # the producer id is known
        _hold(fake, thread)
        futures = [producer.send(TOPIC, v) for v in values]
        _wait_until(lambda: fake.in_flight[0] == 5)
        time.sleep(0.2)  # a sixth batch would be sent by now if the limit allowed it
        assert fake.in_flight[0] == 5
        _release(fake, thread)
        offsets = [f.result(20).offset for f in futures]
    assert fake.max_in_flight[0] == 5
    assert fake.values() == [b"warm-up", *values]
    assert offsets == list(range(1, 41))


def test_max_in_flight_requests_bounds_the_batches_of_a_partition(broker) -> None:
    fake, thread = broker
    with _producer(fake, max_in_flight_requests_per_connection=2) as producer:
        producer.send(TOPIC, b"warm-up").result(20)
        _hold(fake, thread)
        futures = [producer.send(TOPIC, v) for v in _values(10)]
        _wait_until(lambda: fake.in_flight[0] == 2)
        time.sleep(0.2)
        _release(fake, thread)
        [f.result(20) for f in futures]
    assert fake.max_in_flight[0] == 2


def test_a_lost_response_is_answered_as_a_duplicate_with_its_original_offset(broker) -> None:
    fake, thread = broker
    values = _values(12)
    fake.faults[values[3]].append("lost")
    with _producer(fake) as producer:
        producer.send(TOPIC, b"warm-up").result(20)
        _hold(fake, thread)
        futures = [producer.send(TOPIC, v) for v in values]
        _wait_until(lambda: fake.in_flight[0] == 5)
        _release(fake, thread)
        offsets = [f.result(20).offset for f in futures]
    assert fake.values() == [b"warm-up", *values]  # stored once, in order
    assert offsets == list(range(1, 13))  # the retried one got its original offset back
    assert (values[3], ErrorCode.REQUEST_TIMED_OUT) in fake.answers


def test_batches_behind_a_retried_one_are_resent_in_order_and_the_sequence_error_is_not_surfaced(
        broker) -> None:
    fake, thread = broker
    values = _values(12)
    fake.faults[values[2]].extend([ErrorCode.NOT_ENOUGH_REPLICAS, ErrorCode.NOT_ENOUGH_REPLICAS])
    with _producer(fake) as producer:
        producer.send(TOPIC, b"warm-up").result(20)
        _hold(fake, thread)
        futures = [producer.send(TOPIC, v) for v in values]
        _wait_until(lambda: fake.in_flight[0] == 5)
        _release(fake, thread)
        offsets = [f.result(20).offset for f in futures]
    assert fake.values() == [b"warm-up", *values]
    assert offsets == list(range(1, 13))
    # The batches sent after the failed one overtook it and were refused, then resent.
    assert (values[3], ErrorCode.OUT_OF_ORDER_SEQUENCE_NUMBER) in fake.answers
    pids = {pid for pid, _ in fake.stored[0]}
    assert len(pids) == 1  # one producer id throughout: nothing failed for good
    assert [seq for _, seq in fake.stored[0]] == list(range(13))


def test_a_batch_failed_for_good_fails_alone_and_later_ones_are_renumbered_under_a_new_id(broker) -> None:
    fake, thread = broker
    values = _values(12)
    fake.faults[values[2]].append(ErrorCode.MESSAGE_TOO_LARGE)
    with _producer(fake) as producer:
        producer.send(TOPIC, b"warm-up").result(20)
        _hold(fake, thread)
        futures = [producer.send(TOPIC, v) for v in values]
        _wait_until(lambda: fake.in_flight[0] == 5)
        _release(fake, thread)
        outcomes = []
        for f in futures:
            try:
                outcomes.append(f.result(20).offset)
            except TidelogError as exc:
                outcomes.append(exc.code)
    assert outcomes == [1, 2, ErrorCode.MESSAGE_TOO_LARGE, *range(3, 12)]
    assert fake.values() == [b"warm-up", *values[:2], *values[3:]]
    first_pid = fake.stored[0][0][0]
    # The later batches were refused under the old id (their predecessor is missing), then
    # numbered again from 0 under a new one: no gap in either id's sequence.
    assert fake.stored[0][:3] == [(first_pid, 0), (first_pid, 1), (first_pid, 2)]
    second_pid = fake.stored[0][3][0]
    assert second_pid != first_pid
    assert fake.stored[0][3:] == [(second_pid, seq) for seq in range(9)]


def test_idempotence_with_more_than_five_in_flight_is_a_configuration_error() -> None:
    with pytest.raises(ValueError, match="max_in_flight_requests_per_connection <= 5"):
        AsyncProducer("127.0.0.1:1", enable_idempotence=True, max_in_flight_requests_per_connection=6)
    # As in Kafka, the default idempotence steps aside for an explicit larger value.
    assert not AsyncProducer("127.0.0.1:1", max_in_flight_requests_per_connection=6).idempotent
    assert AsyncProducer("127.0.0.1:1", max_in_flight_requests_per_connection=5).idempotent
    with pytest.raises(ValueError, match="at least 1"):
        AsyncProducer("127.0.0.1:1", max_in_flight_requests_per_connection=0)


@pytest.mark.parametrize(("seed", "max_request_size"), [(1, 300), (2, 1 << 20), (3, 300)])
def test_random_faults_leave_each_acknowledged_record_once_in_order(broker, seed: int,
                                                                     max_request_size: int) -> None:
    """Lost responses, retriable and definite errors on random batches, 5 in flight (one batch
    per request, or runs of several): whatever was acknowledged is stored once at its offset, in
    send order; a definite failure is absent."""
    import random

    fake, _ = broker
    rng = random.Random(seed)
    values = _values(300)
    retriable: list[object] = ["lost", ErrorCode.NOT_ENOUGH_REPLICAS, ErrorCode.REQUEST_TIMED_OUT]
    for value in rng.sample(values, 40):
        if rng.random() < 0.2:
            fake.faults[value].append(ErrorCode.MESSAGE_TOO_LARGE)
        else:
            fake.faults[value].extend(rng.choice(retriable) for _ in range(rng.randint(1, 3)))
    with _producer(fake, max_request_size=max_request_size) as producer:
        futures = [producer.send(TOPIC, v) for v in values]
        producer.flush(60)
    stored = fake.values()
    assert len(stored) == len(set(stored)), f"seed {seed}: a record stored twice"
    assert stored == [v for v in values if v in set(stored)], f"seed {seed}: reordered"
    acknowledged = []
    for value, future in zip(values, futures):
        error = future.exception(0)
        if error is None:
            offset = future.result(0).offset
            assert stored[offset] == value, f"seed {seed}: wrong offset for {value[:4]!r}"
            acknowledged.append(value)
        else:
            assert isinstance(error, TidelogError) and error.code == ErrorCode.MESSAGE_TOO_LARGE, error
            assert value not in stored, f"seed {seed}: a definitely failed record was stored"
    assert acknowledged == stored  # nothing stored without an acknowledgement: no timeout expired
    assert len(acknowledged) > 200
