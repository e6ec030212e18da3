"""`tidelog node …` and `tidelog cluster …` sub-commands."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tidelog.client import cli as client_cli
from tidelog.cluster import launcher
from tidelog.cluster.chaos import register_chaos
from tidelog.node import main as node_main
from tidelog.node.config import DEFAULT_PORT


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the node and cluster commands; each sets ``handler`` to a function of the args."""
    node = subparsers.add_parser("node", help="run a tidelog node")
    node_commands = node.add_subparsers(dest="node_command", metavar="COMMAND")
    node.set_defaults(handler=lambda args: _help(node))
    start = node_commands.add_parser(
        "start", help="run one node in the foreground (SIGTERM stops it cleanly)",
        description="Run one tidelog node in the foreground until SIGTERM or Ctrl-C.")
    node_main.add_node_arguments(start)
    start.set_defaults(handler=node_main.start)

    cluster = subparsers.add_parser("cluster", help="start and manage a local cluster")
    cluster_commands = cluster.add_subparsers(dest="cluster_command", metavar="COMMAND")
    cluster.set_defaults(handler=lambda args: _help(cluster))

    def sub(name: str, help_text: str) -> argparse.ArgumentParser:
        parser = cluster_commands.add_parser(name, help=help_text, description=help_text)
        parser.add_argument("--data-dir", type=Path, default=Path(launcher.DEFAULT_DATA_DIR),
                            help=f"the cluster's directory (default: {launcher.DEFAULT_DATA_DIR})")
        return parser

    up = sub("up", "start local nodes in the background and wait until they serve")
    up.add_argument("--nodes", type=int, default=3, help="how many nodes (default: 3)")
    up.add_argument("--base-port", type=int, default=DEFAULT_PORT,
                    help=f"node i listens on 127.0.0.1:(base+i-1) (default: {DEFAULT_PORT})")
    up.set_defaults(handler=_up)

    status = sub("status", "show the nodes, their PIDs, liveness and the partitions they lead")
    status.add_argument("--output", choices=("table", "json"), default="table")
    status.set_defaults(handler=_status)

    for name, help_text, handler in (
        ("stop", "stop one node gracefully (SIGTERM)", _stop),
        ("kill", "kill one node (SIGKILL)", _kill),
        ("restart", "start a stopped or killed node again and wait until it serves", _restart),
    ):
        parser = sub(name, help_text)
        parser.add_argument("node_id", type=int, metavar="ID")
        parser.set_defaults(handler=handler)

    down = sub("down", "stop every node of the cluster")
    down.set_defaults(handler=_down)

    # `cluster info` asks a running cluster over the client API, so the client room defines it.
    client_cli.register_cluster_info(cluster_commands)
    register_chaos(cluster_commands)


def _help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 0


def _up(args: argparse.Namespace) -> int:
    nodes = launcher.up(args.data_dir, args.nodes, args.base_port)
    bootstrap = ",".join(n.address for n in nodes)
    print(f"tidelog cluster of {len(nodes)} node(s) is up; data and logs in {args.data_dir.resolve()}")
    for node in nodes:
        print(f"  node {node.node_id}  {node.address}  pid {node.pid()}  log {node.log_path}")
    print(f"bootstrap: {bootstrap}")
    print(f"  export TIDELOG_BOOTSTRAP={bootstrap}")
    print(f"stop it with: tidelog cluster down --data-dir {args.data_dir}")
    return 0


def _status(args: argparse.Namespace) -> int:
    state = launcher.status(args.data_dir)
    if args.output == "json":
        print(json.dumps(state))
        return 0
    print(f"controller: {state['controller'] if state['controller'] >= 0 else 'none'}")
    print(f"{'ID':>4}  {'ADDRESS':<21} {'PID':>8}  {'ALIVE':<5}  LEADER OF")
    for node in state["nodes"]:
        leads = ", ".join(node["leader_of"]) or "-"
        pid = node["pid"] if node["pid"] is not None else "-"
        print(f"{node['id']:>4}  {node['address']:<21} {pid:>8}  {str(node['alive']).lower():<5}  {leads}")
    return 0


def _stop(args: argparse.Namespace) -> int:
    node, _ = launcher.find_node(args.data_dir, args.node_id)
    if not launcher.stop(node):
        print(f"node {node.node_id} was not running")
        return 0
    print(f"node {node.node_id} stopped")
    return 0


def _kill(args: argparse.Namespace) -> int:
    node, _ = launcher.find_node(args.data_dir, args.node_id)
    if not launcher.kill(node):
        print(f"node {node.node_id} was not running")
        return 0
    print(f"node {node.node_id} killed")
    return 0


def _restart(args: argparse.Namespace) -> int:
    node, nodes = launcher.find_node(args.data_dir, args.node_id)
    launcher.restart(node, nodes)
    print(f"node {node.node_id} serving on {node.address} (pid {node.pid()})")
    return 0


def _down(args: argparse.Namespace) -> int:
    stopped = launcher.down(args.data_dir)
    print(f"stopped node(s) {', '.join(map(str, stopped))}" if stopped else "no node was running")
    return 0
