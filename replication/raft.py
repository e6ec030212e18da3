"""The Raft core: one `RaftGroup` per replicated log, sans-IO, pull-based as in KRaft (KIP-595).

A `RaftGroup` owns no socket, thread or clock. The driver (the node, or the simulator) feeds it
inputs — `receive(message)`, `tick(now_ms)`, `propose(batches)`, `flush_completed(offset, gen)`,
`propose_voters(voters)`, `resign()` — and after each input takes the `Output` with
`take_output()`: messages to send, a flush to perform, the quorum state to persist, role and
high-watermark changes, proposals that committed or failed.

The one ordering contract (as etcd's Ready): **when an `Output` carries `quorum_state`, the
driver makes it durable before it sends any message of that same output.** A vote granted or a
request of a new epoch answered before the epoch and vote are on disk can elect two leaders in
one epoch after a crash. Log appends and truncations are done by the core itself through
`RaftLog` (page-cache writes); only flushes are deferred, and only flushed offsets count: toward
the high watermark on the leader, and as the fetch offset a follower reports.

Roles follow KRaft with KIP-996 pre-vote: Unattached, Follower, Prospective (pre-vote),
Candidate, Leader, Resigned; `TRANSITIONS` is the table of legal moves and anything else raises
`IllegalTransitionError`. Observers (replicas outside the voter set) only ever are Unattached or
Follower.
"""

from __future__ import annotations

import enum
import json
import random
import struct
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from tidelog.proto.records import (
    ATTRIBUTES_OFFSET,
    BATCH_LENGTH_OFFSET,
    CONTROL_FLAG_MASK,
    LOG_OVERHEAD,
    Record,
    decode_batches,
    encode_batch,
)
from tidelog.replication.log import RaftLog
from tidelog.replication.messages import (
    NO_DIVERGENCE,
    NO_EPOCH,
    BeginQuorumEpoch,
    EndQuorumEpoch,
    FetchError,
    FetchRequest,
    FetchResponse,
    Message,
    VoteRequest,
    VoteResponse,
    coalesce,
)

# Control record keys: (version int16 = 0, type int16), Kafka's ControlRecordType numbering.
LEADER_CHANGE_KEY = struct.pack(">hh", 0, 3)
VOTERS_KEY = struct.pack(">hh", 0, 7)

_VOTERS_KEY_FIELD = b"\x08" + VOTERS_KEY
_INT32 = struct.Struct(">i")
_INT16 = struct.Struct(">h")


class Role(enum.Enum):
    UNATTACHED = "unattached"  # knows an epoch but no leader (may have voted in it)
    FOLLOWER = "follower"  # fetches from the known leader of its epoch
    PROSPECTIVE = "prospective"  # asking for pre-votes (KIP-996); changes nobody's epoch
    CANDIDATE = "candidate"  # stands in a new epoch, voted for itself
    LEADER = "leader"
    RESIGNED = "resigned"  # was leader of this epoch, gave it up; waits to elect a successor


TRANSITIONS: dict[Role, frozenset[Role]] = {
    Role.UNATTACHED: frozenset({Role.UNATTACHED, Role.FOLLOWER, Role.PROSPECTIVE}),
    Role.FOLLOWER: frozenset({Role.UNATTACHED, Role.FOLLOWER, Role.PROSPECTIVE}),
    Role.PROSPECTIVE: frozenset({Role.UNATTACHED, Role.FOLLOWER, Role.CANDIDATE}),
    Role.CANDIDATE: frozenset({Role.UNATTACHED, Role.FOLLOWER, Role.PROSPECTIVE, Role.LEADER}),
    Role.LEADER: frozenset({Role.UNATTACHED, Role.FOLLOWER, Role.RESIGNED}),
    Role.RESIGNED: frozenset({Role.UNATTACHED, Role.FOLLOWER, Role.PROSPECTIVE}),
}
_VOTER_ONLY_ROLES = frozenset({Role.PROSPECTIVE, Role.CANDIDATE, Role.LEADER})


class RaftError(Exception):
    """Base of the errors the core raises."""


class IllegalTransitionError(RaftError):
    def __init__(self, group_id: str, node_id: int, old: Role, new: Role, why: str = "") -> None:
        super().__init__(
            f"group {group_id} node {node_id}: illegal transition {old.value} -> {new.value}{why}"
        )
        self.old = old
        self.new = new


class NotLeaderError(RaftError):
    """A proposal reached a replica that is not the leader; ``leader_id`` is the hint, if any."""

    def __init__(self, epoch: int, leader_id: int | None) -> None:
        super().__init__(f"not the leader (epoch {epoch}, leader {leader_id})")
        self.epoch = epoch
        self.leader_id = leader_id


class MembershipChangeError(RaftError):
    """A voter change that would not be safe now (more than one voter, or one still pending)."""


class TruncationBelowHighWatermarkError(RaftError):
    """The leader asked to truncate committed entries: a safety bug somewhere, never carry on."""


@dataclass(frozen=True, slots=True)
class QuorumState:
    """What must survive a restart: the epoch, the vote cast in it, the leader known in it."""

    epoch: int = 0
    voted_for: int | None = None
    leader_id: int | None = None


