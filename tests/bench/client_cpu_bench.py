"""Client CPU cost per record (issue 5): the producer's and the consumer's hot paths.

    python tests/bench/client_cpu_bench.py [--records 100000] [--size 1024] [--runs 3]
                                           [--compression none,lz4] [--distinct] [--threads]
                                           [--only produce] [--profile DIR] [--against GIT_REF]

Starts a 1-node cluster (tests/support/nodes.py) in a temporary directory and, for each
compression, measures in this process:
  * produce: `Producer.send` of N records of --size random bytes (null key, one partition),
    then `flush()`; by default every record carries the same payload, as `tidelog perf` sends
    (lz4 then shrinks the batches to almost nothing), with --distinct none compresses;
  * consume: a `Consumer` assigned to that partition replaying the N records from offset 0.

The figure is CPU time of this process (``time.process_time``: every thread, the client's I/O
thread and gRPC's included) divided by N (the calling thread's own share, ``time.thread_time``,
is printed beside it), so it is robust to other load on the machine; the node runs in
its own process and is not counted. Wall-clock rates are printed beside it for orientation only.
Each measurement runs --runs times on a fresh topic and the median is reported, with the implied
records/s of one fully busy core (1e6 / µs per record). On a shared, loaded machine the figures
move by ±20% from run to run: --against GIT_REF compares the working tree with an older commit
by alternating child processes against one cluster, which cancels most of that.

Not collected by pytest (no test functions); the lead runs it for the record.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, NamedTuple

from tidelog.client import AdminClient, Consumer, NewTopic, Producer, TopicPartition

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from support.nodes import start_cluster  # noqa: E402


def thread_cpu() -> dict[str, float]:
    """CPU seconds per thread of this process, by Python thread name where there is one
    (Linux /proc; empty elsewhere)."""
    ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    names = {t.native_id: t.name for t in threading.enumerate()}
    totals: dict[str, float] = {}
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return totals
    for tid in tasks:
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        name = names.get(int(tid)) or stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        totals[name] = totals.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / ticks
    return totals


def thread_delta(before: dict[str, float], after: dict[str, float], records: int) -> str:
    """µs per record by thread name, largest first (threads named alike are summed)."""
    delta = {name: after[name] - before.get(name, 0.0) for name in after}
    shown = sorted(((v, k) for k, v in delta.items() if v > 0), reverse=True)[:5]
    return ", ".join(f"{name} {v / records * 1e6:.1f}" for v, name in shown)


class Sample(NamedTuple):
    cpu: float  # seconds of this process's CPU time (all threads)
    wall: float
    records: int
    caller_cpu: float  # of which the calling (application) thread's own
    threads: str  # µs per record by thread (from /proc, 10 ms resolution)


def produce(bootstrap: str, topic: str, records: int, payloads: list[bytes], compression: str,
            hook: Hook) -> Sample:
    """Time `send` of every record plus `flush`; connecting and closing are left out."""
    with Producer(bootstrap, compression=compression) as producer:
        producer.partitions_for(topic)  # metadata first: not part of the per-record cost
        send = producer.send
        futures = []
        hook.start()
        threads0 = thread_cpu()
        cpu0, wall0, own0 = time.process_time(), time.perf_counter(), time.thread_time()
        pool = len(payloads)
        for i in range(records):
            futures.append(send(topic, payloads[i % pool]))
        producer.flush()
        sample = Sample(time.process_time() - cpu0, time.perf_counter() - wall0, records,
                        time.thread_time() - own0, thread_delta(threads0, thread_cpu(), records))
        hook.stop()
    failed = sum(1 for f in futures if f.exception() is not None)
    if failed:
        raise RuntimeError(f"{failed} of {records} records failed: {futures[-1].exception()}")
    return sample


def consume(bootstrap: str, topic: str, records: int, hook: Hook) -> Sample:
    """Time polling ``records`` records from offset 0; connecting and closing are left out."""
    got = 0
    with Consumer(bootstrap, auto_offset_reset="earliest") as consumer:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        consumer.seek(tp, 0)
        deadline = time.monotonic() + 120
        hook.start()
        threads0 = thread_cpu()
        cpu0, wall0, own0 = time.process_time(), time.perf_counter(), time.thread_time()
        while got < records and time.monotonic() < deadline:
            got += len(consumer.poll(1000))
        sample = Sample(time.process_time() - cpu0, time.perf_counter() - wall0, got,
                        time.thread_time() - own0, thread_delta(threads0, thread_cpu(), got))
        hook.stop()
    if got < records:
        raise RuntimeError(f"consumed only {got} of {records} records")
    return sample


class Hook:
    """Starts and stops an optional profiler around the measured part of one run."""

    def __init__(self, directory: str | None, label: str) -> None:
        self.directory = directory
        self.label = label
        self.profiler: Any = None

    def start(self) -> None:
        if self.directory:
            from pyinstrument import Profiler

            self.profiler = Profiler(async_mode="disabled")
            self.profiler.start()

    def stop(self) -> None:
        if self.profiler is not None:
            self.profiler.stop()
            Path(self.directory, f"{self.label}.txt").write_text(  # type: ignore[arg-type]
                self.profiler.output_text(unicode=True, show_all=False)
            )
            self.profiler = None


def report(label: str, samples: list[Sample], verbose: bool) -> float:
    per_record = [s.cpu / s.records * 1e6 for s in samples]
    caller = statistics.median(s.caller_cpu / s.records * 1e6 for s in samples)
    rates = [s.records / s.wall for s in samples]
    med = statistics.median(per_record)
    print(
        f"{label:<18} cpu {med:6.2f} µs/record (runs: {', '.join(f'{x:.2f}' for x in per_record)};"
        f" calling thread {caller:.2f})  => {1e6 / med:>8,.0f} records/s per core;"
        f"  wall {statistics.median(rates):>8,.0f} records/s",
        flush=True,
    )
    if verbose:
        for sample in samples:
            print(f"    by thread (µs/record): {sample.threads}")
    return med


def export_ref(ref: str, directory: Path) -> Path:
    """A directory to put first on PYTHONPATH so that `tidelog` imports as of git ``ref``."""
    repo = Path(__file__).resolve().parents[2]
    tree = directory / "tree"
    tree.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(repo), "archive", ref], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    (directory / "tidelog").symlink_to(tree, target_is_directory=True)
    return directory


def run_child(mode: str, bootstrap: str, topic: str, args: argparse.Namespace, codec: str,
              pythonpath: str | None) -> Sample:
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = pythonpath
    command = [sys.executable, __file__, "--child", mode, "--bootstrap", bootstrap, "--topic", topic,
               "--records", str(args.records), "--size", str(args.size), "--compression", codec]
    if args.distinct:
        command.append("--distinct")
    out = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    if out.returncode:
        raise RuntimeError(f"{mode} child failed:\n{out.stderr[-3000:]}")
    return Sample(*json.loads(out.stdout.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--compression", default="none,lz4")
    parser.add_argument("--only", choices=["produce"], default=None,
                        help="skip the consumer")
    parser.add_argument("--distinct", action="store_true",
                        help="incompressible records (1024 random payloads) instead of one payload")
    parser.add_argument("--threads", action="store_true",
                        help="also print each run's CPU per record by thread (Linux)")
    parser.add_argument("--profile", metavar="DIR", default=None,
                        help="write a pyinstrument text profile of each measured run to DIR")
    parser.add_argument("--against", metavar="GIT_REF", default=None,
                        help="A/B: alternate runs of the working tree's client and GIT_REF's, each "
                             "in a child process against the same cluster (load on a shared "
                             "machine moves the figures by ±20%%; alternating cancels most of it)")
    parser.add_argument("--child", choices=["produce", "consume"], help=argparse.SUPPRESS)
    parser.add_argument("--bootstrap", help=argparse.SUPPRESS)
    parser.add_argument("--topic", help=argparse.SUPPRESS)
    args = parser.parse_args()
    # One payload for every record, as `tidelog perf` (and Kafka's perf tool) send: lz4 then
    # compresses a batch to almost nothing. --distinct cycles through 1024 random payloads
    # instead, more than an lz4 block (64 KiB) holds, so nothing compresses.
    payloads = [os.urandom(args.size) for _ in range(1024 if args.distinct else 1)]
    if args.profile:
        Path(args.profile).mkdir(parents=True, exist_ok=True)
    if args.child:
        hook = Hook(None, "")
        if args.child == "produce":
            sample = produce(args.bootstrap, args.topic, args.records, payloads, args.compression, hook)
        else:
            sample = consume(args.bootstrap, args.topic, args.records, hook)
        print(json.dumps(list(sample)))
        return

    with tempfile.TemporaryDirectory(prefix="tidelog-client-bench-") as tmp:
        variants: dict[str, str | None] = {"": None}
        if args.against:
            variants = {"this": None,
                        args.against: str(export_ref(args.against, Path(tmp, "ref").resolve()))}
        cluster = start_cluster(Path(tmp), nodes=1)
        try:
            bootstrap = cluster.bootstrap
            print(f"{args.records} records of {args.size} B "
                  f"({'1024 distinct random payloads' if args.distinct else 'one random payload'}), "
                  f"1 node, 1 partition, acks=all, median of {args.runs} runs", flush=True)
            if args.against:
                print(f"A/B: the working tree against {args.against}, alternating", flush=True)
            with AdminClient(bootstrap) as admin:
                for codec in args.compression.split(","):
                    produced: dict[str, list[Sample]] = {name: [] for name in variants}
                    consumed: dict[str, list[Sample]] = {name: [] for name in variants}
                    for i in range(args.runs):
                        order = list(variants.items())
                        for name, path in order if i % 2 == 0 else order[::-1]:
                            topic = f"bench-{codec}-{i}-{list(variants).index(name)}"
                            admin.create_topics([NewTopic(topic, 1, 1)])
                            if args.against:
                                produced[name].append(run_child("produce", bootstrap, topic, args, codec, path))
                                if args.only != "produce":
                                    consumed[name].append(run_child("consume", bootstrap, topic, args, codec, path))
                                continue
                            produced[name].append(produce(bootstrap, topic, args.records, payloads, codec,
                                                          Hook(args.profile, f"produce-{codec}-{i}")))
                            if args.only != "produce":
                                consumed[name].append(consume(bootstrap, topic, args.records,
                                                              Hook(args.profile, f"consume-{codec}-{i}")))
                    for name in variants:
                        suffix = f" [{name}]" if name else ""
                        report(f"produce {codec}{suffix}", produced[name], args.threads)
                    for name in variants:
                        suffix = f" [{name}]" if name else ""
                        if consumed[name]:
                            report(f"consume {codec}{suffix}", consumed[name], args.threads)
        finally:
            cluster.stop_all()


if __name__ == "__main__":
    main()
