"""GroupHost remembers each group's `__consumer_offsets` partition (the hash is computed once per
group, not per call) and forgets it when the topic's partition count changes."""

from __future__ import annotations

import pytest
from tidelog.node import group_host
from tidelog.node.group_coordinator import GroupCoordinatorConfig
from tidelog.node.group_host import GroupHost
from tidelog.node.group_records import coordinator_partition


def test_placement_follows_the_partition_count() -> None:
    count = [2]
    host = GroupHost(dict, lambda: count[0], GroupCoordinatorConfig())
    # A group whose partition differs between 2 and 3 partitions of __consumer_offsets.
    group = next(g for g in (f"group-{i}" for i in range(100))
                 if coordinator_partition(g, 2) != coordinator_partition(g, 3))
    assert host.partition_for(group) == coordinator_partition(group, 2)
    assert host.partition_for(group) == coordinator_partition(group, 2)  # remembered
    count[0] = 3
    assert host.partition_for(group) == coordinator_partition(group, 3)


def test_placement_memory_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(group_host, "PLACEMENT_CACHE_SIZE", 8)
    host = GroupHost(dict, lambda: 16, GroupCoordinatorConfig())
    groups = [f"g{i}" for i in range(50)]
    assert [host.partition_for(g) for g in groups] == [coordinator_partition(g, 16) for g in groups]
    assert len(host._placement) <= 8
