"""The local cluster launcher behind `tidelog cluster up|status|stop|kill|restart|down`.

Layout of a launcher data dir (default ./tidelog-data):

    cluster.json         {"version": 0, "nodes": [{"id": 1, "port": 9192}, ...]}
    node-<id>.pid        PID of the running node process (removed by `down`)
    node-<id>/           the node's data dir; node-<id>/node.log holds its stdout and stderr

Node i listens on 127.0.0.1:(base_port + i - 1). Nodes run detached in their own session, so
they outlive the `tidelog cluster up` command; every other sub-command finds them by PID file.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from tidelog.node.config import DEFAULT_PORT
from tidelog.proto import api_pb2, api_pb2_grpc
from tidelog.proto.common_pb2 import ErrorCode
from tidelog.proto.errors import TidelogError

HOST = "127.0.0.1"
STATE_FILE = "cluster.json"
DEFAULT_DATA_DIR = "./tidelog-data"
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0


class LauncherError(TidelogError):
    def __init__(self, message: str) -> None:
        super().__init__(ErrorCode.INVALID_REQUEST, message)

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True, slots=True)
class LocalNode:
    node_id: int
    port: int
    cluster_dir: Path

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def data_dir(self) -> Path:
        return self.cluster_dir / f"node-{self.node_id}"

    @property
    def pid_file(self) -> Path:
        return self.cluster_dir / f"node-{self.node_id}.pid"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "node.log"

    def pid(self) -> int | None:
        """The PID of this node's process if it is running, else None (stale PID files ignored)."""
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if _is_node_process(pid) else None


