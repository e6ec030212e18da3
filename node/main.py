"""`python -m tidelog.node.main` and `tidelog node start`: run one node in the foreground."""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import ctypes.util
import gc
import logging
import sys
from pathlib import Path

from tidelog.node.config import NODE_KEYS, ConfigError, NodeConfig, load_config


def add_node_arguments(parser: argparse.ArgumentParser) -> None:
    docs = {key.name: key for key in NODE_KEYS}

    def text(name: str) -> str:
        key = docs[name]
        default = "" if key.default in (None, {}) else f" (default: {key.default})"
        return f"{key.doc}{default}; config key {name}"

    parser.add_argument("--config", type=Path, metavar="FILE.toml",
                        help="TOML file with the keys below (flags win over the file)")
    parser.add_argument("--node-id", type=int, help=text("node_id"))
    parser.add_argument("--listen", metavar="HOST:PORT", help=text("listen"))
    parser.add_argument("--advertised", metavar="HOST:PORT", help=text("advertised"))
    parser.add_argument("--data-dir", metavar="DIR", help=text("data_dir"))
    parser.add_argument("--controller-voters", metavar="ID@HOST:PORT,...", help=text("controller_voters"))
    parser.add_argument("--cluster-id", help=text("cluster_id"))
    parser.add_argument("--flush", choices=("always", "interval"), help=text("flush"))
    parser.add_argument("--flush-interval-ms", type=int, help=text("flush_interval_ms"))
    parser.add_argument("--peer-address", action="append", metavar="ID=HOST:PORT",
                        help=text("peer_addresses") + " (repeatable)")
    parser.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                        help="log verbosity (default: INFO)")


def config_from_args(args: argparse.Namespace) -> NodeConfig:
    return load_config(args.config, {
        "node_id": args.node_id,
        "listen": args.listen,
        "advertised": args.advertised,
        "data_dir": args.data_dir,
        "controller_voters": args.controller_voters,
        "cluster_id": args.cluster_id,
        "flush": args.flush,
        "flush_interval_ms": args.flush_interval_ms,
        "peer_addresses": args.peer_address,
    })


# glibc's malloc serves blocks above a (moving) threshold with mmap and unmaps them on free, so
# every batch-sized buffer (a request, a fetch answer, their protobuf copies) pays its pages'
# faults and zeroing again: about 3 us per 4 KiB page on a VM, i.e. ~200 us per 256 KiB buffer.
# Fixed thresholds keep such blocks in the heap; memory freed at the heap's top beyond the trim
# threshold still goes back to the system.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MALLOC_MMAP_THRESHOLD_BYTES = 16 << 20
MALLOC_TRIM_THRESHOLD_BYTES = 64 << 20


def keep_large_buffers_in_heap() -> None:
    """Set glibc's mmap and trim thresholds (see above); a no-op where malloc is not glibc's."""
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return
    mallopt(_M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD_BYTES)
    mallopt(_M_TRIM_THRESHOLD, MALLOC_TRIM_THRESHOLD_BYTES)


def use_uvloop_if_installed() -> None:
    """uvloop's event loop when it is installed, asyncio's own otherwise. The node's loop runs
    every gRPC completion, Raft timer and fsync hand-off; with uvloop a 3-node RF 3 acks=all
    produce takes about a tenth less node CPU per request (tests/node_process/test_bench.py)."""
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def freeze_startup_objects() -> None:
    """Move everything alive now (modules, classes, protobuf descriptors, grpc's and the node's
    code: ~34,000 objects) out of the cyclic GC's reach. grpc.aio leaves a reference cycle of 5
    objects behind every call it serves (its method lookup's closure), so the collector runs
    all the time on a busy node, and each full collection walked those objects again: 15-20 ms
    with the event loop stopped, several times a minute at 1,000 commits/s (issue #6's bench),
    right in the commits' p99. Frozen, a full collection walks only what the node made since."""
    gc.collect()
    gc.freeze()


def start(args: argparse.Namespace) -> int:
    """Handler of `tidelog node start`: run until SIGTERM/SIGINT; 0 after a clean shutdown."""
    # Imported here, not at the top: every `tidelog` command loads this module to register
    # `node start`, and the server's imports were a third of a client command's start-up CPU.
    from tidelog.node.server import StartupError, run

    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = config_from_args(args)
        keep_large_buffers_in_heap()
        use_uvloop_if_installed()
        freeze_startup_objects()
        return asyncio.run(run(config))
    except (ConfigError, StartupError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tidelog node start", description="Run one tidelog node.")
    add_node_arguments(parser)
    return start(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
