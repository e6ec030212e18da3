"""What one unary call costs grpc.aio itself on this machine: the floor under the coordinator's
CPU per commit (issue #6).

    python tests/bench/grpc_floor_bench.py [--rate 1000] [--seconds 5] [--option KEY=VALUE ...]

Starts a process serving the `Groups` service whose OffsetCommit answers at once (no
coordinator, no log, no replication; uvloop, like a node), drives it open loop at --rate
OffsetCommit calls/s from this process (uvloop, one call per commit, like group_bench.py), and
prints the server's CPU per call (whole process, then by thread: "loop" is the event loop, i.e.
grpc.aio's Python side; "event_engine" grpc's C-core threads; "python" grpc's poller thread),
this process's CPU per call, and the latency. --option passes a grpc server option (e.g.
grpc.optimization_target=latency) to try its effect. Prints figures and asserts nothing about
speed (DESIGN.md §10). Not collected by pytest.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import uvloop
from tidelog.cluster.launcher import free_ports
from tidelog.proto import api_pb2, api_pb2_grpc
from tidelog.proto.common_pb2 import ErrorCode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from group_bench import commit_request, percentile, process_cpu_s, thread_cpu_s

WARM_UP_CALLS = 200


class AnswerAtOnce(api_pb2_grpc.GroupsServicer):
    async def OffsetCommit(self, request: api_pb2.OffsetCommitRequest,
                           context: grpc.aio.ServicerContext) -> api_pb2.OffsetCommitResponse:
        return api_pb2.OffsetCommitResponse(error=ErrorCode.NONE, partitions=[
            api_pb2.OffsetCommitPartitionResult(topic=p.topic, partition=p.partition, error=ErrorCode.NONE)
            for p in request.partitions])


async def serve(port: int, options: list[tuple[str, Any]]) -> None:
    server = grpc.aio.server(options=options)
    api_pb2_grpc.add_GroupsServicer_to_server(AnswerAtOnce(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print("serving", flush=True)
    await server.wait_for_termination()


async def drive(port: int, pid: int, args: argparse.Namespace) -> None:
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    stub = api_pb2_grpc.GroupsStub(channel)
    for i in range(WARM_UP_CALLS):
        await stub.OffsetCommit(commit_request("g", "t", 0, i), timeout=10)
    latencies: list[float] = []

    async def one(i: int) -> None:
        started = time.perf_counter()
        await stub.OffsetCommit(commit_request("g", "t", i % 8, i), timeout=10)
        latencies.append(time.perf_counter() - started)

    gc.collect()
    gc.freeze()
    server_before, threads_before, own_before = process_cpu_s(pid), thread_cpu_s(pid), time.process_time()
    total = int(args.rate * args.seconds)
    started = time.perf_counter()
    tasks = []
    for i in range(total):
        delay = started + i / args.rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(one(i)))
    await asyncio.gather(*tasks)
    server = (process_cpu_s(pid) - server_before) / total * 1e6
    threads = {name: (cpu - threads_before.get(name, 0.0)) / total * 1e6 for name, cpu in thread_cpu_s(pid).items()}
    own = (time.process_time() - own_before) / total * 1e6
    ms = sorted(v * 1000 for v in latencies)
    print(f"no-op OffsetCommit at {args.rate:,.0f}/s open loop: server {server:.0f} us per call ("
          + ", ".join(f"{name} {us:.0f}" for name, us in sorted(threads.items(), key=lambda kv: -kv[1]) if us >= 1)
          + f"); load generator {own:.0f} us per call; p50 {ms[len(ms) // 2]:.2f} ms, p99 {percentile(ms, 0.99):.2f} ms",
          flush=True)
    await channel.close()


def parse_option(text: str) -> tuple[str, Any]:
    key, _, value = text.partition("=")
    return key, int(value) if value.lstrip("-").isdigit() else value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=1000.0)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--serve-on", type=int, help=argparse.SUPPRESS)  # the server process
    args = parser.parse_args()
    options = [parse_option(o) for o in args.option]
    if args.serve_on is not None:
        gc.collect()
        gc.freeze()  # as a node does (node/main.py)
        uvloop.run(serve(args.serve_on, options))
        return
    port = free_ports(1)[0]
    command = [sys.executable, __file__, "--serve-on", str(port)] + [f"--option={o}" for o in args.option]
    server = subprocess.Popen(command, stdout=subprocess.PIPE)
    try:
        assert server.stdout is not None
        server.stdout.readline()  # "serving"
        uvloop.run(drive(port, server.pid, args))
    finally:
        server.terminate()
        server.wait(timeout=10)


if __name__ == "__main__":
    main()
