"""Random SIGKILL / SIGTERM / SIGSTOP of nodes under acks=all load (marker ``chaos``).

    .venv/bin/python -m pytest -m chaos tests/node_process/test_chaos.py -s
    TIDELOG_CHAOS_SEED=7 TIDELOG_CHAOS_SECONDS=120 .venv/bin/python -m pytest -m chaos ...

Three producers (one per partition, RF 3) run while one node at a time is killed, stopped or
paused and brought back. Afterwards: every acknowledged record is read back at its offset, and
every replica's log is byte-identical to the others on their common prefix.
"""

from __future__ import annotations

import os
import random
import threading
import time
from pathlib import Path

import pytest
from support.nodes import start_cluster
from test_replicated import Router, stop_when_replicas_agree

pytestmark = pytest.mark.chaos


def test_random_node_faults_lose_no_acknowledged_record(tmp_path: Path) -> None:
    seed = int(os.environ.get("TIDELOG_CHAOS_SEED", "1"))
    seconds = float(os.environ.get("TIDELOG_CHAOS_SECONDS", "60"))
    rng = random.Random(seed)
    print(f"\nchaos seed {seed}, {seconds:.0f} s")
    cluster = start_cluster(tmp_path, nodes=3)
    routers = [Router(cluster) for _ in range(3)]
    acknowledged: list[dict[int, bytes]] = [{} for _ in range(3)]
    errors: list[BaseException] = []
    stop = threading.Event()

    def produce(partition: int) -> None:
        try:
            i = 0
            while not stop.is_set():
                value = b"p%d-%d" % (partition, i)
                offset = routers[partition].produce("chaos", partition, value, deadline_s=5)
                if offset is not None:
                    assert offset not in acknowledged[partition], f"offset {offset} acknowledged twice"
                    acknowledged[partition][offset] = value
                i += 1
        except BaseException as exc:
            errors.append(exc)

    producers = [threading.Thread(target=produce, args=(p,)) for p in range(3)]
    try:
        routers[0].create("chaos", partitions=3)
        for thread in producers:
            thread.start()
        end = time.monotonic() + seconds
        while time.monotonic() < end and not errors:
            time.sleep(rng.uniform(0.5, 2.5))
            victim = cluster.nodes[rng.randrange(3)]
            action = rng.choice(["kill", "kill", "stop", "pause"])
            print(f"{action} node {victim.node_id}")
            if action == "kill":
                victim.kill()
            elif action == "stop":
                victim.stop()
            else:
                victim.pause()
            time.sleep(rng.uniform(0.2, 3.0))
            if action == "pause":
                victim.resume()
            else:
                victim.start(wait=False)
            cluster.wait_ready(timeout=60)
        stop.set()
        for thread in producers:
            thread.join(60)
        assert not errors, errors
        assert all(len(a) > 0 for a in acknowledged)
        for partition in range(3):
            found = routers[partition].read_all("chaos", partition, deadline_s=60)
            lost = {o: v for o, v in acknowledged[partition].items() if found.get(o) != v}
            assert not lost, f"seed {seed}: partition {partition} lost {len(lost)}: {list(lost.items())[:5]}"
        stop_when_replicas_agree(cluster, routers[0], "chaos", [0, 1, 2])
    finally:
        stop.set()
        for router in routers:
            router.close()
        cluster.stop_all()
