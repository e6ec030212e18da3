"""Real node processes for process-level tests (DESIGN.md §10).

Each node runs as ``sys.executable -m tidelog.node.main`` on a free loopback port, with its
stdout/stderr in ``<data_dir>/node.log``. Every process started here is also registered with
atexit, so an aborted test run never leaves nodes behind; the pytest fixtures in
tests/conftest.py stop them by PID when the test ends, pass or fail.

    cluster = start_cluster(tmp_path, nodes=1, flush="interval")
    cluster.bootstrap        # "127.0.0.1:p1[,127.0.0.1:p2...]"
    node = cluster.nodes[0]  # NodeProcess: node_id, port, address, pid, data_dir, log_path
    node.kill(); node.restart(); cluster.wait_ready()
    cluster.stop_all()
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from tidelog.cluster.launcher import free_ports
from tidelog.proto import api_pb2, api_pb2_grpc
from tidelog.proto.common_pb2 import ErrorCode

LOOPBACK = "127.0.0.1"

# grpc's default reconnect backoff (1 s growing 1.6x, jittered) leaves a channel to a node that
# was killed and restarted failing fast for seconds after the node serves again; a raw-gRPC test
# client that outlives a restart must reconnect as quickly as tidelog.client does.
RECONNECT_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
                     ("grpc.max_reconnect_backoff_ms", 1000)]


def reconnecting_channel(address: str) -> grpc.Channel:
    return grpc.insecure_channel(address, options=RECONNECT_OPTIONS)
DEFAULT_START_TIMEOUT = 30.0
LOG_FILE = "node.log"
CONFIG_FILE = "node.toml"
PORT_RETRIES = 3


class NodeStartError(RuntimeError):
    """A node did not come up; the message carries the tail of its log."""


def free_port() -> int:
    """A port nothing listens on right now (bind to port 0 on loopback and let the kernel pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, dict):
        return "{ " + ", ".join(f'"{k}" = {_toml_value(v)}' for k, v in value.items()) + " }"
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


def write_config(path: Path, values: dict[str, Any]) -> None:
    path.write_text("".join(f"{key} = {_toml_value(value)}\n" for key, value in values.items()))


def probe(address: str, timeout: float = 1.0) -> api_pb2.DescribeClusterResponse | None:
    """DescribeCluster of the node at ``address``, or None if it does not answer."""
    try:
        with grpc.insecure_channel(address) as channel:
            return api_pb2_grpc.AdminStub(channel).DescribeCluster(
                api_pb2.DescribeClusterRequest(), timeout=timeout)
    except grpc.RpcError:
        return None


