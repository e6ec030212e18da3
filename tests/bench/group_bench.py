"""Consumer-group coordinator figures (issue 6): offset commits/s and group join time.

    python tests/bench/group_bench.py [--nodes 3] [--seconds 10] [--in-flight 64] [--rate 1000]
                                      [--groups 100] [--members 4] [--partitions 8] [--reads]
                                      [--heartbeat-interval-ms 1000] [--only commits|joins]
                                      [--unary] [--asyncio-loop] [--profile FILE [--profile-follower]]

Starts a --nodes cluster (tests/support/nodes.py) in a temporary directory; `__consumer_offsets`
gets replication factor min(3, nodes). It talks gRPC without the client library around it, so
the figures are the server's:

* commits go as tidelog.client sends them, over one OffsetCommitStream (client/connection.py
  `CommitStream`); --unary makes each one a unary OffsetCommit call instead.
* commits, closed loop: --in-flight OffsetCommit calls (one partition each) kept in flight
  against one group's coordinator for --seconds; commits/s and latency p50/p99/max.
* commits, open loop: one commit every 1/--rate s for --seconds whatever the answers do, so the
  latency is the one a client sees at that load (the target: >= 1,000/s with p99 <= 20 ms on
  3 nodes, RF 3).
* after each commit phase, the CPU per call of each node process (/proc) and of this load
  generator, and how busy the whole machine was: the nodes and the generator share its cores
  (with anything else running), so a busy machine explains a long tail. --reads makes the same
  calls OffsetFetch, which append nothing: the per-call cost without the log. The load generator
  is one process on uvloop (--asyncio-loop: asyncio's loop).
* the open loop's latencies again, split by what other processes on the machine did meanwhile
  (per 0.5 s window, machine CPU minus the benchmark's own): in windows where they took under
  10% of a core, and in the rest. The benchmark itself takes ~1.3 of the 2 cores at 1,000/s, so
  a tail found only in the busy windows is the machine's, not the coordinator's.
* joins: --groups groups x --members members subscribe to one --partitions topic at once; each
  member heartbeats again at once when its assignment changed (to acknowledge a revocation or
  take new partitions), else every heartbeat interval (node config, default here 1000 ms), as a
  KIP-848 client does. Reported: time until every group is stable (DescribeGroup) with
  disjoint member assignments covering every partition, and heartbeats sent.

Prints figures and asserts nothing about speed (DESIGN.md §10). Not collected by pytest.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from bisect import bisect_right
from pathlib import Path
from typing import Any

import grpc
import uvloop
from tidelog.client.connection import CommitStream
from tidelog.proto import api_pb2, api_pb2_grpc, common_pb2
from tidelog.proto.common_pb2 import ErrorCode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from support.nodes import LocalCluster, start_cluster

RETRIABLE = {ErrorCode.NOT_COORDINATOR, ErrorCode.COORDINATOR_LOAD_IN_PROGRESS, ErrorCode.COORDINATOR_NOT_AVAILABLE,
             ErrorCode.REQUEST_TIMED_OUT}


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (all its threads) so far; 0 if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def thread_cpu_s(pid: int) -> dict[str, float]:
    """CPU seconds so far of each thread of process ``pid``, summed by thread name (grpc's own
    threads, the flusher, the loop's thread: where a node's CPU goes without a profiler)."""
    by_name: dict[str, float] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return by_name
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                text = f.read()
        except OSError:
            continue
        # The main thread (tid = pid) runs the event loop; other Python threads share its name.
        name = "loop" if tid == str(pid) else text[text.index("(") + 1:text.rindex(")")]
        fields = text.rsplit(")", 1)[1].split()
        by_name[name] = by_name.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    return by_name


def machine_busy() -> tuple[int, int]:
    """(total, idle + iowait) jiffies of the whole machine, from /proc/stat."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    return sum(values), values[3] + values[4]


