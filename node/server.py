"""The node process: one asyncio gRPC server, the controller, and this node's partitions.

Start-up: lock the data dir, listen, join the metadata quorum (every node replicates
`__cluster_metadata`; its leader is the controller), register this node with the controller
under a fresh incarnation id, and open the partition replicas each committed image assigns
here. SIGTERM (or SIGINT): refuse new produce requests, let in-flight requests finish
(long-polling fetches are woken to answer at once), resign leaderships so the other replicas
elect at once, flush and close every log — closing writes storage's clean-shutdown marker —
and exit 0.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import signal
import uuid
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import IO

import grpc
from tidelog.node.config import CONSUMER_OFFSETS_TOPIC, NodeConfig
from tidelog.node.controller import (
    METADATA_GROUP_ID,
    Controller,
    MetadataQuorum,
    NotController,
)
from tidelog.node.group_coordinator import GroupCoordinatorConfig
from tidelog.node.group_host import GroupHost, OffsetsPartition
from tidelog.node.group_service import GroupsService
from tidelog.node.metadata import MetadataImage, RegisterNode, TopicImage
from tidelog.node.partitions import PartitionManager, _write_atomically, group_id_for
from tidelog.node.request_decoding import add_service
from tidelog.node.services import AdminService, BrokerService, add_broker_service
from tidelog.node.transport import ReplicationService, Transport, add_replication_service
from tidelog.proto import api_pb2, api_pb2_grpc, replication_pb2, replication_pb2_grpc
from tidelog.replication.messages import Message

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"
# Delay between the surviving replicas' elections after their leader's node died.
FAILOVER_STAGGER_S = 0.3
NODE_FILE = "node.json"


class StartupError(Exception):
    """The node cannot start; the message says why and what to do."""


def lock_data_dir(data_dir: Path) -> IO[bytes]:
    """Hold an exclusive lock on the data dir for the life of the process."""
    data_dir.mkdir(parents=True, exist_ok=True)
    handle = open(data_dir / LOCK_FILE, "a+b")
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise StartupError(f"data dir {data_dir} is in use by another running node") from None
    return handle


def check_node_identity(config: NodeConfig) -> None:
    """A data dir belongs to one node id for ever; refuse to start it as another."""
    path = config.data_dir / NODE_FILE
    if path.exists():
        stored = json.loads(path.read_text())
        if int(stored["node_id"]) != config.node_id:
            raise StartupError(f"data dir {config.data_dir} belongs to node {stored['node_id']}, "
                               f"not {config.node_id}")
    else:
        _write_atomically(path, json.dumps({"version": 0, "node_id": config.node_id}).encode())


class Node:
    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.shutting_down = False
        self.incarnation_id = uuid.uuid4().hex
        self.transport = Transport(config.node_id, self._deliver, self._local_leaders, config.max_request_bytes,
                                   self._on_peer_down)
        self.partitions = PartitionManager(
            config.data_dir, config.node_id, config.flush, config.flush_interval_ms,
            lambda: config.topic_config_defaults, config.retention_check_interval_ms, self.transport.send,
            config.election_timeout_ms, self._leaders_changed, config.replica_fetch_max_wait_ms,
            log_cleaner_interval_ms=config.log_cleaner_interval_ms)
        self.groups = GroupHost(
            self._offsets_partitions, self._offsets_partition_count,
            GroupCoordinatorConfig(session_timeout_ms=config.group_consumer_session_timeout_ms,
                                   heartbeat_interval_ms=config.group_consumer_heartbeat_interval_ms,
                                   offsets_retention_ms=round(config.offsets_retention_minutes * 60_000),
                                   offsets_retention_check_interval_ms=config.offsets_retention_check_interval_ms),
            append_linger_ms=config.group_coordinator_append_linger_ms)
        self.quorum = MetadataQuorum(config, self.transport.send, self._on_image, self._on_controller_change)
        self.controller = Controller(config, self.quorum, self.transport.alive)
        self._server: grpc.aio.Server | None = None
        self._lock: IO[bytes] | None = None
        self._stop: asyncio.Event | None = None
        self._shutdown: asyncio.Future[None] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.exit_code = 0  # the process's status once stopped
        self._controller_changed = asyncio.Event()
        self._admin_channels: dict[str, grpc.aio.Channel] = {}
        self._replication_service: ReplicationService | None = None
        self._groups_service: GroupsService | None = None
        # Client requests in progress (produce and fetch), which a graceful stop lets finish.
        self.inflight = 0
        self._idle = asyncio.Event()
        self.port = 0

    # --- views used by the services ---------------------------------------------------------

    @property
    def image(self) -> MetadataImage:
        return self.quorum.image

    @property
    def controller_id(self) -> int:
        return self.controller.controller_id

    def leader_of(self, image: MetadataImage, topic: str, partition: int) -> tuple[int, int]:
        """(leader id, leader epoch) of a partition as this node knows it; (-1, -1) = unknown.

        This node's own replica knows best; one that has not learnt its leader yet (a new or
        restarted replica) defers to what the other nodes announce.
        """
        replica = self.partitions.get(topic, partition)
        if replica is not None and not replica.closed and replica.leader_id is not None:
            return replica.leader_id, replica.leader_epoch
        topic_image = image.topics.get(topic)
        if topic_image is None:
            return -1, -1
        remote = self.transport.remote_leader(group_id_for(topic, partition, topic_image.topic_id))
        return remote if remote is not None else (-1, -1)

    def node_infos(self, image: MetadataImage) -> list[api_pb2.NodeInfo]:
        return [api_pb2.NodeInfo(node_id=n.node_id, host=n.host, port=n.port, rack=n.rack,
                                 alive=self.transport.alive(n.node_id))
                for n in sorted(image.nodes.values(), key=lambda n: n.node_id)]

    def topic_configs(self, topic: TopicImage) -> Mapping[str, str]:
        return MappingProxyType({**self.config.topic_config_defaults, **topic.configs})

    def request_started(self) -> None:
        self.inflight += 1

    def request_finished(self) -> None:
        self.inflight -= 1
        if self.inflight == 0:
            self._idle.set()

    def shutdown_signal(self) -> asyncio.Future[None]:
        assert self._shutdown is not None
        return self._shutdown

    def address_of(self, node_id: int) -> str | None:
        registration = self.image.nodes.get(node_id)
        if registration is not None:
            return f"{registration.host}:{registration.port}"
        for voter in self.config.voters:
            if voter.node_id == node_id:
                return str(voter.address)
        return None

    def admin_channel(self, address: str) -> grpc.aio.Channel:
        channel = self._admin_channels.get(address)
        if channel is None:
            options = [("grpc.max_send_message_length", self.config.max_request_bytes),
                       ("grpc.max_receive_message_length", self.config.max_request_bytes)]
            channel = self._admin_channels[address] = grpc.aio.insecure_channel(address, options=options)
        return channel

    # --- wiring -----------------------------------------------------------------------------

    def _leaders_changed(self) -> None:
        self.transport.leaders_changed()
        self.groups.leaders_changed()

    def _offsets_partitions(self) -> dict[int, OffsetsPartition]:
        return {index: partition for (topic, index), partition in self.partitions.partitions.items()
                if topic == CONSUMER_OFFSETS_TOPIC}

    def _offsets_partition_count(self) -> int | None:
        topic = self.image.topics.get(CONSUMER_OFFSETS_TOPIC)
        return len(topic.partitions) if topic is not None and topic.partitions else None

    def _deliver(self, message: Message) -> None:
        if message.group_id == METADATA_GROUP_ID:
            if self.quorum.replica is not None:
                self.quorum.replica.receive(message)
            return
        self.partitions.deliver(message)

    def _on_peer_down(self, node_id: int) -> None:
        """Start elections at once in the groups the dead node led, staggered by replica rank so
        the survivors do not split the vote: the lowest surviving id goes first."""
        loop = asyncio.get_running_loop()
        replicas = [p.replica for p in self.partitions.partitions.values()]
        if self.quorum.replica is not None:
            replicas.append(self.quorum.replica)
        for replica in replicas:
            if replica.group.leader_id != node_id:
                continue
            survivors = sorted(v for v in replica.group.voters if v != node_id)
            rank = survivors.index(self.config.node_id) if self.config.node_id in survivors else len(survivors)
            loop.call_later(rank * FAILOVER_STAGGER_S, replica.leader_node_down, node_id)

    def _local_leaders(self) -> dict[str, int]:
        leaders = self.partitions.leaders()
        if self.quorum.is_leader and self.quorum.replica is not None:
            leaders[METADATA_GROUP_ID] = self.quorum.replica.epoch
        return leaders

    async def _on_image(self, image: MetadataImage) -> None:
        self._update_peers(image)
        await self.partitions.reconcile(image)

    def _update_peers(self, image: MetadataImage) -> None:
        peers = {v.node_id: str(v.address) for v in self.config.voters}
        peers.update({n.node_id: f"{n.host}:{n.port}" for n in image.nodes.values()})
        peers.update({node_id: str(address) for node_id, address in self.config.peer_addresses.items()})
        self.transport.set_peers(peers)

    def _on_controller_change(self) -> None:
        self._controller_changed.set()
        self.transport.leaders_changed()

    async def _keep_registered(self) -> None:
        """Register this node (again after every restart: a new incarnation) with the controller."""
        address = self.config.advertised_address
        request = replication_pb2.RegisterRequest(node_id=self.config.node_id, host=address.host, port=address.port,
                                                  rack="", incarnation_id=self.incarnation_id)
        while not self.shutting_down:
            current = self.image.nodes.get(self.config.node_id)
            if current is not None and current.incarnation_id == self.incarnation_id and self.image.cluster_id:
                self._controller_changed.clear()
                try:
                    await asyncio.wait_for(self._controller_changed.wait(), 5.0)
                except TimeoutError:
                    pass
                continue
            try:
                if self.quorum.is_leader:
                    await self.controller.ensure_cluster_created()
                    await self.register(request)
                else:
                    leader = self.quorum.leader_id
                    target = self.address_of(leader) if leader is not None else None
                    if target is not None:
                        stub = replication_pb2_grpc.ReplicationStub(self.admin_channel(target))
                        await stub.Register(request, timeout=5)
            except (TimeoutError, NotController, grpc.RpcError):
                pass
            except Exception:
                log.exception("registration failed")
            await self.quorum.wait_image_change(0.2)

    async def _find_metadata_leader(self) -> None:
        """An observer (a node outside the controller voters) asks the voters who leads the
        metadata quorum whenever it has no live leader to fetch from."""
        while not self.shutting_down:
            leader = self.quorum.leader_id
            if leader is None or not self.transport.alive(leader):
                for voter in self.config.voters:
                    try:
                        stub = api_pb2_grpc.AdminStub(self.admin_channel(str(voter.address)))
                        answer = await stub.DescribeCluster(api_pb2.DescribeClusterRequest(), timeout=1)
                    except grpc.RpcError:
                        continue
                    if answer.controller_id >= 0 and answer.controller_id != self.config.node_id:
                        self.quorum.observe_leader(answer.controller_id, max(answer.metadata_epoch, 1))
                        break
            await asyncio.sleep(0.5)

    async def register(self, request: replication_pb2.RegisterRequest) -> replication_pb2.RegisterResponse:
        try:
            await self.controller.ensure_cluster_created()
            await self.controller.register(RegisterNode(request.node_id, request.host, request.port, request.rack,
                                                        request.incarnation_id))
        except NotController as exc:
            return replication_pb2.RegisterResponse(
                ok=False, controller_id=exc.leader_id if exc.leader_id is not None else -1,
                error_message=str(exc))
        except TimeoutError:
            return replication_pb2.RegisterResponse(ok=False, controller_id=-1, error_message="timed out")
        return replication_pb2.RegisterResponse(ok=True, controller_id=self.config.node_id)

    # --- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        config = self.config
        self._lock = lock_data_dir(config.data_dir)
        check_node_identity(config)
        self._stop = asyncio.Event()
        self._shutdown = asyncio.get_running_loop().create_future()
        options = [
            ("grpc.max_receive_message_length", config.max_request_bytes),
            ("grpc.max_send_message_length", config.max_request_bytes),
            ("grpc.so_reuseport", 0),
        ]
        server = grpc.aio.server(options=options)
        add_broker_service(BrokerService(self), server)
        add_service(server, api_pb2, "Admin", AdminService(self))
        self._groups_service = GroupsService(self)
        add_service(server, api_pb2, "Groups", self._groups_service)
        self._replication_service = ReplicationService(self.transport, self.register)
        add_replication_service(self._replication_service, server)
        try:
            self.port = server.add_insecure_port(str(config.listen))
        except RuntimeError as exc:
            raise StartupError(f"cannot listen on {config.listen}: {exc}") from None
        if self.port == 0:
            raise StartupError(f"cannot listen on {config.listen} (address in use?)")
        self._update_peers(self.image)
        await self.quorum.start()
        self.partitions.start()
        self.groups.start()
        await server.start()
        self._server = server
        self._tasks.append(asyncio.get_running_loop().create_task(self._keep_registered()))
        self._tasks.append(asyncio.get_running_loop().create_task(self._stop_if_metadata_fails()))
        if not self.quorum.is_voter:
            self._tasks.append(asyncio.get_running_loop().create_task(self._find_metadata_leader()))
        log.info("node %d serving on %s (data dir %s, flush=%s, voters %s)", config.node_id, config.listen,
                 config.data_dir, config.flush, ",".join(f"{v.node_id}@{v.address}" for v in config.voters))

    def request_stop(self) -> None:
        if self._stop is not None:
            self._stop.set()

    async def _stop_if_metadata_fails(self) -> None:
        """A node whose metadata replica failed (a full disk, an I/O error) can neither follow
        the cluster nor serve it, yet would look alive: it stops with a non-zero status instead,
        so that a supervisor restarts it once the cause is gone (Kafka's broker halts likewise
        when its metadata log directory fails)."""
        replica = self.quorum.replica
        if replica is None:
            return
        while replica.failure is None and not replica.closed:
            await replica.wait_change()
        if replica.failure is not None and not self.shutting_down:
            log.critical("node %d: the metadata replica failed (%s); stopping", self.config.node_id,
                         replica.failure)
            self.exit_code = 1
            self.request_stop()

    async def wait_stopped(self) -> None:
        assert self._stop is not None
        await self._stop.wait()

    async def stop(self) -> None:
        self.shutting_down = True
        if self._shutdown is not None and not self._shutdown.done():
            self._shutdown.set_result(None)
        for task in self._tasks:
            task.cancel()
        # In-flight produce and fetch requests finish (long-polls were just woken; new produces
        # are refused) while replication still runs, so acks=all ones can still commit.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.shutdown_grace_ms / 1000
        while self.inflight > 0 and loop.time() < deadline:
            self._idle.clear()
            try:
                await asyncio.wait_for(self._idle.wait(), max(0.0, deadline - loop.time()))
            except TimeoutError:
                break
        if self._replication_service is not None:
            self._replication_service.cancel_streams()
        if self._groups_service is not None:
            self._groups_service.cancel_streams()
        if self._server is not None:
            await self._server.stop(0.5)
        await self.groups.close()
        # Leaders resign so the other replicas elect at once instead of after a timeout.
        await self.partitions.close_all()
        await self.quorum.close()
        await self.transport.close()
        for channel in self._admin_channels.values():
            await channel.close()
        if self._lock is not None:
            self._lock.close()
        log.info("node %d stopped cleanly", self.config.node_id)


async def run(config: NodeConfig) -> int:
    node = Node(config)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, node.request_stop)
    try:
        await node.start()
    except BaseException:
        await node.stop()
        raise
    await node.wait_stopped()
    log.info("node %d shutting down", config.node_id)
    await node.stop()
    return node.exit_code


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