def _is_node_process(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True  # no /proc: trust the PID file
    if not cmdline:
        return False  # a zombie: exited but not yet reaped
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        if state == "Z":
            return False
    except (OSError, IndexError):
        pass
    return b"tidelog.node.main" in cmdline


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct ports nothing listens on right now. Every socket is held until all
    are chosen, so the kernel cannot hand out one port twice; another process may still take
    one before a node binds it, which callers must survive."""
    socks = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((host, 0))
            socks.append(sock)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for sock in socks:
            sock.close()


def voters_of(nodes: list[LocalNode]) -> str:
    return ",".join(f"{n.node_id}@{n.address}" for n in nodes)


def load_nodes(cluster_dir: Path) -> list[LocalNode]:
    path = cluster_dir / STATE_FILE
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        raise LauncherError(f"no cluster in {cluster_dir} (run `tidelog cluster up --data-dir {cluster_dir}`)") from None
    except ValueError as exc:
        raise LauncherError(f"{path} is damaged: {exc}") from None
    return [LocalNode(int(n["id"]), int(n["port"]), cluster_dir) for n in state["nodes"]]


def find_node(cluster_dir: Path, node_id: int) -> tuple[LocalNode, list[LocalNode]]:
    nodes = load_nodes(cluster_dir)
    for node in nodes:
        if node.node_id == node_id:
            return node, nodes
    raise LauncherError(f"no node {node_id} in the cluster in {cluster_dir}; nodes: "
                        f"{', '.join(str(n.node_id) for n in nodes)}")


def describe(address: str, timeout: float = 1.0) -> api_pb2.DescribeClusterResponse | None:
    try:
        with grpc.insecure_channel(address) as channel:
            return api_pb2_grpc.AdminStub(channel).DescribeCluster(api_pb2.DescribeClusterRequest(), timeout=timeout)
    except grpc.RpcError:
        return None


def metadata(address: str, timeout: float = 2.0) -> api_pb2.MetadataResponse | None:
    try:
        with grpc.insecure_channel(address) as channel:
            return api_pb2_grpc.BrokerStub(channel).Metadata(api_pb2.MetadataRequest(), timeout=timeout)
    except grpc.RpcError:
        return None


def _log_tail(node: LocalNode, lines: int = 20) -> str:
    try:
        return "\n".join(node.log_path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def spawn(node: LocalNode, voters: str) -> subprocess.Popen[bytes]:
    """Start ``node`` detached and write its PID file."""
    node.data_dir.mkdir(parents=True, exist_ok=True)
    with open(node.log_path, "ab") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "tidelog.node.main", "--node-id", str(node.node_id), "--listen", node.address,
             "--data-dir", str(node.data_dir), "--controller-voters", voters],
            stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
        )
    tmp = node.pid_file.with_suffix(".pid.tmp")
    tmp.write_text(f"{process.pid}\n")
    os.replace(tmp, node.pid_file)
    return process


def wait_serving(nodes: list[LocalNode], processes: dict[int, subprocess.Popen[bytes]],
                 timeout: float = START_TIMEOUT_S) -> api_pb2.DescribeClusterResponse:
    """Wait until every node answers and sees every node registered; raise with log tails if not.

    ``processes`` are the just-spawned nodes by id: their exit is detected through the child
    handle, because right after fork a PID file points at a process that is not yet the node.
    """
    deadline = time.monotonic() + timeout
    ids = {n.node_id for n in nodes}
    last: api_pb2.DescribeClusterResponse | None = None
    pending = list(nodes)
    while pending:
        for node in list(pending):
            process = processes.get(node.node_id)
            if (process.poll() is not None) if process is not None else node.pid() is None:
                raise LauncherError(f"node {node.node_id} exited during start-up; last lines of "
                                    f"{node.log_path}:\n{_log_tail(node)}")
            answer = describe(node.address)
            if answer is not None and {n.node_id for n in answer.nodes} >= ids and answer.controller_id >= 0:
                last = answer
                pending.remove(node)
        if pending and time.monotonic() > deadline:
            raise LauncherError(f"node(s) {', '.join(str(n.node_id) for n in pending)} not serving within "
                                f"{timeout:.0f}s; see {pending[0].log_path}:\n{_log_tail(pending[0])}")
        if pending:
            time.sleep(0.1)
    assert last is not None
    return last


def up(cluster_dir: Path, nodes: int = 3, base_port: int = DEFAULT_PORT, timeout: float = START_TIMEOUT_S
       ) -> list[LocalNode]:
    if nodes < 1:
        raise LauncherError("--nodes must be at least 1")
    cluster_dir = cluster_dir.resolve()
    if (cluster_dir / STATE_FILE).exists():
        existing = load_nodes(cluster_dir)
        running = [n for n in existing if n.pid() is not None]
        if running:
            raise LauncherError(
                f"a cluster is already running in {cluster_dir} (node(s) "
                f"{', '.join(str(n.node_id) for n in running)}); use `tidelog cluster status` or "
                "`tidelog cluster down` first")
        if len(existing) != nodes or existing[0].port != base_port:
            raise LauncherError(
                f"{cluster_dir} holds a {len(existing)}-node cluster on ports from {existing[0].port}; "
                "start it with the same --nodes and --base-port, or use another --data-dir")
    cluster_dir.mkdir(parents=True, exist_ok=True)
    local = [LocalNode(i, base_port + i - 1, cluster_dir) for i in range(1, nodes + 1)]
    state = {"version": 0, "nodes": [{"id": n.node_id, "port": n.port} for n in local]}
    (cluster_dir / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
    voters = voters_of(local)
    processes = {node.node_id: spawn(node, voters) for node in local}
    try:
        wait_serving(local, processes, timeout)
    except LauncherError:
        for node in local:
            signal_node(node, signal.SIGKILL)
        raise
    return local


def signal_node(node: LocalNode, signum: int) -> bool:
    pid = node.pid()
    if pid is None:
        return False
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        return False
    return True


def wait_exit(node: LocalNode, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while node.pid() is not None:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def stop(node: LocalNode, timeout: float = STOP_TIMEOUT_S) -> bool:
    """SIGTERM and wait; SIGKILL after ``timeout``. True if it was running."""
    if not signal_node(node, signal.SIGTERM):
        return False
    if not wait_exit(node, timeout):
        signal_node(node, signal.SIGKILL)
        wait_exit(node, 5.0)
    return True


def kill(node: LocalNode) -> bool:
    was_running = signal_node(node, signal.SIGKILL)
    wait_exit(node, 5.0)
    return was_running


def restart(node: LocalNode, nodes: list[LocalNode], timeout: float = START_TIMEOUT_S) -> None:
    if node.pid() is not None:
        stop(node)
    process = spawn(node, voters_of(nodes))
    wait_serving([node], {node.node_id: process}, timeout)


def down(cluster_dir: Path, timeout: float = STOP_TIMEOUT_S) -> list[int]:
    """Stop every node (SIGTERM, SIGKILL after ``timeout``); return the ids that were running."""
    nodes = load_nodes(cluster_dir.resolve())
    stopped = [n for n in nodes if signal_node(n, signal.SIGTERM)]
    for node in stopped:
        if not wait_exit(node, timeout):
            signal_node(node, signal.SIGKILL)
            wait_exit(node, 5.0)
    for node in nodes:
        node.pid_file.unlink(missing_ok=True)
    return [n.node_id for n in stopped]


def status(cluster_dir: Path) -> dict[str, Any]:
    """``{"controller": id, "nodes": [{"id", "address", "pid", "alive", "leader_of": [...]}]}``."""
    nodes = load_nodes(cluster_dir.resolve())
    leader_of: dict[int, list[str]] = {n.node_id: [] for n in nodes}
    controller = -1
    for node in nodes:
        if node.pid() is None:
            continue
        answer = metadata(node.address)
        if answer is None:
            continue
        controller = answer.controller_id
        if controller in leader_of:
            leader_of[controller].append("__cluster_metadata-0")
        for topic in answer.topics:
            for partition in topic.partitions:
                if partition.leader_id in leader_of:
                    leader_of[partition.leader_id].append(f"{topic.name}-{partition.partition}")
        break
    out = []
    for node in nodes:
        pid = node.pid()
        out.append({"id": node.node_id, "address": node.address, "pid": pid,
                    "alive": pid is not None and describe(node.address) is not None,
                    "leader_of": sorted(leader_of[node.node_id])})
    return {"controller": controller, "nodes": out}
