"""A single real node process: produce/fetch, durability across SIGKILL, bad input, long-poll,
restart, graceful shutdown. Talks raw gRPC so it tests the server, not the client library."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from support.nodes import LocalCluster, NodeProcess, NodeStartError, start_cluster
from tidelog.proto import api_pb2, api_pb2_grpc
from tidelog.proto import records as codec
from tidelog.proto.common_pb2 import ErrorCode


class Stubs:
    def __init__(self, address: str) -> None:
        self.channel = grpc.insecure_channel(address)
        self.broker = api_pb2_grpc.BrokerStub(self.channel)
        self.admin = api_pb2_grpc.AdminStub(self.channel)

    def create(self, name: str, partitions: int = 1, **configs: str) -> None:
        response = self.admin.CreateTopics(api_pb2.CreateTopicsRequest(topics=[
            api_pb2.NewTopic(name=name, num_partitions=partitions, replication_factor=1, configs=configs)]),
            timeout=10)
        assert response.topics[0].error == ErrorCode.NONE, response

    def produce(self, topic: str, partition: int, records: bytes, acks: int = -1
                ) -> api_pb2.ProducePartitionResult:
        """One produce; NOT_LEADER_OR_FOLLOWER (no leader elected yet) is retried for a while."""
        deadline = time.monotonic() + 15
        while True:
            response = self.broker.Produce(api_pb2.ProduceRequest(acks=acks, timeout_ms=10000, partitions=[
                api_pb2.ProducePartitionData(topic=topic, partition=partition, records=records)]), timeout=15)
            assert len(response.partitions) == 1
            result = response.partitions[0]
            if result.error != ErrorCode.NOT_LEADER_OR_FOLLOWER or time.monotonic() > deadline:
                return result
            time.sleep(0.02)

    def latest(self, topic: str, partition: int) -> int:
        return self.broker.ListOffsets(api_pb2.ListOffsetsRequest(partitions=[
            api_pb2.ListOffsetsPartition(topic=topic, partition=partition, timestamp=-1)])).partitions[0].offset

    def fetch(self, topic: str, partition: int, offset: int, max_wait_ms: int = 0, min_bytes: int = 0,
              max_bytes: int = 1 << 20) -> api_pb2.FetchPartitionResult:
        response = self.broker.Fetch(api_pb2.FetchRequest(
            max_wait_ms=max_wait_ms, min_bytes=min_bytes, max_bytes=max_bytes,
            partitions=[api_pb2.FetchPartition(topic=topic, partition=partition, fetch_offset=offset,
                                               current_leader_epoch=-1)]), timeout=30)
        return response.partitions[0]

    def read_all(self, topic: str, partition: int) -> list[codec.Record]:
        return self.read_all_from(topic, partition, 0)

    def read_all_from(self, topic: str, partition: int, offset: int) -> list[codec.Record]:
        out: list[codec.Record] = []
        while True:
            result = self.fetch(topic, partition, offset)
            assert result.error == ErrorCode.NONE, result
            records = [r for r in codec.decode_records(result.records) if r.offset >= offset]
            if not records:
                return out
            out.extend(records)
            offset = records[-1].offset + 1

    def close(self) -> None:
        self.channel.close()


@pytest.fixture
def stubs(cluster: LocalCluster) -> Iterator[Stubs]:
    client = Stubs(cluster.nodes[0].address)
    yield client
    client.close()


def batch(*values: bytes, key: bytes | None = None, timestamp: int = 1_700_000_000_000,
          compression: str = "none") -> bytes:
    return codec.encode_batch([codec.Record(i, timestamp + i, key, v) for i, v in enumerate(values)],
                              compression=compression)


def test_fixture_describes_a_running_node(cluster: LocalCluster) -> None:
    node = cluster.nodes[0]
    assert node.running() and node.pid > 0
    assert cluster.bootstrap == node.address == f"127.0.0.1:{node.port}"
    answer = cluster.wait_ready()
    assert answer.controller_id == node.node_id
    assert [n.node_id for n in answer.nodes] == [node.node_id]
    assert answer.cluster_id


def test_produce_fetch_round_trip(stubs: Stubs) -> None:
    stubs.create("events", partitions=2)
    first = stubs.produce("events", 0, batch(b"a", b"b", key=b"k"))
    second = stubs.produce("events", 0, batch(b"c", compression="lz4"), acks=1)
    other = stubs.produce("events", 1, batch(b"x"))
    assert (first.error, second.error, other.error) == (ErrorCode.NONE,) * 3
    # The leader's leader-change control batch takes the first offset(s).
    base = first.base_offset
    assert base >= 1 and second.base_offset == base + 2
    assert first.leader.leader_id == 1 and first.leader.port > 0 and first.leader.leader_epoch >= 1
    # acks=1 data becomes visible once flushed; wait for it with the long-poll.
    result = stubs.fetch("events", 0, base + 2, max_wait_ms=5000, min_bytes=1)
    assert result.high_watermark == base + 3
    records = stubs.read_all("events", 0)
    assert [(r.offset, r.key, r.value) for r in records] == [
        (base, b"k", b"a"), (base + 1, b"k", b"b"), (base + 2, None, b"c")]
    assert [r.value for r in stubs.read_all("events", 1)] == [b"x"]
    batches = list(codec.decode_batches(stubs.fetch("events", 0, 0).records))
    assert batches[0].is_control  # consumers skip it; decode_records already does
    assert {b.partition_leader_epoch for b in batches} == {first.leader.leader_epoch}


def test_many_partitions_in_one_request(stubs: Stubs) -> None:
    stubs.create("multi", partitions=3)
    response = stubs.broker.Produce(api_pb2.ProduceRequest(acks=-1, timeout_ms=5000, partitions=[
        api_pb2.ProducePartitionData(topic="multi", partition=p, records=batch(b"v%d" % p)) for p in range(3)]))
    # CreateTopics returned once every partition had its leader, so all three are accepted.
    assert [r.error for r in response.partitions] == [ErrorCode.NONE] * 3, response
    fetched = stubs.broker.Fetch(api_pb2.FetchRequest(max_wait_ms=0, max_bytes=1 << 20, partitions=[
        api_pb2.FetchPartition(topic="multi", partition=p, fetch_offset=0, current_leader_epoch=-1)
        for p in range(3)]))
    assert [[r.value for r in codec.decode_records(p.records)] for p in fetched.partitions] == [
        [b"v0"], [b"v1"], [b"v2"]]


def test_acks_all_records_survive_sigkill_and_restart(cluster: LocalCluster, stubs: Stubs) -> None:
    stubs.create("durable")
    acknowledged = {}
    for i in range(20):
        result = stubs.produce("durable", 0, batch(b"r%d" % i))
        assert result.error == ErrorCode.NONE
        acknowledged[result.base_offset] = b"r%d" % i
    node = cluster.nodes[0]
    node.kill()
    node.start()
    again = Stubs(node.address)
    try:
        after = again.produce("durable", 0, batch(b"after"))  # also waits for the re-election
        assert after.error == ErrorCode.NONE and after.base_offset > max(acknowledged)
        found = {r.offset: r.value for r in again.read_all("durable", 0)}
        assert found == {**acknowledged, after.base_offset: b"after"}
    finally:
        again.close()


def test_restart_keeps_topics_configs_and_data(cluster: LocalCluster, stubs: Stubs) -> None:
    stubs.create("kept", partitions=2, **{"retention.ms": "3600000"})
    stubs.produce("kept", 1, batch(b"one", b"two"))
    node = cluster.nodes[0]
    assert node.stop() == 0  # graceful: SIGTERM exits 0
    # ... after closing every log with storage's clean-shutdown marker, so the restart scans nothing.
    assert (node.data_dir / "kept-1" / "clean-shutdown").exists()
    assert (node.data_dir / "__cluster_metadata-0" / "clean-shutdown").exists()
    node.start()
    again = Stubs(node.address)
    try:
        described = again.admin.DescribeTopics(api_pb2.DescribeTopicsRequest(names=["kept"], include_configs=True))
        topic = described.topics[0]
        assert topic.metadata.error == ErrorCode.NONE and len(topic.metadata.partitions) == 2
        assert topic.configs["retention.ms"] == "3600000"
        assert topic.configs["cleanup.policy"] == "delete"  # defaults are listed too
        again.produce("kept", 1, batch(b"three"))  # waits for the leader to be re-elected
        assert [r.value for r in again.read_all("kept", 1)] == [b"one", b"two", b"three"]
    finally:
        again.close()


def test_long_poll_wakes_when_data_arrives(stubs: Stubs) -> None:
    stubs.create("poll")
    end = stubs.produce("poll", 0, batch(b"first")).base_offset + 1
    box: dict[str, api_pb2.FetchPartitionResult] = {}
    waiter = threading.Thread(target=lambda: box.setdefault("r", stubs.fetch("poll", 0, end, max_wait_ms=20000,
                                                                             min_bytes=1)))
    waiter.start()
    # Give the fetch a chance to reach the server and park before producing; correctness does
    # not depend on it (a fetch arriving later simply finds the data).
    deadline = time.monotonic() + 0.3
    while time.monotonic() < deadline and waiter.is_alive():
        waiter.join(0.05)
    assert waiter.is_alive(), "the fetch returned without data instead of waiting"
    stubs.produce("poll", 0, batch(b"wake"))
    waiter.join(15)
    assert not waiter.is_alive(), "the long-poll was not woken by the produce"
    assert [r.value for r in codec.decode_records(box["r"].records)] == [b"wake"]


def test_long_poll_times_out_empty(stubs: Stubs) -> None:
    stubs.create("quiet")
    end = stubs.produce("quiet", 0, batch(b"first")).base_offset + 1
    result = stubs.fetch("quiet", 0, end, max_wait_ms=200, min_bytes=1)
    assert result.error == ErrorCode.NONE and result.records == b"" and result.high_watermark == end


def test_bad_input_gets_its_error_stores_nothing_and_the_node_keeps_serving(stubs: Stubs) -> None:
    stubs.create("strict", **{"max.message.bytes": "2000"})
    good = batch(b"ok")
    corrupt = bytearray(good)
    corrupt[-1] ^= 0xFF  # breaks the CRC
    cases = {
        "corrupt": ("strict", 0, bytes(corrupt), ErrorCode.CORRUPT_MESSAGE),
        "truncated": ("strict", 0, good[:-3], ErrorCode.CORRUPT_MESSAGE),
        "garbage": ("strict", 0, b"\x00" * 5 + b"not a batch at all", ErrorCode.CORRUPT_MESSAGE),
        "empty": ("strict", 0, b"", ErrorCode.CORRUPT_MESSAGE),
        "good then corrupt": ("strict", 0, good + bytes(corrupt), ErrorCode.CORRUPT_MESSAGE),
        "oversized": ("strict", 0, batch(b"x" * 3000), ErrorCode.MESSAGE_TOO_LARGE),
        "unknown topic": ("nope", 0, good, ErrorCode.UNKNOWN_TOPIC_OR_PARTITION),
        "unknown partition": ("strict", 7, good, ErrorCode.UNKNOWN_TOPIC_OR_PARTITION),
        "negative partition": ("strict", -1, good, ErrorCode.UNKNOWN_TOPIC_OR_PARTITION),
        "invalid topic name": ("bad/name", 0, good, ErrorCode.UNKNOWN_TOPIC_OR_PARTITION),
        "control batch": ("strict", 0, codec.encode_batch([codec.Record(0, 0, b"\x00\x00\x00\x00", b"")],
                                                          is_control=True), ErrorCode.INVALID_REQUEST),
    }
    before = stubs.produce("strict", 0, good).base_offset + 1
    for name, (topic, partition, records, expected) in cases.items():
        result = stubs.produce(topic, partition, records)
        assert result.error == expected, f"{name}: {result}"
        assert result.error_message, name
    bad_acks = stubs.broker.Produce(api_pb2.ProduceRequest(acks=2, partitions=[
        api_pb2.ProducePartitionData(topic="strict", partition=0, records=good)]))
    assert bad_acks.partitions[0].error == ErrorCode.INVALID_REQUIRED_ACKS
    # Nothing was stored by any of them: the next good produce gets the next offset.
    assert stubs.produce("strict", 0, good).base_offset == before

    assert stubs.fetch("strict", 0, before + 5).error == ErrorCode.OFFSET_OUT_OF_RANGE
    assert stubs.fetch("strict", 0, -1).error == ErrorCode.OFFSET_OUT_OF_RANGE
    assert stubs.fetch("nope", 0, 0).error == ErrorCode.UNKNOWN_TOPIC_OR_PARTITION
    fenced = stubs.broker.Fetch(api_pb2.FetchRequest(partitions=[api_pb2.FetchPartition(
        topic="strict", partition=0, fetch_offset=0, current_leader_epoch=999)]))
    assert fenced.partitions[0].error == ErrorCode.UNKNOWN_LEADER_EPOCH

    def create(**kwargs: object) -> api_pb2.TopicResult:
        return stubs.admin.CreateTopics(api_pb2.CreateTopicsRequest(topics=[api_pb2.NewTopic(**kwargs)])).topics[0]

    assert create(name="strict", num_partitions=1, replication_factor=1).error == ErrorCode.TOPIC_ALREADY_EXISTS
    for bad in ("", ".", "..", "a" * 250, "spaces not allowed", "slash/no", "__cluster_metadata"):
        assert create(name=bad, num_partitions=1, replication_factor=1).error == ErrorCode.INVALID_TOPIC_EXCEPTION, bad
    assert create(name="a" * 249, num_partitions=1, replication_factor=1).error == ErrorCode.NONE
    assert create(name="rf", num_partitions=1, replication_factor=3).error == ErrorCode.INVALID_REPLICATION_FACTOR
    assert create(name="np", num_partitions=0, replication_factor=1).error == ErrorCode.INVALID_PARTITIONS
    assert create(name="cfg", num_partitions=1, replication_factor=1,
                  configs={"no.such.key": "1"}).error == ErrorCode.INVALID_CONFIG
    assert create(name="cfg", num_partitions=1, replication_factor=1,
                  configs={"retention.ms": "soon"}).error == ErrorCode.INVALID_CONFIG
    listed = {t.name for t in stubs.admin.ListTopics(api_pb2.ListTopicsRequest()).topics}
    assert listed == {"strict", "a" * 249}

    offsets = stubs.broker.ListOffsets(api_pb2.ListOffsetsRequest(partitions=[
        api_pb2.ListOffsetsPartition(topic="nope", partition=0, timestamp=-1),
        api_pb2.ListOffsetsPartition(topic="strict", partition=0, timestamp=-7)]))
    assert [p.error for p in offsets.partitions] == [ErrorCode.UNKNOWN_TOPIC_OR_PARTITION, ErrorCode.INVALID_REQUEST]
    metadata = stubs.broker.Metadata(api_pb2.MetadataRequest(topics=["nope", "bad/name"]))
    assert [t.error for t in metadata.topics] == [ErrorCode.UNKNOWN_TOPIC_OR_PARTITION,
                                                  ErrorCode.INVALID_TOPIC_EXCEPTION]
    # Still serving after all of it, and only the good batches were stored.
    assert [r.value for r in stubs.read_all("strict", 0)] == [b"ok", b"ok"]


def test_list_offsets_earliest_latest_and_by_time(stubs: Stubs) -> None:
    stubs.create("times")
    # Timestamps after the leader-change batch's (stamped with the broker's clock at election).
    t0 = int(time.time() * 1000) + 60_000
    offsets = [stubs.produce("times", 0, batch(b"v", timestamp=t0 + 1000 * i)).base_offset for i in range(3)]

    def lookup(timestamp: int) -> api_pb2.ListOffsetsPartitionResult:
        return stubs.broker.ListOffsets(api_pb2.ListOffsetsRequest(partitions=[
            api_pb2.ListOffsetsPartition(topic="times", partition=0, timestamp=timestamp)])).partitions[0]

    assert lookup(-2).offset == 0
    assert lookup(-1).offset == offsets[-1] + 1
    assert (lookup(t0 + 500).offset, lookup(t0 + 500).timestamp) == (offsets[1], t0 + 1000)
    assert lookup(t0).offset == offsets[0]
    assert lookup(t0 + 10_000).offset == offsets[-1] + 1


def test_admin_delete_alter_and_add_partitions(stubs: Stubs) -> None:
    stubs.create("gone")
    stubs.produce("gone", 0, batch(b"old"))
    deleted = stubs.admin.DeleteTopics(api_pb2.DeleteTopicsRequest(names=["gone", "never"]))
    assert [t.error for t in deleted.topics] == [ErrorCode.NONE, ErrorCode.UNKNOWN_TOPIC_OR_PARTITION]
    assert stubs.produce("gone", 0, batch(b"x")).error == ErrorCode.UNKNOWN_TOPIC_OR_PARTITION
    stubs.create("gone")  # a new topic under the old name starts empty
    assert stubs.read_all("gone", 0) == []
    assert stubs.latest("gone", 0) <= 1  # at most its leader-change batch

    altered = stubs.admin.AlterTopicConfigs(api_pb2.AlterTopicConfigsRequest(
        topic="gone", set={"retention.bytes": "1000000"}))
    assert altered.result.error == ErrorCode.NONE
    bad = stubs.admin.AlterTopicConfigs(api_pb2.AlterTopicConfigsRequest(topic="gone", set={"segment.bytes": "-5"}))
    assert bad.result.error == ErrorCode.INVALID_CONFIG
    configs = stubs.admin.DescribeTopics(api_pb2.DescribeTopicsRequest(names=["gone"], include_configs=True))
    assert configs.topics[0].configs["retention.bytes"] == "1000000"
    reverted = stubs.admin.AlterTopicConfigs(api_pb2.AlterTopicConfigsRequest(topic="gone", delete=["retention.bytes"]))
    assert reverted.result.error == ErrorCode.NONE
    configs = stubs.admin.DescribeTopics(api_pb2.DescribeTopicsRequest(names=["gone"], include_configs=True))
    assert configs.topics[0].configs["retention.bytes"] == "-1"

    grown = stubs.admin.CreatePartitions(api_pb2.CreatePartitionsRequest(topic="gone", new_total_count=3))
    assert grown.result.error == ErrorCode.NONE
    shrunk = stubs.admin.CreatePartitions(api_pb2.CreatePartitionsRequest(topic="gone", new_total_count=2))
    assert shrunk.result.error == ErrorCode.INVALID_PARTITIONS
    assert stubs.produce("gone", 2, batch(b"new")).error == ErrorCode.NONE
    assert [r.value for r in stubs.read_all("gone", 2)] == [b"new"]


def test_start_failure_raises_with_the_log_tail(cluster: LocalCluster, tmp_path: Path) -> None:
    running = cluster.nodes[0]
    # A second node on the same data dir must refuse to start, saying why.
    intruder = NodeProcess(node_id=running.node_id, port=running.port + 1 if running.port < 65535 else 1025,
                           data_dir=running.data_dir)
    intruder_dir_log = tmp_path / "intruder"
    intruder.data_dir = running.data_dir
    with pytest.raises(NodeStartError, match="in use by another running node"):
        try:
            intruder.start(timeout=20)
        finally:
            intruder.kill()
    assert running.running() and intruder_dir_log is not None


def test_sigterm_during_long_poll_exits_cleanly(tmp_path: Path) -> None:
    local = start_cluster(tmp_path, nodes=1, flush="interval", flush_interval_ms=50)
    try:
        client = Stubs(local.bootstrap)
        client.create("t")
        assert client.produce("t", 0, batch(b"v")).error == ErrorCode.NONE
        end = client.latest("t", 0)
        box: dict[str, object] = {}

        def poll() -> None:
            try:
                box["r"] = client.fetch("t", 0, end, max_wait_ms=25000, min_bytes=1)
            except grpc.RpcError as exc:
                box["r"] = exc

        waiter = threading.Thread(target=poll)
        waiter.start()
        waiter.join(0.3)
        assert local.nodes[0].stop(timeout=15) == 0
        waiter.join(15)
        assert not waiter.is_alive()
        client.close()
    finally:
        local.stop_all()


def test_retention_deletes_old_segments_and_moves_the_log_start(tmp_path: Path) -> None:
    # segment.bytes comes from the node's topic defaults (TOML table), retention.bytes from the topic.
    local = start_cluster(tmp_path, nodes=1, retention_check_interval_ms=100, topic_defaults={"segment.bytes": "1024"})
    client = Stubs(local.bootstrap)
    try:
        client.create("short", **{"retention.bytes": "2048"})
        configs = client.admin.DescribeTopics(api_pb2.DescribeTopicsRequest(names=["short"], include_configs=True))
        assert configs.topics[0].configs["segment.bytes"] == "1024"
        for i in range(20):
            assert client.produce("short", 0, batch(b"x" * 300)).error == ErrorCode.NONE

        def earliest() -> int:
            return client.broker.ListOffsets(api_pb2.ListOffsetsRequest(partitions=[
                api_pb2.ListOffsetsPartition(topic="short", partition=0, timestamp=-2)])).partitions[0].offset

        deadline = time.monotonic() + 20
        while earliest() == 0:
            assert time.monotonic() < deadline, "retention never deleted a segment"
            time.sleep(0.05)
        assert client.fetch("short", 0, 0).error == ErrorCode.OFFSET_OUT_OF_RANGE
        # The newest data is still there (the active segment is never deleted).
        last = client.latest("short", 0) - 1
        newest = codec.decode_records(client.fetch("short", 0, last).records)
        assert newest[-1].offset == last and newest[-1].value == b"x" * 300
    finally:
        client.close()
        local.stop_all()


def test_a_request_over_max_request_bytes_is_refused_and_the_node_keeps_serving(tmp_path: Path) -> None:
    local = start_cluster(tmp_path, nodes=1, max_request_bytes=64 * 1024)
    client = Stubs(local.bootstrap)
    try:
        client.create("big")
        with pytest.raises(grpc.RpcError) as refused:
            client.produce("big", 0, batch(b"x" * 100_000))
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert client.produce("big", 0, batch(b"small")).error == ErrorCode.NONE
        assert [r.value for r in client.read_all("big", 0)] == [b"small"]
    finally:
        client.close()
        local.stop_all()


def test_a_damaged_replica_goes_offline_and_the_others_keep_serving(cluster: LocalCluster, stubs: Stubs) -> None:
    stubs.create("damaged")
    stubs.create("healthy")
    for topic in ("damaged", "healthy"):
        for i in range(5):
            assert stubs.produce(topic, 0, batch(b"v%d" % i)).error == ErrorCode.NONE
    node = cluster.nodes[0]
    assert node.stop() == 0
    segment = next((node.data_dir / "damaged-0").glob("*.log"))
    with open(segment, "r+b") as file:  # flushed data gone: the log cannot be trusted
        file.truncate(segment.stat().st_size // 2)
    node.start()
    again = Stubs(node.address)
    try:
        assert again.produce("healthy", 0, batch(b"more")).error == ErrorCode.NONE  # node is up
        refused = again.broker.Produce(api_pb2.ProduceRequest(acks=-1, partitions=[
            api_pb2.ProducePartitionData(topic="damaged", partition=0, records=batch(b"x"))])).partitions[0]
        assert refused.error == ErrorCode.NOT_LEADER_OR_FOLLOWER and "offline" in refused.error_message
        assert [r.value for r in again.read_all("healthy", 0)][-1] == b"more"
    finally:
        again.close()
