"""A leader failover under a running producer and consumer (3 real nodes, replication factor 3).

Skipped by the `cluster3` fixture until replicated partitions land in the node.
"""

from __future__ import annotations

import threading
import time

from tidelog.client import AdminClient, Consumer, Producer


def test_leader_failover_under_a_running_producer_and_consumer(cluster3) -> None:
    with AdminClient(cluster3.bootstrap) as admin:
        admin.create_topic("failover", num_partitions=2, replication_factor=3)
        deadline = time.monotonic() + 30
        while any(p.leader < 0 for p in admin.describe_topic("failover").partitions):
            assert time.monotonic() < deadline, "no leaders elected"
            time.sleep(0.05)
    acked: list[tuple[int, int, bytes]] = []  # (partition, offset, value)
    failed: list[BaseException] = []
    stop = threading.Event()

    def produce() -> None:
        with Producer(cluster3.bootstrap, linger_ms=2, retry_backoff_ms=50,
                      delivery_timeout_ms=60_000) as producer:
            i = 0
            while not stop.is_set():
                value = f"v{i}".encode()
                future = producer.send("failover", value, key=str(i % 7).encode())
                future.add_done_callback(
                    lambda f, value=value: failed.append(f.exception()) if f.exception()
                    else acked.append((f.result().partition, f.result().offset, value)))
                if i % 50 == 49:
                    future.result(60)  # pace the producer by its own acknowledgements
                i += 1
            producer.flush(60)

    consumed: list[tuple[int, int, bytes]] = []
    with Consumer(cluster3.bootstrap, topics=["failover"], auto_offset_reset="earliest",
                  retry_backoff_ms=50) as consumer:
        thread = threading.Thread(target=produce, name="failover-producer")
        thread.start()
        try:
            deadline = time.monotonic() + 60
            while len(acked) < 300:
                assert time.monotonic() < deadline and thread.is_alive(), "producer stalled"
                consumed += [(r.partition, r.offset, r.value) for r in consumer.poll(100)]
            with AdminClient(cluster3.bootstrap) as admin:
                leader = admin.describe_topic("failover").partitions[0].leader
            cluster3.node(leader).kill()
            before = len(acked)
            while len(acked) < before + 300:
                assert time.monotonic() < deadline + 60 and thread.is_alive(), "no progress after failover"
                consumed += [(r.partition, r.offset, r.value) for r in consumer.poll(100)]
        finally:
            stop.set()
            thread.join(120)
        assert not failed, failed[:3]
        wanted = set(acked)
        deadline = time.monotonic() + 60
        while not wanted <= set(consumed):
            assert time.monotonic() < deadline, f"{len(wanted - set(consumed))} acked records never read"
            consumed += [(r.partition, r.offset, r.value) for r in consumer.poll(200)]
    with AdminClient(cluster3.bootstrap) as admin:
        assert admin.describe_topic("failover").partitions[0].leader not in (leader, -1)
    by_offset: dict[tuple[int, int], bytes] = {}
    for partition, offset, value in consumed:
        assert by_offset.setdefault((partition, offset), value) == value, "one offset, two records"
    for partition in (0, 1):
        offsets = [o for p, o, _ in consumed if p == partition]
        assert offsets == sorted(set(offsets)), "offsets must only grow for a consumer"
