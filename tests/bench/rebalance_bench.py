"""Rebalance times of the client's consumer groups (issue 6's targets).

    python tests/bench/rebalance_bench.py [--nodes 3] [--members 3] [--partitions 6] [--rounds 3]
                                          [--session-timeout-ms 3000] [--heartbeat-interval-ms 200]

Starts a --nodes cluster (tests/support/nodes.py) with the given group session timeout and
heartbeat interval, and runs --members group members, each a child process running
`tidelog.client.Consumer` that prints every on_assign/on_revoke with its wall-clock time. Each
round measures:

* close: a member calls close() (commit, on_revoke, leave at once); the time from the start of
  close() until the remaining members own every partition, disjointly (target <= 1 s);
* kill: a member is SIGKILLed; the time from the kill until the remaining members own every
  partition (target <= session timeout + 1 s).

"Own" is as each member reports it from its callbacks, so the figure includes the revocations
and commits the handover needs, not just the coordinator's decision. A new member restores the
count between measurements. Prints figures; asserts nothing about speed (DESIGN.md §10). Not
collected by pytest.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from support.nodes import start_cluster  # noqa: E402
from tidelog.client import AdminClient  # noqa: E402

MEMBER = r"""
import json, sys, threading, time
from tidelog.client import Consumer

bootstrap, topic, group, session = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
lock = threading.Lock()

def say(**fields):
    with lock:
        print(json.dumps(fields), flush=True)

consumer = Consumer(bootstrap, group_id=group, auto_offset_reset="earliest",
                    session_timeout_ms=session, fetch_max_wait_ms=100)
owned = set()

def changed(what):
    def callback(partitions):
        if what == "assign":
            owned.update(p.partition for p in partitions)
        else:
            owned.difference_update(p.partition for p in partitions)
        say(t=time.time(), event=what, owned=sorted(owned))
    return callback

consumer.subscribe([topic], on_assign=changed("assign"), on_revoke=changed("revoke"))
stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.readline(), stop.set()), daemon=True).start()
say(t=time.time(), event="started", owned=[])
while not stop.is_set():
    consumer.poll(50)
say(t=time.time(), event="closing", owned=sorted(owned))
consumer.close()
say(t=time.time(), event="closed", owned=[])
"""


class Child:
    def __init__(self, name: str, argv: list[str]) -> None:
        self.name = name
        self.process = subprocess.Popen([sys.executable, "-c", MEMBER, *argv], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True)
        self.owned: frozenset[int] = frozenset()
        self.last_change = 0.0
        self.events: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            event = json.loads(line)
            with self.lock:
                self.events.append(event)
                if event["event"] in ("assign", "revoke"):
                    self.owned = frozenset(event["owned"])
                    self.last_change = event["t"]

    def close(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write("close\n")
        self.process.stdin.flush()

    def closing_time(self) -> float | None:
        with self.lock:
            return next((e["t"] for e in self.events if e["event"] == "closing"), None)


def covered(children: list[Child], partitions: int) -> float | None:
    """When the children came to own every partition disjointly (their latest change), or None."""
    owned = [c.owned for c in children]
    if sum(len(o) for o in owned) != partitions or frozenset().union(*owned) != frozenset(range(partitions)):
        return None
    return max(c.last_change for c in children)


def wait_covered(children: list[Child], partitions: int, timeout: float) -> float:
    deadline = time.monotonic() + timeout
    while True:
        done = covered(children, partitions)
        if done is not None:
            return done
        if time.monotonic() > deadline:
            raise SystemExit(f"members never covered the {partitions} partitions: "
                             f"{[sorted(c.owned) for c in children]}")
        time.sleep(0.005)


def wait_all_own(children: list[Child], partitions: int, timeout: float = 60) -> None:
    """Until the newest member has its share too (when there are enough partitions to share)."""
    deadline = time.monotonic() + timeout
    while len(children) <= partitions and not all(c.owned for c in children):
        if time.monotonic() > deadline:
            raise SystemExit("a member never got partitions")
        time.sleep(0.01)
    wait_covered(children, partitions, timeout)


def summary(name: str, values: list[float], target: str) -> str:
    if not values:
        return f"{name}: no samples"
    ms = [v * 1000 for v in values]
    return (f"{name}: median {statistics.median(ms):.0f} ms, max {max(ms):.0f} ms over {len(ms)} "
            f"round(s) (target {target})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--members", type=int, default=3)
    parser.add_argument("--partitions", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--session-timeout-ms", type=int, default=3000)
    parser.add_argument("--heartbeat-interval-ms", type=int, default=200)
    args = parser.parse_args()
    if args.members < 2:
        raise SystemExit("--members must be at least 2 (someone must take the partitions over)")
    with tempfile.TemporaryDirectory() as tmp:
        cluster = start_cluster(Path(tmp), nodes=args.nodes,
                                group_consumer_session_timeout_ms=args.session_timeout_ms,
                                group_consumer_heartbeat_interval_ms=args.heartbeat_interval_ms)
        children: list[Child] = []
        try:
            topic, group = "rebalance-bench", "rebalance-bench"
            with AdminClient(cluster.bootstrap) as admin:
                admin.create_topic(topic, args.partitions, min(3, args.nodes))
            argv = [cluster.bootstrap, topic, group, str(args.session_timeout_ms)]
            count = 0

            def spawn() -> None:
                nonlocal count
                count += 1
                children.append(Child(f"m{count}", argv))

            for _ in range(args.members):
                spawn()
            wait_covered(children, args.partitions, 60)
            print(f"{args.members} members own the {args.partitions} partitions; "
                  f"session timeout {args.session_timeout_ms} ms, heartbeat {args.heartbeat_interval_ms} ms")
            close_times: list[float] = []
            kill_times: list[float] = []
            for round_ in range(1, args.rounds + 1):
                leaving = next(c for c in children if c.owned)
                children.remove(leaving)
                leaving.close()
                done = wait_covered(children, args.partitions, 60)
                started = None
                deadline = time.monotonic() + 10
                while started is None and time.monotonic() < deadline:
                    started = leaving.closing_time()
                    time.sleep(0.005)
                assert started is not None
                close_times.append(max(0.0, done - started))
                leaving.process.wait(30)
                spawn()
                wait_covered(children, args.partitions, 60)
                wait_all_own(children, args.partitions)

                victim = next(c for c in children if c.owned)
                children.remove(victim)
                killed_at = time.time()
                os.kill(victim.process.pid, signal.SIGKILL)
                done = wait_covered(children, args.partitions, args.session_timeout_ms / 1000 * 5 + 30)
                kill_times.append(max(0.0, done - killed_at))
                victim.process.wait(30)
                spawn()
                wait_covered(children, args.partitions, 60)
                wait_all_own(children, args.partitions)
                print(f"round {round_}: close {close_times[-1] * 1000:.0f} ms, kill {kill_times[-1] * 1000:.0f} ms")
            print(summary("after close()", close_times, "<= 1000 ms"))
            print(summary("after SIGKILL", kill_times, f"<= {args.session_timeout_ms + 1000} ms"))
        finally:
            for child in children:
                if child.process.poll() is None:
                    child.process.kill()
                    child.process.wait(10)
            cluster.stop_all()


if __name__ == "__main__":
    main()