class CpuMeter:
    """CPU per call of each node and of this load generator over one phase, and how busy the
    whole machine was meanwhile (the machine is shared: a busy one explains a bad tail)."""

    def __init__(self, local: LocalCluster) -> None:
        self.pids = {n.node_id: n.pid for n in local.nodes if n.pid is not None}
        self.start()

    def start(self) -> None:
        self.nodes = {i: process_cpu_s(pid) for i, pid in self.pids.items()}
        self.threads = {i: thread_cpu_s(pid) for i, pid in self.pids.items()}
        self.own = time.process_time()
        self.machine = machine_busy()

    def line(self, calls: int, coordinator: int) -> str:
        if not calls:
            return "no calls"
        per = {i: (process_cpu_s(pid) - self.nodes[i]) / calls * 1e6 for i, pid in self.pids.items()}
        own = (time.process_time() - self.own) / calls * 1e6
        total, idle = machine_busy()
        span = total - self.machine[0]
        busy = 100 * (os.cpu_count() or 1) * (1 - (idle - self.machine[1]) / span) if span else float("nan")
        others = " ".join(f"{per[i]:.0f}" for i in sorted(per) if i != coordinator)
        return (f"CPU per call: coordinator {per.get(coordinator, float('nan')):.0f} us, other nodes {others} us, "
                f"load generator {own:.0f} us, all {sum(per.values()) + own:.0f} us; "
                f"machine busy {busy:.0f}% of {100 * (os.cpu_count() or 1)}%")

    def threads_line(self, calls: int, node_id: int) -> str:
        """Node ``node_id``'s CPU per call by thread name, biggest first."""
        before = self.threads.get(node_id, {})
        after = thread_cpu_s(self.pids[node_id]) if node_id in self.pids else {}
        per = {name: (cpu - before.get(name, 0.0)) / calls * 1e6 for name, cpu in after.items()}
        return ", ".join(f"{name} {us:.0f}" for name, us in sorted(per.items(), key=lambda kv: -kv[1]) if us >= 1)


# The open loop's latencies are split by what other processes did meanwhile, per window of this
# length: a window is quiet when they took less than QUIET_OTHERS_PCT of one core.
WINDOW_S = 0.5
QUIET_OTHERS_PCT = 10.0


