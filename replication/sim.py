"""Deterministic simulation of one Raft group under faults, with the safety invariants checked.

    python -m tidelog.replication.sim --seeds 1000 [--start 0] [--nodes 3|5] [--steps 600] [--workers 2]

Everything comes from one seed: `random.Random(seed)` drives the network (delay, drop, duplicate,
reorder by delay, partitions that heal), the disks (flush latency and stalls; a crash loses what
was not flushed and may tear the last batch), crashes, power cuts, restarts and stopped processes,
retention, client proposals and voter changes; each seed draws its own mix of them (swarm).
Time is simulated; the real `RaftGroup` runs unchanged. A step is one event (a delivery, a tick,
a flush completing, a fault, a proposal); the invariants are checked as each step's outputs are
applied:

* election safety: at most one leader per epoch, and no voter grants two votes in one epoch;
* durable before visible: no message carries an epoch, and no vote is granted, that the sender
  has not persisted (the driver contract of `RaftGroup`);
* the commit rule: the leader's HW moves only through an entry of its epoch and only to an
  offset flushed on a majority of the voters;
* log matching: two batches with the same (base offset, epoch) end identical prefixes;
* leader completeness: every new leader holds everything committed in earlier epochs, and at
  every commit no replica lacking it is as up to date as a majority of the voters' durable logs;
* committed prefix: every HW a replica reports covers exactly the committed prefix, and no
  replica truncates a committed batch it holds (a deposed leader may still append conflicting
  entries at committed offsets: they are never committed and get truncated);
* the high watermark of a replica never goes backwards (within one process lifetime);
* a proposal reported committed stays at its offsets, with its bytes, on every node;
* liveness: after the chaos phase all faults heal; a leader must then commit a new proposal
  within a bounded simulated time.

On a violation the run prints the seed, the invariant and the last events, and exits 1;
`--seed N [--trace K]` replays one seed exactly and prints its last K events.
"""

from __future__ import annotations

import argparse
import bisect
import heapq
import multiprocessing
import random
import resource
import sys
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from tidelog.proto.records import Record, encode_batch
from tidelog.replication.log import MemoryLog
from tidelog.replication.messages import Message, VoteRequest, VoteResponse
from tidelog.replication.raft import (
    Flush,
    MembershipChangeError,
    NotLeaderError,
    Output,
    QuorumState,
    RaftConfig,
    RaftGroup,
    Role,
)

GROUP = "sim-0"
BUGS = ("vote_without_log_check", "commit_old_epoch", "vote_before_persist", "skip_truncation")

_NOT_LEADER_PROBE = encode_batch([Record(offset=0, timestamp=0, key=None, value=b"probe")])
_DELIVER, _TICK, _FLUSH, _FAULT, _RESTART, _HEAL, _PROPOSE, _ISOLATE = range(8)


class Violation(Exception):
    def __init__(self, invariant: str, detail: str) -> None:
        super().__init__(f"{invariant}: {detail}")
        self.invariant = invariant
        self.detail = detail


@dataclass(frozen=True, slots=True)
class SimConfig:
    nodes: int = 3
    steps: int = 600
    election_timeout_ms: int = 100
    # Network.
    min_delay_ms: int = 1
    max_delay_ms: int = 8
    long_delay_p: float = 0.02
    drop_p: float = 0.03
    duplicate_p: float = 0.03
    # Faults, one every fault_interval on average during the chaos phase.
    fault_interval_ms: int = 80
    crash_weight: int = 4
    partition_weight: int = 3
    resign_weight: int = 1
    membership_weight: int = 1
    retention_weight: int = 1
    pause_weight: int = 1
    # A crash right after a node granted a vote: the classic moment to lose an unpersisted vote.
    crash_after_vote_p: float = 0.2
    # ... and a leader right after its high watermark moved, before followers hear of the new one.
    crash_after_commit_p: float = 0.02
    # ... and a leader cut off just after its election, before its first batches spread: the
    # history of Raft's Figure 8 (a log whose last epoch is newer but which lacks older entries).
    isolate_new_leader_p: float = 0.15
    tear_p: float = 0.5
    max_flush_ms: int = 4
    slow_flush_p: float = 0.01
    propose_interval_ms: int = 20
    max_in_flight: int = 10
    observers: int = 1
    liveness_bound_ms: int = 40 * 100
    # Check the rules that safety rests on directly (durable-before-visible, the commit rule),
    # not only their consequences; off, only the consequences are checked.
    direct_checks: bool = True
    trace_events: int = 60
    # Draw the fault mix per seed around these values (see `_swarm`).
    swarm: bool = True
    bugs: tuple[str, ...] = ()

    def raft_config(self, max_fetch_bytes: int) -> RaftConfig:
        flags: dict[str, int | bool] = {f"_bug_{name}": True for name in self.bugs}
        return RaftConfig.scaled(self.election_timeout_ms, max_fetch_bytes=max_fetch_bytes, **flags)


@dataclass(slots=True)
class SeedResult:
    seed: int
    steps: int = 0
    elections: int = 0
    commits: int = 0
    sim_ms: int = 0
    violation: str | None = None
    trace: list[str] = field(default_factory=list)


