"""Issue 5's throughput figures, measured as the issue states them: `tidelog perf produce` and
`tidelog perf consume` against 3 local nodes, RF 3, acks=all, 1 KiB records.

    python tests/bench/perf_cli_bench.py [--records 200000] [--partitions 6] [--runs 3]
                                         [--only produce|consume] [--against GIT_REF]
                                         [--profile DIR [--profile-gil]]

Starts 3 nodes (tests/support/nodes.py) in a temporary directory, then for each run creates a
fresh topic, runs ``tidelog perf produce`` into it and ``tidelog perf consume`` from its start
(the consumer replays from disk what the producer wrote), each in its own process, and prints
records/s of every run and the median. Every run's client process's CPU per record (user +
system, from its rusage) is printed beside it.

--against GIT_REF alternates each run's perf processes between the working tree and GIT_REF
(exported with git archive, imported first through PYTHONPATH), so an A/B comparison shares one
cluster and one stretch of machine load. --profile DIR records each perf process with py-spy
(must be on PATH) into DIR as collapsed stacks; with --profile-gil only the thread holding the
GIL is sampled, which shows where the Python CPU goes without the threads' waits.

Run it under the benchmark lock: ``flock -x /work/bench.lock python tests/bench/perf_cli_bench.py``.
Not collected by pytest (no test functions).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple

from tidelog.client import AdminClient, Consumer, NewTopic, TopicPartition

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from support.nodes import start_cluster  # noqa: E402
from client_cpu_bench import export_ref  # noqa: E402


class Run(NamedTuple):
    records_per_sec: float
    # The perf process's user + system CPU per record, start-up and connecting included (a
    # client too old to report its own figure is measured this way too).
    process_us_per_record: float
    # What the perf command reports: its CPU over the measured span only (None if too old).
    cpu_us_per_record: float | None


def run_perf(kind: str, bootstrap: str, topic: str, args: argparse.Namespace,
             pythonpath: str | None, profile: Path | None) -> Run:
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = pythonpath
    # main() returns the exit status (as the `tidelog` console script uses it): dropping it made
    # every failed run exit 0, so a producer whose records failed looked like a successful run.
    command = [sys.executable, "-c", "from tidelog.cluster.cli import main; raise SystemExit(main())", "perf", kind,
               topic, "--bootstrap", bootstrap, "--num-records", str(args.records),
               "--record-size", str(args.size), "--no-progress", "--output", "json",
               "--timeout", "60"]
    if kind == "produce":
        command += ["--acks", "all", "--compression", args.compression]
    if profile is not None:
        # Collapsed stacks (one line per stack with its sample count): greppable, and
        # flamegraph.pl or speedscope draw them.
        command = ["py-spy", "record", "--threads", "--rate", "250", "--format", "raw",
                   *(["--gil"] if args.profile_gil else []), "-o", str(profile), "--"] + command
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if out.returncode:
        raise RuntimeError(f"perf {kind} failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
    # py-spy adds lines of its own around the command's output.
    answers = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if not answers:
        raise RuntimeError(f"perf {kind} printed no result:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
    result = json.loads(answers[-1])
    if result.get("errors") or result["records"] != args.records:
        # Too old a client to exit non-zero still reports its failures in its result.
        raise RuntimeError(f"perf {kind}: {result['records']} of {args.records} records, "
                           f"{result.get('errors')} errors:\n{out.stderr[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return Run(result["records_per_sec"], cpu / result["records"] * 1e6,
               result.get("client_cpu_us_per_record"))


def log_ends(bootstrap: str, topic: str, args: argparse.Namespace) -> str:
    """The topic's end offsets, to tell a consumer that stalled from records that were never
    written when a run fails (each partition also holds one leader-change marker)."""
    with Consumer(bootstrap) as consumer:
        ends = consumer.end_offsets([TopicPartition(topic, p) for p in range(args.partitions)])
    return (f"end offsets of {topic}: {sorted((tp.partition, end) for tp, end in ends.items())}, "
            f"sum {sum(ends.values())} for {args.records} records produced")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--partitions", type=int, default=6)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--compression", default="lz4")
    parser.add_argument("--only", choices=["produce", "consume"], default=None)
    parser.add_argument("--against", metavar="GIT_REF", default=None)
    parser.add_argument("--profile", metavar="DIR", default=None)
    parser.add_argument("--profile-gil", action="store_true")
    args = parser.parse_args()
    kinds = [k for k in ("produce", "consume") if args.only in (None, k)]
    # A consume-only run still needs data: it is written by the working tree's producer.
    with tempfile.TemporaryDirectory(prefix="tidelog-perf-bench-") as tmp:
        variants: dict[str, str | None] = {"this": None}
        if args.against:
            variants[args.against] = str(export_ref(args.against, Path(tmp, "ref").resolve()))
        profile_dir = Path(args.profile) if args.profile else None
        if profile_dir is not None:
            profile_dir.mkdir(parents=True, exist_ok=True)
        cluster = start_cluster(Path(tmp, "nodes"), nodes=3)
        results: dict[tuple[str, str], list[Run]] = {}
        try:
            bootstrap = cluster.bootstrap
            print(f"tidelog perf, 3 nodes, RF 3, {args.partitions} partitions, acks=all, "
                  f"{args.records} records of {args.size} B, {args.compression}", flush=True)
            with AdminClient(bootstrap) as admin:
                for i in range(args.runs):
                    order = list(variants.items())
                    for name, path in order if i % 2 == 0 else order[::-1]:
                        topic = f"perf-{i}-{list(variants).index(name)}"
                        admin.create_topics([NewTopic(topic, args.partitions, 3)])
                        produce_path = path if "produce" in kinds else None
                        for kind in ("produce", "consume"):
                            profile = (profile_dir / f"{kind}-{name}-{i}.txt"
                                       if profile_dir is not None and kind in kinds else None)
                            try:
                                run = run_perf(kind, bootstrap, topic, args,
                                               path if kind == "consume" else produce_path, profile)
                            except RuntimeError as exc:
                                raise RuntimeError(f"{exc}\n{log_ends(bootstrap, topic, args)}") from None
                            if kind in kinds:
                                results.setdefault((kind, name), []).append(run)
                                print(f"  run {i} {kind:<7} [{name}] {run.records_per_sec:>10,.0f} "
                                      f"records/s, client cpu {run.cpu_us_per_record} µs/record "
                                      f"(whole process {run.process_us_per_record:.2f})", flush=True)
                        admin.delete_topics([topic])
        finally:
            cluster.stop_all()
            shutil.rmtree(Path(tmp, "nodes"), ignore_errors=True)
    for (kind, name), runs in results.items():
        rates = [r.records_per_sec for r in runs]
        spans = [r.cpu_us_per_record for r in runs if r.cpu_us_per_record is not None]
        span = f"{statistics.median(spans):.2f}" if spans else "n/a"
        print(f"{kind:<7} [{name}] median {statistics.median(rates):>10,.0f} records/s "
              f"(runs {' / '.join(f'{r / 1000:.1f}k' for r in rates)}); client cpu median "
              f"{span} µs/record (whole process "
              f"{statistics.median(r.process_us_per_record for r in runs):.2f})")


if __name__ == "__main__":
    main()
