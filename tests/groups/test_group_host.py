"""GroupHost over an in-memory `__consumer_offsets` partition: the hosting rules of DESIGN.md §7.

"Apply on append, answer after commit", reads behind earlier appends, replay on a new leader,
dropping the coordinator when leadership or an append is lost, and timers expiring members.
The fake partition commits only when told to, so every "not answered yet" is observable.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest
from tidelog.node.group_coordinator import (
    CommittedOffset,
    GroupCoordinatorConfig,
    GroupErrorCode,
)
from tidelog.node.group_host import (
    CoordinatorUnavailable,
    GroupHost,
    encode_group_batch,
)
from tidelog.node.group_records import (
    GroupRecord,
    OffsetCommitKey,
    OffsetCommitValue,
    TopicPartition,
    coordinator_partition,
)
from tidelog.node.storage import RecordTooLargeError
from tidelog.proto import records as codec
from tidelog.proto.common_pb2 import ErrorCode

T = TypeVar("T")
TP0 = TopicPartition("orders", 0)


class NotLeaderError(Exception):
    pass


@dataclass(frozen=True, slots=True)
class _Appended:
    base_offset: int
    last_offset: int


class MemoryLog:
    def __init__(self) -> None:
        self.batches: list[tuple[int, bytes]] = []  # (base offset, stamped bytes)
        self.end_offset = 0

    def append(self, batches: bytes, epoch: int) -> _Appended:
        buf = bytearray(batches)
        base = self.end_offset
        self.end_offset = codec.stamp_batches(buf, base, epoch)
        self.batches.append((base, bytes(buf)))
        return _Appended(base, self.end_offset - 1)

    def read(self, offset: int, max_bytes: int) -> bytes:
        out = b""
        for base, data in self.batches:
            last = codec.scan_batches(data)[-1].last_offset
            if last < offset:
                continue
            out += data
            if len(out) >= max_bytes:
                break
        return out


class FakePartition:
    """A `__consumer_offsets` replica whose commits and leadership the test drives."""

    def __init__(self, log: MemoryLog | None = None, *, leader: bool = True, epoch: int = 1,
                 auto_commit: bool = False) -> None:
        self.log = log or MemoryLog()
        self._leader = leader
        self._epoch = epoch
        self._hw = self.log.end_offset
        self.closed = False
        self.auto_commit = auto_commit
        self.fail_appends: Exception | None = None
        self._change: asyncio.Future[None] | None = None
        if leader:
            self._leader_change_batch()

    def _leader_change_batch(self) -> None:
        # A new Raft leader's first batch is a control batch; replay must skip it.
        control = codec.encode_batch([codec.Record(0, 0, b"\x00\x00\x00\x03", b"{}")], is_control=True)
        self.log.append(control, self._epoch)

    @property
    def is_leader(self) -> bool:
        return self._leader

    @property
    def leader_epoch(self) -> int:
        return self._epoch

    @property
    def high_watermark(self) -> int:
        return self._hw

    @property
    def end_offset(self) -> int:
        return self.log.end_offset

    @property
    def log_start_offset(self) -> int:
        return 0

    def append(self, batches: bytes) -> _Appended:
        if not self._leader:
            raise NotLeaderError()
        if self.fail_appends is not None:
            raise self.fail_appends
        appended = self.log.append(batches, self._epoch)
        if self.auto_commit:
            asyncio.get_running_loop().call_soon(self.commit)
        return appended

    def wait_change(self) -> asyncio.Future[None]:
        if self._change is None or self._change.done():
            self._change = asyncio.get_running_loop().create_future()
        return self._change

    def _notify(self) -> None:
        if self._change is not None and not self._change.done():
            self._change.set_result(None)

    def commit(self) -> None:
        if self._hw != self.log.end_offset:
            self._hw = self.log.end_offset
            self._notify()

    def lose_leadership(self) -> None:
        self._leader = False
        self._notify()

    def become_leader(self, epoch: int) -> None:
        self._leader, self._epoch = True, epoch
        self._leader_change_batch()
        self._notify()


def run(scenario: Callable[[], Coroutine[Any, Any, T]]) -> T:
    return asyncio.run(asyncio.wait_for(scenario(), 10))


async def eventually(condition: Callable[[], Any], what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)


async def loaded_host(partitions: dict[int, FakePartition], count: int = 1,
                      config: GroupCoordinatorConfig | None = None, commit_timeout_ms: int = 5000) -> GroupHost:
    host = GroupHost(lambda: partitions, lambda: count, config or GroupCoordinatorConfig(),
                     commit_timeout_ms=commit_timeout_ms)
    host.refresh()
    leading = {i for i, p in partitions.items() if p.is_leader}
    await eventually(lambda: {s.partition for s in host.describe() if s.loaded} == leading, "coordinators to load")
    return host


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


def commit_call(group: str, offset: int, tp: TopicPartition = TP0) -> Callable[[Any, int], Any]:
    return lambda c, now: c.commit_offsets(group, "", -1, {tp: CommittedOffset(offset)}, now)


def fetch_call(group: str) -> Callable[[Any], Any]:
    return lambda c: c.fetch_offsets(group)


def offsets_of(answer: Any) -> dict[TopicPartition, int]:
    return {tp: o.offset for tp, o in answer.offsets.items() if o is not None}


def test_a_write_is_answered_only_once_its_batch_commits() -> None:
    async def scenario() -> None:
        partition = FakePartition()
        host = await loaded_host({0: partition})
        partition.commit()  # the leader-change batch
        end_before = partition.end_offset
        write = asyncio.ensure_future(host.write("g", commit_call("g", 42)))
        await settle()
        assert not write.done()
        # Appended at once, as exactly one batch holding one OffsetCommit record.
        assert partition.end_offset == end_before + 1
        assert len(partition.log.batches) == 2
        partition.commit()
        answer = await write
        assert answer.error == GroupErrorCode.NONE
        await host.close()

    run(scenario)


def test_a_read_waits_for_everything_appended_before_it() -> None:
    async def scenario() -> None:
        partition = FakePartition()
        host = await loaded_host({0: partition})
        write = asyncio.ensure_future(host.write("g", commit_call("g", 7)))
        await settle()
        read = asyncio.ensure_future(host.read("g", fetch_call("g")))
        await settle()
        assert not write.done() and not read.done()
        partition.commit()
        assert offsets_of(await read) == {TP0: 7}  # it sees the earlier, uncommitted write
        assert (await write).error == GroupErrorCode.NONE
        await host.close()

    run(scenario)


def test_a_new_leader_replays_the_log_into_the_same_state() -> None:
    async def scenario() -> None:
        log = MemoryLog()
        old = FakePartition(log, auto_commit=True)
        host = await loaded_host({0: old})
        for group, offset in (("a", 1), ("b", 2), ("a", 3)):
            await host.write(group, commit_call(group, offset))
        await host.write("c", commit_call("c", 9))
        assert (await host.write("c", lambda c, now: c.delete_group("c"))).error == GroupErrorCode.NONE
        await host.close()

        # Another node (a new host) leads the same log in a later epoch.
        new = FakePartition(log, leader=False)
        new.auto_commit = True
        new.become_leader(2)
        successor = await loaded_host({0: new})
        new.commit()
        assert offsets_of(await successor.read("a", fetch_call("a"))) == {TP0: 3}
        assert offsets_of(await successor.read("b", fetch_call("b"))) == {TP0: 2}
        assert offsets_of(await successor.read("c", fetch_call("c"))) == {}
        await successor.close()

    run(scenario)


def test_calls_are_refused_while_loading_and_for_partitions_led_elsewhere() -> None:
    async def scenario() -> None:
        group_here = next(g for g in (f"g{i}" for i in range(100)) if coordinator_partition(g, 2) == 0)
        group_elsewhere = next(g for g in (f"g{i}" for i in range(100)) if coordinator_partition(g, 2) == 1)
        partitions = {0: FakePartition(), 1: FakePartition(leader=False)}
        host = GroupHost(lambda: partitions, lambda: 2, GroupCoordinatorConfig())
        host.refresh()
        with pytest.raises(CoordinatorUnavailable) as loading:
            await host.read(group_here, fetch_call(group_here))
        assert loading.value.code == ErrorCode.COORDINATOR_LOAD_IN_PROGRESS
        await eventually(lambda: any(s.loaded for s in host.describe()), "the load")
        with pytest.raises(CoordinatorUnavailable) as elsewhere:
            await host.read(group_elsewhere, fetch_call(group_elsewhere))
        assert elsewhere.value.code == ErrorCode.NOT_COORDINATOR
        await host.close()

        missing = GroupHost(dict, lambda: None, GroupCoordinatorConfig())
        with pytest.raises(CoordinatorUnavailable) as no_topic:
            await missing.read("g", fetch_call("g"))
        assert no_topic.value.code == ErrorCode.COORDINATOR_NOT_AVAILABLE

    run(scenario)


def test_losing_leadership_fails_waiting_calls_and_drops_the_coordinator() -> None:
    async def scenario() -> None:
        partition = FakePartition()
        host = await loaded_host({0: partition})
        write = asyncio.ensure_future(host.write("g", commit_call("g", 5)))
        await settle()
        partition.lose_leadership()
        with pytest.raises(CoordinatorUnavailable) as lost:
            await write
        assert lost.value.code == ErrorCode.NOT_COORDINATOR
        host.refresh()
        assert host.describe() == []
        with pytest.raises(CoordinatorUnavailable) as after:
            await host.write("g", commit_call("g", 6))
        assert after.value.code == ErrorCode.NOT_COORDINATOR
        # Leading again (a new epoch): a fresh coordinator replays what the log holds — the
        # uncommitted write included, since this replica kept it.
        partition.become_leader(partition.leader_epoch + 1)
        host.refresh()
        await eventually(lambda: any(s.loaded and s.epoch == 2 for s in host.describe()), "the reload")
        partition.commit()
        assert offsets_of(await host.read("g", fetch_call("g"))) == {TP0: 5}
        await host.close()

    run(scenario)


def test_a_failed_append_reloads_the_coordinator_without_the_lost_change() -> None:
    async def scenario() -> None:
        partition = FakePartition(auto_commit=True)
        host = await loaded_host({0: partition})
        await host.write("g", commit_call("g", 1))
        partition.fail_appends = RecordTooLargeError("batch too large")
        with pytest.raises(CoordinatorUnavailable) as refused:
            await host.write("g", commit_call("g", 2))
        assert refused.value.code == ErrorCode.INVALID_REQUEST
        partition.fail_appends = None
        await eventually(lambda: any(s.loaded for s in host.describe()), "the reload")
        # The in-memory state had offset 2 applied; the reloaded coordinator never saw it.
        assert offsets_of(await host.read("g", fetch_call("g"))) == {TP0: 1}
        await host.close()

    run(scenario)


def test_the_timer_removes_a_member_after_its_session_timeout() -> None:
    async def scenario() -> None:
        partition = FakePartition(auto_commit=True)
        host = await loaded_host({0: partition}, config=GroupCoordinatorConfig(session_timeout_ms=150))
        joined = await host.write("g", lambda c, now: c.heartbeat("g", "", 0, None, ["orders"], [], 1000, now,
                                                                   {"orders": 2}))
        assert joined.error == GroupErrorCode.NONE and joined.assignment == {TP0, TopicPartition("orders", 1)}
        end_after_join = partition.end_offset
        await eventually(lambda: partition.end_offset > end_after_join, "the expiry to be appended")
        described = await host.read("g", lambda c: c.describe_group("g"))
        assert described.members == ()
        await host.close()
        # The expiry went through the log: a replay on a new leader agrees.
        new = FakePartition(partition.log, leader=False)
        new.become_leader(2)
        successor = await loaded_host({0: new})
        new.commit()
        assert (await successor.read("g", lambda c: c.describe_group("g"))).members == ()
        await successor.close()

    run(scenario)


def test_encode_group_batch_is_one_uncompressed_batch_of_the_records() -> None:
    records = (GroupRecord.of(OffsetCommitKey("g", "t", 0), OffsetCommitValue(5, -1, "", 10)),
               GroupRecord.of(OffsetCommitKey("g", "t", 1), None))
    data = encode_group_batch(records, 1234)
    batches = list(codec.decode_batches(data))
    assert len(batches) == 1 and batches[0].compression is codec.Compression.NONE
    decoded = [(r.key, r.value, r.timestamp) for r in batches[0].records()]
    assert decoded == [(records[0].key, records[0].value, 1234), (records[1].key, None, 1234)]


def test_a_replay_skips_records_it_cannot_decode() -> None:
    async def scenario() -> None:
        log = MemoryLog()
        log.append(codec.encode_batch([codec.Record(0, 0, b"\xff", b"junk")]), 1)
        good = encode_group_batch((GroupRecord.of(OffsetCommitKey("g", "orders", 0),
                                                  OffsetCommitValue(8, -1, "", 1)),), 1)
        log.append(good, 1)
        partition = FakePartition(log, leader=False)
        partition.become_leader(2)
        host = await loaded_host({0: partition})
        partition.commit()
        assert offsets_of(await host.read("g", fetch_call("g"))) == {TP0: 8}
        await host.close()

    run(scenario)

