"""Offset expiry on a real node (KIP-211: offsets_retention_minutes), with a short retention.

A group that was left empty and a group that only ever had admin commits lose their offsets
(and their records) after the retention; a group whose member still subscribes to the topic
keeps offsets committed before either of theirs.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from support.nodes import start_cluster
from tidelog.client import AdminClient, Consumer, NewTopic, Producer, TidelogError, TopicPartition
from tidelog.proto.common_pb2 import ErrorCode

TOPIC = "expiring"


def wait_until(condition: Any, timeout: float = 60.0, poll: Any = None) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        if poll is not None:
            poll()
        time.sleep(0.1)


def consume_and_commit(bootstrap: str, group_id: str) -> Consumer:
    consumer = Consumer(bootstrap, group_id=group_id, auto_offset_reset="earliest", fetch_max_wait_ms=50,
                        enable_auto_commit=False)
    consumer.subscribe([TOPIC])
    got: list[Any] = []
    wait_until(lambda: len(got) >= 4, poll=lambda: got.extend(consumer.poll(50)))
    consumer.commit()
    return consumer


def group_gone(admin: AdminClient, group_id: str) -> bool:
    try:
        admin.describe_group(group_id)
    except TidelogError as exc:
        if exc.code == ErrorCode.GROUP_ID_NOT_FOUND:
            return True
        raise
    return False


def test_offsets_expire_after_the_retention_and_live_subscriptions_keep_theirs(tmp_path: Path) -> None:
    local = start_cluster(tmp_path, nodes=1, offsets_retention_minutes=0.05,  # 3 s
                          offsets_retention_check_interval_ms=200)
    live = None
    try:
        with AdminClient(local.bootstrap) as admin:
            admin.create_topics([NewTopic(TOPIC, 2)])
            with Producer(local.bootstrap) as producer:
                for i in range(4):
                    producer.send(TOPIC, value=b"v%d" % i, partition=i % 2)
                producer.flush()
            live = consume_and_commit(local.bootstrap, "live")
            kept = admin.list_group_offsets("live")
            assert kept == {TopicPartition(TOPIC, 0): 3, TopicPartition(TOPIC, 1): 3}
            consume_and_commit(local.bootstrap, "left").close()
            admin.alter_group_offsets("admin-only", {TopicPartition(TOPIC, 0): 2})

            wait_until(lambda: group_gone(admin, "left") and not admin.list_group_offsets("admin-only"))
            assert group_gone(admin, "admin-only")
            assert {g.group_id for g in admin.list_groups()} == {"live"}
            # Older than the retention too, but its member still subscribes to the topic.
            assert admin.list_group_offsets("live") == kept
    finally:
        if live is not None:
            live.close(timeout=5)
        local.stop_all()