def _swarm(config: SimConfig, rng: random.Random) -> SimConfig:
    """Swarm testing (Groce et al., 2012; TigerBeetle's VOPR does the same): each seed draws its
    own fault mix, so some seeds hammer one fault while others leave it out entirely, which
    reaches histories that one fixed mix makes rare."""
    weights = {
        name: rng.choice((0, 1, 1, 3)) * getattr(config, name)
        for name in (
            "crash_weight",
            "partition_weight",
            "resign_weight",
            "membership_weight",
            "retention_weight",
            "pause_weight",
        )
    }
    if not any(weights.values()):
        weights["crash_weight"] = config.crash_weight
    return replace(
        config,
        fault_interval_ms=rng.choice((30, config.fault_interval_ms, config.fault_interval_ms, 200)),
        drop_p=rng.choice((0.0, config.drop_p, config.drop_p, 0.15)),
        duplicate_p=rng.choice((0.0, config.duplicate_p, 0.1)),
        long_delay_p=rng.choice((0.0, config.long_delay_p, config.long_delay_p, 0.2)),
        max_flush_ms=rng.choice((1, config.max_flush_ms, config.max_flush_ms, 40)),
        slow_flush_p=rng.choice((0.0, config.slow_flush_p, 0.1)),
        observers=rng.choice((0, config.observers, config.observers, 2)),
        swarm=False,
        **weights,
    )


class _Registry:
    """Interns log prefixes: equal chain ids <=> identical batches from the start of the log."""

    __slots__ = ("ids", "by_position")

    def __init__(self) -> None:
        self.ids: dict[tuple[int, bytes], int] = {}
        # (base offset, epoch) -> chain id of the prefix ending with that batch: log matching.
        self.by_position: dict[tuple[int, int], int] = {}


class SimLog(MemoryLog):
    """A MemoryLog that keeps, per batch, the chain id of the prefix it ends, and checks writes."""

    def __init__(self, sim: Simulation, node_id: int) -> None:
        self.chain: list[int] = []
        self._sim = sim
        self._node_id = node_id
        # Chain id of the prefix ending at the log start (-1: the empty prefix at offset 0), and
        # the same for the durable image, whose start a crash restores.
        self._base_chain = -1
        self._durable_base_chain = -1
        super().__init__()

    def _push(self, base: int, next_offset: int, epoch: int, data: bytes) -> None:
        super()._push(base, next_offset, epoch, data)
        registry = self._sim.registry
        previous = self.chain[-1] if self.chain else self._base_chain
        # CRC-covered content plus where it sits: the same batch at the same offsets and epoch.
        key = (previous, data)
        chain_id = registry.ids.get(key)
        if chain_id is None:
            chain_id = registry.ids[key] = len(registry.ids)
        self.chain.append(chain_id)
        position = (base, epoch)
        known = registry.by_position.setdefault(position, chain_id)
        if known != chain_id:
            raise Violation(
                "log matching",
                f"node {self._node_id} holds a batch at offset {base} epoch {epoch} whose prefix differs "
                f"from another node's batch at the same offset and epoch",
            )

    def truncate_to(self, offset: int) -> int:
        keep = bisect.bisect_right(self._nexts, offset)
        if keep < len(self.chain):
            self._sim.check_committed_truncation(self._node_id, self._nexts[keep], self.chain[keep])
        end = super().truncate_to(offset)
        del self.chain[len(self._data) :]
        return end

    def flush(self) -> int:
        self._durable_base_chain = self._base_chain
        return super().flush()

    def delete_before(self, offset: int) -> int:
        drop = max(0, min(bisect.bisect_right(self._nexts, offset), len(self._nexts) - 1))
        start = super().delete_before(offset)
        if drop:
            self._base_chain = self._durable_base_chain = self.chain[drop - 1]
            del self.chain[:drop]
        return start

    def reset_to(self, start_offset: int, start_epoch: int) -> None:
        # The leader's log start is committed (it deletes only below its HW): we continue from
        # the committed prefix that ends there.
        base = self._sim.committed_chain_at(start_offset)
        if base is None:
            raise Violation(
                "committed prefix",
                f"node {self._node_id} reset its log to {start_offset}, not a committed offset",
            )
        super().reset_to(start_offset, start_epoch)
        self._base_chain = base
        self.chain = []

    def crash(self, rng: random.Random, *, tear: bool = True) -> None:
        # Recovery may bring back batches whose truncation was never flushed: the node's HW
        # restarts at 0, so it claims nothing about them, and its next fetch truncates them again.
        self.chain = []
        self._base_chain = self._durable_base_chain
        super().crash(rng, tear=tear)

    def durable_chain_at(self, end_offset: int) -> int | None:
        """Like `chain_at`, but only if that prefix is flushed."""
        durable_start = self._durable_start[0]
        if end_offset <= durable_start:
            return self.chain_at(end_offset) if self._start == durable_start else None
        index = bisect.bisect_left(self._nexts, end_offset)
        if index < self._synced and self._nexts[index] == end_offset:
            return self.chain[index]
        return None

    def durable_key(self) -> tuple[int, int]:
        """(last epoch, end offset) of the flushed prefix: what a crash now would leave at least."""
        if not self._synced:
            return (0, self._start)
        return (self._epochs[self._synced - 1], self._nexts[self._synced - 1])

    def chain_at(self, end_offset: int) -> int | None:
        """Chain id of the prefix ending exactly at ``end_offset`` (a batch boundary), if any.

        Below the log start (deleted by retention, always committed) it is the committed one.
        """
        if end_offset <= self._start:
            return self._base_chain if end_offset == self._start else self._sim.committed_chain_at(end_offset)
        index = bisect.bisect_left(self._nexts, end_offset)
        if index < len(self._nexts) and self._nexts[index] == end_offset:
            return self.chain[index]
        return None


