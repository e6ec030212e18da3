"""A hand-driven cluster of `RaftGroup`s over `MemoryLog`s, for tests that script exact scenarios.

Nothing happens unless the test says so: messages wait in `Cluster.inbox` until delivered (or
dropped), flushes wait until `flush()`, time moves only with `tick()`. Every output is applied
the way the node must: the quorum state is persisted before the messages are queued.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable

from tidelog.proto.records import Record, encode_batch
from tidelog.replication.log import MemoryLog
from tidelog.replication.messages import Message
from tidelog.replication.raft import Flush, Output, Proposal, QuorumState, RaftConfig, RaftGroup, Role

GROUP = "test-0"


def batch(*values: bytes) -> bytes:
    """One client batch holding a record per value."""
    return encode_batch([Record(offset=i, timestamp=0, key=None, value=v) for i, v in enumerate(values)])


class Cluster:
    def __init__(
        self,
        voters: Iterable[int] = (1, 2, 3),
        observers: Iterable[int] = (),
        *,
        config: RaftConfig | None = None,
        seed: int = 0,
        logs: dict[int, MemoryLog] | None = None,
        states: dict[int, QuorumState] | None = None,
    ) -> None:
        self.voters = tuple(voters)
        self.observers = tuple(observers)
        self.config = config or RaftConfig.scaled(100)
        self.rng = random.Random(seed)
        self.now = 0
        self.logs: dict[int, MemoryLog] = {}
        self.persisted: dict[int, QuorumState] = {}
        self.groups: dict[int, RaftGroup] = {}
        self.inbox: list[Message] = []
        self.flushes: dict[int, Flush] = {}
        self.outputs: dict[int, list[Output]] = {}
        self.committed: dict[int, list[Proposal]] = {}
        self.failed: dict[int, list[Proposal]] = {}
        self.roles: dict[int, list[Role]] = {}
        for node_id in self.voters + self.observers:
            self.logs[node_id] = (logs or {}).get(node_id) or MemoryLog()
            self.persisted[node_id] = (states or {}).get(node_id) or QuorumState()
            self.start(node_id)

    # --- node lifecycle ---------------------------------------------------------------------------

    def start(self, node_id: int) -> RaftGroup:
        group = RaftGroup(
            GROUP,
            node_id,
            self.voters,
            self.observers,
            log=self.logs[node_id],
            quorum_state=self.persisted[node_id],
            config=self.config,
            rng=random.Random(self.rng.getrandbits(32)),
            now_ms=self.now,
        )
        self.groups[node_id] = group
        self.flushes.pop(node_id, None)
        self.apply(node_id)
        return group

    def crash(self, node_id: int, *, tear: bool = False) -> RaftGroup:
        """Power cut and restart: unflushed data and undelivered messages to it are lost."""
        self.logs[node_id].crash(self.rng, tear=tear)
        self.inbox = [m for m in self.inbox if m.dst != node_id]
        return self.start(node_id)

    def apply(self, node_id: int) -> Output:
        out = self.groups[node_id].take_output()
        self.outputs.setdefault(node_id, []).append(out)
        if out.quorum_state is not None:
            self.persisted[node_id] = out.quorum_state
        if out.flush is not None:
            self.flushes[node_id] = out.flush
        self.committed.setdefault(node_id, []).extend(out.committed)
        self.failed.setdefault(node_id, []).extend(out.failed)
        self.roles.setdefault(node_id, []).extend(change.role for change in out.role_changes)
        self.inbox.extend(out.messages)
        return out

    # --- driving ---------------------------------------------------------------------------------

    def __getitem__(self, node_id: int) -> RaftGroup:
        return self.groups[node_id]

    def tick(self, node_id: int, advance_ms: int = 0) -> Output:
        self.now += advance_ms
        self.groups[node_id].tick(self.now)
        return self.apply(node_id)

    def tick_all(self, advance_ms: int = 0) -> None:
        self.now += advance_ms
        for node_id in self.groups:
            self.groups[node_id].tick(self.now)
            self.apply(node_id)

    def take(self, predicate: Callable[[Message], bool] = lambda m: True) -> list[Message]:
        """Remove and return the queued messages matching ``predicate`` (without delivering)."""
        taken = [m for m in self.inbox if predicate(m)]
        self.inbox = [m for m in self.inbox if not predicate(m)]
        return taken

    def deliver(self, message: Message) -> Output:
        self.groups[message.dst].receive(message, self.now)
        return self.apply(message.dst)

    def flush(self, node_id: int) -> None:
        flush = self.flushes.pop(node_id, None)
        if flush is not None:
            self.logs[node_id].flush()
            self.groups[node_id].flush_completed(flush.up_to, flush.generation, self.now)
            self.apply(node_id)

    def run(self, *, max_rounds: int = 1000, drop: Callable[[Message], bool] = lambda m: False) -> None:
        """Deliver messages and complete flushes until the cluster is quiet (time does not move)."""
        for _ in range(max_rounds):
            if not self.inbox and not self.flushes:
                return
            for node_id in list(self.flushes):
                self.flush(node_id)
            pending, self.inbox = self.inbox, []
            for message in pending:
                if not drop(message):
                    self.deliver(message)
        raise AssertionError("the cluster did not settle")

    def elect(self, node_id: int) -> None:
        """Make ``node_id`` leader the ordinary way: its election timer fires first."""
        group = self.groups[node_id]
        current = self.leader()
        if current is not None and current != node_id:
            self.groups[current].resign()
            self.apply(current)
            self.run()
        for _ in range(20):
            if group.role is Role.LEADER:
                return
            self.tick(node_id, max(0, group.next_deadline() - self.now))
            self.run()
        assert group.role is Role.LEADER, group.role

    def propose(self, node_id: int, *values: bytes) -> Proposal:
        proposal = self.groups[node_id].propose(batch(*values), self.now)
        self.apply(node_id)
        return proposal

    def settle(self, rounds: int = 20, step_ms: int = 10) -> None:
        """Let time pass in small steps, delivering everything between (for long-poll timeouts)."""
        for _ in range(rounds):
            self.run()
            self.tick_all(step_ms)
        self.run()

    def leader(self) -> int | None:
        leaders = [n for n, g in self.groups.items() if g.role is Role.LEADER]
        return max(leaders, key=lambda n: self.groups[n].epoch) if leaders else None
