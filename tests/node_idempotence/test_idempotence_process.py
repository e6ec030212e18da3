"""Issue 7 against real node processes: producer ids (InitProducerId) and the partition leader's
idempotence checks (DESIGN.md §8)."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
from support.nodes import LocalCluster, produce_following_leader
from tidelog.client import Producer
from tidelog.client.producer import AsyncProducer
from tidelog.proto import api_pb2, api_pb2_grpc
from tidelog.proto import records as codec
from tidelog.proto.common_pb2 import ErrorCode
from tidelog.proto.errors import TidelogError

DEADLINE_S = 60.0


def _init_producer_id(address: str) -> api_pb2.InitProducerIdResponse:
    deadline = time.monotonic() + DEADLINE_S
    with grpc.insecure_channel(address) as channel:
        while True:
            try:
                answer = api_pb2_grpc.BrokerStub(channel).InitProducerId(api_pb2.InitProducerIdRequest(), timeout=15)
            except grpc.RpcError:
                answer = None
            if answer is not None and answer.error == ErrorCode.NONE:
                return answer
            assert time.monotonic() < deadline, answer
            time.sleep(0.1)


def test_producer_ids_are_unique_across_nodes_and_restarts(cluster3: LocalCluster) -> None:
    seen: list[int] = []
    for _ in range(3):
        for node in cluster3.nodes:
            answer = _init_producer_id(node.address)
            assert answer.producer_epoch == 0
            seen.append(answer.producer_id)
    assert len(set(seen)) == len(seen)
    assert all(pid >= 0 for pid in seen)
    cluster3.stop_all()
    for node in cluster3.nodes:
        node.start(wait=False)
    cluster3.wait_ready()
    after = [_init_producer_id(node.address).producer_id for node in cluster3.nodes]
    assert len(set(seen + after)) == len(seen) + len(after)


def _create(address: str, topic: str, replication_factor: int) -> None:
    with grpc.insecure_channel(address) as channel:
        response = api_pb2_grpc.AdminStub(channel).CreateTopics(api_pb2.CreateTopicsRequest(topics=[
            api_pb2.NewTopic(name=topic, num_partitions=1, replication_factor=replication_factor)]), timeout=60)
        assert response.topics[0].error == ErrorCode.NONE, response


def _batch(producer_id: int, epoch: int, sequence: int, *values: bytes) -> bytes:
    return codec.encode_batch([codec.Record(i, 1_700_000_000_000 + i, None, v) for i, v in enumerate(values)],
                              producer_id=producer_id, producer_epoch=epoch, base_sequence=sequence)


def _produce(cluster: LocalCluster, topic: str, records: bytes) -> api_pb2.ProducePartitionResult:
    """acks=all to the partition leader, following leader hints; retries only 'no leader yet'."""
    return produce_following_leader(cluster, topic, records, deadline_s=DEADLINE_S)


def _read_all(cluster: LocalCluster, topic: str, partition: int = 0) -> list[codec.Record]:
    """Every committed record, from whichever node leads the partition."""
    deadline = time.monotonic() + DEADLINE_S
    while True:
        for node in cluster.running_nodes():
            with grpc.insecure_channel(node.address) as channel:
                stub = api_pb2_grpc.BrokerStub(channel)
                out: list[codec.Record] = []
                offset = 0
                while True:
                    result = stub.Fetch(api_pb2.FetchRequest(max_wait_ms=0, max_bytes=1 << 20, partitions=[
                        api_pb2.FetchPartition(topic=topic, partition=partition, fetch_offset=offset,
                                               current_leader_epoch=-1)]), timeout=30).partitions[0]
                    if result.error != ErrorCode.NONE:
                        break
                    records = [r for r in codec.decode_records(result.records) if r.offset >= offset]
                    if not records:
                        return out
                    out.extend(records)
                    offset = records[-1].offset + 1
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_leader_answers_retries_once_rejects_gaps_and_fences_old_epochs(cluster3: LocalCluster) -> None:
    _create(cluster3.nodes[0].address, "idem", 3)
    pid = _init_producer_id(cluster3.nodes[0].address).producer_id
    first = _produce(cluster3, "idem", _batch(pid, 0, 0, b"a", b"b"))
    assert first.error == ErrorCode.NONE, first
    retry = _produce(cluster3, "idem", _batch(pid, 0, 0, b"a", b"b"))
    assert (retry.error, retry.base_offset) == (ErrorCode.NONE, first.base_offset), retry
    gap = _produce(cluster3, "idem", _batch(pid, 0, 5, b"x"))
    assert gap.error == ErrorCode.OUT_OF_ORDER_SEQUENCE_NUMBER, gap
    unknown = _produce(cluster3, "idem", _batch(pid + 1, 0, 3, b"x"))
    assert unknown.error == ErrorCode.UNKNOWN_PRODUCER_ID, unknown
    bumped = _produce(cluster3, "idem", _batch(pid, 1, 0, b"c"))
    assert bumped.error == ErrorCode.NONE, bumped
    fenced = _produce(cluster3, "idem", _batch(pid, 0, 2, b"zombie"))
    assert fenced.error == ErrorCode.INVALID_PRODUCER_EPOCH, fenced
    assert [r.value for r in _read_all(cluster3, "idem")] == [b"a", b"b", b"c"]

    # Full-cluster restart: the state comes back (snapshot on clean close, then the log tail).
    cluster3.stop_all()
    for node in cluster3.nodes:
        node.start(wait=False)
    cluster3.wait_ready()
    again = _produce(cluster3, "idem", _batch(pid, 1, 0, b"c"))
    assert (again.error, again.base_offset) == (ErrorCode.NONE, bumped.base_offset), again
    nxt = _produce(cluster3, "idem", _batch(pid, 1, 1, b"d"))
    assert nxt.error == ErrorCode.NONE, nxt
    assert _produce(cluster3, "idem", _batch(pid, 1, 3, b"gap")).error == ErrorCode.OUT_OF_ORDER_SEQUENCE_NUMBER
    assert [r.value for r in _read_all(cluster3, "idem")] == [b"a", b"b", b"c", b"d"]

    # The new leader after a SIGKILL of the old one built the same state as a follower.
    cluster3.node(nxt.leader.leader_id).kill()
    retried = _produce(cluster3, "idem", _batch(pid, 1, 1, b"d"))
    assert (retried.error, retried.base_offset) == (ErrorCode.NONE, nxt.base_offset), retried
    assert retried.leader.leader_id != nxt.leader.leader_id
    assert _produce(cluster3, "idem", _batch(pid, 1, 2, b"e")).error == ErrorCode.NONE
    assert [r.value for r in _read_all(cluster3, "idem")] == [b"a", b"b", b"c", b"d", b"e"]


def test_state_survives_sigkill_of_every_node(cluster: LocalCluster) -> None:
    # No clean-close snapshot: the state is rebuilt from the log alone.
    _create(cluster.nodes[0].address, "crash", 1)
    pid = _init_producer_id(cluster.nodes[0].address).producer_id
    first = _produce(cluster, "crash", _batch(pid, 0, 0, b"a"))
    assert first.error == ErrorCode.NONE, first
    cluster.nodes[0].kill()
    cluster.nodes[0].start()
    retry = _produce(cluster, "crash", _batch(pid, 0, 0, b"a"))
    assert (retry.error, retry.base_offset) == (ErrorCode.NONE, first.base_offset), retry
    assert _produce(cluster, "crash", _batch(pid, 0, 2, b"c")).error == ErrorCode.OUT_OF_ORDER_SEQUENCE_NUMBER
    assert [r.value for r in _read_all(cluster, "crash")] == [b"a"]


def test_a_producer_retrying_across_sigkill_of_the_leader_writes_each_record_once_in_order(
        cluster3: LocalCluster) -> None:
    _create(cluster3.nodes[0].address, "killed", 3)
    _create(cluster3.nodes[0].address, "killed2", 3)
    topics = ["killed", "killed2"]
    sent: dict[str, list[bytes]] = {t: [] for t in topics}
    acknowledged: dict[str, set[bytes]] = {t: set() for t in topics}
    stop = threading.Event()
    errors: list[TidelogError] = []

    def produce() -> None:
        with Producer(cluster3.bootstrap, linger_ms=2, retry_backoff_ms=20, request_timeout_ms=3000) as producer:
            i = 0
            while not stop.is_set():
                futures = []
                for _ in range(20):
                    topic = topics[i % 2]
                    value = b"v%06d" % i
                    sent[topic].append(value)
                    futures.append((topic, value, producer.send(topic, value)))
                    i += 1
                for topic, value, future in futures:
                    try:
                        future.result(60)
                        acknowledged[topic].add(value)
                    except TidelogError as exc:  # an unacknowledged record may be absent
                        errors.append(exc)

    thread = threading.Thread(target=produce)
    thread.start()
    try:
        deadline = time.monotonic() + DEADLINE_S
        while len(acknowledged["killed"]) < 200:
            assert time.monotonic() < deadline and thread.is_alive()
            time.sleep(0.05)
        leader = _produce(cluster3, "killed", codec.encode_batch([codec.Record(0, 0, None, b"probe")])).leader
        victim = cluster3.node(leader.leader_id)
        victim.kill()
        before = len(acknowledged["killed"])
        while len(acknowledged["killed"]) < before + 300:
            assert time.monotonic() < deadline and thread.is_alive()
            time.sleep(0.05)
        victim.start()
        before = len(acknowledged["killed"])
        while len(acknowledged["killed"]) < before + 200:
            assert time.monotonic() < deadline and thread.is_alive()
            time.sleep(0.05)
    finally:
        stop.set()
        thread.join(120)
    for topic in topics:
        values = [r.value for r in _read_all(cluster3, topic) if r.value != b"probe"]
        assert len(values) == len(set(values)), f"{topic}: duplicates"
        assert acknowledged[topic] <= set(values), f"{topic}: acknowledged records missing"
        order = {v: i for i, v in enumerate(sent[topic])}
        positions = [order[v] for v in values]
        assert positions == sorted(positions), f"{topic}: reordered"


def test_explicit_idempotence_with_acks_0_or_1_is_a_clear_error() -> None:
    for acks in (0, 1, "1"):
        with pytest.raises(ValueError, match="enable_idempotence=True requires acks='all'"):
            AsyncProducer("127.0.0.1:1", acks=acks, enable_idempotence=True)
        assert not AsyncProducer("127.0.0.1:1", acks=acks).idempotent  # the default steps aside
    assert AsyncProducer("127.0.0.1:1").idempotent
    assert not AsyncProducer("127.0.0.1:1", enable_idempotence=False).idempotent
