"""Model test of the producer state against the exactly-once rule (KIP-98, issue 7 item 3).

Random producers send, retry, skip sequences, bump epochs and linger as zombies; the log is
truncated, trimmed by retention, snapshotted, and the leader restarts (sometimes over a damaged
snapshot) or fails over to its follower. After every step:

- the leader's verdict equals that of a simple model that looks only at the log: a producer's
  current epoch and last sequence are those of its last batch in the log, its retained window is
  the last 5 batches of that epoch (Kafka's ProducerAppendInfo.checkSequence / checkProducerEpoch
  and ProducerStateEntry, with tidelog's UNKNOWN_PRODUCER_ID rule for unknown producers);
- the log obeys exactly-once-in-order: per producer and epoch the batches are distinct and
  gap-free from sequence 0, and every acknowledged batch sits once at its acknowledged offset, which
  is also what a duplicate's answer names;
- the leader's incremental state equals a fresh replay of the log, and the follower's (fed only
  by `update`) equals the leader's.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from tidelog.node.producer_state import ProducerStateManager, Verdict, list_snapshots
from tidelog.proto.common_pb2 import ErrorCode
from tidelog.proto.records import BatchHeader, Record, encode_batch, scan_batches, stamp_batches

PIDS = (11, 12)
WINDOW = 5
START_MS = 1_700_000_000_000

BatchKey = tuple[int, int, int, int]  # producer id, epoch, first sequence, last sequence


def encode(producer_id: int, epoch: int, seq: int, n: int) -> bytes:
    records = [Record(i, 1000 + i, None, b"x") for i in range(n)]
    return encode_batch(records, producer_id=producer_id, producer_epoch=epoch, base_sequence=seq)


def key(header: BatchHeader) -> BatchKey:
    return (header.producer_id, header.producer_epoch, header.base_sequence, header.last_sequence)


def next_seq(last: int) -> int:
    return (last + 1) % 2**31


class Log:
    def __init__(self) -> None:
        self.buf = bytearray()
        self.log_start_offset = 0

    def all_headers(self) -> list[BatchHeader]:
        return scan_batches(self.buf, verify_crc=False)

    def headers(self) -> list[BatchHeader]:
        return [h for h in self.all_headers() if h.last_offset >= self.log_start_offset]

    @property
    def end_offset(self) -> int:
        headers = self.all_headers()
        return headers[-1].next_offset if headers else 0

    def append(self, data: bytes) -> list[BatchHeader]:
        stamped = bytearray(data)
        stamp_batches(stamped, self.end_offset, 0)
        self.buf += stamped
        return scan_batches(stamped)

    def read_batches_from(self, offset: int) -> Iterable[BatchHeader]:
        return [h for h in self.headers() if h.last_offset >= offset]

    def boundaries(self) -> list[int]:
        return [h.base_offset for h in self.headers()] + [self.end_offset]

    def truncate_to(self, offset: int) -> None:
        for h in self.all_headers():
            if h.base_offset >= offset:
                del self.buf[h.position :]
                return


@dataclass
class Client:
    epoch: int = 0
    next_seq: int = 0
    sent: list[bytes] = field(default_factory=list)


@dataclass(frozen=True)
class Expected:
    verdict: Verdict
    error: int = ErrorCode.NONE
    duplicates: tuple[BatchHeader, ...] = ()


def expected_alone(log: list[BatchHeader], h: BatchHeader) -> Expected:
    """The rule for one batch, read off the log's batches of its producer."""
    mine = [b for b in log if b.producer_id == h.producer_id]
    if not mine:
        return Expected(Verdict.APPEND) if h.base_sequence == 0 else Expected(
            Verdict.REJECT, ErrorCode.UNKNOWN_PRODUCER_ID
        )
    current = mine[-1].producer_epoch
    if h.producer_epoch < current:
        return Expected(Verdict.REJECT, ErrorCode.INVALID_PRODUCER_EPOCH)
    if h.producer_epoch > current:
        if h.base_sequence == 0:
            return Expected(Verdict.APPEND)
        return Expected(Verdict.REJECT, ErrorCode.OUT_OF_ORDER_SEQUENCE_NUMBER)
    run: list[BatchHeader] = []
    for b in reversed(mine):
        if b.producer_epoch != current:
            break
        run.insert(0, b)
    for b in run[-WINDOW:]:
        if (b.base_sequence, b.last_sequence) == (h.base_sequence, h.last_sequence):
            return Expected(Verdict.DUPLICATE, duplicates=(b,))
    if h.base_sequence == next_seq(run[-1].last_sequence):
        return Expected(Verdict.APPEND)
    return Expected(Verdict.REJECT, ErrorCode.OUT_OF_ORDER_SEQUENCE_NUMBER)


