"""Model-based test of the group coordinator: members join, heartbeat, leave, crash, lose
answers, revoke slowly; topics grow; time passes; the coordinator fails over by replaying its log.

Checked after every step:
* no partition has two owners — neither in the coordinator's view (assigned or pending
  revocation) nor among the partitions the clients that are still members actually hold
  (KIP-848: "a partition is assigned only after its previous owner revoked it");
* what a member's client holds is within what the coordinator thinks it owns;
* replaying every record emitted so far rebuilds exactly the coordinator's state.

At the end, after quiescence (crashed members expired, everyone else heartbeating with what it
was given), every partition of every subscribed topic is owned by exactly one member, the group
is stable, and clients and coordinator agree.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from tidelog.node.group_coordinator import (
    CommittedOffset,
    GroupCoordinator,
    GroupCoordinatorConfig,
    GroupErrorCode,
    GroupState,
    HeartbeatResponse,
    Result,
)
from tidelog.node.group_records import GroupRecord, TopicPartition

SESSION_MS = 1000
REBALANCE_MS = 700
NAMES = ("a", "b", "c", "s1", "s2")  # "s…" processes are static members (group.instance.id)
G = "g"
OK = GroupErrorCode.NONE
# Errors after which a KIP-848 client drops its partitions ("lost") and rejoins with epoch 0.
REJOIN = {GroupErrorCode.UNKNOWN_MEMBER_ID, GroupErrorCode.FENCED_MEMBER_EPOCH}


@dataclass
class Client:
    name: str
    static: bool
    topics: tuple[str, ...]
    incarnation: int = 0
    member_id: str = ""
    epoch: int = 0
    owned: frozenset[TopicPartition] = frozenset()
    last_assignment: frozenset[TopicPartition] = frozenset()
    history: list[str] = field(default_factory=list)

    @property
    def instance_id(self) -> str | None:
        return f"inst-{self.name}" if self.static else None


class GroupMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.config = GroupCoordinatorConfig(session_timeout_ms=SESSION_MS, heartbeat_interval_ms=100)
        self.coord = GroupCoordinator(self.config)
        self.log: list[GroupRecord] = []
        self.now = 0
        self.counts = {"t": 5, "u": 3}
        self.clients: dict[str, Client] = {}  # running processes, by name
        self.incarnations = {name: 0 for name in NAMES}

    # -------------------------------------------------------------------------- helpers

    def _append(self, result: Result) -> object:
        self.log.extend(result.records)
        return result.response

    def _heartbeat(self, c: Client, *, lose_answer: bool = False, slow_revoke: bool = False) -> HeartbeatResponse:
        resp = self._append(
            self.coord.heartbeat(
                G,
                c.member_id,
                c.epoch,
                c.instance_id,
                c.topics if c.epoch == 0 else None,
                c.owned,
                REBALANCE_MS if c.epoch == 0 else None,
                self.now,
                self.counts,
            )
        )
        assert isinstance(resp, HeartbeatResponse)
        c.history.append(f"t={self.now} hb e={c.epoch} owned={sorted(map(str, c.owned))} -> {resp.error.name} e={resp.member_epoch}")
        if lose_answer:
            return resp
        if resp.error == OK:
            assert resp.assignment is not None
            c.member_id, c.epoch = resp.member_id, resp.member_epoch
            c.last_assignment = resp.assignment
            # A client adds new partitions at once; it revokes the others at once unless slow.
            c.owned = (c.owned | resp.assignment) if slow_revoke else resp.assignment
        elif resp.error in REJOIN:
            c.epoch, c.owned, c.last_assignment = 0, frozenset(), frozenset()
        else:
            assert resp.error == GroupErrorCode.UNRELEASED_INSTANCE_ID, resp
        return resp

    def _members(self) -> set[str]:
        return {m.member_id for m in self.coord.describe_group(G).members}

    # ---------------------------------------------------------------------------- rules

    @rule(name=st.sampled_from(NAMES), topics=st.sampled_from([("t",), ("t", "u"), ("u",)]))
    def start(self, name: str, topics: tuple[str, ...]) -> None:
        """A new process for `name` starts and joins (a static one reuses its instance id)."""
        if name in self.clients:
            return
        self.incarnations[name] += 1
        c = Client(name, name.startswith("s"), topics, self.incarnations[name])
        c.member_id = f"{name}-{c.incarnation}"
        self.clients[name] = c
        self._heartbeat(c)

    @precondition(lambda self: self.clients)
    @rule(data=st.data(), lose_answer=st.booleans(), slow_revoke=st.booleans())
    def heartbeat(self, data: st.DataObject, lose_answer: bool, slow_revoke: bool) -> None:
        c = self.clients[data.draw(st.sampled_from(sorted(self.clients)))]
        self._heartbeat(c, lose_answer=lose_answer, slow_revoke=slow_revoke)

    @precondition(lambda self: self.clients)
    @rule(data=st.data())
    def finish_revoking(self, data: st.DataObject) -> None:
        c = self.clients[data.draw(st.sampled_from(sorted(self.clients)))]
        c.owned = c.owned & c.last_assignment

    @precondition(lambda self: self.clients)
    @rule(data=st.data(), temporary=st.booleans())
    def leave(self, data: st.DataObject, temporary: bool) -> None:
        """A clean shutdown: epoch -1, or -2 for a static member that will come back."""
        c = self.clients.pop(data.draw(st.sampled_from(sorted(self.clients))))
        if c.epoch == 0 and c.member_id not in self._members():
            return  # never got in: nothing to leave
        epoch = -2 if (temporary and c.static) else -1
        self._append(self.coord.heartbeat(G, c.member_id, epoch, c.instance_id, None, c.owned, None, self.now, self.counts))

    @precondition(lambda self: self.clients)
    @rule(data=st.data())
    def crash(self, data: st.DataObject) -> None:
        """SIGKILL: the process is gone; only the session timeout removes its member."""
        del self.clients[data.draw(st.sampled_from(sorted(self.clients)))]

    @rule(ms=st.integers(1, 700))
    def advance_time(self, ms: int) -> None:
        self.now += ms
        self._append(self.coord.tick(self.now))

    @rule(topic=st.sampled_from(["t", "u"]))
    def add_partition(self, topic: str) -> None:
        if self.counts[topic] < 8:
            self.counts[topic] += 1

    @precondition(lambda self: self.clients)
    @rule(data=st.data())
    def commit(self, data: st.DataObject) -> None:
        c = self.clients[data.draw(st.sampled_from(sorted(self.clients)))]
        offsets = {tp: CommittedOffset(self.now) for tp in c.owned}
        resp = self._append(self.coord.commit_offsets(G, c.member_id, c.epoch, offsets, self.now))
        members = {m.member_id: m for m in self.coord.describe_group(G).members}
        if c.member_id in members and members[c.member_id].member_epoch == c.epoch:
            assert resp.error == OK
        else:
            assert resp.error != OK, "a commit from outside the member's current epoch must be fenced"

    @rule()
    def failover(self) -> None:
        """The coordinator's node dies; the new leader replays the partition."""
        fresh = GroupCoordinator(self.config)
        for r in self.log:
            fresh.replay(r.key, r.value)
        fresh.on_loaded(self.now)
        self.coord = fresh

    # ------------------------------------------------------------------------ invariants

    @invariant()
    def no_partition_has_two_owners(self) -> None:
        desc = self.coord.describe_group(G)
        server: dict[TopicPartition, str] = {}
        for m in desc.members:
            assert m.assignment.isdisjoint(m.partitions_pending_revocation)
            for tp in m.assignment | m.partitions_pending_revocation:
                assert tp not in server, f"coordinator: {tp} owned by {server[tp]} and {m.member_id}"
                server[tp] = m.member_id
        members = {m.member_id: m for m in desc.members}
        held: dict[TopicPartition, str] = {}
        for c in self.clients.values():
            if c.member_id not in members or c.epoch == 0:
                continue  # fenced or not yet in: its owned set is empty or about to be dropped
            m = members[c.member_id]
            assert c.owned <= m.assignment | m.partitions_pending_revocation, (
                f"{c.name} holds {sorted(map(str, c.owned))} beyond what the coordinator gave it", c.history[-5:]
            )
            for tp in c.owned:
                assert tp not in held, f"clients: {tp} held by {held[tp]} and {c.member_id}"
                held[tp] = c.member_id

    @invariant()
    def replay_rebuilds_the_same_state(self) -> None:
        fresh = GroupCoordinator(self.config)
        for r in self.log:
            fresh.replay(r.key, r.value)
        assert fresh.snapshot() == self.coord.snapshot()

    def teardown(self) -> None:
        # Quiescence: let crashed members expire while the running ones keep heartbeating,
        # then everyone reconciles with no more faults.
        for _ in range(SESSION_MS // 100 + 2):
            self.now += 100
            self._append(self.coord.tick(self.now))
            for c in self.clients.values():
                self._heartbeat(c)
        for _ in range(8):
            self.now += 10
            for c in self.clients.values():
                self._heartbeat(c)
        self.no_partition_has_two_owners()
        self.replay_rebuilds_the_same_state()
        # Compaction keeps the latest record per key; later it drops the tombstones too.
        latest: dict[bytes, int] = {r.key: i for i, r in enumerate(self.log)}
        compacted = [r for i, r in enumerate(self.log) if latest[r.key] == i]
        for records in (compacted, [r for r in compacted if r.value is not None]):
            fresh = GroupCoordinator(self.config)
            for r in records:
                fresh.replay(r.key, r.value)
            assert fresh.snapshot() == self.coord.snapshot()
        desc = self.coord.describe_group(G)
        if not self.clients:
            assert desc.state in (GroupState.EMPTY, GroupState.DEAD)
            return
        assert desc.state == GroupState.STABLE, desc
        assert {m.member_id for m in desc.members} == {c.member_id for c in self.clients.values()}
        subscribed = {t for c in self.clients.values() for t in c.topics}
        expected = {TopicPartition(t, p) for t in subscribed for p in range(self.counts[t])}
        owned = [tp for c in self.clients.values() for tp in c.owned]
        assert sorted(owned) == sorted(expected), "after quiescence every partition is owned exactly once"
        by_id = {m.member_id: m for m in desc.members}
        for c in self.clients.values():
            assert c.owned == by_id[c.member_id].assignment == by_id[c.member_id].target_assignment


GroupMachine.TestCase.settings = settings(
    max_examples=100,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_group_coordinator_model = GroupMachine.TestCase