@dataclass(frozen=True, slots=True)
class RaftConfig:
    """Timeouts as KRaft's defaults (controller.quorum.*); the simulator scales them down.

    ``fetch_max_wait_ms`` is the leader's long-poll; KIP-1236 requires 2 x it <= fetch timeout.

    ``lazy_follower_hw``: a leader answers a parked fetch only for new data (or when the
    long-poll expires), not for a high-watermark move alone, so followers learn the HW from the
    next data or the long-poll. Kafka's partition replication works so: it halves the messages
    per replicated batch under load. Only for groups whose followers do nothing with the HW
    (partitions; never the metadata quorum, whose followers apply committed records).
    """

    election_timeout_ms: int = 1000
    fetch_timeout_ms: int = 2000
    fetch_max_wait_ms: int = 500
    request_timeout_ms: int = 500
    election_backoff_max_ms: int = 1000
    retry_backoff_ms: int = 20
    max_fetch_bytes: int = 1 << 20
    lazy_follower_hw: bool = False
    # Deliberately broken behaviour, to prove the simulator's checker finds it. Never set outside tests.
    _bug_vote_without_log_check: bool = False
    _bug_commit_old_epoch: bool = False
    _bug_vote_before_persist: bool = False
    _bug_skip_truncation: bool = False

    def __post_init__(self) -> None:
        assert 2 * self.fetch_max_wait_ms <= self.fetch_timeout_ms, "KIP-1236 timing invariant"
        assert self.election_timeout_ms > 0 and self.fetch_timeout_ms >= self.election_timeout_ms

    @classmethod
    def scaled(cls, election_timeout_ms: int, **overrides: bool | int) -> RaftConfig:
        """KRaft's ratios at another scale: fetch timeout 2T, long-poll T/2, backoff T."""
        t = election_timeout_ms
        values: dict[str, int | bool] = dict(
            election_timeout_ms=t,
            fetch_timeout_ms=2 * t,
            fetch_max_wait_ms=t // 2,
            request_timeout_ms=t // 2,
            election_backoff_max_ms=t,
            retry_backoff_ms=max(1, t // 10),
        )
        values.update(overrides)
        return cls(**values)  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class Flush:
    """Make the log durable up to ``up_to``, then call ``flush_completed(up_to, generation)``.

    ``generation`` changes whenever the core truncates the log, so a flush that raced with a
    truncation cannot be mistaken for one covering the new bytes at the same offsets.
    """

    up_to: int
    generation: int


@dataclass(frozen=True, slots=True)
class RoleChange:
    role: Role
    epoch: int
    leader_id: int | None


@dataclass(frozen=True, slots=True)
class Proposal:
    """A leader append: its batches hold offsets base_offset..last_offset, stamped ``epoch``.

    Committed means: stored on a majority, and it will stay at these offsets forever. Failed
    means the leader lost its role first: the outcome is unknown (a later leader may still
    commit it), as for Kafka's NOT_LEADER_OR_FOLLOWER on acks=all; producers retry idempotently.
    """

    epoch: int
    base_offset: int
    last_offset: int


@dataclass(slots=True)
class Output:
    """Everything one input produced. Persist ``quorum_state`` before sending ``messages``."""

    messages: list[Message] = field(default_factory=list)
    quorum_state: QuorumState | None = None
    flush: Flush | None = None
    role_changes: list[RoleChange] = field(default_factory=list)
    high_watermark: int | None = None
    committed: list[Proposal] = field(default_factory=list)
    failed: list[Proposal] = field(default_factory=list)
    voters: tuple[int, ...] | None = None
    # The lowest offset the core truncated the log to in this step (its end offset then), so the
    # node can drop state derived from the removed batches (producer state, index caches).
    truncated_to: int | None = None

    def by_destination(self) -> dict[int, list[Message]]:
        """The messages grouped by destination node (see `messages.coalesce`)."""
        return coalesce(self.messages)

    def __bool__(self) -> bool:
        return bool(
            self.messages
            or self.quorum_state is not None
            or self.flush is not None
            or self.role_changes
            or self.high_watermark is not None
            or self.committed
            or self.failed
            or self.voters is not None
            or self.truncated_to is not None
        )


@dataclass(frozen=True, slots=True)
class ReplicaProgress:
    """The leader's view of one replica (KIP-595 DescribeQuorum): its last valid fetch offset
    (-1 before its first) and when it last fetched (-1 never), on the driver's clock."""

    node_id: int
    fetch_offset: int
    last_fetch_ms: int


@dataclass(frozen=True, slots=True)
class QuorumDescription:
    """A snapshot for admin tools; ``replicas`` is filled on the leader only."""

    group_id: str
    node_id: int
    role: Role
    epoch: int
    leader_id: int | None
    high_watermark: int
    log_end_offset: int
    voters: tuple[int, ...]
    replicas: tuple[ReplicaProgress, ...]


class _Progress:
    """The leader's view of one replica: its last valid fetch offset and when it last fetched."""

    __slots__ = ("match", "last_fetch_ms")

    def __init__(self) -> None:
        self.match = -1
        self.last_fetch_ms = -1 << 62


# `next_deadline()` when no timer is armed (an observer with nothing to do).
NEVER = 1 << 62
_NEVER = NEVER


def control_batch(key: bytes, value: dict[str, object], timestamp: int) -> bytes:
    """One control batch with one record: Kafka's control key layout, a JSON value of ours."""
    payload = json.dumps(value, sort_keys=True, separators=(",", ":")).encode()
    return encode_batch([Record(offset=0, timestamp=timestamp, key=key, value=payload)], is_control=True)


class RaftGroup:
    """One replica of one Raft group. Not thread-safe; the driver serialises all calls."""

    def __init__(
        self,
        group_id: str,
        node_id: int,
        voters: Iterable[int],
        observers: Iterable[int] = (),
        *,
        log: RaftLog,
        quorum_state: QuorumState | None = None,
        config: RaftConfig | None = None,
        rng: random.Random,
        now_ms: int = 0,
    ) -> None:
        self.group_id = group_id
        self.node_id = node_id
        self._log = log
        self._config = config or RaftConfig()
        self._rng = rng
        self._now = now_ms
        self._out = Output()

        self._role = Role.UNATTACHED
        self._initial_voters = tuple(sorted(set(voters)))
        assert self._initial_voters, "a group needs at least one voter"
        # (offset of the voters record, voter set), in log order; truncation pops from the end.
        self._voter_changes: list[tuple[int, tuple[int, ...]]] = []
        self._voters = self._initial_voters
        self._replicas: list[int] = sorted(set(self._initial_voters) | set(observers))

        self._load_voter_changes()
        state = quorum_state or QuorumState()
        self._epoch = state.epoch
        self._voted_for = state.voted_for
        self._leader_id = state.leader_id
        self._deferred_persist = False

        self._hw = 0
        self._leader_hw = 0
        end = log.end_offset
        # Whatever recovery left in the log is on disk.
        self._flushed = end
        self._flush_generation = 0
        self._flush_requested = end

        # Election state.
        self._election_deadline = _NEVER
        self._failed_elections = 0
        self._granted: set[int] = set()
        self._rejected: set[int] = set()
        self._vote_resend_ms = _NEVER
        # Follower state.
        self._fetch_id = 0
        self._fetch_inflight = False
        self._fetch_sent_ms = 0
        self._fetch_retry_ms = 0
        self._lease_until = -_NEVER
        # Leader state.
        self._progress: dict[int, _Progress] = {}
        self._parked: dict[int, tuple[FetchRequest, int]] = {}
        self._pending: deque[Proposal] = deque()
        self._epoch_start = 0
        self._leader_since = 0
        self._check_quorum_ms = _NEVER
        self._begin_resend_ms = _NEVER

        if self._leader_id == node_id:
            # We led this epoch before the restart; what we appended may be lost, so we never
            # lead it again. KRaft restarts such a replica as Resigned too, and says so.
            self._role = Role.RESIGNED
            self._election_deadline = self._now + self._random_election_timeout()
            self._announce()
            self._send_end_quorum_epoch()
        elif self._leader_id is not None:
            self._role = Role.FOLLOWER
            self._enter_follower_timers()
            self._announce()
            self._maybe_send_fetch()
        else:
            self._role = Role.UNATTACHED
            self._election_deadline = self._now + self._random_election_timeout()
            self._announce()

    # --- read-only views ----------------------------------------------------------------------

    @property
    def role(self) -> Role:
        return self._role

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def leader_id(self) -> int | None:
        return self._leader_id

    @property
    def voted_for(self) -> int | None:
        return self._voted_for

    @property
    def high_watermark(self) -> int:
        return self._hw

    @property
    def flushed_offset(self) -> int:
        return self._flushed

    @property
    def retention_limit(self) -> int:
        """Retention may delete batches only below this offset: what is committed, and never the
        latest voters record, which a restart reads the voter set from (there are no snapshots)."""
        if self._voter_changes:
            return min(self._hw, self._voter_changes[-1][0])
        return self._hw

    @property
    def voters(self) -> tuple[int, ...]:
        return self._voters

    @property
    def is_voter(self) -> bool:
        return self.node_id in self._voters

    @property
    def log(self) -> RaftLog:
        return self._log

    @property
    def quorum_state(self) -> QuorumState:
        return QuorumState(self._epoch, self._voted_for, self._leader_id)

    def describe(self) -> QuorumDescription:
        replicas: tuple[ReplicaProgress, ...] = ()
        if self._role is Role.LEADER:
            progress = self._progress
            replicas = tuple(
                ReplicaProgress(r, progress[r].match, max(progress[r].last_fetch_ms, -1))
                if r in progress
                else ReplicaProgress(r, -1, -1)
                for r in self._replicas
                if r != self.node_id
            )
        return QuorumDescription(
            self.group_id, self.node_id, self._role, self._epoch, self._leader_id, self._hw,
            self._log.end_offset, self._voters, replicas,
        )  # fmt: skip

    def next_deadline(self) -> int:
        """The earliest simulated/real time at which `tick` has work; the driver may tick sooner."""
        role = self._role
        if self._deferred_persist:
            return self._now
        if role is Role.LEADER:
            deadline = min(self._check_quorum_ms, self._begin_resend_ms)
            for _, expiry in self._parked.values():
                if expiry < deadline:
                    deadline = expiry
            return deadline
        if role is Role.FOLLOWER:
            deadline = self._election_deadline if self.node_id in self._voters else _NEVER
            if self._fetch_inflight:
                resend = (
                    self._fetch_sent_ms + self._config.fetch_max_wait_ms + self._config.request_timeout_ms
                )
                return min(deadline, resend)
            if self._flushed >= self._log.end_offset:
                return min(deadline, self._fetch_retry_ms)
            return deadline
        if self.node_id not in self._voters:
            return _NEVER
        if role is Role.PROSPECTIVE or role is Role.CANDIDATE:
            return min(self._election_deadline, self._vote_resend_ms)
        return self._election_deadline

    # --- inputs ---------------------------------------------------------------------------------

    def take_output(self) -> Output:
        """Everything produced since the last call. Persist quorum_state before sending messages."""
        out = self._out
        self._out = Output()
        return out

    def tick(self, now_ms: int) -> None:
        if now_ms > self._now:
            self._now = now_ms
        now = self._now
        if self._deferred_persist:
            self._deferred_persist = False
            self._persist()
        role = self._role
        if role is Role.LEADER:
            self._tick_leader(now)
        elif role is Role.FOLLOWER:
            if self.node_id in self._voters and now >= self._election_deadline:
                self._become_prospective()
            elif self._fetch_inflight:
                cfg = self._config
                if now >= self._fetch_sent_ms + cfg.fetch_max_wait_ms + cfg.request_timeout_ms:
                    self._send_fetch()
            elif now >= self._fetch_retry_ms:
                self._maybe_send_fetch()
        elif self.node_id not in self._voters:
            return
        elif now < self._election_deadline:
            if (role is Role.PROSPECTIVE or role is Role.CANDIDATE) and now >= self._vote_resend_ms:
                # KRaft retries unanswered vote requests: a voter that restarted or lost the
                # request may still decide this election.
                self._request_votes()
        else:
            if role is Role.PROSPECTIVE:
                self._prospective_failed()
            else:
                if role is Role.CANDIDATE:
                    self._failed_elections += 1
                # Unattached, Resigned and Candidate all go (back) to asking for pre-votes.
                self._become_prospective()

    def propose(self, batches: bytes, now_ms: int | None = None) -> Proposal:
        """Append client batches as leader; the proposal commits or fails in a later Output."""
        if now_ms is not None and now_ms > self._now:
            self._now = now_ms
        if self._role is not Role.LEADER:
            raise NotLeaderError(self._epoch, self._leader_id if self._role is Role.FOLLOWER else None)
        base, last = self._log.append(batches, self._epoch)
        proposal = Proposal(self._epoch, base, last)
        self._pending.append(proposal)
        self._after_leader_append()
        return proposal

    def propose_voters(self, voters: Iterable[int]) -> Proposal:
        """Change the voter set by exactly one voter (KIP-853); effective as soon as appended.

        Refused while an earlier change is uncommitted or before the leader has committed an
        entry of its own epoch (the single-server-change bug Ongaro describes in his 2015 note).
        """
        if self._role is not Role.LEADER:
            raise NotLeaderError(self._epoch, None)
        new = tuple(sorted(set(voters)))
        if len(set(new) ^ set(self._voters)) != 1:
            raise MembershipChangeError(f"voters {self._voters} -> {new}: change exactly one voter at a time")
        if self._voter_changes and self._voter_changes[-1][0] >= self._hw:
            raise MembershipChangeError("the previous voter change has not committed yet")
        if self._hw <= self._epoch_start:
            raise MembershipChangeError("the leader has not committed an entry of its epoch yet")
        batch = control_batch(VOTERS_KEY, {"voters": list(new)}, self._now)
        base, last = self._log.append(batch, self._epoch)
        self._apply_voters(base, new)
        proposal = Proposal(self._epoch, base, last)
        self._pending.append(proposal)
        self._after_leader_append()
        return proposal

    def resign(self) -> None:
        """Graceful hand-over (shutdown): stop leading and tell the voters who should run next."""
        if self._role is Role.LEADER:
            self._resign()

    def flush_completed(self, offset: int, generation: int, now_ms: int | None = None) -> None:
        """The driver made the log durable up to ``offset`` for a `Flush` of ``generation``."""
        if now_ms is not None and now_ms > self._now:
            self._now = now_ms
        if generation != self._flush_generation:
            return
        offset = min(offset, self._log.end_offset)
        if offset <= self._flushed:
            return
        self._flushed = offset
        role = self._role
        if role is Role.LEADER:
            self._maybe_advance_hw()
        elif role is Role.FOLLOWER:
            self._update_follower_hw()
            if not self._fetch_inflight:
                self._maybe_send_fetch()

    def receive(self, message: Message, now_ms: int | None = None) -> None:
        """Handle one message. ``now_ms`` (the driver's clock) dates leases and deadlines set
        here; without it the time of the last input is used. Timers only fire in `tick`."""
        if now_ms is not None and now_ms > self._now:
            self._now = now_ms
        if message.group_id != self.group_id or message.dst != self.node_id:
            raise ValueError(
                f"message for {message.group_id}/{message.dst} given to {self.group_id}/{self.node_id}"
            )
        kind = type(message)
        if kind is FetchRequest:
            self._on_fetch_request(message)  # type: ignore[arg-type]
        elif kind is FetchResponse:
            self._on_fetch_response(message)  # type: ignore[arg-type]
        elif kind is VoteRequest:
            self._on_vote_request(message)  # type: ignore[arg-type]
        elif kind is VoteResponse:
            self._on_vote_response(message)  # type: ignore[arg-type]
        elif kind is BeginQuorumEpoch:
            self._on_begin_quorum_epoch(message)  # type: ignore[arg-type]
        elif kind is EndQuorumEpoch:
            self._on_end_quorum_epoch(message)  # type: ignore[arg-type]
        else:
            raise TypeError(f"not a Raft message: {message!r}")

    # --- role transitions ---------------------------------------------------------------------

    def _transition(self, new: Role) -> Role:
        old = self._role
        if new not in TRANSITIONS[old]:
            raise IllegalTransitionError(self.group_id, self.node_id, old, new)
        if new in _VOTER_ONLY_ROLES and self.node_id not in self._voters:
            raise IllegalTransitionError(self.group_id, self.node_id, old, new, " (an observer never runs)")
        if old is Role.LEADER:
            self._leave_leadership()
        elif old is Role.FOLLOWER:
            self._fetch_inflight = False
        self._role = new
        return old

    def _announce(self) -> None:
        self._out.role_changes.append(RoleChange(self._role, self._epoch, self._leader_id))

    def _persist(self) -> None:
        self._out.quorum_state = QuorumState(self._epoch, self._voted_for, self._leader_id)

    def _become_unattached(self, epoch: int) -> None:
        self._transition(Role.UNATTACHED)
        if epoch > self._epoch:
            self._epoch = epoch
            self._voted_for = None
            self._leader_id = None
            self._persist()
        self._election_deadline = self._now + self._random_election_timeout() + self._backoff()
        self._announce()

    def _become_follower(self, epoch: int, leader_id: int) -> None:
        assert leader_id != self.node_id
        if epoch == self._epoch and self._role is Role.FOLLOWER and self._leader_id == leader_id:
            return
        self._transition(Role.FOLLOWER)
        changed = self._leader_id != leader_id
        if epoch > self._epoch:
            self._epoch = epoch
            self._voted_for = None
            changed = True
        if changed:
            self._leader_id = leader_id
            self._persist()
        self._failed_elections = 0
        # What we knew from an earlier leader stays committed, but nothing above it yet.
        self._leader_hw = self._hw
        self._enter_follower_timers()
        self._announce()
        self._maybe_send_fetch()

    def _enter_follower_timers(self) -> None:
        # A follower that just learned of its leader treats it as alive (KAFKA-17641: no pre-vote
        # is granted before the first fetch could have happened), which stops ping-pong.
        self._lease_until = self._now + self._config.election_timeout_ms
        self._election_deadline = self._now + self._config.fetch_timeout_ms
        self._fetch_inflight = False
        self._fetch_retry_ms = self._now

    def _become_prospective(self) -> None:
        self._transition(Role.PROSPECTIVE)
        self._granted = {self.node_id}
        self._rejected = set()
        self._election_deadline = self._now + self._random_election_timeout()
        self._announce()
        self._request_votes()
        self._count_pre_votes()

    def _prospective_failed(self) -> None:
        self._failed_elections += 1
        if self._leader_id is not None and self._leader_id != self.node_id:
            # KIP-996: back to the leader we had, which may well be alive.
            self._transition(Role.FOLLOWER)
            self._enter_follower_timers()
            self._election_deadline = self._now + self._random_election_timeout() + self._backoff()
            self._announce()
            self._maybe_send_fetch()
        else:
            self._become_unattached(self._epoch)

    def _become_candidate(self) -> None:
        self._transition(Role.CANDIDATE)
        self._epoch += 1
        self._voted_for = self.node_id
        self._leader_id = None
        self._persist()
        self._granted = {self.node_id}
        self._rejected = set()
        self._election_deadline = self._now + self._random_election_timeout() + self._backoff()
        self._announce()
        self._request_votes()
        self._count_votes()

    def _become_leader(self) -> None:
        self._transition(Role.LEADER)
        self._leader_id = self.node_id
        self._persist()
        self._failed_elections = 0
        now = self._now
        self._leader_since = now
        self._check_quorum_ms = now + self._config.fetch_timeout_ms
        self._progress = {}
        self._parked = {}
        self._pending = deque()
        self._announce()
        # The leader-change batch commits the epoch: the HW may only pass through entries of the
        # current epoch (Raft §5.4.2), and this is the first one.
        self._epoch_start = self._log.end_offset
        batch = control_batch(LEADER_CHANGE_KEY, {"leader": self.node_id, "voters": list(self._voters)}, now)
        self._log.append(batch, self._epoch)
        self._request_flush()
        for replica in self._replicas:
            if replica != self.node_id:
                self._send(BeginQuorumEpoch(self.group_id, self.node_id, replica, self._epoch))
        self._begin_resend_ms = now + self._config.request_timeout_ms
        self._maybe_advance_hw()

    def _resign(self) -> None:
        self._transition(Role.RESIGNED)
        self._election_deadline = self._now + self._random_election_timeout()
        self._announce()
        self._send_end_quorum_epoch()

    def _send_end_quorum_epoch(self) -> None:
        # The most caught-up voters first (KIP-595 PreferredSuccessors): they win quickest.
        others = [v for v in self._voters if v != self.node_id]
        progress = self._progress
        others.sort(key=lambda v: (-(progress[v].match if v in progress else -1), v))
        successors = tuple(others)
        for voter in others:
            self._send(EndQuorumEpoch(self.group_id, self.node_id, voter, self._epoch, successors))

    def _leave_leadership(self) -> None:
        if self._pending:
            self._out.failed.extend(self._pending)
            self._pending = deque()
        parked = self._parked
        self._parked = {}
        for request, _ in parked.values():
            self._reply_fetch_error(request, FetchError.NOT_LEADER_OR_FOLLOWER)
        self._progress = {}
        self._check_quorum_ms = _NEVER
        self._begin_resend_ms = _NEVER

    def _observe_epoch(self, epoch: int, leader_id: int | None) -> None:
        """Someone knows a newer epoch: join it (as follower if its leader is known)."""
        if leader_id is not None and leader_id != self.node_id:
            self._become_follower(epoch, leader_id)
        else:
            self._become_unattached(epoch)

    # --- votes ----------------------------------------------------------------------------------

    def _log_up_to_date(self, last_epoch: int, end_offset: int) -> bool:
        if self._config._bug_vote_without_log_check:
            return True
        log = self._log
        own = (log.last_epoch, log.end_offset)
        if own[0] == NO_EPOCH and own[1] > 0:
            # An empty log past offset 0 that cannot say which epoch its prefix ended in: our
            # position is unknown, so we cannot judge anyone's log as up to date. Refuse.
            return False
        return (last_epoch, end_offset) >= own

    def _on_vote_request(self, m: VoteRequest) -> None:
        if m.pre_vote:
            # KIP-996: a pre-vote changes no state here. Refuse it while we have a live leader
            # (or are it): that is what keeps a partitioned replica from disrupting the quorum.
            granted = (
                m.epoch > self._epoch
                and self._role is not Role.LEADER
                and not (self._role is Role.FOLLOWER and self._now < self._lease_until)
                and self._log_up_to_date(m.last_epoch, m.end_offset)
            )
            self._send(
                VoteResponse(self.group_id, self.node_id, m.src, self._epoch, granted, True, self._leader_id)
            )
            return
        if m.epoch < self._epoch:
            self._send(
                VoteResponse(self.group_id, self.node_id, m.src, self._epoch, False, False, self._leader_id)
            )
            return
        if m.epoch > self._epoch:
            self._become_unattached(m.epoch)
        granted = False
        if self._voted_for == m.src:
            granted = True
        elif (
            self._voted_for is None
            and self._leader_id is None
            and self._role in (Role.UNATTACHED, Role.PROSPECTIVE)
            and self._log_up_to_date(m.last_epoch, m.end_offset)
        ):
            granted = True
            self._voted_for = m.src
            if self._config._bug_vote_before_persist:
                self._deferred_persist = True
            else:
                self._persist()
            if self._role is Role.PROSPECTIVE:
                self._transition(Role.UNATTACHED)
                self._announce()
            self._election_deadline = self._now + self._random_election_timeout()
        self._send(
            VoteResponse(self.group_id, self.node_id, m.src, self._epoch, granted, False, self._leader_id)
        )

    def _on_vote_response(self, m: VoteResponse) -> None:
        if m.epoch > self._epoch:
            self._observe_epoch(m.epoch, m.leader_id)
            return
        if (
            m.epoch == self._epoch
            and m.leader_id is not None
            and self._leader_id is None
            and m.leader_id != self.node_id
            and self._role in (Role.UNATTACHED, Role.PROSPECTIVE)
        ):
            # A voter knows the leader of our epoch, whose BeginQuorumEpoch we missed: follow it.
            # (If we knew that leader already, we are asking precisely because it went quiet.)
            self._become_follower(m.epoch, m.leader_id)
            return
        if m.src not in self._voters:
            return
        if m.pre_vote:
            if self._role is not Role.PROSPECTIVE:
                return
            (self._granted if m.granted else self._rejected).add(m.src)
            self._count_pre_votes()
        elif self._role is Role.CANDIDATE and m.epoch == self._epoch:
            (self._granted if m.granted else self._rejected).add(m.src)
            self._count_votes()

    def _request_votes(self) -> None:
        """(Re)send the vote or pre-vote request to every voter that has not answered yet."""
        pre_vote = self._role is Role.PROSPECTIVE
        epoch = self._epoch + 1 if pre_vote else self._epoch
        log = self._log
        answered = self._granted | self._rejected
        for voter in self._voters:
            if voter not in answered:
                self._send(
                    VoteRequest(
                        self.group_id, self.node_id, voter, epoch, log.last_epoch, log.end_offset, pre_vote
                    )
                )
        self._vote_resend_ms = self._now + self._config.request_timeout_ms

    def _count_pre_votes(self) -> None:
        majority = len(self._voters) // 2 + 1
        if len(self._granted) >= majority:
            self._become_candidate()
        elif len(self._voters) - len(self._rejected) < majority:
            self._prospective_failed()

    def _count_votes(self) -> None:
        if len(self._granted) >= len(self._voters) // 2 + 1:
            self._become_leader()

    # --- quorum epoch announcements -----------------------------------------------------------

    def _on_begin_quorum_epoch(self, m: BeginQuorumEpoch) -> None:
        if m.epoch > self._epoch:
            self._become_follower(m.epoch, m.src)
        elif m.epoch == self._epoch and self._role in (Role.UNATTACHED, Role.PROSPECTIVE, Role.CANDIDATE):
            self._become_follower(m.epoch, m.src)

    def _on_end_quorum_epoch(self, m: EndQuorumEpoch) -> None:
        if m.epoch < self._epoch:
            return
        if m.epoch > self._epoch:
            self._become_unattached(m.epoch)
        elif self._leader_id != m.src or self._role not in (Role.FOLLOWER, Role.UNATTACHED):
            return
        # The leader is gone on purpose: stop honouring its lease and let the preferred
        # successor (the most caught-up voter) run first, the others a little later.
        self._lease_until = self._now
        if self.node_id in m.preferred_successors:
            position = m.preferred_successors.index(self.node_id)
            delay = position * (self._config.election_timeout_ms // 4)
        else:
            delay = self._random_election_timeout()
        self._election_deadline = min(self._election_deadline, self._now + delay)

    # --- fetch: leader side -------------------------------------------------------------------

    def _reply(self, m: FetchRequest, error: FetchError = FetchError.NONE, records: bytes = b"",
               diverging_epoch: int = NO_DIVERGENCE, diverging_end: int = -1) -> None:
        """Answer fetch ``m`` as the leader of the current epoch."""
        self._send(
            FetchResponse(
                self.group_id, self.node_id, m.src, self._epoch, self.node_id, error, m.fetch_id,
                m.fetch_offset, m.last_fetched_epoch, records, self._hw, diverging_epoch, diverging_end,
            )
        )  # fmt: skip

    def _reply_fetch_error(self, m: FetchRequest, error: FetchError) -> None:
        leader = self._leader_id if self._role in (Role.FOLLOWER, Role.LEADER) else None
        self._send(
            FetchResponse(
                self.group_id, self.node_id, m.src, self._epoch, leader, error, m.fetch_id,
                m.fetch_offset, m.last_fetched_epoch, b"", self._hw, NO_DIVERGENCE, -1,
            )
        )  # fmt: skip

    def _on_fetch_request(self, m: FetchRequest) -> None:
        if self._role is not Role.LEADER or m.epoch != self._epoch:
            if m.epoch < self._epoch:
                error = FetchError.FENCED_LEADER_EPOCH
            elif m.epoch > self._epoch:
                error = FetchError.UNKNOWN_LEADER_EPOCH
            else:
                error = FetchError.NOT_LEADER_OR_FOLLOWER
            self._reply_fetch_error(m, error)
            return
        progress = self._progress.get(m.src)
        if progress is None:
            progress = self._progress[m.src] = _Progress()
            if m.src not in self._replicas:
                self._replicas.append(m.src)
        progress.last_fetch_ms = self._now
        log = self._log
        start = log.start_offset
        # KIP-595 validateOffsetAndEpoch: does the follower's log end agree with ours? Below our
        # log start (deleted by retention) we cannot tell: the follower starts over there.
        if m.fetch_offset < start:
            self._reply_out_of_range(m)
            return
        if start == 0 or m.fetch_offset != start or m.last_fetched_epoch != log.start_epoch:
            epoch, end = log.end_offset_for_epoch(m.last_fetched_epoch)
            if epoch == NO_EPOCH and start > 0:
                # The epochs that would place the follower's log were deleted with the start of
                # ours: it cannot be validated, so it starts over at our log start.
                self._reply_out_of_range(m)
                return
            if epoch != m.last_fetched_epoch or m.fetch_offset > end:
                self._reply(m, diverging_epoch=epoch, diverging_end=end)
                return
        if m.fetch_offset != progress.match:
            # A lower offset than before is the follower's state after a restart or truncation;
            # taking it can only delay the HW, which never goes back anyway.
            progress.match = m.fetch_offset
            if m.src in self._voters:
                self._maybe_advance_hw()
        if m.fetch_offset < self._log.end_offset or m.max_wait_ms <= 0 or (
                m.high_watermark < self._hw and not self._config.lazy_follower_hw):
            self._answer_fetch(m)
        else:
            # Long-poll: nothing new for this follower; answer when data (or the HW, unless
            # lazy_follower_hw) moves.
            self._parked[m.src] = (m, self._now + min(m.max_wait_ms, self._config.fetch_max_wait_ms))

    def _reply_out_of_range(self, m: FetchRequest) -> None:
        # Our log start and the epoch that ended there, in the divergence fields.
        self._reply(m, FetchError.OFFSET_OUT_OF_RANGE, diverging_epoch=self._log.start_epoch,
                    diverging_end=self._log.start_offset)

    def _answer_fetch(self, m: FetchRequest, records: bytes | None = None) -> None:
        if records is None:
            records = self._log.read(m.fetch_offset, self._config.max_fetch_bytes)
        self._reply(m, records=records)

    def _complete_parked(self) -> None:
        if self._parked:
            parked = self._parked
            self._parked = {}
            # Followers in step park at the same offset: they get one read of the log between
            # them (the bytes are immutable), not one each.
            read: dict[int, bytes] = {}
            for request, _ in parked.values():
                records = read.get(request.fetch_offset)
                if records is None:
                    records = read[request.fetch_offset] = self._log.read(request.fetch_offset,
                                                                          self._config.max_fetch_bytes)
                self._answer_fetch(request, records)

    def _after_leader_append(self) -> None:
        self._request_flush()
        self._complete_parked()

    def _maybe_advance_hw(self) -> None:
        voters = self._voters
        node_id = self.node_id
        progress = self._progress
        offsets = []
        for voter in voters:
            if voter == node_id:
                offsets.append(self._flushed)
            else:
                replica = progress.get(voter)
                offsets.append(replica.match if replica is not None else -1)
        offsets.sort(reverse=True)
        candidate = offsets[len(voters) // 2]
        # Raft §5.4.2: commit only through an entry of the current epoch (everything from
        # _epoch_start on is, the leader-change batch first).
        if candidate > self._hw and (candidate > self._epoch_start or self._config._bug_commit_old_epoch):
            self._set_hw(candidate)

    def _set_hw(self, hw: int) -> None:
        assert hw > self._hw
        self._hw = hw
        out = self._out
        out.high_watermark = hw
        if self._role is Role.LEADER:
            pending = self._pending
            while pending and pending[0].last_offset < hw:
                out.committed.append(pending.popleft())
            if not self._config.lazy_follower_hw:
                self._complete_parked()
            if self.node_id not in self._voters and self._voter_changes and self._voter_changes[-1][0] < hw:
                # KIP-853: a leader that removed itself leads until the removal commits.
                self._resign()

    def _tick_leader(self, now: int) -> None:
        cfg = self._config
        if now >= self._check_quorum_ms:
            # Check quorum (KIP-595 "fetch.timeout.ms"): resign if a majority has not fetched.
            cutoff = now - cfg.fetch_timeout_ms
            recent = sorted(
                (
                    self._progress[v].last_fetch_ms
                    for v in self._voters
                    if v != self.node_id and v in self._progress
                ),
                reverse=True,
            )
            needed = len(self._voters) // 2 + 1 - (1 if self.node_id in self._voters else 0)
            if needed > 0 and (len(recent) < needed or recent[needed - 1] <= cutoff):
                self._resign()
                return
            self._check_quorum_ms = (recent[needed - 1] if needed > 0 else now) + cfg.fetch_timeout_ms
        if self._parked:
            expired = [src for src, (_, expiry) in self._parked.items() if expiry <= now]
            for src in expired:
                request, _ = self._parked.pop(src)
                self._answer_fetch(request)
        if now >= self._begin_resend_ms:
            missing = [
                r
                for r in self._replicas
                if r != self.node_id
                and (r not in self._progress or self._progress[r].last_fetch_ms < self._leader_since)
            ]
            for replica in missing:
                self._send(BeginQuorumEpoch(self.group_id, self.node_id, replica, self._epoch))
            self._begin_resend_ms = now + cfg.request_timeout_ms if missing else _NEVER

    # --- fetch: follower side -----------------------------------------------------------------

    def _maybe_send_fetch(self) -> None:
        # Fetch offset = log end = flushed: the leader counts what we report toward the HW.
        if self._role is Role.FOLLOWER and not self._fetch_inflight and self._flushed >= self._log.end_offset:
            self._send_fetch()

    def _send_fetch(self) -> None:
        assert self._leader_id is not None
        self._fetch_id += 1
        self._fetch_inflight = True
        self._fetch_sent_ms = self._now
        log = self._log
        self._send(
            FetchRequest(
                self.group_id,
                self.node_id,
                self._leader_id,
                self._epoch,
                log.end_offset,
                log.last_epoch,
                self._fetch_id,
                self._leader_hw,
                self._config.fetch_max_wait_ms,
            )
        )

    def _on_fetch_response(self, m: FetchResponse) -> None:
        if m.epoch > self._epoch:
            self._observe_epoch(m.epoch, m.leader_id)
            return
        if (
            m.epoch < self._epoch
            or self._role is not Role.FOLLOWER
            or m.src != self._leader_id
            or not self._fetch_inflight
            or m.fetch_id != self._fetch_id
        ):
            return
        log = self._log
        if m.fetch_offset != log.end_offset or m.last_fetched_epoch != log.last_epoch:
            return
        self._fetch_inflight = False
        if m.error is FetchError.OFFSET_OUT_OF_RANGE and m.diverging_end_offset >= self._hw:
            self._reset_to(m.diverging_end_offset, m.diverging_epoch)
            self._maybe_send_fetch()
            return
        if m.error is not FetchError.NONE:
            self._fetch_retry_ms = self._now + self._config.retry_backoff_ms
            return
        now = self._now
        self._lease_until = now + self._config.election_timeout_ms
        self._election_deadline = now + self._config.fetch_timeout_ms
        if m.diverging_epoch != NO_DIVERGENCE:
            if self._config._bug_skip_truncation:
                self._leader_hw = max(self._leader_hw, m.high_watermark)
                self._update_follower_hw()
                self._fetch_retry_ms = now + self._config.retry_backoff_ms
                return
            self._truncate_to(self._truncation_offset(m.diverging_epoch, m.diverging_end_offset))
            self._maybe_send_fetch()
            return
        if m.records:
            try:
                self._append_replicated(m.records)
            except ValueError:
                # Bytes that fail their CRC or do not continue our log (CorruptRecordError,
                # LogAppendError): nothing was appended; ask again rather than trust them.
                self._fetch_retry_ms = now + self._config.retry_backoff_ms
                return
        if m.high_watermark > self._leader_hw:
            self._leader_hw = m.high_watermark
        self._update_follower_hw()
        # Fetch again at once (after the flush if we appended): the next answer long-polls.
        self._maybe_send_fetch()

    def _truncation_offset(self, diverging_epoch: int, diverging_end: int) -> int:
        """KRaft's ReplicatedLog.truncateToEndOffset: where our log stops agreeing with the leader's."""
        if diverging_epoch == NO_EPOCH:
            return min(diverging_end, self._log.end_offset)
        local_epoch, local_end = self._log.end_offset_for_epoch(diverging_epoch)
        if local_epoch == diverging_epoch:
            return min(local_end, diverging_end)
        return local_end

    def _truncate_to(self, offset: int) -> None:
        if offset < self._hw:
            raise TruncationBelowHighWatermarkError(
                f"group {self.group_id} node {self.node_id}: asked to truncate to {offset}, below HW {self._hw}"
            )
        end = self._log.truncate_to(offset)
        assert end >= self._hw
        out = self._out
        out.truncated_to = end if out.truncated_to is None else min(out.truncated_to, end)
        self._flush_generation += 1
        self._flushed = min(self._flushed, end)
        self._flush_requested = self._flushed
        changes = self._voter_changes
        if changes and changes[-1][0] >= end:
            while changes and changes[-1][0] >= end:
                changes.pop()
            self._set_voters(changes[-1][1] if changes else self._initial_voters)
        self._request_flush()

    def _reset_to(self, start_offset: int, start_epoch: int) -> None:
        # Everything below the leader's log start is committed (retention only deletes below
        # the HW) and gone there; we cannot hold a gap or prove our tail matches, so we start
        # over at its log start. Nothing at or above our HW is lost that the leader still has.
        assert self._hw <= start_offset
        self._log.reset_to(start_offset, start_epoch)
        # Keep only the voter changes we know committed (below our HW): the rest of our old log
        # may have diverged. We are then simply a lagging replica with an older configuration,
        # until we fetch the leader's voters record (retention keeps it above its log start).
        changes = self._voter_changes
        while changes and changes[-1][0] >= self._hw:
            changes.pop()
        self._set_voters(changes[-1][1] if changes else self._initial_voters)
        self._flush_generation += 1
        self._flushed = self._flush_requested = start_offset
        out = self._out
        out.truncated_to = start_offset if out.truncated_to is None else min(out.truncated_to, start_offset)

    def _append_replicated(self, records: bytes) -> None:
        self._log.append_replicated(records)
        self._scan_for_voters(records)
        self._request_flush()

    def _update_follower_hw(self) -> None:
        hw = min(self._leader_hw, self._flushed)
        if hw > self._hw:
            self._set_hw(hw)

    # --- membership -----------------------------------------------------------------------------

    def _scan_for_voters(self, buf: bytes | memoryview) -> None:
        # Walk batch lengths and the control bit only: the log already checked these bytes.
        # ``buf`` may be a memoryview (a node's transport hands records on uncopied).
        position = 0
        size = len(buf)
        while position < size:
            (length,) = _INT32.unpack_from(buf, position + BATCH_LENGTH_OFFSET)
            end = position + length + LOG_OVERHEAD
            (attributes,) = _INT16.unpack_from(buf, position + ATTRIBUTES_OFFSET)
            # Control batches are rare but every leader change makes one; decode only those that
            # can hold a voters record (keyLength 4 as a zig-zag varint, then the key).
            if attributes & CONTROL_FLAG_MASK and bytes(buf[position:end]).find(_VOTERS_KEY_FIELD) >= 0:
                for batch in decode_batches(buf[position:end]):
                    for record in batch.records():
                        if record.key == VOTERS_KEY and record.value is not None:
                            voters = tuple(sorted(json.loads(record.value)["voters"]))
                            self._apply_voters(batch.base_offset, voters)
            position = end

    def _load_voter_changes(self) -> None:
        log = self._log
        offset = log.start_offset
        while offset < log.end_offset:
            chunk = log.read(offset, 1 << 20)
            if not chunk:
                break
            self._scan_for_voters(chunk)
            offset = self._next_offset_after(chunk)

    @staticmethod
    def _next_offset_after(chunk: bytes) -> int:
        position = 0
        next_offset = 0
        while position < len(chunk):
            (length,) = _INT32.unpack_from(chunk, position + BATCH_LENGTH_OFFSET)
            base = struct.unpack_from(">q", chunk, position)[0]
            (delta,) = _INT32.unpack_from(chunk, position + 23)
            next_offset = base + delta + 1
            position += length + LOG_OVERHEAD
        return next_offset

    def _apply_voters(self, offset: int, voters: tuple[int, ...]) -> None:
        self._voter_changes.append((offset, voters))
        self._set_voters(voters)

    def _set_voters(self, voters: tuple[int, ...]) -> None:
        if voters == self._voters:
            return
        self._voters = voters
        for voter in voters:
            if voter not in self._replicas:
                self._replicas.append(voter)
        self._out.voters = voters
        if self._role is Role.LEADER:
            self._maybe_advance_hw()

    # --- helpers --------------------------------------------------------------------------------

    def _send(self, message: Message) -> None:
        self._out.messages.append(message)

    def _request_flush(self) -> None:
        end = self._log.end_offset
        if end > self._flush_requested:
            self._flush_requested = end
            self._out.flush = Flush(end, self._flush_generation)

    def _random_election_timeout(self) -> int:
        t = self._config.election_timeout_ms
        return t + self._rng.randrange(t)

    def _backoff(self) -> int:
        """Binary exponential backoff after failed elections, capped (election.backoff.max.ms)."""
        if not self._failed_elections:
            return 0
        cfg = self._config
        cap = min(cfg.election_backoff_max_ms, cfg.retry_backoff_ms << min(self._failed_elections, 16))
        return self._rng.randrange(cap + 1)
