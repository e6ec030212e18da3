"""Issue 4's targets, measured against real local nodes (marker ``bench``; not in the default run).

    .venv/bin/python -m pytest -m bench tests/node_process/test_bench.py -s

Each test prints one figure line; none asserts a speed (DESIGN.md §10). They talk raw gRPC so
they measure the server, with the client library's batching left out: one client process
keeps several produce requests in flight across partitions.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from pathlib import Path

import grpc
import pytest
from support.nodes import LocalCluster, start_cluster
from tidelog.proto import api_pb2, api_pb2_grpc
from tidelog.proto import records as codec
from tidelog.proto.common_pb2 import ErrorCode

pytestmark = pytest.mark.bench


def _lz4_batch(records: int, record_bytes: int) -> bytes:
    # Distinct hex records: lz4 halves them, about what it does to text or JSON.
    now = int(time.time() * 1000)
    return codec.encode_batch([codec.Record(i, now, None, os.urandom(record_bytes // 2).hex().encode())
                               for i in range(records)], compression="lz4")


async def _leaders(address: str, topic: str) -> dict[int, int]:
    async with grpc.aio.insecure_channel(address) as channel:
        deadline = time.monotonic() + 30
        while True:
            metadata = await api_pb2_grpc.BrokerStub(channel).Metadata(api_pb2.MetadataRequest(topics=[topic]))
            leaders = {p.partition: p.leader_id for p in metadata.topics[0].partitions}
            if all(v >= 0 for v in leaders.values()):
                return leaders
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _create(cluster: LocalCluster, topic: str, partitions: int, replication_factor: int = 3) -> None:
    with grpc.insecure_channel(cluster.nodes[0].address) as channel:
        response = api_pb2_grpc.AdminStub(channel).CreateTopics(api_pb2.CreateTopicsRequest(topics=[
            api_pb2.NewTopic(name=topic, num_partitions=partitions, replication_factor=replication_factor)]),
            timeout=120)
        assert response.topics[0].error == ErrorCode.NONE, response


async def _produce_loop(cluster: LocalCluster, topic: str, partitions: int, batch: bytes, seconds: float,
                        in_flight: int, rate_per_s: float | None = None) -> tuple[int, list[float]]:
    leaders = await _leaders(cluster.nodes[0].address, topic)
    options = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
    channels = {n.node_id: grpc.aio.insecure_channel(n.address, options=options) for n in cluster.nodes}
    stubs = {node_id: api_pb2_grpc.BrokerStub(ch) for node_id, ch in channels.items()}
    latencies: list[float] = []
    sent = 0
    deadline = time.monotonic() + seconds
    interval = in_flight / rate_per_s if rate_per_s else 0.0

    async def worker(index: int) -> None:
        nonlocal sent
        partition = index % partitions
        next_at = time.monotonic()
        while time.monotonic() < deadline:
            if interval:
                next_at += interval
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            started = time.monotonic()
            response = await stubs[leaders[partition]].Produce(api_pb2.ProduceRequest(
                acks=-1, timeout_ms=10000, partitions=[api_pb2.ProducePartitionData(
                    topic=topic, partition=partition, records=batch)]))
            assert response.partitions[0].error == ErrorCode.NONE, response
            latencies.append(time.monotonic() - started)
            sent += 1

    try:
        await asyncio.gather(*(worker(i) for i in range(in_flight)))
    finally:
        for channel in channels.values():
            await channel.close()
    return sent, latencies


# Both ends of the target's batch range (256 KiB-1 MiB of 1 KiB records); in flight: 3 MiB of
# payload, so the client keeps every partition's leader busy either way.
@pytest.mark.parametrize("batch_kib,in_flight", [(256, 12), (1024, 6)], ids=["256KiB", "1MiB"])
def test_produce_throughput_rf3_acks_all(tmp_path: Path, batch_kib: int, in_flight: int) -> None:
    cluster = start_cluster(tmp_path, nodes=3)
    try:
        _create(cluster, "bench", partitions=6)
        batch = _lz4_batch(batch_kib, 1024)  # batch_kib 1 KiB records, lz4
        # CPU per MB as well: on a shared machine it moves less than MB/s does, and with every
        # process on 2 cores it is what bounds the throughput.
        nodes_before = [_cpu_seconds(n.pid) for n in cluster.nodes]
        generator_before = time.process_time()
        started = time.monotonic()
        sent, _ = asyncio.run(_produce_loop(cluster, "bench", 6, batch, 10.0, in_flight=in_flight))
        elapsed = time.monotonic() - started
        nodes_cpu = sum(_cpu_seconds(n.pid) - b for n, b in zip(cluster.nodes, nodes_before))
        generator_cpu = time.process_time() - generator_before
        mb = sent * batch_kib * 1024 / 1e6
        print(f"\nthroughput: {mb / elapsed:.1f} MB/s of record payload ({sent * len(batch) / 1e6 / elapsed:.1f} "
              f"MB/s on the wire), {sent} x {batch_kib} KiB lz4 batches, RF 3, acks=all, flush=always; CPU per MB of "
              f"payload: {1000 * nodes_cpu / mb:.1f} ms in the 3 nodes, {1000 * generator_cpu / mb:.1f} ms in the "
              f"load generator")
    finally:
        cluster.stop_all()


def test_produce_latency_at_2000_records_per_second(tmp_path: Path) -> None:
    cluster = start_cluster(tmp_path, nodes=3)
    try:
        _create(cluster, "latency", partitions=3)
        batch = _lz4_batch(10, 1024)  # 200 requests/s x 10 records
        sent, latencies = asyncio.run(_produce_loop(cluster, "latency", 3, batch, 10.0, in_flight=4,
                                                    rate_per_s=200))
        latencies.sort()
        p50 = latencies[len(latencies) // 2] * 1000
        p99 = latencies[int(len(latencies) * 0.99) - 1] * 1000
        print(f"\nlatency at {sent * 10 / 10.0:.0f} records/s: p50 {p50:.1f} ms, p99 {p99:.1f} ms (RF 3, acks=all)")
    finally:
        cluster.stop_all()


def test_failover_time_after_leader_sigkill(tmp_path: Path) -> None:
    from test_replicated import Router

    cluster = start_cluster(tmp_path, nodes=3)
    router = Router(cluster)
    try:
        router.create("failover")
        times = []
        for _ in range(10):
            assert router.produce("failover", 0, b"before") is not None
            leader = router.leader("failover", 0)
            assert leader is not None
            killed_at = time.monotonic()
            cluster.node(leader).kill()
            assert router.produce("failover", 0, b"after", deadline_s=30) is not None
            times.append(time.monotonic() - killed_at)
            cluster.node(leader).start()
            cluster.wait_ready()
        print(f"\nleader SIGKILL -> next acknowledged produce: median {statistics.median(times):.2f} s, "
              f"max {max(times):.2f} s over {len(times)} kills")
    finally:
        router.close()
        cluster.stop_all()


def test_idle_cpu_with_1000_partitions(tmp_path: Path) -> None:
    cluster = start_cluster(tmp_path, nodes=3)
    try:
        _create(cluster, "idle", partitions=1000)

        time.sleep(30)  # let the elections of 1000 new groups settle
        before = [_cpu_seconds(n.pid) for n in cluster.nodes]
        started = time.monotonic()
        time.sleep(20)
        elapsed = time.monotonic() - started
        used = [100 * (_cpu_seconds(n.pid) - b) / elapsed for n, b in zip(cluster.nodes, before)]
        print(f"\nidle CPU, 1000 partitions RF 3 on 3 nodes: {', '.join(f'{u:.1f}%' for u in used)} of a core per node")
    finally:
        cluster.stop_all()
