"""Hunt for a short `tidelog perf consume` (brief H19): perf_cli_bench.py's cycle, in a loop.

    flock -x /work/bench.lock python tests/bench/shortfall_hunt.py [--cycles 20] [--minutes 9]
        [--records 200000] [--hogs 1] [--keep-going]

On one 3-node cluster (RF 3, 6 partitions, acks=all, lz4), each cycle creates a topic, runs
``tidelog perf produce`` into it and ``tidelog perf consume`` from its start, each in its own
process as the bench does, the consumer through tests/support/perf_consume_traced.py (which
records per partition what it handed out and its fetch state at the end). ``--hogs N`` runs N
busy-looping processes beside it, since the short consumes were seen on a busy machine.

When a consume comes up short, before the nodes stop, it prints what tells the cases apart:
the end offsets per partition; what the traced consumer handed out per partition (gaps) and
where its positions stood; a plain Consumer reading every partition from 0 (gaps: records the
leader serves are missing); and the batches in each replica's segment files
(`scan_batches`: offsets, producer id, sequences), so records never stored although acked,
records stored but skipped, and a consumer that stopped fetching are told apart.
Exits 1 if any cycle was short. Not collected by pytest.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tidelog.client import AdminClient, Consumer, NewTopic, TopicPartition
from tidelog.proto.records import scan_batches

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from support.nodes import LocalCluster, start_cluster  # noqa: E402

TRACED = Path(__file__).resolve().parents[1] / "support" / "perf_consume_traced.py"


def perf(kind: str, bootstrap: str, topic: str, args: argparse.Namespace,
         trace: Path) -> subprocess.CompletedProcess[str]:
    records = args.records + (args.consume_extra if kind == "consume" else 0)
    common = [topic, "--bootstrap", bootstrap, "--num-records", str(records),
              "--record-size", "1024", "--no-progress", "--output", "json", "--timeout", str(args.timeout)]
    if kind == "produce":
        command = [sys.executable, "-c", "from tidelog.cluster.cli import main; raise SystemExit(main())",
                   "perf", "produce", *common, "--acks", "all", "--compression", "lz4"]
    else:
        command = [sys.executable, str(TRACED), str(trace), "perf", "consume", *common]
    return subprocess.run(command, capture_output=True, text=True, timeout=900)


def offsets_gaps(offsets: list[int]) -> list[list[int]]:
    return [[a, b] for a, b in zip(offsets, offsets[1:]) if b != a + 1]


def read_all(bootstrap: str, topic: str, partitions: int, ends: dict[int, int]) -> dict[int, Any]:
    """Every partition read from 0 to its end by a plain Consumer: count and gaps."""
    out: dict[int, Any] = {}
    with Consumer(bootstrap, auto_offset_reset="earliest") as consumer:
        for p in range(partitions):
            tp = TopicPartition(topic, p)
            consumer.assign([tp])
            consumer.seek(tp, 0)
            offsets: list[int] = []
            deadline = time.monotonic() + 60
            while (not offsets or offsets[-1] < ends[p] - 1) and time.monotonic() < deadline:
                offsets += [r.offset for r in consumer.poll(500, max_records=5000)]
            out[p] = {"count": len(offsets), "first": offsets[0] if offsets else None,
                      "last": offsets[-1] if offsets else None, "gaps": offsets_gaps(offsets)[:20]}
    return out


def scan_replicas(cluster: LocalCluster, topic: str) -> dict[str, Any]:
    """Per node and partition: records stored in data batches, and gaps in offsets or sequences."""
    out: dict[str, Any] = {}
    for node in cluster.nodes:
        for log_dir in sorted(Path(node.data_dir).rglob(f"{topic}-*")):
            if not log_dir.is_dir():
                continue
            headers = []
            for segment in sorted(log_dir.glob("*.log")):
                headers += scan_batches(segment.read_bytes())
            data = [h for h in headers if not h.attributes & 0x20]  # control bit
            offset_gaps = [[a.next_offset, b.base_offset] for a, b in zip(headers, headers[1:])
                           if b.base_offset != a.next_offset]
            sequence_gaps = [[a.producer_id, a.base_sequence + a.record_count, b.producer_id, b.base_sequence]
                             for a, b in zip(data, data[1:])
                             if (a.producer_id, a.base_sequence + a.record_count) != (b.producer_id, b.base_sequence)]
            out[f"node{node.node_id}/{log_dir.name}"] = {
                "batches": len(headers), "records": sum(h.record_count for h in data),
                "first": headers[0].base_offset if headers else None,
                "next": headers[-1].next_offset if headers else None,
                "offset_gaps": offset_gaps[:20], "sequence_gaps": sequence_gaps[:20],
                "producer_ids": sorted({h.producer_id for h in data}),
            }
    return out


def diagnose(cluster: LocalCluster, topic: str, args: argparse.Namespace, trace: Path) -> None:
    bootstrap = cluster.bootstrap
    with Consumer(bootstrap) as consumer:
        ends = {tp.partition: end for tp, end in consumer.end_offsets(
            [TopicPartition(topic, p) for p in range(args.partitions)]).items()}
    print(f"  end offsets {sorted(ends.items())}, sum {sum(ends.values())}", flush=True)
    if trace.exists():
        print(f"  traced consumer: {trace.read_text()}", flush=True)
    print(f"  plain read from 0: {json.dumps(read_all(bootstrap, topic, args.partitions, ends))}", flush=True)
    print("  replicas:\n" + "\n".join(f"    {k}: {json.dumps(v)}" for k, v in scan_replicas(cluster, topic).items()), flush=True)


def cycle(cluster: LocalCluster, i: int, tmp: Path, args: argparse.Namespace, started: float) -> bool:
    """One produce + consume into a new topic; False (after the diagnosis) if it came up short."""
    topic = f"hunt-{i}"
    trace = tmp / f"trace-{i}.json"
    with AdminClient(cluster.bootstrap) as admin:
        admin.create_topics([NewTopic(topic, args.partitions, 3)])
    produced = perf("produce", cluster.bootstrap, topic, args, trace)
    # The producer's own log lines (warnings and up), e.g. retries and producer id changes.
    notes = [line for line in produced.stderr.splitlines() if "H19" in line or " tidelog." in line or "WARNING" in line]
    answer = [line for line in produced.stdout.splitlines() if line.startswith("{")]
    if produced.returncode or not answer:
        print(f"cycle {i}: produce failed: {produced.stdout[-1000:]} {produced.stderr[-3000:]}", flush=True)
        diagnose(cluster, topic, args, trace)
        return False
    result = json.loads(answer[-1])
    consumed = perf("consume", cluster.bootstrap, topic, args, trace)
    ok = consumed.returncode == 0
    print(f"cycle {i} [{time.monotonic() - started:.0f} s]: produce {result['records']} "
          f"errors {result['errors']} {result['records_per_sec']:,.0f}/s, {len(notes)} log lines; consume "
          f"{'ok' if ok else 'SHORT: ' + consumed.stderr.strip()[-500:]}", flush=True)
    if not ok or result["records"] != args.records:
        print("  producer log:\n" + "\n".join(f"    {line}" for line in notes[-60:]), flush=True)
    if not ok:
        diagnose(cluster, topic, args, trace)
        return False
    with AdminClient(cluster.bootstrap) as admin:
        admin.delete_topics([topic])
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cycles", type=int, default=20)
    parser.add_argument("--minutes", type=float, default=9.0, help="stop starting cycles after this")
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--partitions", type=int, default=6)
    parser.add_argument("--timeout", type=int, default=60)
    parser.add_argument("--hogs", type=int, default=1, help="busy-looping processes beside the cycle")
    parser.add_argument("--consume-extra", type=int, default=0,
                        help="ask the consumer for this many more records than produced (tries the diagnosis)")
    parser.add_argument("--fresh", action="store_true",
                        help="a new cluster for every cycle (the bench's short runs were its first)")
    parser.add_argument("--keep-going", action="store_true", help="go on after a short cycle")
    args = parser.parse_args()
    started = time.monotonic()
    short = 0
    hogs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory(prefix="tidelog-shortfall-") as tmp:
        cluster: LocalCluster | None = None
        try:
            hogs = [subprocess.Popen([sys.executable, "-c", "while 1: pass"]) for _ in range(args.hogs)]
            for i in range(args.cycles):
                if time.monotonic() - started > args.minutes * 60:
                    break
                if cluster is None:
                    cluster = start_cluster(Path(tmp, f"nodes-{i}"), nodes=3)
                ok = cycle(cluster, i, Path(tmp), args, started)
                short += not ok
                if not ok and not args.keep_going:
                    break
                if args.fresh:
                    cluster.stop_all()
                    shutil.rmtree(Path(tmp, f"nodes-{i}"), ignore_errors=True)
                    cluster = None
        finally:
            for hog in hogs:
                hog.kill()
                hog.wait()
            if cluster is not None:
                cluster.stop_all()
    print(f"{short} short cycle(s)")
    sys.exit(1 if short else 0)


if __name__ == "__main__":
    main()