class OthersMeter:
    """Every WINDOW_S, from a thread beside the loop: the whole machine's CPU and this
    benchmark's own (the nodes and this load generator). Their difference, what the *other*
    processes took in each window, tells a tail of ours from one a busy machine made: with
    ~1.3 cores of 2 taken by the benchmark itself, another process's burst saturates it."""

    def __init__(self, local: LocalCluster) -> None:
        self.pids = [n.pid for n in local.nodes if n.pid is not None] + [os.getpid()]
        self.samples: list[tuple[float, int, int, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="others-meter", daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        total, idle = machine_busy()
        self.samples.append((time.perf_counter(), total, idle, sum(process_cpu_s(pid) for pid in self.pids)))

    def _run(self) -> None:
        self._sample()
        while not self._stop.wait(WINDOW_S):
            self._sample()
        self._sample()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def split(self, calls: list[tuple[float, float]]) -> str:
        """``calls`` as (start time, latency s): their latency in quiet windows and in the rest."""
        starts, others = [], []
        for a, b in zip(self.samples, self.samples[1:]):
            span = b[1] - a[1]
            if span <= 0 or b[0] <= a[0]:
                continue
            machine = 100 * (os.cpu_count() or 1) * (1 - (b[2] - a[2]) / span)
            starts.append(a[0])
            others.append(machine - (b[3] - a[3]) / (b[0] - a[0]) * 100)
        if not starts:
            return "no CPU samples"
        quiet: list[float] = []
        busy: list[float] = []
        for started, latency in calls:
            window = bisect_right(starts, started) - 1
            (quiet if window >= 0 and others[window] < QUIET_OTHERS_PCT else busy).append(latency)
        calm = sum(1 for o in others if o < QUIET_OTHERS_PCT)
        return (f"{calm} of {len(others)} {WINDOW_S:g} s windows had other processes under "
                f"{QUIET_OTHERS_PCT:g}% of a core: {len(quiet)} calls there, {latency_line(quiet)}; "
                f"{len(busy)} calls in the others, {latency_line(busy)}")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def latency_line(latencies_s: list[float]) -> str:
    ms = [v * 1000 for v in latencies_s]
    if not ms:
        return "no answers"
    return (f"p50 {statistics.median(ms):.1f} ms, p99 {percentile(ms, 0.99):.1f} ms, "
            f"max {max(ms):.1f} ms")


class Cluster:
    """Async stubs per node and coordinator lookup with retries."""

    def __init__(self, local: LocalCluster) -> None:
        self.local = local
        self.channels = {n.node_id: grpc.aio.insecure_channel(n.address) for n in local.nodes}
        self.coordinators: dict[str, int] = {}

    def stub(self, node_id: int) -> api_pb2_grpc.GroupsStub:
        return api_pb2_grpc.GroupsStub(self.channels[node_id])

    async def close(self) -> None:
        for channel in self.channels.values():
            await channel.close()

    async def find(self, group_id: str) -> int:
        deadline = time.monotonic() + 60
        while True:
            for node_id in self.channels:
                try:
                    answer = await self.stub(node_id).FindCoordinator(
                        api_pb2.FindCoordinatorRequest(group_id=group_id), timeout=10)
                except grpc.RpcError:
                    continue
                if answer.error == ErrorCode.NONE:
                    self.coordinators[group_id] = answer.node_id
                    return answer.node_id
            if time.monotonic() > deadline:
                raise RuntimeError(f"no coordinator for {group_id}")
            await asyncio.sleep(0.05)

    async def call(self, group_id: str, method: str, request: Any) -> Any:
        deadline = time.monotonic() + 60
        while True:
            node_id = self.coordinators.get(group_id) or await self.find(group_id)
            try:
                answer = await getattr(self.stub(node_id), method)(request, timeout=10)
            except grpc.RpcError:
                answer = None
            if answer is not None and answer.error not in RETRIABLE:
                return answer
            self.coordinators.pop(group_id, None)
            if time.monotonic() > deadline:
                raise RuntimeError(f"{method} for {group_id} kept failing: {answer}")
            await asyncio.sleep(0.02)


def create_topic(local: LocalCluster, name: str, partitions: int) -> None:
    with grpc.insecure_channel(local.nodes[0].address) as channel:
        answer = api_pb2_grpc.AdminStub(channel).CreateTopics(api_pb2.CreateTopicsRequest(
            topics=[api_pb2.NewTopic(name=name, num_partitions=partitions, replication_factor=1)],
            timeout_ms=30000), timeout=40)
    if answer.topics[0].error not in (ErrorCode.NONE, ErrorCode.TOPIC_ALREADY_EXISTS):
        raise RuntimeError(str(answer))


def commit_request(group_id: str, topic: str, partition: int, offset: int) -> api_pb2.OffsetCommitRequest:
    return api_pb2.OffsetCommitRequest(group_id=group_id, member_epoch=-1, partitions=[
        api_pb2.OffsetCommitPartition(topic=topic, partition=partition, offset=offset, leader_epoch=-1)])


async def commits(cluster: Cluster, args: argparse.Namespace) -> None:
    group_id, topic = "bench-commits", "bench-offsets"
    node_id = await cluster.find(group_id)
    await cluster.call(group_id, "OffsetCommit", commit_request(group_id, topic, 0, 0))  # loaded, warm
    stub = cluster.stub(node_id)
    commit_stream = CommitStream(stub)  # as tidelog.client commits
    counter = 0
    errors = 0

    async def one(partition: int) -> float:
        nonlocal counter, errors
        counter += 1
        started = time.perf_counter()
        if args.reads:
            answer = await stub.OffsetFetch(api_pb2.OffsetFetchRequest(
                group_id=group_id, member_epoch=-1,
                partitions=[common_pb2.TopicPartition(topic=topic, partition=partition)]), timeout=10)
            failed = answer.error != ErrorCode.NONE
        else:
            request = commit_request(group_id, topic, partition, counter)
            answer = await (stub.OffsetCommit(request, timeout=10) if args.unary else commit_stream.commit(request, 10))
            failed = answer.error != ErrorCode.NONE or answer.partitions[0].error != ErrorCode.NONE
        if failed:
            errors += 1
        return time.perf_counter() - started

    # Closed loop.
    latencies: list[float] = []
    meter = CpuMeter(cluster.local)
    stop_at = time.perf_counter() + args.seconds

    async def worker(index: int) -> None:
        while time.perf_counter() < stop_at:
            latencies.append(await one(index % args.partitions))

    started = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(args.in_flight)))
    elapsed = time.perf_counter() - started
    print(f"commits closed loop ({args.in_flight} in flight, coordinator node {node_id}): "
          f"{len(latencies) / elapsed:,.0f} commits/s; {latency_line(latencies)}; errors {errors}", flush=True)
    print(f"  {meter.line(len(latencies), node_id)}", flush=True)
    print(f"  coordinator threads, us per call: {meter.threads_line(len(latencies), node_id)}", flush=True)

    # Open loop at --rate.
    errors = 0
    latencies = []
    tasks: list[asyncio.Task[float]] = []
    interval = 1.0 / args.rate
    meter.start()
    others = OthersMeter(cluster.local)
    profiler = start_profiler(cluster.local, node_id, args)
    started = time.perf_counter()
    total = int(args.rate * args.seconds)
    issued: list[float] = []
    for i in range(total):
        delay = started + i * interval - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        issued.append(time.perf_counter())
        tasks.append(asyncio.ensure_future(one(i % args.partitions)))
    latencies = list(await asyncio.gather(*tasks))
    elapsed = time.perf_counter() - started
    others.stop()
    print(f"commits open loop at {args.rate:,.0f}/s offered: {total / elapsed:,.0f} commits/s answered; "
          f"{latency_line(latencies)}; errors {errors}", flush=True)
    print(f"  {meter.line(total, node_id)}", flush=True)
    print(f"  coordinator threads, us per call: {meter.threads_line(total, node_id)}", flush=True)
    print(f"  {others.split(list(zip(issued, latencies)))}", flush=True)
    if profiler is not None:
        await asyncio.to_thread(profiler.wait)
    await commit_stream.close()


