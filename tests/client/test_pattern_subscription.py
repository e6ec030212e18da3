"""Regex subscriptions (`subscribe(pattern=...)`, kafka-python's and aiokafka's style), resolved
by the consumer against the cluster's topics at each metadata refresh: a matching topic created
later joins the assignment after the next refresh, a deleted one leaves it."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import pytest

from support.nodes import start_cluster
from tidelog.client import AdminClient, Consumer, NewTopic, Producer, TopicPartition
from tidelog.client.group import compile_pattern, topics_matching


def test_a_pattern_matches_whole_names_and_never_internal_topics() -> None:
    names = ["orders", "orders-eu", "my-orders", "__consumer_offsets", "__orders"]
    assert topics_matching(compile_pattern("orders.*"), names) == ("orders", "orders-eu")
    assert topics_matching(re.compile(".*"), names) == ("my-orders", "orders", "orders-eu")
    with pytest.raises(ValueError):
        compile_pattern("orders(")


def test_topics_and_a_pattern_together_are_refused() -> None:
    consumer = Consumer("127.0.0.1:1", group_id="g")
    try:
        with pytest.raises(ValueError):
            consumer.subscribe(["a"], pattern="b.*")
    finally:
        consumer.close(timeout=0)


def test_assign_is_refused_while_a_pattern_subscription_matches_nothing_yet() -> None:
    """A group member subscribed by pattern is a member even while the pattern matches no
    topic; assign() beside it left a heartbeating membership and a manual assignment mixed
    (the pattern forgotten), where Kafka refuses: unsubscribe() first."""
    consumer = Consumer("127.0.0.1:1", group_id="g")
    try:
        consumer.subscribe(pattern="nothing-matches-.*")
        with pytest.raises(RuntimeError):
            consumer.assign([TopicPartition("orders", 0)])
        assert consumer.assignment() == set()
    finally:
        consumer.close(timeout=0)


def wait_until(condition: Any, poll: Any, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        poll()
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")


def tps(topic: str, count: int) -> set[TopicPartition]:
    return {TopicPartition(topic, p) for p in range(count)}


@pytest.mark.parametrize("group_id", ["pattern-group", None])
def test_created_topics_join_and_deleted_ones_leave_the_assignment(tmp_path: Path, group_id: str | None) -> None:
    local = start_cluster(tmp_path, nodes=1)
    consumer = None
    try:
        with AdminClient(local.bootstrap) as admin, Producer(local.bootstrap) as producer:
            admin.create_topics([NewTopic("orders-a", 2), NewTopic("payments", 1)])
            consumer = Consumer(local.bootstrap, group_id=group_id, auto_offset_reset="earliest",
                                fetch_max_wait_ms=50, metadata_max_age_ms=300)
            consumer.subscribe(pattern=r"orders-.*")
            got: list[Any] = []

            def poll() -> None:
                got.extend(consumer.poll(50))

            wait_until(lambda: consumer.assignment() == tps("orders-a", 2), poll)
            assert consumer.subscription() == {"orders-a"}

            admin.create_topics([NewTopic("orders-b", 3)])
            wait_until(lambda: consumer.assignment() == tps("orders-a", 2) | tps("orders-b", 3), poll)
            producer.send("orders-b", value=b"late", partition=2)
            producer.send("payments", value=b"not matched", partition=0)
            producer.flush()
            wait_until(lambda: any(r.value == b"late" for r in got), poll)
            assert all(r.topic.startswith("orders-") for r in got)

            admin.delete_topics(["orders-a"])
            wait_until(lambda: consumer.assignment() == tps("orders-b", 3), poll)
            assert consumer.subscription() == {"orders-b"}
    finally:
        if consumer is not None:
            consumer.close(timeout=5)
        local.stop_all()
