"""Offset expiry through the GroupHost: its tombstones reach the log however many expire at once."""

from __future__ import annotations

import asyncio

from tidelog.node.group_coordinator import CommittedOffset, GroupCoordinatorConfig
from tidelog.node.group_host import GroupHost
from tidelog.node.group_records import TopicPartition
from tidelog.node.storage import RecordTooLargeError
from tidelog.proto import records as codec

from tests.groups.test_group_host import FakePartition, eventually, run

# Kafka's (and tidelog's) default max.message.bytes.
MAX_MESSAGE_BYTES = 1048588


class LimitedPartition(FakePartition):
    """Refuses a batch over max.message.bytes, as the real log does."""

    def append(self, batches: bytes):  # type: ignore[no-untyped-def]
        for header in codec.scan_batches(batches):
            if header.size > MAX_MESSAGE_BYTES:
                raise RecordTooLargeError(f"batch of {header.size} bytes exceeds {MAX_MESSAGE_BYTES}")
        return super().append(batches)


def test_a_pass_expiring_more_than_one_batch_holds_still_expires_everything() -> None:
    """The first pass after an upgrade (or after a quiet week) may expire every offset of the
    partition at once: more tombstones than one batch of max.message.bytes holds. Written as
    one batch, the log refused it, the coordinator reloaded, and the next pass failed alike,
    so nothing ever expired and every group of the partition kept stalling."""
    groups = [f"group-{i:03d}-" + "g" * 200 for i in range(30)]
    topic = "t" * 200
    partitions_per_group = 100  # 30 x 100 tombstones of ~420 bytes: over 1 MiB together

    async def scenario() -> None:
        clock = [1_000_000]
        partition = LimitedPartition(auto_commit=True)
        config = GroupCoordinatorConfig(offsets_retention_ms=60_000, offsets_retention_check_interval_ms=20)
        host = GroupHost(lambda: {0: partition}, lambda: 1, config, now_ms=lambda: clock[0])
        host.refresh()
        await eventually(lambda: any(s.loaded for s in host.describe()), "the coordinator to load")
        for group in groups:
            offsets = {TopicPartition(topic, p): CommittedOffset(5) for p in range(partitions_per_group)}
            await host.write(group, lambda c, now, g=group, o=offsets: c.commit_offsets(g, "", -1, o, now))
        epoch = host.describe()[0].epoch
        clock[0] += 60_000  # every offset is now past the retention
        host.start()
        try:
            deadline = asyncio.get_running_loop().time() + 5
            while True:
                listings, loading = await host.list_groups()
                if not loading and not listings:
                    break
                assert asyncio.get_running_loop().time() < deadline, "the groups never expired"
                await asyncio.sleep(0.02)
            assert host.describe()[0].epoch == epoch
            for group in groups:
                answer = await host.read(group, lambda c, g=group: c.fetch_offsets(g))
                assert not answer.offsets
        finally:
            await host.close()

    run(scenario)