def start_profiler(local: LocalCluster, node_id: int, args: argparse.Namespace) -> subprocess.Popen[bytes] | None:
    """With --profile FILE: py-spy (not a dependency: install it yourself) samples the
    coordinator's process (--profile-follower: another node's) for the open-loop phase without
    stopping it, one stack per thread; FILE is in py-spy's raw (collapsed stack) format."""
    if args.profile is None:
        return None
    pid = next(n.pid for n in local.nodes if (n.node_id == node_id) != args.profile_follower)
    return subprocess.Popen([str(Path(sys.executable).with_name("py-spy")), "record", "--format", "raw",
                             "--rate", "250", "--nonblocking", "--threads", "--duration", str(int(args.seconds)),
                             "--pid", str(pid), "--output", str(args.profile)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def joins(cluster: Cluster, args: argparse.Namespace) -> None:
    topic = "bench-joins"
    everything = {(topic, p) for p in range(args.partitions)}
    groups = [f"bench-group-{i}" for i in range(args.groups)]
    await asyncio.gather(*(cluster.find(g) for g in groups))
    heartbeats = 0
    stop = asyncio.Event()
    views: dict[str, dict[str, set[tuple[str, int]]]] = {g: {} for g in groups}

    async def member(group_id: str, index: int) -> None:
        nonlocal heartbeats
        member_id, epoch = "", 0
        owned: set[tuple[str, int]] = set()
        while not stop.is_set():
            request = api_pb2.ConsumerGroupHeartbeatRequest(
                group_id=group_id, member_id=member_id, member_epoch=epoch, rebalance_timeout_ms=30000,
                has_subscription=True, subscribed_topics=[topic], has_owned_partitions=True,
                owned_partitions=[common_pb2.TopicPartition(topic=t, partition=p) for t, p in sorted(owned)])
            answer = await cluster.call(group_id, "ConsumerGroupHeartbeat", request)
            heartbeats += 1
            if answer.error != ErrorCode.NONE:
                raise RuntimeError(f"{group_id} member {index}: {answer}")
            member_id, epoch = answer.member_id, answer.member_epoch
            changed = False
            if answer.has_assignment:
                new = {(tp.topic, tp.partition) for tp in answer.assignment}
                changed = new != owned
                owned = new
            views[group_id][member_id] = owned
            if not changed:
                try:
                    await asyncio.wait_for(stop.wait(), answer.heartbeat_interval_ms / 1000)
                except TimeoutError:
                    pass

    def split_ok(group_id: str) -> bool:
        owned = list(views[group_id].values())
        union = set().union(*owned) if owned else set()
        return len(owned) == args.members and union == everything and sum(len(o) for o in owned) == len(everything)

    started = time.perf_counter()
    tasks = [asyncio.ensure_future(member(g, i)) for g in groups for i in range(args.members)]
    pending = set(groups)
    while pending:
        if any(t.done() and t.exception() for t in tasks):
            raise next(t.exception() for t in tasks if t.done() and t.exception())  # type: ignore[misc]
        for group_id in [g for g in pending if split_ok(g)]:
            described = await cluster.call(group_id, "DescribeGroup", api_pb2.DescribeGroupRequest(group_id=group_id))
            if described.state == "stable" and len(described.members) == args.members:
                pending.discard(group_id)
        if time.perf_counter() - started > 300:
            raise RuntimeError(f"{len(pending)} groups not stable after 300 s")
        await asyncio.sleep(0.05)
    elapsed = time.perf_counter() - started
    stop.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    print(f"joins: {args.groups} groups x {args.members} members on {args.partitions} partitions all stable "
          f"in {elapsed:.2f} s ({heartbeats:,} heartbeats, heartbeat interval {args.heartbeat_interval_ms} ms)",
          flush=True)


async def main_async(local: LocalCluster, args: argparse.Namespace) -> None:
    cluster = Cluster(local)
    # The load generator's own cyclic GC (grpc.aio leaves a cycle behind every call) stopped its
    # loop for 20-70 ms per full collection, which every call in flight then counted as latency.
    gc.collect()
    gc.freeze()
    try:
        if args.only in (None, "commits"):
            await commits(cluster, args)
        if args.only in (None, "joins"):
            await joins(cluster, args)
    finally:
        await cluster.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--in-flight", type=int, default=64)
    parser.add_argument("--rate", type=float, default=1000.0)
    parser.add_argument("--groups", type=int, default=100)
    parser.add_argument("--members", type=int, default=4)
    parser.add_argument("--partitions", type=int, default=8)
    parser.add_argument("--heartbeat-interval-ms", type=int, default=1000)
    parser.add_argument("--only", choices=("commits", "joins"))
    parser.add_argument("--linger-ms", type=int, default=None,
                        help="the nodes' group_coordinator_append_linger_ms (default: the node's)")
    parser.add_argument("--reads", action="store_true",
                        help="OffsetFetch instead of OffsetCommit: the per-call cost without an append")
    parser.add_argument("--unary", action="store_true",
                        help="one unary OffsetCommit call per commit instead of tidelog.client's commit stream")
    parser.add_argument("--asyncio-loop", action="store_true",
                        help="run the load generator on asyncio's own loop instead of uvloop's")
    parser.add_argument("--profile", type=Path, metavar="FILE",
                        help="py-spy record the coordinator during the open loop, raw format, into FILE")
    parser.add_argument("--profile-follower", action="store_true", help="--profile a follower, not the coordinator")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="group-bench-") as tmp:
        linger = {} if args.linger_ms is None else {"group_coordinator_append_linger_ms": args.linger_ms}
        local = start_cluster(Path(tmp), nodes=args.nodes,
                              group_consumer_heartbeat_interval_ms=args.heartbeat_interval_ms, **linger)
        try:
            create_topic(local, "bench-offsets", args.partitions)
            create_topic(local, "bench-joins", args.partitions)
            if args.asyncio_loop:
                asyncio.run(main_async(local, args))
            else:
                uvloop.run(main_async(local, args))
        finally:
            local.stop_all()


if __name__ == "__main__":
    main()
