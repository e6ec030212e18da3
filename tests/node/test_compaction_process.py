"""Compaction in real node processes: a compacted topic keeps the latest value per key once the
cleaner has run, and a follower that was away catches up from the compacted leader (gaps)."""

from __future__ import annotations

import random
import shutil
import threading
import time
from pathlib import Path

import pytest
from support.nodes import start_cluster
from tidelog.client import AdminClient, Consumer, NewTopic, Producer, TopicPartition
from tidelog.node.storage import LogConfig, PartitionLog, StorageError
from tidelog.proto.errors import TidelogError
from tidelog.proto.records import decode_batches

KEYS = 10
RECORDS = 400


def read_partition(bootstrap: str, topic: str, end: int, deadline: float) -> list[tuple[int, bytes, bytes]]:
    with Consumer(bootstrap) as consumer:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        consumer.seek_to_beginning(tp)
        seen: list[tuple[int, bytes, bytes]] = []
        while not seen or seen[-1][0] < end - 1:
            assert time.monotonic() < deadline, f"read only up to {seen[-1:] or 'nothing'}"
            seen.extend((r.offset, r.key, r.value) for r in consumer.poll(timeout_ms=500))
        return seen


def replica_end(data_dir: Path, copy: Path) -> int:
    """The end offset of a running node's replica, from a copy of its directory; -1 when the
    copy caught the files mid-change (a segment swap, a roll): the caller polls again."""
    shutil.rmtree(copy, ignore_errors=True)
    try:
        shutil.copytree(data_dir / "kv-0", copy)
        plog = PartitionLog.open(copy, LogConfig())
    except (OSError, StorageError):
        return -1
    try:
        return plog.end_offset
    finally:
        plog.close()


def replica_records(directory: Path) -> tuple[int, dict[bytes, bytes]]:
    """(end offset, latest value per key) of a stopped node's replica."""
    plog = PartitionLog.open(directory, LogConfig())
    try:
        latest: dict[bytes, bytes] = {}
        offset = plog.log_start_offset
        while offset < plog.end_offset:
            data = plog.read(offset, 1 << 20)
            if not data:
                break
            for batch in decode_batches(data):
                if not batch.is_control:
                    latest.update((r.key, r.value) for r in batch.records() if r.key is not None)
                offset = batch.next_offset
        return plog.end_offset, latest
    finally:
        plog.close()


def test_a_compacted_topic_keeps_the_latest_value_per_key_and_a_follower_catches_up(tmp_path: Path) -> None:
    local = start_cluster(tmp_path, nodes=3, log_cleaner_interval_ms=200)
    try:
        with AdminClient(local.bootstrap) as admin:
            admin.create_topics([NewTopic("kv", 1, 3, {
                "cleanup.policy": "compact", "segment.bytes": "1024", "min.cleanable.dirty.ratio": "0.1"})])
        away = local.nodes[2]
        away.stop()
        expected: dict[bytes, bytes] = {}
        with Producer(local.bootstrap) as producer:
            for start in range(0, RECORDS, 20):
                futures = []
                for i in range(start, start + 20):
                    key, value = b"k%d" % (i % KEYS), b"v%d" % i
                    expected[key] = value
                    futures.append(producer.send("kv", value, key=key, partition=0))
                end = max(f.result(timeout=30).offset for f in futures) + 1
            # Kafka's rule: a compacted topic refuses records without a key.
            with pytest.raises(TidelogError, match="without key"):
                producer.send("kv", b"no key", partition=0).result(timeout=20)

        # The cleaner runs on its own: wait until a read from the start shows it did.
        deadline = time.monotonic() + 60
        while True:
            seen = read_partition(local.bootstrap, "kv", end, deadline)
            if len(seen) < RECORDS:
                break
            assert time.monotonic() < deadline, "no compaction within 60 s"
            time.sleep(0.2)
        offsets = [offset for offset, _, _ in seen]
        assert offsets == sorted(set(offsets)) and offsets[-1] == end - 1
        latest = {key: value for _, key, value in seen}
        assert latest == expected
        # Below the records still dirty, only one record per key remains: values are unique,
        # so every record read is a value that was produced for its key, in produce order.
        for key in expected:
            values = [int(value[1:]) for _, k, value in seen if k == key]
            assert values == sorted(values)

        # The follower that missed everything fetches from the compacted leader, gaps and all.
        away.start()
        deadline = time.monotonic() + 60
        while (reached := replica_end(away.data_dir, tmp_path / "copy")) < end:
            assert time.monotonic() < deadline, f"follower stuck at {reached} of {end}"
            time.sleep(0.2)
        assert away.stop() == 0
        replica_end_offset, replica_latest = replica_records(away.data_dir / "kv-0")
        assert replica_end_offset >= end and replica_latest == expected
    finally:
        local.stop_all()