@dataclass(eq=False)
class NodeProcess:
    """One node process; config holds node TOML keys (see tidelog.node.config.NODE_KEYS)."""

    node_id: int
    port: int
    data_dir: Path
    config: dict[str, Any] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None
    _log_file: Any = None

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    @property
    def pid(self) -> int:
        if self.process is None:
            raise RuntimeError(f"node {self.node_id} was never started")
        return self.process.pid

    @property
    def log_path(self) -> Path:
        return self.data_dir / LOG_FILE

    @property
    def config_path(self) -> Path:
        return self.data_dir / CONFIG_FILE

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def start(self, wait: bool = True, timeout: float = DEFAULT_START_TIMEOUT) -> NodeProcess:
        if self.running():
            raise RuntimeError(f"node {self.node_id} is already running (pid {self.pid})")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        values = {"node_id": self.node_id, "listen": self.address, "data_dir": str(self.data_dir),
                  **self.config}
        write_config(self.config_path, values)
        if self._log_file is not None:
            self._log_file.close()
        self._log_file = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tidelog.node.main", "--config", str(self.config_path)],
            stdin=subprocess.DEVNULL, stdout=self._log_file, stderr=subprocess.STDOUT,
            start_new_session=True,  # a Ctrl-C of pytest must not reach the nodes first
        )
        atexit.register(self._kill_at_exit)
        if wait:
            self.wait_serving(timeout)
        return self

    def wait_serving(self, timeout: float = DEFAULT_START_TIMEOUT) -> api_pb2.DescribeClusterResponse:
        """Poll DescribeCluster until this node answers with a controller and its metadata
        (its own registration) applied; raise with the log tail if it dies or hangs."""
        deadline = time.monotonic() + timeout
        while True:
            if not self.running():
                raise NodeStartError(f"node {self.node_id} exited with {self.returncode} during start-up:\n"
                                     f"{self.log_tail()}")
            answer = probe(self.address, timeout=max(0.1, min(1.0, deadline - time.monotonic())))
            if answer is not None and answer.controller_id >= 0 and \
                    self.node_id in {info.node_id for info in answer.nodes}:
                return answer
            if time.monotonic() > deadline:
                self.kill()
                raise NodeStartError(f"node {self.node_id} did not answer on {self.address} within "
                                     f"{timeout:.0f}s:\n{self.log_tail()}")
            time.sleep(0.05)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def _signal(self, signum: int) -> None:
        if self.running():
            assert self.process is not None
            try:
                os.kill(self.process.pid, signum)
            except ProcessLookupError:
                pass

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL if it has not exited by the deadline; returns the exit code."""
        if self.process is None:
            return None
        if self.running():
            self._signal(signal.SIGCONT)  # a paused process cannot handle SIGTERM
            self._signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
                self.process.wait()
        self._forget()
        return self.process.returncode

    def kill(self) -> int | None:
        """SIGKILL: the crash every acks=all record must survive."""
        if self.process is None:
            return None
        self._signal(signal.SIGKILL)
        self.process.wait()
        self._forget()
        return self.process.returncode

    def pause(self) -> None:
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal(signal.SIGCONT)

    def restart(self, wait: bool = True, timeout: float = DEFAULT_START_TIMEOUT) -> NodeProcess:
        """Stop (gracefully) if running, then start again on the same port and data dir."""
        if self.running():
            self.stop()
        return self.start(wait=wait, timeout=timeout)

    def _forget(self) -> None:
        atexit.unregister(self._kill_at_exit)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def _kill_at_exit(self) -> None:
        if self.process is not None and self.process.poll() is None:
            try:
                os.kill(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@dataclass(eq=False)
class LocalCluster:
    nodes: list[NodeProcess]

    @property
    def bootstrap(self) -> str:
        return ",".join(node.address for node in self.nodes)

    @property
    def addresses(self) -> list[str]:
        return [node.address for node in self.nodes]

    def node(self, node_id: int) -> NodeProcess:
        return next(n for n in self.nodes if n.node_id == node_id)

    def running_nodes(self) -> list[NodeProcess]:
        return [n for n in self.nodes if n.running()]

    def wait_ready(self, timeout: float = DEFAULT_START_TIMEOUT, nodes: Iterable[NodeProcess] | None = None
                   ) -> api_pb2.DescribeClusterResponse:
        """Wait until every (running) node answers DescribeCluster and sees every node registered."""
        wanted = list(nodes) if nodes is not None else self.running_nodes()
        ids = {n.node_id for n in self.nodes}
        deadline = time.monotonic() + timeout
        last: api_pb2.DescribeClusterResponse | None = None
        while True:
            pending = []
            for node in wanted:
                answer = node.wait_serving(max(0.1, deadline - time.monotonic()))
                if {info.node_id for info in answer.nodes} >= ids and answer.controller_id >= 0:
                    last = answer
                else:
                    pending.append(node)
            if not pending and last is not None:
                return last
            if time.monotonic() > deadline:
                raise NodeStartError(f"cluster not ready within {timeout:.0f}s; waiting on "
                                     f"{[n.node_id for n in pending]}:\n" +
                                     "\n".join(n.log_tail(15) for n in pending))
            wanted = pending
            time.sleep(0.05)

    def stop_all(self, timeout: float = 10.0) -> None:
        for node in self.nodes:
            node._signal(signal.SIGCONT)
            node._signal(signal.SIGTERM)
        for node in self.nodes:
            node.stop(timeout)

    def kill_all(self) -> None:
        for node in self.nodes:
            node.kill()

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()


def start_cluster(tmp_path: Path, nodes: int = 1, *, wait: bool = True,
                  timeout: float = DEFAULT_START_TIMEOUT, voters: int | None = None,
                  **config: Any) -> LocalCluster:
    """Start ``nodes`` nodes with data dirs ``tmp_path/node-<id>`` and wait until they serve.

    ``config`` are node config keys (tidelog.node.config.NODE_KEYS), e.g. ``flush="interval"``
    or ``topic_defaults={"segment.bytes": "1048576"}``; they apply to every node.
    With more than one node, the first ``voters`` nodes (default: all) are the controller
    voters and the others observe the metadata quorum. Ports are picked free; if
    another process grabs one before the node binds it, the whole start is retried on new ones.
    """
    for attempt in range(PORT_RETRIES):
        ports = free_ports(nodes)
        node_config = dict(config)
        if nodes > 1 and "controller_voters" not in config:
            node_config["controller_voters"] = ",".join(
                f"{i + 1}@{LOOPBACK}:{p}" for i, p in enumerate(ports[:voters or nodes]))
        cluster = LocalCluster([NodeProcess(i + 1, port, Path(tmp_path) / f"node-{i + 1}", dict(node_config))
                                for i, port in enumerate(ports)])
        try:
            for node in cluster.nodes:
                node.start(wait=False)
            if wait:
                cluster.wait_ready(timeout)
        except NodeStartError as exc:
            cluster.kill_all()
            if "cannot listen" not in str(exc) or attempt == PORT_RETRIES - 1:
                raise
            for node in cluster.nodes:
                shutil.rmtree(node.data_dir, ignore_errors=True)
            continue
        except BaseException:
            cluster.kill_all()
            raise
        return cluster
    raise AssertionError("unreachable")


def produce_following_leader(
    cluster: LocalCluster, topic: str, records: bytes, *, deadline_s: float = 60.0,
    retry_on: Iterable[int] = (ErrorCode.NOT_LEADER_OR_FOLLOWER,),
) -> api_pb2.ProducePartitionResult:
    """acks=all of ``records`` (bytes as they are) to partition 0's leader, following leader
    hints; an unreachable node or an error in ``retry_on`` is tried again until the deadline,
    anything else is returned."""
    retry = set(retry_on)
    deadline = time.monotonic() + deadline_s
    addresses = [n.address for n in cluster.running_nodes()]
    index = 0
    while True:
        address = addresses[index % len(addresses)]
        try:
            with grpc.insecure_channel(address) as channel:
                response = api_pb2_grpc.BrokerStub(channel).Produce(api_pb2.ProduceRequest(
                    acks=-1, timeout_ms=10000, partitions=[api_pb2.ProducePartitionData(
                        topic=topic, partition=0, records=records)]), timeout=15)
            result: api_pb2.ProducePartitionResult | None = response.partitions[0]
        except grpc.RpcError:
            result = None
        if result is not None and result.error not in retry:
            return result
        assert time.monotonic() < deadline, result
        if result is not None and result.leader.leader_id >= 0 and result.leader.port:
            hinted = f"{result.leader.host}:{result.leader.port}"
            if hinted in addresses:
                index = addresses.index(hinted)
                continue
        index += 1
        time.sleep(0.05)  # between attempts, not a wait for a condition
