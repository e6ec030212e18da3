"""The node process: one asyncio gRPC server, the controller, and this node's partitions.

Start-up: lock the data dir, replay the metadata log into an image, register this node, open
the partitions the image assigns here, then listen. SIGTERM (or SIGINT): refuse new produce
requests, let in-flight requests finish (long-polling fetches are woken to answer at once),
flush and close every log — closing writes storage's clean-shutdown marker — and exit 0.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import signal
from pathlib import Path
from types import MappingProxyType
from typing import IO, Mapping

import grpc

from tidelog.node.config import ConfigError, NodeConfig
from tidelog.node.controller import Controller, LocalMetadataLog
from tidelog.node.metadata import MetadataImage, TopicImage
from tidelog.node.partitions import LOCAL_LEADER_EPOCH, PartitionManager, _write_atomically
from tidelog.node.services import AdminService, BrokerService
from tidelog.proto import api_pb2, api_pb2_grpc

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"
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
        if len(config.voters) > 1 or config.voters[0].node_id != config.node_id:
            raise ConfigError(
                "replicated metadata quorums are not available yet: --controller-voters must be this "
                f"node alone ({config.node_id}@{config.advertised_address})")
        self.config = config
        self.shutting_down = False
        self.partitions = PartitionManager(config.data_dir, config.node_id, config.flush,
                                           config.flush_interval_ms, lambda: config.topic_config_defaults,
                                           config.retention_check_interval_ms)
        self.metadata_log: LocalMetadataLog | None = None
        self.controller: Controller = None  # type: ignore[assignment]  # set in start()
        self._server: grpc.aio.Server | None = None
        self._lock: IO[bytes] | None = None
        self._stop: asyncio.Event | None = None
        self._shutdown: asyncio.Future[None] | None = None
        self.port = 0

    # --- views used by the services ---------------------------------------------------------

    @property
    def image(self) -> MetadataImage:
        return self.controller.image

    @property
    def controller_id(self) -> int:
        return self.controller.controller_id

    def leader_of(self, image: MetadataImage, topic: str, partition: int) -> tuple[int, int]:
        """(leader id, leader epoch) of a partition as this node knows it; -1 = none."""
        assignment = image.partition(topic, partition)
        if assignment is None:
            return -1, -1
        leader = assignment.preferred_leader
        if leader != self.config.node_id:
            return -1, -1
        replica = self.partitions.get(topic, partition)
        return leader, replica.leader_epoch if replica is not None else LOCAL_LEADER_EPOCH

    def node_infos(self, image: MetadataImage) -> list[api_pb2.NodeInfo]:
        return [api_pb2.NodeInfo(node_id=n.node_id, host=n.host, port=n.port, rack=n.rack,
                                 alive=n.node_id == self.config.node_id)
                for n in sorted(image.nodes.values(), key=lambda n: n.node_id)]

    def topic_configs(self, topic: TopicImage) -> Mapping[str, str]:
        return MappingProxyType({**self.config.topic_config_defaults, **topic.configs})

    def shutdown_signal(self) -> asyncio.Future[None]:
        assert self._shutdown is not None
        return self._shutdown

    # --- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        config = self.config
        self._lock = lock_data_dir(config.data_dir)
        check_node_identity(config)
        self._stop = asyncio.Event()
        self._shutdown = asyncio.get_running_loop().create_future()
        self.metadata_log = await asyncio.to_thread(LocalMetadataLog, config.data_dir,
                                                    config.topic_config_defaults)
        self.controller = Controller(config, self.metadata_log, self.partitions.reconcile)
        await self.controller.start()
        await self.partitions.reconcile(self.controller.image)
        self.partitions.start()
        options = [
            ("grpc.max_receive_message_length", config.max_request_bytes),
            ("grpc.max_send_message_length", config.max_request_bytes),
            ("grpc.so_reuseport", 0),
        ]
        server = grpc.aio.server(options=options)
        api_pb2_grpc.add_BrokerServicer_to_server(BrokerService(self), server)
        api_pb2_grpc.add_AdminServicer_to_server(AdminService(self), server)
        try:
            self.port = server.add_insecure_port(str(config.listen))
        except RuntimeError as exc:
            raise StartupError(f"cannot listen on {config.listen}: {exc}") from None
        if self.port == 0:
            raise StartupError(f"cannot listen on {config.listen} (address in use?)")
        await server.start()
        self._server = server
        log.info("node %d serving on %s (cluster %s, data dir %s, flush=%s)", config.node_id,
                 config.listen, self.image.cluster_id, config.data_dir, config.flush)

    def request_stop(self) -> None:
        if self._stop is not None:
            self._stop.set()

    async def wait_stopped(self) -> None:
        assert self._stop is not None
        await self._stop.wait()

    async def stop(self) -> None:
        self.shutting_down = True
        if self._shutdown is not None and not self._shutdown.done():
            self._shutdown.set_result(None)
        if self._server is not None:
            await self._server.stop(self.config.shutdown_grace_ms / 1000)
        await self.partitions.close_all()
        if self.metadata_log is not None:
            await asyncio.to_thread(self.metadata_log.close)
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
    return 0


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