def _table(directory: Path) -> tuple[int, dict[bytes, bytes | None]]:
    """(end offset, key → latest value, tombstones as None) of a stopped node's replica."""
    plog = PartitionLog.open(directory, LogConfig())
    try:
        table: dict[bytes, bytes | None] = {}
        offset = plog.log_start_offset
        while offset < plog.end_offset:
            data = plog.read(offset, 1 << 20)
            if not data:
                break
            for batch in decode_batches(data):
                if not batch.is_control:
                    table.update((r.key, r.value) for r in batch.records() if r.key is not None)
                offset = batch.next_offset
        return plog.end_offset, table
    finally:
        plog.close()


@pytest.mark.slow
def test_compaction_under_sigkills_keeps_every_keys_latest_acknowledged_value(tmp_path: Path) -> None:
    """A producer writes keyed records while nodes are SIGKILLed and restarted one at a time
    (crashes land mid-pass and mid-swap) and every replica compacts its own log: the latest
    value read per key is the last acknowledged one or a later write of unknown outcome, and
    every replica ends up with the same table."""
    local = start_cluster(tmp_path, nodes=3, log_cleaner_interval_ms=100)
    try:
        with AdminClient(local.bootstrap) as admin:
            admin.create_topics([NewTopic("kv", 1, 3, {
                "cleanup.policy": "compact", "segment.bytes": "2048", "min.cleanable.dirty.ratio": "0.1",
                "delete.retention.ms": "0"})])
        acked: dict[bytes, int] = {}
        unknown: dict[bytes, set[int]] = {}
        stop = threading.Event()
        errors: list[BaseException] = []

        def produce() -> None:
            try:
                with Producer(local.bootstrap, request_timeout_ms=5000, delivery_timeout_ms=15000) as producer:
                    i = 0
                    while not stop.is_set():
                        key = b"k%d" % (i % 20)
                        try:
                            producer.send("kv", b"%d" % i, key=key, partition=0).result(timeout=30)
                            acked[key] = i
                        except (TidelogError, TimeoutError):
                            unknown.setdefault(key, set()).add(i)
                        i += 1
            except BaseException as exc:  # surfaced in the main thread
                errors.append(exc)

        producer = threading.Thread(target=produce)
        producer.start()
        rng = random.Random(7)
        try:
            deadline = time.monotonic() + 25
            while time.monotonic() < deadline and not errors:
                victim = local.nodes[rng.randrange(3)]
                time.sleep(rng.uniform(0.5, 2.0))
                victim.kill()
                time.sleep(rng.uniform(0.2, 1.0))
                victim.start()
        finally:
            stop.set()
            producer.join(60)
        assert not errors, errors
        assert len(acked) == 20

        with Producer(local.bootstrap) as producer:
            end = producer.send("kv", b"end", key=b"end", partition=0).result(timeout=30).offset + 1
        deadline = time.monotonic() + 60
        for node in local.nodes:
            while (reached := replica_end(node.data_dir, tmp_path / "copy")) < end:
                assert time.monotonic() < deadline, f"node {node.node_id} stuck at {reached} of {end}"
                time.sleep(0.2)
        seen = read_partition(local.bootstrap, "kv", end, time.monotonic() + 60)
        latest = {key: int(value) for _, key, value in seen if key != b"end"}
        for key, last in acked.items():
            assert latest[key] == last or latest[key] in unknown.get(key, set()) and latest[key] > last, key
        local.stop_all()
        # Ends may differ by a leader-change batch appended while the nodes stopped one by one.
        tables = [_table(node.data_dir / "kv-0")[1] for node in local.nodes]
        assert all(table == tables[0] for table in tables), "replicas disagree"
        assert {k: int(v) for k, v in tables[0].items() if k != b"end" and v is not None} == latest
    finally:
        local.stop_all()
