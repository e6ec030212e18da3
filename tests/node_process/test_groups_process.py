"""Consumer groups on real nodes, over raw gRPC (the server side of issue 6).

One three-node cluster (short session timeout) serves the whole module; the SIGKILL test runs
last because it takes a node down. The client here is deliberately minimal — it re-finds the
coordinator on every retriable error — so the tests pin down the server, not tidelog.client.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
from support.nodes import LocalCluster, reconnecting_channel, start_cluster
from tidelog.node.group_records import coordinator_partition
from tidelog.proto import api_pb2, api_pb2_grpc, common_pb2
from tidelog.proto import records as codec
from tidelog.proto.common_pb2 import ErrorCode

SESSION_TIMEOUT_MS = 2000
OFFSETS_PARTITIONS = 16
RETRY = {ErrorCode.NOT_COORDINATOR, ErrorCode.COORDINATOR_LOAD_IN_PROGRESS, ErrorCode.COORDINATOR_NOT_AVAILABLE,
         ErrorCode.REQUEST_TIMED_OUT}


@pytest.fixture(scope="module")
def groups_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    local = start_cluster(Path(tmp_path_factory.mktemp("groups")), nodes=3,
                          group_consumer_session_timeout_ms=SESSION_TIMEOUT_MS,
                          group_consumer_heartbeat_interval_ms=300)
    try:
        yield local
    finally:
        local.stop_all()


class GroupsClient:
    """FindCoordinator, then the call; on a retriable error or a dead node, find again."""

    def __init__(self, cluster: LocalCluster) -> None:
        self.cluster = cluster
        self.channels = {n.node_id: reconnecting_channel(n.address) for n in cluster.nodes}
        self.coordinators: dict[str, int] = {}

    def close(self) -> None:
        for channel in self.channels.values():
            channel.close()

    def stub(self, node_id: int) -> api_pb2_grpc.GroupsStub:
        return api_pb2_grpc.GroupsStub(self.channels[node_id])

    def find(self, group_id: str, deadline_s: float = 30.0) -> int:
        deadline = time.monotonic() + deadline_s
        while True:
            for node in self.cluster.running_nodes():
                try:
                    answer = self.stub(node.node_id).FindCoordinator(
                        api_pb2.FindCoordinatorRequest(group_id=group_id), timeout=10)
                except grpc.RpcError:
                    continue
                if answer.error == ErrorCode.NONE and self.cluster.node(answer.node_id).running():
                    self.coordinators[group_id] = answer.node_id
                    return answer.node_id
            assert time.monotonic() < deadline, f"no coordinator for {group_id}"
            time.sleep(0.05)

    def call(self, group_id: str, method: str, request: Any, deadline_s: float = 30.0) -> Any:
        deadline = time.monotonic() + deadline_s
        while True:
            node_id = self.coordinators.get(group_id) or self.find(group_id)
            try:
                answer = getattr(self.stub(node_id), method)(request, timeout=10)
            except grpc.RpcError:
                answer = None
            if answer is not None and answer.error not in RETRY:
                return answer
            self.coordinators.pop(group_id, None)
            assert time.monotonic() < deadline, f"{method} for {group_id} kept failing: {answer}"
            time.sleep(0.05)


@pytest.fixture
def client(groups_cluster: LocalCluster) -> Iterator[GroupsClient]:
    c = GroupsClient(groups_cluster)
    try:
        yield c
    finally:
        c.close()


def create_topic(cluster: LocalCluster, name: str, partitions: int) -> None:
    with grpc.insecure_channel(cluster.running_nodes()[0].address) as channel:
        answer = api_pb2_grpc.AdminStub(channel).CreateTopics(api_pb2.CreateTopicsRequest(
            topics=[api_pb2.NewTopic(name=name, num_partitions=partitions, replication_factor=1)],
            timeout_ms=10000), timeout=15)
    assert answer.topics[0].error in (ErrorCode.NONE, ErrorCode.TOPIC_ALREADY_EXISTS), answer


def wait_until(condition: Callable[[], Any], what: str, timeout: float = 20.0, every: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(every)


class Member:
    """A KIP-848 member that owns exactly what it was last assigned (revokes at once)."""

    def __init__(self, client: GroupsClient, group_id: str, topics: list[str]) -> None:
        self.client = client
        self.group_id = group_id
        self.topics = topics
        self.member_id = ""
        self.epoch = 0
        self.owned: set[tuple[str, int]] = set()
        self.last_sent = 0.0

    def heartbeat(self) -> api_pb2.ConsumerGroupHeartbeatResponse:
        request = api_pb2.ConsumerGroupHeartbeatRequest(
            group_id=self.group_id, member_id=self.member_id, member_epoch=self.epoch, rebalance_timeout_ms=10000,
            has_subscription=True, subscribed_topics=self.topics, has_owned_partitions=True,
            owned_partitions=[common_pb2.TopicPartition(topic=t, partition=p) for t, p in sorted(self.owned)])
        self.last_sent = time.monotonic()
        answer = self.client.call(self.group_id, "ConsumerGroupHeartbeat", request)
        assert answer.error == ErrorCode.NONE, answer
        self.member_id, self.epoch = answer.member_id, answer.member_epoch
        if answer.has_assignment:
            self.owned = {(tp.topic, tp.partition) for tp in answer.assignment}
        return answer


def describe(client: GroupsClient, group_id: str) -> api_pb2.DescribeGroupResponse:
    return client.call(group_id, "DescribeGroup", api_pb2.DescribeGroupRequest(group_id=group_id))


def commit(client: GroupsClient, group_id: str, offsets: dict[tuple[str, int], int], member_id: str = "",
           member_epoch: int = -1, deadline_s: float = 30.0) -> api_pb2.OffsetCommitResponse:
    return client.call(group_id, "OffsetCommit", api_pb2.OffsetCommitRequest(
        group_id=group_id, member_id=member_id, member_epoch=member_epoch,
        partitions=[api_pb2.OffsetCommitPartition(topic=t, partition=p, offset=o, leader_epoch=-1)
                    for (t, p), o in sorted(offsets.items())]), deadline_s)


def fetch(client: GroupsClient, group_id: str) -> dict[tuple[str, int], int]:
    answer = client.call(group_id, "OffsetFetch", api_pb2.OffsetFetchRequest(group_id=group_id, member_epoch=-1))
    assert answer.error == ErrorCode.NONE, answer
    return {(o.topic, o.partition): o.offset for o in answer.offsets}


def test_find_coordinator_agrees_on_every_node(groups_cluster: LocalCluster, client: GroupsClient) -> None:
    # The first group requests of the cluster, on every node at once: each may have to create
    # __consumer_offsets, and none may fail for another's having done it first.
    first = [f"first-{n.node_id}" for n in groups_cluster.nodes]
    with ThreadPoolExecutor(len(first)) as pool:
        answers = list(pool.map(
            lambda pair: client.stub(pair[0].node_id).FindCoordinator(
                api_pb2.FindCoordinatorRequest(group_id=pair[1]), timeout=20),
            zip(groups_cluster.nodes, first)))
    assert {a.error for a in answers} <= {ErrorCode.NONE, ErrorCode.COORDINATOR_NOT_AVAILABLE}, answers
    groups = first + [f"group-{i}" for i in range(6)] + ["ünïcode-grüppe", "x" * 300]

    def answers_of(group_id: str) -> list[api_pb2.FindCoordinatorResponse]:
        return [client.stub(n.node_id).FindCoordinator(api_pb2.FindCoordinatorRequest(group_id=group_id), timeout=10)
                for n in groups_cluster.nodes]

    def agreed(group_id: str) -> list[api_pb2.FindCoordinatorResponse] | None:
        answers = answers_of(group_id)
        if all(a.error == ErrorCode.NONE for a in answers) and len({a.node_id for a in answers}) == 1:
            return answers
        return None

    for group_id in groups:
        found = wait_until(functools.partial(agreed, group_id), f"every node to agree on {group_id}'s coordinator")
        assert {x.partition for x in found} == {coordinator_partition(group_id, OFFSETS_PARTITIONS)}
        node = groups_cluster.node(found[0].node_id)
        assert (found[0].host, found[0].port) == ("127.0.0.1", node.port)
    bad = client.stub(1).FindCoordinator(api_pb2.FindCoordinatorRequest(group_id=""), timeout=10)
    assert bad.error == ErrorCode.INVALID_GROUP_ID
    with grpc.insecure_channel(groups_cluster.nodes[0].address) as channel:
        topics = api_pb2_grpc.AdminStub(channel).DescribeTopics(api_pb2.DescribeTopicsRequest(
            names=["__consumer_offsets"], include_configs=True), timeout=10).topics
    assert len(topics[0].metadata.partitions) == OFFSETS_PARTITIONS
    assert topics[0].metadata.internal
    assert all(len(p.replicas) == 3 for p in topics[0].metadata.partitions)
    assert topics[0].configs["cleanup.policy"] == "compact"
    assert topics[0].configs["retention.ms"] == "-1"


def test_commit_and_fetch_offsets(groups_cluster: LocalCluster, client: GroupsClient) -> None:
    create_topic(groups_cluster, "orders", 3)
    offsets = {("orders", 0): 10, ("orders", 1): 20, ("orders", 2): 30}
    answer = commit(client, "offsets-group", offsets)
    assert answer.error == ErrorCode.NONE
    assert [r.error for r in answer.partitions] == [ErrorCode.NONE] * 3
    assert fetch(client, "offsets-group") == offsets
    # Later commits win; unknown partitions are refused one by one, the rest still commit.
    answer = commit(client, "offsets-group", {("orders", 1): 21, ("orders", 7): 5, ("nope", 0): 1})
    assert {(r.topic, r.partition): r.error for r in answer.partitions} == {
        ("orders", 1): ErrorCode.NONE, ("orders", 7): ErrorCode.UNKNOWN_TOPIC_OR_PARTITION,
        ("nope", 0): ErrorCode.UNKNOWN_TOPIC_OR_PARTITION}
    assert fetch(client, "offsets-group") == {**offsets, ("orders", 1): 21}
    # Metadata over offset.metadata.max.bytes is refused for that partition only.
    big = client.call("offsets-group", "OffsetCommit", api_pb2.OffsetCommitRequest(
        group_id="offsets-group", member_epoch=-1, partitions=[
            api_pb2.OffsetCommitPartition(topic="orders", partition=0, offset=11, metadata="m" * 5000)]))
    assert big.partitions[0].error == ErrorCode.OFFSET_METADATA_TOO_LARGE
    described = describe(client, "offsets-group")
    assert described.error == ErrorCode.NONE and described.state == "empty"
    assert {(o.topic, o.partition): o.offset for o in described.offsets} == {**offsets, ("orders", 1): 21}
    listed: set[str] = set()
    for node in groups_cluster.nodes:
        listed |= {g.group_id for g in client.stub(node.node_id).ListGroups(api_pb2.ListGroupsRequest(),
                                                                             timeout=10).groups}
    assert "offsets-group" in listed
    deleted = client.call("offsets-group", "DeleteGroup", api_pb2.DeleteGroupRequest(group_id="offsets-group"))
    assert deleted.error == ErrorCode.NONE
    assert fetch(client, "offsets-group") == {}
    assert describe(client, "offsets-group").error == ErrorCode.GROUP_ID_NOT_FOUND


def test_two_members_get_disjoint_assignments_then_one_times_out(groups_cluster: LocalCluster,
                                                                  client: GroupsClient) -> None:
    create_topic(groups_cluster, "six", 6)
    everything = {("six", p) for p in range(6)}
    a, b = Member(client, "pair", ["six"]), Member(client, "pair", ["six"])

    def reconciled() -> bool:
        a.heartbeat()
        b.heartbeat()
        return a.owned | b.owned == everything and not a.owned & b.owned and bool(a.owned) and bool(b.owned)

    wait_until(reconciled, "two members to split six partitions", every=0.02)
    assert a.member_id != b.member_id
    wait_until(lambda: describe(client, "pair").state == "stable", "the group to be stable")
    # A member's commit is fenced by its epoch.
    stale = commit(client, "pair", {("six", 0): 1}, member_id=a.member_id, member_epoch=a.epoch - 1)
    assert stale.error == ErrorCode.STALE_MEMBER_EPOCH
    assert commit(client, "pair", {("six", 0): 1}, member_id=a.member_id, member_epoch=a.epoch).error == ErrorCode.NONE
    # An admin commit is refused while the group has members.
    assert commit(client, "pair", {("six", 0): 2}).error == ErrorCode.NON_EMPTY_GROUP

    # b stops heartbeating: after its session timeout a gets everything.
    def a_owns_all() -> bool:
        a.heartbeat()
        return a.owned == everything

    wait_until(a_owns_all, "the silent member's partitions to move on", timeout=SESSION_TIMEOUT_MS / 1000 + 20,
               every=0.2)
    # Not before b's session ran out (timed from before b's last heartbeat was sent).
    assert time.monotonic() - b.last_sent >= SESSION_TIMEOUT_MS / 1000 * 0.95
    members = describe(client, "pair").members
    assert [m.member_id for m in members] == [a.member_id]
    stale_b = client.call("pair", "ConsumerGroupHeartbeat", api_pb2.ConsumerGroupHeartbeatRequest(
        group_id="pair", member_id=b.member_id, member_epoch=b.epoch))
    assert stale_b.error == ErrorCode.UNKNOWN_MEMBER_ID


def test_bad_requests_get_error_codes(groups_cluster: LocalCluster, client: GroupsClient) -> None:
    node_id = client.find("bad-requests")
    stub = client.stub(node_id)
    too_long = "g" * 40000
    assert stub.ConsumerGroupHeartbeat(api_pb2.ConsumerGroupHeartbeatRequest(group_id=too_long),
                                       timeout=10).error == ErrorCode.INVALID_GROUP_ID
    assert stub.OffsetCommit(api_pb2.OffsetCommitRequest(group_id=""), timeout=10).error == ErrorCode.INVALID_GROUP_ID
    bad_topic = stub.ConsumerGroupHeartbeat(api_pb2.ConsumerGroupHeartbeatRequest(
        group_id="bad-requests", member_epoch=0, has_subscription=True, subscribed_topics=["no spaces!"]), timeout=10)
    assert bad_topic.error == ErrorCode.INVALID_REQUEST
    no_subscription = stub.ConsumerGroupHeartbeat(api_pb2.ConsumerGroupHeartbeatRequest(
        group_id="bad-requests", member_epoch=0), timeout=10)
    assert no_subscription.error == ErrorCode.INVALID_REQUEST
    huge_member = stub.ConsumerGroupHeartbeat(api_pb2.ConsumerGroupHeartbeatRequest(
        group_id="bad-requests", member_id="m" * 40000, member_epoch=0, has_subscription=True), timeout=10)
    assert huge_member.error == ErrorCode.INVALID_REQUEST
    # An unknown (not yet created) topic is a valid subscription with nothing to assign.
    joined = stub.ConsumerGroupHeartbeat(api_pb2.ConsumerGroupHeartbeatRequest(
        group_id="bad-requests", member_epoch=0, has_subscription=True, subscribed_topics=["not-yet"],
        rebalance_timeout_ms=10000), timeout=10)
    assert joined.error == ErrorCode.NONE and joined.member_epoch > 0 and list(joined.assignment) == []
    other = next(n for n in groups_cluster.nodes if n.node_id != node_id)
    elsewhere = client.stub(other.node_id).OffsetFetch(api_pb2.OffsetFetchRequest(group_id="bad-requests"),
                                                       timeout=10)
    assert elsewhere.error == ErrorCode.NOT_COORDINATOR
    # Only coordinators write to __consumer_offsets, and its partition count never changes.
    with grpc.insecure_channel(groups_cluster.nodes[0].address) as channel:
        produced = api_pb2_grpc.BrokerStub(channel).Produce(api_pb2.ProduceRequest(acks=-1, partitions=[
            api_pb2.ProducePartitionData(topic="__consumer_offsets", partition=0, records=codec.encode_batch(
                [codec.Record(0, 0, b"\x00\x01junk", b"junk")]))]), timeout=10)
        grown = api_pb2_grpc.AdminStub(channel).CreatePartitions(api_pb2.CreatePartitionsRequest(
            topic="__consumer_offsets", new_total_count=OFFSETS_PARTITIONS + 1), timeout=10)
    assert produced.partitions[0].error == ErrorCode.INVALID_TOPIC_EXCEPTION
    assert grown.result.error == ErrorCode.INVALID_REQUEST
    # The node is still fine.
    assert client.find("bad-requests") == node_id


def test_acknowledged_commits_survive_the_coordinator_being_killed(groups_cluster: LocalCluster,
                                                                   client: GroupsClient) -> None:
    create_topic(groups_cluster, "kill", 2)
    group_id = "survivor"
    victim = groups_cluster.node(client.find(group_id))
    acknowledged: dict[tuple[str, int], int] = {}
    attempted: dict[tuple[str, int], int] = {}
    acks = [0]
    stop = threading.Event()
    failures: list[BaseException] = []

    def commit_in_a_loop() -> None:
        # Its own client: the kill lands while a commit is in flight, at any point of it.
        own = GroupsClient(groups_cluster)
        try:
            n = 0
            while not stop.is_set():
                n += 1
                offsets = {("kill", 0): n, ("kill", 1): 2 * n}
                attempted.update(offsets)
                answer = commit(own, group_id, offsets, deadline_s=30)
                assert answer.error == ErrorCode.NONE, answer
                acknowledged.update(offsets)
                acks[0] += 1
        except BaseException as exc:  # noqa: BLE001 - the main thread reports any failure
            failures.append(exc)
        finally:
            own.close()

    thread = threading.Thread(target=commit_in_a_loop, daemon=True)
    thread.start()
    try:
        wait_until(lambda: acks[0] >= 30 or failures, "30 acknowledged commits")
        victim.kill()
        at_kill = acks[0]
        wait_until(lambda: acks[0] >= at_kill + 20 or failures, "20 commits acknowledged by the new coordinator",
                   timeout=40)
    finally:
        stop.set()
        thread.join(60)
    assert not failures, failures
    assert client.find(group_id) != victim.node_id
    committed = fetch(client, group_id)
    # Sequential commits, each retried until acknowledged: the last one is what must be there.
    assert committed == acknowledged == attempted


def test_offsets_and_members_survive_a_crash_of_every_node(groups_cluster: LocalCluster,
                                                           client: GroupsClient) -> None:
    for node in groups_cluster.nodes:
        if not node.running():
            node.start(wait=False)
    groups_cluster.wait_ready()
    create_topic(groups_cluster, "crash", 4)
    offsets = {("crash", p): 100 + p for p in range(4)}
    assert commit(client, "crash-offsets", offsets).error == ErrorCode.NONE
    member = Member(client, "crash-members", ["crash"])
    wait_until(lambda: member.heartbeat() and len(member.owned) == 4, "the member to own every partition")
    epoch = member.epoch

    groups_cluster.kill_all()
    for node in groups_cluster.nodes:
        # A replayed member's session restarts when its coordinator loads. With the module's 2 s
        # session, a slow machine expires it before this client has even reached the restarted
        # coordinator (CI saw UNKNOWN_MEMBER_ID); what is under test is the replay, not a race
        # with the restart. This test runs last, so the longer timeout touches no other.
        node.config["group_consumer_session_timeout_ms"] = 60_000
        node.start(wait=False)
    client.coordinators.clear()
    # As soon as a coordinator has loaded: the member is still in the group after the replay,
    # and its epoch and assignment carry on without a rejoin.
    assert member.heartbeat().member_epoch == epoch
    groups_cluster.wait_ready()
    assert fetch(client, "crash-offsets") == offsets
    assert member.owned == {("crash", p) for p in range(4)}
    assert [m.member_id for m in describe(client, "crash-members").members] == [member.member_id]