class _Node:
    __slots__ = (
        "node_id",
        "log",
        "group",
        "persisted",
        "incarnation",
        "hw",
        "tick_at",
        "up",
        "role",
        "cut_incarnation",
        "paused_until",
    )

    def __init__(self, node_id: int, log: SimLog) -> None:
        self.node_id = node_id
        self.log = log
        self.group: RaftGroup | None = None
        self.persisted = QuorumState()
        self.incarnation = 0
        self.hw = 0
        self.tick_at = -1
        self.up = True
        self.role = Role.UNATTACHED
        self.cut_incarnation = -1
        # A stopped process (SIGSTOP, a long GC pause): nothing it receives is handled before.
        self.paused_until = 0


class Simulation:
    def __init__(self, seed: int, config: SimConfig) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        if config.swarm:
            config = _swarm(config, self.rng)
        self.config = config
        # Small fetch responses (one batch, or a few) open the windows where a follower holds an
        # old epoch's entry but not yet the new leader's leader-change batch (Raft Figure 8).
        self.raft_config = config.raft_config(self.rng.choice((1, 200, 1 << 20)))
        self.registry = _Registry()
        self.now = 0
        self._queue: list[tuple[int, int, int, object, object]] = []
        self._seq = 0
        self.trace: deque[tuple[int, int, object, object]] = deque(maxlen=config.trace_events)
        voters = list(range(1, config.nodes + 1))
        self.voters = tuple(voters)
        observers = list(range(config.nodes + 1, config.nodes + 1 + config.observers))
        self.all_ids = voters + observers
        self.observers = tuple(observers)
        self.nodes: dict[int, _Node] = {i: _Node(i, SimLog(self, i)) for i in self.all_ids}
        # Global committed log: chain ids and end offsets of the committed batches, in order.
        self.committed_chain: list[int] = []
        self.committed_ends: list[int] = []
        # The epoch in which each of them committed (non-decreasing along the log).
        self.committed_epochs: list[int] = []
        self.committed_payloads: dict[int, bytes] = {}
        self.leaders: dict[int, int] = {}
        # (voter, epoch) -> the candidate it granted: Raft §5.2, at most one vote per epoch.
        self.votes: dict[tuple[int, int], int] = {}
        self.blocked: set[tuple[int, int]] = set()
        self.elections = 0
        self.commits = 0
        self.steps = 0
        self.calm = False
        self.heal_ms = 0
        self.calm_commit = False
        # Client proposals accepted and not yet reported committed or failed (the in-flight ones).
        self._proposal_payloads: dict[tuple[int, int, int], bytes] = {}
        self._payload_counter = 0
        self._last_vote_grant: int | None = None

    # --- scheduling -----------------------------------------------------------------------------

    def _push(self, at: int, kind: int, a: object = None, b: object = None) -> None:
        self._seq += 1
        heapq.heappush(self._queue, (at, self._seq, kind, a, b))

    def _start_node(self, node: _Node) -> None:
        node.incarnation += 1
        node.up = True
        node.hw = 0
        node.tick_at = -1
        node.group = RaftGroup(
            GROUP,
            node.node_id,
            self.voters,
            self.observers,
            log=node.log,
            quorum_state=node.persisted,
            config=self.raft_config,
            rng=random.Random(self.rng.getrandbits(64)),
            now_ms=self.now,
        )
        node.role = node.group.role
        self._apply(node)

    def _send(self, message: Message, incarnation: int) -> None:
        # The hottest path of the simulator: plain floats instead of randint.
        random_ = self.rng.random
        cfg = self.config
        calm = self.calm
        if not calm and random_() < cfg.drop_p:
            return
        copies = 2 if not calm and random_() < cfg.duplicate_p else 1
        for _ in range(copies):
            if not calm and random_() < cfg.long_delay_p:
                low, high = cfg.max_delay_ms, 3 * cfg.election_timeout_ms
            else:
                low, high = cfg.min_delay_ms, cfg.max_delay_ms
            self._seq += 1
            heapq.heappush(
                self._queue,
                (
                    self.now + low + int(random_() * (high - low + 1)),
                    self._seq,
                    _DELIVER,
                    message,
                    incarnation,
                ),
            )

    # --- applying a node's output and checking it ------------------------------------------------

    def _apply(self, node: _Node) -> None:
        group = node.group
        assert group is not None
        out: Output = group.take_output()
        now = self.now
        # The persist-before-send contract: the state is durable before any message leaves.
        if out.quorum_state is not None:
            node.persisted = out.quorum_state
        for change in out.role_changes:
            node.role = change.role
            if change.role is Role.LEADER:
                self._on_new_leader(node, change.epoch)
        crash = False
        if out.high_watermark is not None:
            self._on_high_watermark(node, out.high_watermark)
            crash = node.role is Role.LEADER and self.rng.random() < self.config.crash_after_commit_p
        for proposal in out.committed:
            self._on_committed(node, proposal.base_offset, proposal.last_offset, proposal.epoch)
        for proposal in out.failed:
            self._proposal_payloads.pop((node.node_id, proposal.epoch, proposal.base_offset), None)
        if out.flush is not None:
            cfg = self.config
            if self.rng.random() < cfg.slow_flush_p:
                delay = self.rng.randint(cfg.max_flush_ms, 2 * cfg.election_timeout_ms)  # an fsync stall
            else:
                delay = int(self.rng.random() * (cfg.max_flush_ms + 1))
            self._push(now + delay, _FLUSH, node, (node.incarnation, out.flush))
        granted_vote = False
        persisted = node.persisted
        direct = self.config.direct_checks
        incarnation = node.incarnation
        for message in out.messages:
            self._send(message, incarnation)
            if (
                direct
                and message.epoch > persisted.epoch
                and not (type(message) is VoteRequest and message.pre_vote)
            ):
                raise Violation(
                    "durable before visible",
                    f"node {node.node_id} sent {type(message).__name__} of epoch {message.epoch} while its "
                    f"durable epoch is {persisted.epoch}",
                )
            if type(message) is VoteResponse and message.granted and not message.pre_vote:
                granted_vote = True
                if direct and (persisted.epoch, persisted.voted_for) != (message.epoch, message.dst):
                    raise Violation(
                        "durable before visible",
                        f"node {node.node_id} granted its epoch-{message.epoch} vote to {message.dst} "
                        f"before persisting it (durable: {persisted})",
                    )
                voted = self.votes.setdefault((node.node_id, message.epoch), message.dst)
                if voted != message.dst:
                    raise Violation(
                        "vote safety",
                        f"node {node.node_id} voted for both {voted} and {message.dst} in epoch {message.epoch}",
                    )
        deadline = group.next_deadline()
        if deadline <= now:
            deadline = now + 1
        if node.tick_at <= now or deadline < node.tick_at:
            node.tick_at = deadline
            self._push(deadline, _TICK, node, node.incarnation)
        if granted_vote and self.rng.random() < self.config.crash_after_vote_p:
            crash = True
        if crash and not self.calm:
            self._crash(node)

    def _on_new_leader(self, node: _Node, epoch: int) -> None:
        self.elections += 1
        if not self.calm and self.rng.random() < self.config.isolate_new_leader_p:
            self._push(self.now + int(self.rng.random() * 3 * self.config.max_delay_ms), _ISOLATE, node)
        other = self.leaders.setdefault(epoch, node.node_id)
        if other != node.node_id:
            raise Violation("election safety", f"nodes {other} and {node.node_id} both lead epoch {epoch}")
        # Raft §5.4: entries committed in epochs before this one must all be in its log. (A leader
        # of an older epoch can still be elected late, from votes granted before those commits.)
        known = bisect.bisect_left(self.committed_epochs, epoch)
        if known:
            end = self.committed_ends[known - 1]
            if node.log.chain_at(end) != self.committed_chain[known - 1]:
                raise Violation(
                    "leader completeness",
                    f"node {node.node_id} leads epoch {epoch} without the prefix up to offset {end}, "
                    f"committed in epoch {self.committed_epochs[known - 1]}",
                )

    def _on_high_watermark(self, node: _Node, hw: int) -> None:
        if hw <= node.hw:
            raise Violation("high watermark monotonic", f"node {node.node_id} HW {node.hw} -> {hw}")
        node.hw = hw
        log = node.log
        chain_id = log.chain_at(hw)
        if chain_id is None:
            raise Violation("committed prefix", f"node {node.node_id} HW {hw} is not a batch end in its log")
        ends = self.committed_ends
        top = ends[-1] if ends else 0
        assert node.group is not None
        epoch = node.group.epoch
        if hw > top and self.committed_epochs and epoch < self.committed_epochs[-1]:
            raise Violation(
                "committed prefix",
                f"node {node.node_id} of epoch {epoch} extends the committed log after epoch "
                f"{self.committed_epochs[-1]} committed",
            )
        if hw <= top:
            index = bisect.bisect_left(ends, hw)
            if index >= len(ends) or ends[index] != hw or self.committed_chain[index] != chain_id:
                raise Violation(
                    "committed prefix",
                    f"node {node.node_id} claims HW {hw} over a prefix that differs from the committed one",
                )
            return
        if top and log.chain_at(top) != self.committed_chain[-1]:
            raise Violation(
                "committed prefix",
                f"node {node.node_id} HW {hw} extends a prefix that differs below offset {top}",
            )
        start = bisect.bisect_right(log._nexts, top)
        stop = bisect.bisect_right(log._nexts, hw)
        for index in range(start, stop):
            ends.append(log._nexts[index])
            self.committed_chain.append(log.chain[index])
            self.committed_epochs.append(epoch)
        if node.role is Role.LEADER:
            if self.config.direct_checks:
                self._check_commit_rule(node, hw, chain_id)
            self._check_electable(node, hw, chain_id)

    def _check_commit_rule(self, leader: _Node, hw: int, chain_id: int) -> None:
        """Raft §5.4.2 and DESIGN §4: the leader's HW moves only through an entry of its own
        epoch, and only to an offset durable on a majority of the voters (with the same prefix)."""
        group = leader.group
        assert group is not None
        if leader.log.epoch_for(hw - 1) != group.epoch:
            raise Violation(
                "commit rule",
                f"leader {leader.node_id} of epoch {group.epoch} advanced its HW to {hw} through an entry "
                f"of epoch {leader.log.epoch_for(hw - 1)}",
            )
        voters = group.voters
        durable = sum(
            1 for v in voters if v in self.nodes and self.nodes[v].log.durable_chain_at(hw) == chain_id
        )
        if durable < len(voters) // 2 + 1:
            raise Violation(
                "commit rule",
                f"leader {leader.node_id} advanced its HW to {hw}, durable on only {durable} of voters {voters}",
            )

    def _check_electable(self, leader: _Node, hw: int, chain_id: int) -> None:
        """Leader completeness, checked ahead of time (the argument of Raft §5.4.3).

        Once the prefix up to ``hw`` commits, no replica lacking it may have a log at least as
        up to date as a majority of the voters' *durable* logs, or it could be elected later.
        """
        assert leader.group is not None
        voters = leader.group.voters
        durable = [self.nodes[v].log.durable_key() for v in voters if v in self.nodes]
        majority = len(voters) // 2 + 1
        for node_id in self.all_ids:
            log = self.nodes[node_id].log
            if log.chain_at(hw) == chain_id:
                continue
            key = (log.last_epoch, log.end_offset)
            if sum(1 for other in durable if other <= key) >= majority:
                raise Violation(
                    "leader completeness",
                    f"node {leader.node_id} committed up to {hw}, but node {node_id}, which lacks that prefix, "
                    f"has a log (epoch {key[0]}, end {key[1]}) as up to date as a majority of the voters",
                )

    def _on_committed(self, node: _Node, base: int, last: int, epoch: int) -> None:
        self.commits += 1
        if self.calm and self.now >= self.heal_ms:
            self.calm_commit = True
        payload = self._proposal_payloads.pop((node.node_id, epoch, base), None)
        ends = self.committed_ends
        if not ends or ends[-1] <= last:
            raise Violation(
                "committed proposal", f"proposal at {base}..{last} reported committed above the HW"
            )
        if payload is None:
            return  # a voters change, not a client proposal
        index = bisect.bisect_left(node.log._bases, base)
        if (
            index >= len(node.log._bases)
            or node.log._bases[index] != base
            or node.log._data[index][21:] != payload
        ):
            raise Violation(
                "committed proposal", f"node {node.node_id} reports a proposal at {base} it does not hold"
            )
        known = self.committed_payloads.setdefault(base, payload)
        if known != payload:
            raise Violation(
                "committed proposal", f"two different proposals reported committed at offset {base}"
            )

    def committed_chain_at(self, end_offset: int) -> int | None:
        """Chain id of the committed prefix ending at ``end_offset``, if that is a committed boundary."""
        if end_offset == 0:
            return -1
        ends = self.committed_ends
        index = bisect.bisect_left(ends, end_offset)
        if index < len(ends) and ends[index] == end_offset:
            return self.committed_chain[index]
        return None

    def check_committed_truncation(self, node_id: int, first_removed_end: int, chain_id: int) -> None:
        """A replica that knows the epoch a batch was committed in must never truncate it (its
        leader has it). One still following a deposed leader of an older epoch may: it was not
        among the majority that committed it, and it never claimed it with its HW."""
        ends = self.committed_ends
        if ends and first_removed_end <= ends[-1]:
            index = bisect.bisect_left(ends, first_removed_end)
            if ends[index] == first_removed_end and self.committed_chain[index] == chain_id:
                group = self.nodes[node_id].group
                epoch = group.epoch if group is not None else 0
                if epoch >= self.committed_epochs[index]:
                    raise Violation(
                        "committed prefix",
                        f"node {node_id} of epoch {epoch} truncates data ending at {first_removed_end}, "
                        f"committed in epoch {self.committed_epochs[index]}",
                    )

    def final_check(self) -> None:
        """Every committed proposal is still, with its bytes, at its offset on every node holding it."""
        for node in self.nodes.values():
            log = node.log
            for base, payload in self.committed_payloads.items():
                index = bisect.bisect_left(log._bases, base)
                if index < len(log._bases) and log._bases[index] == base and index < len(log.chain):
                    ends = self.committed_ends
                    # Only a prefix that agrees with the committed log must hold it.
                    at = bisect.bisect_left(ends, log._nexts[index])
                    if (
                        at < len(ends)
                        and ends[at] == log._nexts[index]
                        and log.chain[index] == self.committed_chain[at]
                    ):
                        if log._data[index][21:] != payload:
                            raise Violation(
                                "committed proposal", f"node {node.node_id} changed the proposal at {base}"
                            )

    # --- faults -----------------------------------------------------------------------------------

    def _pause(self) -> None:
        up = [self.nodes[i] for i in self.all_ids if self.nodes[i].up]
        if not up:
            return
        leader = self._leader()
        node = leader if leader is not None and self.rng.random() < 0.5 else self.rng.choice(up)
        t = self.config.election_timeout_ms
        node.paused_until = self.now + self.rng.randint(t // 2, 4 * t)

    def _crash(self, node: _Node) -> None:
        for key in [key for key in self._proposal_payloads if key[0] == node.node_id]:
            del self._proposal_payloads[key]  # its clients see the connection drop
        if self.rng.random() < 0.5:
            # A power cut rather than a process kill: what it had sent but not yet delivered is lost.
            node.cut_incarnation = node.incarnation
        node.up = False
        node.paused_until = 0
        node.group = None
        node.incarnation += 1
        node.log.crash(self.rng, tear=self.rng.random() < self.config.tear_p)
        t = self.config.election_timeout_ms
        # Half the crashes are a process restart (back within moments), half a machine outage.
        if self.rng.random() < 0.5:
            delay = self.rng.randint(1, t // 10)
        else:
            delay = self.rng.randint(t // 2, 5 * t)
        self._push(self.now + delay, _RESTART, node)

    def _isolate(self, node: _Node) -> None:
        for other in self.all_ids:
            if other != node.node_id:
                self.blocked.add((node.node_id, other))
                self.blocked.add((other, node.node_id))
        t = self.config.election_timeout_ms
        self._push(self.now + self.rng.randint(t, 4 * t), _HEAL)

    def _leader(self) -> _Node | None:
        best: _Node | None = None
        for node_id in self.all_ids:
            node = self.nodes[node_id]
            if node.up and node.role is Role.LEADER:
                assert node.group is not None
                if best is None or node.group.epoch > best.group.epoch:  # type: ignore[union-attr]
                    best = node
        return best

    def _fault(self) -> None:
        rng = self.rng
        cfg = self.config
        t = cfg.election_timeout_ms
        total = (
            cfg.crash_weight
            + cfg.partition_weight
            + cfg.resign_weight
            + cfg.membership_weight
            + cfg.retention_weight
        )
        pick = rng.randrange(total + cfg.pause_weight)
        if pick >= total:
            self._pause()
            return
        if pick >= total - cfg.retention_weight:
            self._retention(rng.choice(self.all_ids))
            return
        up = [self.nodes[i] for i in self.all_ids if self.nodes[i].up]
        if pick < cfg.crash_weight:
            down = len(self.all_ids) - len(up)
            if down < (cfg.nodes - 1) // 2 + 1 and up:
                leader = self._leader()
                victim = leader if leader is not None and rng.random() < 0.5 else rng.choice(up)
                self._crash(victim)
        elif pick < cfg.crash_weight + cfg.partition_weight:
            ids = list(self.all_ids)
            rng.shuffle(ids)
            cut = rng.randint(1, len(ids) // 2)
            one_way = rng.random() < 0.2
            for a in ids[:cut]:
                for b in ids[cut:]:
                    self.blocked.add((a, b))
                    if not one_way:
                        self.blocked.add((b, a))
            self._push(self.now + rng.randint(t, 5 * t), _HEAL)
        elif pick < cfg.crash_weight + cfg.partition_weight + cfg.resign_weight:
            leader = self._leader()
            if leader is not None and leader.group is not None:
                leader.group.resign()
                self._apply(leader)
        else:
            leader = self._leader()
            if leader is not None and leader.group is not None:
                current = list(leader.group.voters)
                if len(current) > cfg.nodes:
                    new = [v for v in current if v != rng.choice(current)]
                else:
                    candidates = [i for i in self.all_ids if i not in current]
                    if not candidates:
                        return
                    new = current + [rng.choice(candidates)]
                try:
                    leader.group.propose_voters(new)
                except MembershipChangeError:
                    return
                self._apply(leader)

    def _retention(self, node_id: int) -> None:
        """Delete a node's oldest batches, as retention.ms would: only below its HW (committed)
        and only what is flushed. A lagging follower may then find its fetch offset gone."""
        node = self.nodes[node_id]
        if not node.up or node.group is None:
            return
        log = node.log
        limit = min(node.group.retention_limit, log.flushed_end_offset)
        if limit > log.start_offset:
            log.delete_before(log.start_offset + int(self.rng.random() * (limit - log.start_offset + 1)))

    def _propose(self) -> None:
        rng = self.rng
        # Producers bound their requests in flight (Kafka: max.in.flight.requests.per.connection),
        # so a leader that cannot commit does not pile up an unbounded backlog.
        if len(self._proposal_payloads) >= (self.config.max_in_flight if not self.calm else 2):
            return
        leader = self._leader()
        if leader is None and rng.random() < 0.9:
            return  # a client waiting for metadata: most of the time it does not even try
        if leader is None or rng.random() < 0.05:
            candidates = [self.nodes[i] for i in self.all_ids if self.nodes[i].up]
            if not candidates:
                return
            leader = rng.choice(candidates)
        group = leader.group
        assert group is not None
        if leader.paused_until > self.now:
            return  # the client's request waits on the stopped process
        if group.role is not Role.LEADER:
            try:
                group.propose(_NOT_LEADER_PROBE)
            except NotLeaderError:
                return
            raise Violation("not leader", f"node {leader.node_id} accepted a proposal as {group.role.value}")
        self._payload_counter += 1
        records = [
            Record(offset=i, timestamp=self.now, key=None, value=b"%d/%d" % (self._payload_counter, i))
            for i in range(rng.randint(1, 3))
        ]
        batch = encode_batch(records)
        try:
            proposal = group.propose(batch, self.now)
        except NotLeaderError:
            return
        self._proposal_payloads[(leader.node_id, proposal.epoch, proposal.base_offset)] = batch[21:]
        self._apply(leader)

    # --- the run ------------------------------------------------------------------------------

    def run(self) -> SeedResult:
        cfg = self.config
        rng = self.rng
        for node_id in self.all_ids:
            self._start_node(self.nodes[node_id])
        self._push(rng.randint(1, cfg.fault_interval_ms * 2), _FAULT)
        self._push(rng.randint(1, cfg.propose_interval_ms), _PROPOSE)
        queue = self._queue
        trace = self.trace
        nodes = self.nodes
        blocked = self.blocked
        pop = heapq.heappop
        result = SeedResult(self.seed)
        try:
            while queue:
                at, _, kind, a, b = pop(queue)
                self.now = at
                self.steps += 1
                if not self.calm and self.steps >= cfg.steps:
                    self._heal_all()
                if self.calm and at > self.heal_ms + cfg.liveness_bound_ms:
                    raise Violation(
                        "liveness",
                        f"no new proposal committed within {cfg.liveness_bound_ms} ms after all faults healed",
                    )
                if kind == _DELIVER:
                    node = nodes[a.dst]  # type: ignore[attr-defined]
                    if not node.up or (a.src, a.dst) in blocked:  # type: ignore[attr-defined]
                        continue
                    if b <= nodes[a.src].cut_incarnation:  # type: ignore[attr-defined, operator]
                        continue  # sent just before its sender lost power
                    if node.paused_until > at:
                        self._push(node.paused_until, kind, a, b)  # waits in the socket buffer
                        continue
                    trace.append((at, kind, a, None))
                    node.group.receive(a, at)  # type: ignore[union-attr, arg-type]
                    self._apply(node)
                elif kind == _TICK:
                    node = a  # type: ignore[assignment]
                    if not node.up or node.incarnation != b or node.tick_at != at:
                        continue
                    if node.paused_until > at:
                        node.tick_at = node.paused_until
                        self._push(node.paused_until, _TICK, node, node.incarnation)
                        continue
                    node.group.tick(at)  # type: ignore[union-attr]
                    self._apply(node)
                elif kind == _FLUSH:
                    node = a  # type: ignore[assignment]
                    incarnation: int = b[0]  # type: ignore[index]
                    flush: Flush = b[1]  # type: ignore[index]
                    if not node.up or node.incarnation != incarnation:
                        continue
                    if node.paused_until > at:
                        self._push(node.paused_until, kind, a, b)
                        continue
                    node.log.flush()
                    node.group.flush_completed(flush.up_to, flush.generation, at)  # type: ignore[union-attr]
                    self._apply(node)
                elif kind == _PROPOSE:
                    trace.append((at, kind, None, None))
                    self._propose()
                    if self.calm_commit:
                        break
                    interval = cfg.propose_interval_ms if not self.calm else cfg.election_timeout_ms // 4
                    self._push(at + rng.randint(1, interval), _PROPOSE)
                elif kind == _FAULT:
                    if self.calm:
                        continue
                    trace.append((at, kind, None, None))
                    self._fault()
                    self._push(at + rng.randint(1, cfg.fault_interval_ms * 2), _FAULT)
                elif kind == _RESTART:
                    node = a  # type: ignore[assignment]
                    if node.up:
                        continue
                    trace.append((at, kind, node.node_id, None))
                    self._start_node(node)
                elif kind == _ISOLATE:
                    if not self.calm:
                        trace.append((at, kind, a.node_id, None))  # type: ignore[attr-defined]
                        self._isolate(a)  # type: ignore[arg-type]
                elif kind == _HEAL:
                    if not self.calm:
                        trace.append((at, kind, None, None))
                        blocked.clear()
            else:
                raise Violation("liveness", "the simulation ran out of events")
            self.final_check()
        except Violation as violation:
            result.violation = f"{violation.invariant}: {violation.detail}"
        except Exception as error:  # a crash inside the core is a failure of this seed, not of the run
            result.violation = f"exception: {type(error).__name__}: {error}"
        result.steps = self.steps
        result.elections = self.elections
        result.commits = self.commits
        result.sim_ms = self.now
        if result.violation is not None:
            result.trace = [self._format(entry) for entry in self.trace]
        return result

    def _heal_all(self) -> None:
        self.calm = True
        self.heal_ms = self.now
        self.blocked.clear()
        for node_id in self.all_ids:
            node = self.nodes[node_id]
            if not node.up:
                self._start_node(node)

    @staticmethod
    def _format(entry: tuple[int, int, object, object]) -> str:
        at, kind, a, _ = entry
        names = {
            _DELIVER: "deliver",
            _FAULT: "fault",
            _RESTART: "restart",
            _HEAL: "heal",
            _PROPOSE: "propose",
        }
        if kind == _ISOLATE:
            return f"{at:>7} ms  isolate node {a}"  # type: ignore[str-format]
        if kind == _DELIVER:
            return f"{at:>7} ms  {_describe(a)}"  # type: ignore[arg-type]
        if kind == _RESTART:
            return f"{at:>7} ms  restart node {a}"
        return f"{at:>7} ms  {names.get(kind, kind)}"


def _describe(message: Message) -> str:
    fields = []
    for name in message.__slots__:  # type: ignore[union-attr]
        if name == "group_id":
            continue
        value = getattr(message, name)
        if name == "records":
            value = f"<{len(value)} bytes>"
        elif hasattr(value, "name"):
            value = value.name
        fields.append(f"{name}={value}")
    return f"{type(message).__name__}(" + ", ".join(fields) + ")"


def run_seed(seed: int, config: SimConfig) -> SeedResult:
    return Simulation(seed, config).run()


def _run_chunk(args: tuple[list[int], SimConfig]) -> list[SeedResult]:
    seeds, config = args
    results = []
    for seed in seeds:
        result = run_seed(seed, config)
        if result.violation is None:
            result.trace = []
        results.append(result)
        if result.violation is not None:
            break
    return results


@dataclass(slots=True)
class Summary:
    seeds: int = 0
    steps: int = 0
    elections: int = 0
    commits: int = 0
    violations: list[SeedResult] = field(default_factory=list)
    seconds: float = 0.0
    cpu_seconds: float = 0.0

    def line(self) -> str:
        # Per CPU second as well as per wall second: the machine is shared, the CPU time is ours.
        cpu = self.cpu_seconds or 1e-9
        return (
            f"seeds={self.seeds} steps={self.steps} elections={self.elections} commits={self.commits} "
            f"violations={len(self.violations)} time={self.seconds:.1f}s cpu={self.cpu_seconds:.1f}s "
            f"({self.seeds / cpu:.0f} seeds/cpu-s, {self.elections / cpu:.0f} elections/cpu-s, "
            f"{self.steps / cpu:.0f} steps/cpu-s)"
        )


def run_seeds(
    seeds: Sequence[int], config: SimConfig, *, workers: int = 1, stop_on_violation: bool = True
) -> Summary:
    started = time.perf_counter()
    cpu_started = _cpu_seconds()
    summary = Summary()
    chunk = 20
    chunks = [(list(seeds[i : i + chunk]), config) for i in range(0, len(seeds), chunk)]
    if workers > 1:
        # Spawned, not forked: the parent may be a test process with gRPC threads running.
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            for results in pool.imap(_run_chunk, chunks):
                if _collect(summary, results) and stop_on_violation:
                    pool.terminate()
                    break
    else:
        for args in chunks:
            if _collect(summary, _run_chunk(args)) and stop_on_violation:
                break
    summary.seconds = time.perf_counter() - started
    summary.cpu_seconds = _cpu_seconds() - cpu_started
    return summary


def _cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the worker pool)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _collect(summary: Summary, results: list[SeedResult]) -> bool:
    for result in results:
        summary.seeds += 1
        summary.steps += result.steps
        summary.elections += result.elections
        summary.commits += result.commits
        if result.violation is not None:
            summary.violations.append(result)
    return bool(summary.violations)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tidelog.replication.sim", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--seeds", type=int, default=100, help="how many seeds to run")
    parser.add_argument("--start", type=int, default=0, help="first seed")
    parser.add_argument("--seed", type=int, default=None, help="replay exactly this one seed")
    parser.add_argument("--nodes", type=int, choices=(3, 5), default=3, help="voters at the start")
    parser.add_argument("--steps", type=int, default=600, help="chaos steps per seed before the faults heal")
    parser.add_argument("--workers", type=int, default=1, help="processes running seeds in parallel")
    parser.add_argument(
        "--bug", choices=BUGS, action="append", default=[], help="run a deliberately broken core"
    )
    parser.add_argument(
        "--trace",
        type=int,
        default=25,
        metavar="K",
        help="how many of the last events to print for a seed with a violation",
    )
    parser.add_argument(
        "--no-swarm", action="store_true", help="use the default fault mix for every seed (no swarm)"
    )
    args = parser.parse_args(argv)
    config = SimConfig(
        nodes=args.nodes,
        steps=args.steps,
        bugs=tuple(args.bug),
        trace_events=max(60, args.trace),
        swarm=not args.no_swarm,
    )
    seeds = [args.seed] if args.seed is not None else list(range(args.start, args.start + args.seeds))
    summary = run_seeds(seeds, config, workers=args.workers)
    print(summary.line())
    for result in summary.violations:
        print(f"VIOLATION seed={result.seed} nodes={args.nodes} steps={args.steps}: {result.violation}")
        replay = f"python -m tidelog.replication.sim --seed {result.seed} --nodes {args.nodes} --steps {args.steps}"
        extra = "".join(f" --bug {bug}" for bug in args.bug) + (" --no-swarm" if args.no_swarm else "")
        print("  replay: " + replay + extra)
        for line in result.trace[-args.trace :]:
            print("  " + line)
    return 1 if summary.violations else 0


if __name__ == "__main__":
    sys.exit(main())