def expected_request(log: list[BatchHeader], request: list[BatchHeader]) -> Expected:
    """A request: each batch judged against the log extended by the request's earlier new batches;
    all retries → one DUPLICATE, retries mixed with new batches → INVALID_REQUEST."""
    extended = list(log)
    seen: set[int] = set()
    duplicates: list[BatchHeader] = []
    new = 0
    for h in request:
        if h.producer_id < 0:
            new += 1
            continue
        verdict = expected_alone(extended, h)
        if verdict.verdict is Verdict.DUPLICATE and h.producer_id in seen:
            verdict = Expected(Verdict.REJECT, ErrorCode.OUT_OF_ORDER_SEQUENCE_NUMBER)
        if verdict.verdict is Verdict.REJECT:
            return verdict
        if verdict.verdict is Verdict.DUPLICATE:
            duplicates.extend(verdict.duplicates)
            continue
        seen.add(h.producer_id)
        extended.append(h)
        new += 1
    if duplicates and new:
        return Expected(Verdict.REJECT, ErrorCode.INVALID_REQUEST)
    if duplicates:
        return Expected(Verdict.DUPLICATE, duplicates=tuple(duplicates))
    return Expected(Verdict.APPEND)


def shape(state: ProducerStateManager) -> dict[int, object]:
    return {pid: (e.producer_epoch, e.batches) for pid, e in state.entries().items()}


pids = st.sampled_from(PIDS)
sizes = st.integers(min_value=1, max_value=3)


class ProducerStateModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.log = Log()
        # tmpfs when there is one: a snapshot fsyncs twice, ~8 ms each on the CI disk.
        scratch = "/dev/shm" if os.path.isdir("/dev/shm") else None
        self.dirs = [Path(tempfile.mkdtemp(prefix="tidelog-ps-", dir=scratch)) for _ in range(2)]
        self.leader = ProducerStateManager(partition="model-0")
        self.follower = ProducerStateManager(partition="model-0")
        self.clients = {pid: Client() for pid in PIDS}
        self.acked: dict[BatchKey, int] = {}
        self.now = START_MS
        self.clocks_agree = True  # a restart replays at its own clock

    def teardown(self) -> None:
        for directory in self.dirs:
            shutil.rmtree(directory, ignore_errors=True)

    # --- the leader's produce path ------------------------------------------------------------

    def produce(self, batches: list[bytes]) -> None:
        data = b"".join(batches)
        request = scan_batches(data)
        expected = expected_request(self.log.headers(), request)
        result = self.leader.check(request, self.now)
        event(f"{result.verdict.name} {ErrorCode.Name(result.error)}")
        assert (result.verdict, result.error) == (expected.verdict, expected.error), (
            result,
            expected,
        )
        if result.verdict is Verdict.DUPLICATE:
            assert [d.base_offset for d in result.duplicates] == [b.base_offset for b in expected.duplicates]
            for original, answered in zip(expected.duplicates, result.duplicates):
                assert self.acked[key(original)] == answered.base_offset
                assert answered.last_offset == original.last_offset
        if result.verdict is Verdict.APPEND:
            first_offset = self.log.end_offset
            stamped = self.log.append(data)
            self.leader.update(request, self.now, first_offset=first_offset)
            self.follower.update(stamped, self.now)
            for h in stamped:
                if h.producer_id >= 0:
                    self.acked[key(h)] = h.base_offset

    # --- producers -----------------------------------------------------------------------------

    @rule(pid=pids, n=sizes)
    def send(self, pid: int, n: int) -> None:
        client = self.clients[pid]
        data = encode(pid, client.epoch, client.next_seq, n)
        client.next_seq += n
        client.sent.append(data)
        self.produce([data])

    @rule(pid=pids, n1=sizes, n2=sizes)
    def send_two_in_one_request(self, pid: int, n1: int, n2: int) -> None:
        client = self.clients[pid]
        first = encode(pid, client.epoch, client.next_seq, n1)
        second = encode(pid, client.epoch, client.next_seq + n1, n2)
        client.next_seq += n1 + n2
        client.sent += [first, second]
        self.produce([first, second])

    @rule(pid=pids, data=st.data())
    def retry(self, pid: int, data: st.DataObject) -> None:
        sent = self.clients[pid].sent
        if sent:
            self.produce([sent[data.draw(st.integers(max(0, len(sent) - 8), len(sent) - 1))]])

    @rule(pid=pids, data=st.data())
    def retry_two_in_one_request(self, pid: int, data: st.DataObject) -> None:
        sent = self.clients[pid].sent
        if len(sent) >= 2:
            i = data.draw(st.integers(max(0, len(sent) - 8), len(sent) - 2))
            self.produce(sent[i : i + 2])

    @rule(pid=pids, n=sizes)
    def retry_with_a_new_batch(self, pid: int, n: int) -> None:
        """A client that coalesces a retry with fresh data (refused as a whole)."""
        client = self.clients[pid]
        if client.sent:
            self.produce([client.sent[-1], encode(pid, client.epoch, client.next_seq, n)])

    @rule(pid=pids, skip=st.integers(min_value=1, max_value=3))
    def send_with_gap(self, pid: int, skip: int) -> None:
        client = self.clients[pid]
        self.produce([encode(pid, client.epoch, client.next_seq + skip, 1)])

    @rule(pid=pids, send_now=st.booleans())
    def bump_epoch(self, pid: int, send_now: bool) -> None:
        client = self.clients[pid]
        client.epoch += 1
        client.next_seq = 0
        if send_now:
            self.send(pid, 1)

    @rule(pid=pids)
    def zombie_send(self, pid: int) -> None:
        client = self.clients[pid]
        if client.epoch > 0:
            self.produce([encode(pid, client.epoch - 1, client.next_seq, 1)])

    @rule(pid=pids)
    def resync_with_log(self, pid: int) -> None:
        """The client's recovery after a rejection: continue from what the log holds."""
        client = self.clients[pid]
        mine = [h for h in self.log.headers() if h.producer_id == pid and h.producer_epoch == client.epoch]
        client.next_seq = next_seq(mine[-1].last_sequence) if mine else 0

    @rule()
    def non_idempotent_send(self) -> None:
        self.produce([encode(-1, -1, -1, 1)])

    @rule(ms=st.integers(min_value=1, max_value=10_000))
    def time_passes(self, ms: int) -> None:
        self.now += ms

    # --- the replicas ------------------------------------------------------------------------

    @rule(data=st.data())
    def truncate(self, data: st.DataObject) -> None:
        offset = data.draw(st.sampled_from(self.log.boundaries()))
        event("truncate below the end" if offset < self.log.end_offset else "truncate at the end")
        self.log.truncate_to(offset)
        for state, directory in ((self.leader, self.dirs[0]), (self.follower, self.dirs[1])):
            state.truncate_to(
                offset,
                directory,
                log_start_offset=self.log.log_start_offset,
                read_batches_from=self.log.read_batches_from,
                now_ms=self.now,
            )
        self.acked = {k: v for k, v in self.acked.items() if v < offset}
        for directory in self.dirs:
            assert all(o <= offset for o, _ in list_snapshots(directory))

    @rule(data=st.data())
    def retention(self, data: st.DataObject) -> None:
        offset = data.draw(st.sampled_from(self.log.boundaries()))
        if offset > self.log.log_start_offset:
            self.log.log_start_offset = offset
            self.leader.remove_before(offset)
            self.follower.remove_before(offset)

    @rule()
    def snapshot(self) -> None:
        self.leader.take_snapshot(self.dirs[0], self.log.end_offset)
        self.follower.take_snapshot(self.dirs[1], self.log.end_offset)
        assert len(list_snapshots(self.dirs[0])) <= 2

    @rule(damage=st.booleans())
    def restart_leader(self, damage: bool) -> None:
        snapshots = list_snapshots(self.dirs[0])
        event("restart over a damaged snapshot" if damage and snapshots else "restart")
        if damage and snapshots:
            path = snapshots[-1][1]
            raw = bytearray(path.read_bytes())
            raw[len(raw) // 2] ^= 0x01
            path.write_bytes(bytes(raw))
        restarted = ProducerStateManager(partition="model-0")
        logging.getLogger("tidelog.node.producer_state").disabled = True
        try:
            restarted.rebuild(
                self.dirs[0],
                log_start_offset=self.log.log_start_offset,
                log_end_offset=self.log.end_offset,
                read_batches_from=self.log.read_batches_from,
                now_ms=self.now,
            )
        finally:
            logging.getLogger("tidelog.node.producer_state").disabled = False
        assert shape(restarted) == shape(self.leader)
        self.leader = restarted
        self.clocks_agree = False

    @rule()
    def failover(self) -> None:
        self.leader, self.follower = self.follower, self.leader
        self.dirs.reverse()

    # --- invariants ----------------------------------------------------------------------------

    @invariant()
    def state_equals_a_replay_of_the_log(self) -> None:
        replay = ProducerStateManager()
        replay.rebuild(
            None,
            log_start_offset=self.log.log_start_offset,
            log_end_offset=self.log.end_offset,
            read_batches_from=self.log.read_batches_from,
            now_ms=self.now,
        )
        assert shape(self.leader) == shape(replay)
        assert self.leader.end_offset == self.follower.end_offset == self.log.end_offset

    @invariant()
    def follower_equals_leader(self) -> None:
        if self.clocks_agree:
            assert self.follower.entries() == self.leader.entries()
        else:
            assert shape(self.follower) == shape(self.leader)

    @invariant()
    def log_is_exactly_once_and_in_order(self) -> None:
        headers = [h for h in self.log.headers() if h.producer_id >= 0]
        keys = [key(h) for h in headers]
        assert len(keys) == len(set(keys)), "a batch is stored twice"
        previous: dict[int, BatchHeader] = {}
        for h in headers:
            before = previous.get(h.producer_id)
            if before is not None and before.producer_epoch == h.producer_epoch:
                assert h.base_sequence == next_seq(before.last_sequence), "gap or reorder"
            elif before is not None or self.log.log_start_offset == 0:
                assert h.base_sequence == 0, "an epoch's first batch must be sequence 0"
            previous[h.producer_id] = h
        by_offset = {h.base_offset: key(h) for h in headers}
        for batch_key, offset in self.acked.items():
            if offset >= self.log.log_start_offset:
                assert by_offset.get(offset) == batch_key, "an acknowledged batch is not where we said"


TestProducerStateModel = ProducerStateModel.TestCase
TestProducerStateModel.settings = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
