"""The group coordinator of one `__consumer_offsets` partition, as a sans-IO state machine.

The node hosts one `GroupCoordinator` per `__consumer_offsets` partition it leads (DESIGN.md §7).
The coordinator never touches a socket, a disk or a clock: every call takes `now_ms` and returns
a response plus the records to append. Membership follows Kafka's KIP-848 consumer protocol
(one heartbeat carrying member id, member epoch, subscription and owned partitions; server-side
assignors; incremental reconciliation with per-member epochs), offsets are committed as Kafka's
OffsetCommit records, and everything durable lives in those records.

**Apply on append, answer after commit** (what Kafka's new coordinator does). A write call
applies its records to the in-memory state at once, returns them, and the node must

1. append `result.records` to the partition as **one** batch (the records of one call are a
   unit: e.g. a member's tombstones and the group epoch bump that follows them; only a
   DeleteGroup's tombstones may go in several, as a retried delete removes what is left);
2. send `result.response` only once the log is committed up to and including that batch —
   or, when `result.records` is empty, once everything appended *before* the call is committed
   (the answer may depend on state that earlier, still-uncommitted calls created);
3. if an append fails or the node stops leading the partition, **drop this object**: its state
   may include records that will never commit. A new coordinator is built by `replay`-ing the
   partition (answer COORDINATOR_LOAD_IN_PROGRESS meanwhile) and then `on_loaded(now_ms)`;
   until then every write call raises CoordinatorNotLoadedError. One exception: a call run
   between `start_undo_log()` and `stop_undo_log()` whose batch the log refuses outright (too
   large) can be taken back with `undo`, so nothing but that call is lost.

Read calls (`fetch_offsets`, `describe_group`, `list_groups`) return no records; their answers
follow the same rule as a write without records.

Why not "apply on commit": with ≥1,000 commits/s to one coordinator, many calls are in flight
within one replication round trip, and each must see the effect of the ones before it (two joins
must not both compute group epoch N+1 from epoch N). Applying on append makes the coordinator a
plain sequential state machine; answering after commit means no client ever sees state that a
coordinator failover could lose. Kafka reverts uncommitted state with timeline data structures;
we revert by throwing the object away and replaying, because with Raft a failed append means the
leadership is gone anyway (or, for a local append error, the node must step down and reload).

Replay is the same code path as writing: a write call builds typed records and applies each
through `_apply`, exactly what `replay` does after decoding. The state is a function of the
latest value of each key — nothing accumulates across records — so a compacted partition (only
the latest record per key, tombstones eventually gone) replays to the same state.

Timers are not in the log: session and rebalance deadlines restart from `on_loaded(now_ms)`
after a load (as Kafka's coordinator reschedules them on load). The node calls `tick(now_ms)`
when `next_deadline()` has passed; it returns the records that remove expired members.

Deliberate tidelog decisions (where Kafka differs or says nothing):

* A heartbeat with member epoch 0 from a member the group already has is a rejoin: the member's
  current assignment is reset (a joining client owns nothing) and reconciled afresh. Kafka 4's
  clients keep their member id across a fence; this gives them a way back in.
* A non-zero epoch for a group the coordinator does not know is UNKNOWN_MEMBER_ID (the client
  rejoins), not GROUP_ID_NOT_FOUND.
* A static member that crashes without leaving keeps its instance id until its session times
  out (UNRELEASED_INSTANCE_ID for a new process meanwhile), as in Kafka's KIP-848; a member that
  leaves with epoch -2 is replaced at once, keeping its partitions without a rebalance.
"""

from __future__ import annotations

import enum
import uuid
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Callable, Generic, Iterable, Mapping, TypeVar

from tidelog.node.group_assignors import ASSIGNOR_NAMES, MemberSubscription, assignor_named
from tidelog.node.group_records import (
    ConsumerGroupCurrentMemberAssignmentKey,
    ConsumerGroupCurrentMemberAssignmentValue,
    ConsumerGroupMemberMetadataKey,
    ConsumerGroupMemberMetadataValue,
    ConsumerGroupMetadataKey,
    ConsumerGroupMetadataValue,
    ConsumerGroupPartitionMetadataKey,
    ConsumerGroupPartitionMetadataValue,
    ConsumerGroupTargetAssignmentMemberKey,
    ConsumerGroupTargetAssignmentMemberValue,
    ConsumerGroupTargetAssignmentMetadataKey,
    ConsumerGroupTargetAssignmentMetadataValue,
    GroupRecord,
    GroupRecordKey,
    GroupRecordValue,
    MemberState,
    OffsetCommitKey,
    OffsetCommitValue,
    TopicPartition,
    UnknownGroupRecordError,
    decode_key,
    decode_value,
)

# Kafka's special member epochs in ConsumerGroupHeartbeat (KIP-848).
JOIN_GROUP_MEMBER_EPOCH = 0
LEAVE_GROUP_MEMBER_EPOCH = -1
LEAVE_GROUP_STATIC_MEMBER_EPOCH = -2

T = TypeVar("T")

# A key a call wrote, its value before (None: no record) and its group's emptiness date then.
UndoEntry = tuple[GroupRecordKey, GroupRecordValue | None, int | None]
# A timer a call moved: session (True) or rebalance, (group, member), its deadline before (None: none).
UndoTimer = tuple[bool, tuple[str, str], int | None]


class GroupErrorCode(enum.IntEnum):
    """Kafka's error codes for group calls (the same numbers as tidelog.proto's ErrorCode)."""

    NONE = 0
    OFFSET_METADATA_TOO_LARGE = 12
    INVALID_GROUP_ID = 24
    UNKNOWN_MEMBER_ID = 25
    INVALID_REQUEST = 42
    NON_EMPTY_GROUP = 68
    GROUP_ID_NOT_FOUND = 69
    GROUP_MAX_SIZE_REACHED = 81
    FENCED_INSTANCE_ID = 82
    FENCED_MEMBER_EPOCH = 110
    UNRELEASED_INSTANCE_ID = 111
    UNSUPPORTED_ASSIGNOR = 112
    STALE_MEMBER_EPOCH = 113


class GroupState(enum.Enum):
    """The group state shown by describe/list (Kafka's ConsumerGroup.ConsumerGroupState)."""

    EMPTY = "empty"  # no members
    ASSIGNING = "assigning"  # the group epoch moved past the target assignment epoch
    RECONCILING = "reconciling"  # some member has not yet reached the target assignment
    STABLE = "stable"  # every member has its target assignment at the target epoch
    DEAD = "dead"  # the coordinator has no such group


class EpochRule(enum.Enum):
    KEEP = "keep"  # the member stays in its epoch: it must revoke before it may advance
    TARGET = "target"  # the member moves to the target assignment epoch


# Reconciliation moves a member between states only as this table says, with this rule for its
# epoch (Kafka's CurrentAssignmentBuilder): a member with partitions to revoke is held in its
# epoch, so a commit fenced by member epoch cannot come from a member that still owes a
# revocation at a newer epoch. `_transition` enforces it and raises at once otherwise.
MEMBER_TRANSITIONS: Mapping[tuple[MemberState, MemberState], EpochRule] = MappingProxyType(
    {
        (MemberState.STABLE, MemberState.STABLE): EpochRule.TARGET,
        (MemberState.STABLE, MemberState.UNREVOKED_PARTITIONS): EpochRule.KEEP,
        (MemberState.STABLE, MemberState.UNRELEASED_PARTITIONS): EpochRule.TARGET,
        (MemberState.UNREVOKED_PARTITIONS, MemberState.UNREVOKED_PARTITIONS): EpochRule.KEEP,
        (MemberState.UNREVOKED_PARTITIONS, MemberState.STABLE): EpochRule.TARGET,
        (MemberState.UNREVOKED_PARTITIONS, MemberState.UNRELEASED_PARTITIONS): EpochRule.TARGET,
        (MemberState.UNRELEASED_PARTITIONS, MemberState.STABLE): EpochRule.TARGET,
        (MemberState.UNRELEASED_PARTITIONS, MemberState.UNRELEASED_PARTITIONS): EpochRule.TARGET,
        (MemberState.UNRELEASED_PARTITIONS, MemberState.UNREVOKED_PARTITIONS): EpochRule.KEEP,
    }
)


class IllegalMemberTransition(AssertionError):
    """Reconciliation tried a move MEMBER_TRANSITIONS forbids: a coordinator bug, never input."""


class CoordinatorNotLoadedError(RuntimeError):
    """A request reached a coordinator that was replayed but not started with `on_loaded`."""


class DoubleOwnershipError(AssertionError):
    """Two members would own one partition: the invariant the whole protocol exists for."""


# ------------------------------------------------------------------------------ value types


@dataclass(frozen=True, slots=True)
class GroupCoordinatorConfig:
    session_timeout_ms: int = 45_000  # group.consumer.session.timeout.ms
    heartbeat_interval_ms: int = 5_000  # group.consumer.heartbeat.interval.ms
    assignors: tuple[str, ...] = ASSIGNOR_NAMES  # group.consumer.assignors; the first is default
    max_group_size: int = 2**31 - 1  # group.consumer.max.size
    default_rebalance_timeout_ms: int = 300_000  # the consumer's max.poll.interval.ms default
    offset_metadata_max_bytes: int = 4096  # offset.metadata.max.bytes
    offsets_retention_ms: int = 7 * 24 * 3600 * 1000  # offsets.retention.minutes (KIP-211)
    offsets_retention_check_interval_ms: int = 600_000  # offsets.retention.check.interval.ms


@dataclass(frozen=True, slots=True)
class Result(Generic[T]):
    """What a call answers, and the records to append (as one batch) before answering."""

    response: T
    records: tuple[GroupRecord, ...] = ()


@dataclass(frozen=True, slots=True)
class HeartbeatResponse:
    error: GroupErrorCode
    member_id: str
    member_epoch: int
    heartbeat_interval_ms: int
    # The partitions the member should own now (its assigned partitions, without those pending
    # revocation); None with an error or after a leave.
    assignment: frozenset[TopicPartition] | None
    message: str = ""


@dataclass(frozen=True, slots=True)
class CommittedOffset:
    offset: int
    leader_epoch: int = -1
    metadata: str = ""
    commit_timestamp_ms: int = -1


@dataclass(frozen=True, slots=True)
class CommitResponse:
    error: GroupErrorCode
    partition_errors: Mapping[TopicPartition, GroupErrorCode] = field(default_factory=dict)
    message: str = ""


@dataclass(frozen=True, slots=True)
class FetchOffsetsResponse:
    error: GroupErrorCode
    # Requested partitions without a committed offset map to None.
    offsets: Mapping[TopicPartition, CommittedOffset | None] = field(default_factory=dict)
    message: str = ""


@dataclass(frozen=True, slots=True)
class GroupListing:
    group_id: str
    state: GroupState


@dataclass(frozen=True, slots=True)
class MemberDescription:
    member_id: str
    instance_id: str | None
    member_epoch: int
    state: MemberState
    subscribed_topics: tuple[str, ...]
    assignment: frozenset[TopicPartition]
    partitions_pending_revocation: frozenset[TopicPartition]
    target_assignment: frozenset[TopicPartition]
    client_id: str
    client_host: str
    rack_id: str | None
    rebalance_timeout_ms: int


@dataclass(frozen=True, slots=True)
class GroupDescription:
    error: GroupErrorCode
    group_id: str
    state: GroupState
    group_epoch: int = 0
    assignment_epoch: int = 0
    assignor: str = ""
    members: tuple[MemberDescription, ...] = ()
    offsets: Mapping[TopicPartition, CommittedOffset] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class UndoLog:
    """What one call changed, for `GroupCoordinator.undo`: each write with the value before,
    and each timer it moved with the deadline before."""

    writes: tuple[UndoEntry, ...]
    timers: tuple[UndoTimer, ...]


@dataclass(frozen=True, slots=True)
class DeleteGroupResponse:
    error: GroupErrorCode
    message: str = ""


@dataclass(frozen=True, slots=True)
class ExpiredOffsets:
    """What one `expire_offsets` pass removed from one group."""

    group_id: str
    partitions: tuple[TopicPartition, ...]
    group_deleted: bool  # the group was empty with no offsets left: its records are gone too


@dataclass(frozen=True, slots=True)
class ExpiredMember:
    group_id: str
    member_id: str
    reason: str  # "session" or "rebalance"


# ---------------------------------------------------------------------------- mutable state


class _Group:
    """Everything the log says about one group, keyed exactly as the records are."""

    __slots__ = (
        "group_id",
        "epoch",
        "partition_metadata",
        "target_epoch",
        "targets",
        "members",
        "current",
        "owners",
        "instances",
        "offsets",
        "epoch_written_ms",
    )

    def __init__(self, group_id: str) -> None:
        self.group_id = group_id
        self.epoch: int | None = None
        self.partition_metadata: ConsumerGroupPartitionMetadataValue | None = None
        self.target_epoch: int | None = None
        self.targets: dict[str, frozenset[TopicPartition]] = {}
        self.members: dict[str, ConsumerGroupMemberMetadataValue] = {}
        self.current: dict[str, ConsumerGroupCurrentMemberAssignmentValue] = {}
        # Derived indexes, rebuilt by _apply like everything else.
        self.owners: dict[TopicPartition, str] = {}  # assigned or pending revocation
        self.instances: dict[str, str] = {}  # instance id -> member id
        self.offsets: dict[TopicPartition, OffsetCommitValue] = {}
        # When the group-metadata record was last written (the record's timestamp on replay).
        # Every member removal writes it, so for an empty group it is when the group became
        # empty: where KIP-211's offset retention starts. Not state: it never decides an answer.
        self.epoch_written_ms: int | None = None

    @property
    def group_epoch(self) -> int:
        return self.epoch or 0

    @property
    def assignment_epoch(self) -> int:
        return self.target_epoch or 0

    def gone(self) -> bool:
        return (
            self.epoch is None
            and self.partition_metadata is None
            and self.target_epoch is None
            and not self.targets
            and not self.members
            and not self.current
            and not self.offsets
        )


_EMPTY: frozenset[TopicPartition] = frozenset()


def _new_member_id() -> str:
    return str(uuid.uuid4())


class GroupCoordinator:
    """The coordinator of the groups of one `__consumer_offsets` partition; see the module doc."""

    def __init__(
        self,
        config: GroupCoordinatorConfig | None = None,
        *,
        new_member_id: Callable[[], str] = _new_member_id,
    ) -> None:
        self.config = config or GroupCoordinatorConfig()
        for name in self.config.assignors:
            assignor_named(name)  # fail fast on a misconfigured assignor list
        self._new_member_id = new_member_id
        self._groups: dict[str, _Group] = {}
        self._session_deadlines: dict[tuple[str, str], int] = {}
        self._rebalance_deadlines: dict[tuple[str, str], int] = {}
        self.skipped_records = 0  # records of types this coordinator does not know
        # The time of the record being applied: the write call's now_ms, or the replayed
        # record's timestamp (None: unknown, e.g. replayed without one).
        self._record_time_ms: int | None = None
        # Set by replay, cleared by on_loaded: serving requests before the timers exist would
        # leave loaded members that never expire.
        self._loading = False
        # While a call runs between `start_undo_log` and `stop_undo_log`: each written key
        # with its value (and group-metadata date) before the write, so `undo` can take the
        # call back when the log refuses its records (too large for one batch).
        self._undo_log: list[UndoEntry] | None = None
        self._undo_timers: list[UndoTimer] = []

    # ------------------------------------------------------------------------------ replay

    def replay(self, key: bytes, value: bytes | None, timestamp_ms: int | None = None) -> None:
        """Apply one record of the partition (in offset order) while loading it; its
        ``timestamp_ms`` dates a group's emptiness for offset expiry.

        Records of unknown types (a newer coordinator's) are counted and skipped, as Kafka's
        loader does, so a downgrade does not make the partition unloadable.
        """
        self._loading = True
        self._record_time_ms = timestamp_ms
        try:
            typed_key = decode_key(key)
        except UnknownGroupRecordError:
            self.skipped_records += 1
            return
        self._apply(typed_key, decode_value(typed_key, value))

    def on_loaded(self, now_ms: int) -> None:
        """Start every member's timers after a load: the log holds no deadlines."""
        self._loading = False
        self._record_time_ms = now_ms
        for group in self._groups.values():
            if group.epoch is not None and group.epoch_written_ms is None:
                group.epoch_written_ms = now_ms  # undated: offset retention starts over, never early
            for member_id, meta in group.members.items():
                self._session_deadlines[(group.group_id, member_id)] = (
                    now_ms + self.config.session_timeout_ms
                )
                cur = group.current.get(member_id)
                if cur is not None and cur.state == MemberState.UNREVOKED_PARTITIONS:
                    self._rebalance_deadlines[(group.group_id, member_id)] = (
                        now_ms + meta.rebalance_timeout_ms
                    )

    def _apply(self, key: GroupRecordKey, value: GroupRecordValue | None) -> None:
        group = self._groups.get(key.group_id)
        if group is None:
            if value is None:
                return
            group = self._groups[key.group_id] = _Group(key.group_id)
        if isinstance(key, OffsetCommitKey):
            tp = TopicPartition(key.topic, key.partition)
            if value is None:
                group.offsets.pop(tp, None)
            else:
                assert isinstance(value, OffsetCommitValue)
                group.offsets[tp] = value
        elif isinstance(key, ConsumerGroupMetadataKey):
            assert value is None or isinstance(value, ConsumerGroupMetadataValue)
            group.epoch = None if value is None else value.epoch
            group.epoch_written_ms = self._record_time_ms
        elif isinstance(key, ConsumerGroupPartitionMetadataKey):
            assert value is None or isinstance(value, ConsumerGroupPartitionMetadataValue)
            group.partition_metadata = value
        elif isinstance(key, ConsumerGroupMemberMetadataKey):
            old = group.members.pop(key.member_id, None)
            if old is not None and old.instance_id is not None:
                if group.instances.get(old.instance_id) == key.member_id:
                    del group.instances[old.instance_id]
            if value is not None:
                assert isinstance(value, ConsumerGroupMemberMetadataValue)
                group.members[key.member_id] = value
                if value.instance_id is not None:
                    group.instances[value.instance_id] = key.member_id
        elif isinstance(key, ConsumerGroupTargetAssignmentMetadataKey):
            assert value is None or isinstance(value, ConsumerGroupTargetAssignmentMetadataValue)
            group.target_epoch = None if value is None else value.assignment_epoch
        elif isinstance(key, ConsumerGroupTargetAssignmentMemberKey):
            if value is None:
                group.targets.pop(key.member_id, None)
            else:
                assert isinstance(value, ConsumerGroupTargetAssignmentMemberValue)
                group.targets[key.member_id] = value.partitions
        elif isinstance(key, ConsumerGroupCurrentMemberAssignmentKey):
            self._apply_current(group, key.member_id, value)
        else:  # pragma: no cover - decode_key only returns the types above
            raise TypeError(f"unexpected key {key!r}")
        if group.gone():
            del self._groups[group.group_id]

    @staticmethod
    def _apply_current(group: _Group, member_id: str, value: GroupRecordValue | None) -> None:
        old = group.current.pop(member_id, None)
        if old is not None:
            for tp in old.assigned_partitions | old.partitions_pending_revocation:
                if group.owners.get(tp) == member_id:
                    del group.owners[tp]
        if value is None:
            return
        assert isinstance(value, ConsumerGroupCurrentMemberAssignmentValue)
        group.current[member_id] = value
        for tp in value.assigned_partitions | value.partitions_pending_revocation:
            holder = group.owners.setdefault(tp, member_id)
            if holder != member_id:
                raise DoubleOwnershipError(
                    f"group {group.group_id}: {tp} given to {member_id} while {holder} owns it"
                )

    def _check_loaded(self) -> None:
        if self._loading:
            raise CoordinatorNotLoadedError("call on_loaded(now_ms) after the last replayed record")

    def _emit(self, out: list[GroupRecord], key: GroupRecordKey, value: GroupRecordValue | None) -> None:
        out.append(GroupRecord.of(key, value))
        if self._undo_log is not None:
            self._undo_log.append(self._prior(key))
        self._apply(key, value)

    def _set_deadline(self, session: bool, key: tuple[str, str], deadline: int | None) -> None:
        """Set (None: clear) a member's session or rebalance deadline; while a call is undo-logged,
        remember the one before. (Copying the group's timers at the call's first write instead cost
        every heartbeat that writes the size of its group.)"""
        deadlines = self._session_deadlines if session else self._rebalance_deadlines
        if self._undo_log is not None:
            self._undo_timers.append((session, key, deadlines.get(key)))
        if deadline is None:
            deadlines.pop(key, None)
        else:
            deadlines[key] = deadline

    # --------------------------------------------------------------------------------- undo

    def start_undo_log(self) -> None:
        """Remember what the next call overwrites (until `stop_undo_log`), for `undo`."""
        self._undo_log = []
        self._undo_timers = []

    def stop_undo_log(self) -> UndoLog:
        writes, self._undo_log = self._undo_log or [], None
        timers, self._undo_timers = self._undo_timers, []
        return UndoLog(tuple(writes), tuple(timers))

    def undo(self, log: UndoLog) -> None:
        """Take back the call whose `stop_undo_log()` this is; no call may have run since.

        The state is a function of the latest value of each key, so writing the earlier values
        back, newest first, passes back through every state the call went through. The timers
        (not in the records) the call moved are put back the same way.
        """
        for key, value, written_ms in reversed(log.writes):
            self._apply(key, value)
            group = self._groups.get(key.group_id)
            if group is not None and isinstance(key, ConsumerGroupMetadataKey):
                group.epoch_written_ms = written_ms
        for session, timer, deadline in reversed(log.timers):
            deadlines = self._session_deadlines if session else self._rebalance_deadlines
            if deadline is None:
                deadlines.pop(timer, None)
            else:
                deadlines[timer] = deadline

    def _prior(self, key: GroupRecordKey) -> UndoEntry:
        """``key``'s value now (None: no record), and its group's emptiness date."""
        group = self._groups.get(key.group_id)
        if group is None:
            return key, None, None
        value: GroupRecordValue | None
        if isinstance(key, OffsetCommitKey):
            value = group.offsets.get(TopicPartition(key.topic, key.partition))
        elif isinstance(key, ConsumerGroupMetadataKey):
            value = None if group.epoch is None else ConsumerGroupMetadataValue(group.epoch)
        elif isinstance(key, ConsumerGroupPartitionMetadataKey):
            value = group.partition_metadata
        elif isinstance(key, ConsumerGroupMemberMetadataKey):
            value = group.members.get(key.member_id)
        elif isinstance(key, ConsumerGroupTargetAssignmentMetadataKey):
            value = None if group.target_epoch is None else ConsumerGroupTargetAssignmentMetadataValue(group.target_epoch)
        elif isinstance(key, ConsumerGroupTargetAssignmentMemberKey):
            target = group.targets.get(key.member_id)
            value = None if target is None else ConsumerGroupTargetAssignmentMemberValue(target)
        elif isinstance(key, ConsumerGroupCurrentMemberAssignmentKey):
            value = group.current.get(key.member_id)
        else:  # pragma: no cover - the key types _apply knows
            raise TypeError(f"unexpected key {key!r}")
        return key, value, group.epoch_written_ms

    # --------------------------------------------------------------------------- heartbeat

    def heartbeat(
        self,
        group_id: str,
        member_id: str,
        member_epoch: int,
        instance_id: str | None,
        subscribed_topics: Iterable[str] | None,
        owned_partitions: Iterable[TopicPartition] | None,
        rebalance_timeout_ms: int | None,
        now_ms: int,
        topic_partition_counts: Mapping[str, int],
        *,
        server_assignor: str | None = None,
        rack_id: str | None = None,
        client_id: str | None = None,
        client_host: str | None = None,
    ) -> Result[HeartbeatResponse]:
        """KIP-848's ConsumerGroupHeartbeat.

        `member_epoch` 0 joins (an empty `member_id` gets one generated), -1 leaves, -2 leaves
        for a while keeping the assignment (static members only). `subscribed_topics`,
        `rebalance_timeout_ms`, `server_assignor`, `instance_id`, `rack_id`, `client_id` and
        `client_host` None mean "unchanged" (a join must give the subscription); `owned_partitions` None means "not reported", which never acknowledges
        a revocation. `topic_partition_counts` is the node's view of the partition counts of at
        least the subscribed topics (a missing topic counts as 0 partitions).
        """
        self._check_loaded()
        self._record_time_ms = now_ms
        owned = None if owned_partitions is None else frozenset(owned_partitions)
        topics = None if subscribed_topics is None else tuple(sorted(set(subscribed_topics)))

        def fail(error: GroupErrorCode, message: str) -> Result[HeartbeatResponse]:
            return Result(HeartbeatResponse(error, member_id, member_epoch, self.config.heartbeat_interval_ms, None, message))

        if not group_id:
            return fail(GroupErrorCode.INVALID_GROUP_ID, "the group id must not be empty")
        if member_epoch < LEAVE_GROUP_STATIC_MEMBER_EPOCH:
            return fail(GroupErrorCode.INVALID_REQUEST, f"member epoch {member_epoch} is not valid")
        if member_epoch == JOIN_GROUP_MEMBER_EPOCH and topics is None:
            return fail(GroupErrorCode.INVALID_REQUEST, "a join must carry the subscribed topics")
        if member_epoch != JOIN_GROUP_MEMBER_EPOCH and not member_id:
            return fail(GroupErrorCode.INVALID_REQUEST, "only a join may come without a member id")
        if member_epoch == LEAVE_GROUP_STATIC_MEMBER_EPOCH and instance_id is None:
            return fail(GroupErrorCode.INVALID_REQUEST, "epoch -2 is for static members (instance id)")
        if rebalance_timeout_ms is not None and rebalance_timeout_ms <= 0 and rebalance_timeout_ms != -1:
            return fail(GroupErrorCode.INVALID_REQUEST, "the rebalance timeout must be positive")
        if server_assignor is not None and server_assignor not in self.config.assignors:
            return fail(
                GroupErrorCode.UNSUPPORTED_ASSIGNOR,
                f"assignor {server_assignor!r} is not one of {', '.join(self.config.assignors)}",
            )

        group = self._groups.get(group_id)
        records: list[GroupRecord] = []

        # ---- leaving
        if member_epoch in (LEAVE_GROUP_MEMBER_EPOCH, LEAVE_GROUP_STATIC_MEMBER_EPOCH):
            if group is None:
                return fail(GroupErrorCode.UNKNOWN_MEMBER_ID, f"group {group_id} has no members")
            if instance_id is not None:
                holder = group.instances.get(instance_id)
                if holder is None:
                    return fail(GroupErrorCode.UNKNOWN_MEMBER_ID, f"instance id {instance_id} is unknown")
                if holder != member_id:
                    return fail(GroupErrorCode.FENCED_INSTANCE_ID, f"instance id {instance_id} belongs to {holder}")
            elif member_id not in group.members:
                return fail(GroupErrorCode.UNKNOWN_MEMBER_ID, f"member {member_id} is unknown")
            if member_epoch == LEAVE_GROUP_MEMBER_EPOCH:
                self._remove_member(group, member_id, records)
            else:
                # KIP-848 static leave: keep the assignment (and the partitions' ownership) for
                # the same instance's return; the session timeout bounds the wait.
                cur = group.current.get(member_id) or self._empty_current()
                self._emit(
                    records,
                    ConsumerGroupCurrentMemberAssignmentKey(group_id, member_id),
                    ConsumerGroupCurrentMemberAssignmentValue(
                        LEAVE_GROUP_STATIC_MEMBER_EPOCH,
                        cur.member_epoch,
                        cur.state,
                        cur.assigned_partitions,
                        cur.partitions_pending_revocation,
                    ),
                )
                self._set_deadline(False, (group_id, member_id), None)
                self._set_deadline(True, (group_id, member_id), now_ms + self.config.session_timeout_ms)
            return Result(
                HeartbeatResponse(GroupErrorCode.NONE, member_id, member_epoch, self.config.heartbeat_interval_ms, None),
                tuple(records),
            )

        # ---- finding (or admitting) the member
        if group is None and member_epoch != JOIN_GROUP_MEMBER_EPOCH:
            return fail(GroupErrorCode.UNKNOWN_MEMBER_ID, f"group {group_id} has no members")
        replaced: str | None = None
        if instance_id is not None:
            holder = group.instances.get(instance_id) if group is not None else None
            if member_epoch == JOIN_GROUP_MEMBER_EPOCH:
                if holder is not None and holder != member_id:
                    assert group is not None
                    holder_cur = group.current.get(holder)
                    if holder_cur is None or holder_cur.member_epoch != LEAVE_GROUP_STATIC_MEMBER_EPOCH:
                        return fail(
                            GroupErrorCode.UNRELEASED_INSTANCE_ID,
                            f"instance id {instance_id} is still held by member {holder}",
                        )
                    replaced = holder
            elif holder is None:
                return fail(GroupErrorCode.UNKNOWN_MEMBER_ID, f"instance id {instance_id} is unknown")
            elif holder != member_id:
                return fail(GroupErrorCode.FENCED_INSTANCE_ID, f"instance id {instance_id} belongs to {holder}")

        if member_epoch == JOIN_GROUP_MEMBER_EPOCH and not member_id:
            member_id = self._new_member_id()
        is_new = group is None or member_id not in group.members
        if is_new and member_epoch != JOIN_GROUP_MEMBER_EPOCH:
            return fail(GroupErrorCode.UNKNOWN_MEMBER_ID, f"member {member_id} is unknown")
        if is_new and replaced is None and group is not None and len(group.members) >= self.config.max_group_size:
            return fail(GroupErrorCode.GROUP_MAX_SIZE_REACHED, f"group {group_id} is full")

        if not is_new and member_epoch != JOIN_GROUP_MEMBER_EPOCH:
            assert group is not None
            cur = group.current.get(member_id) or self._empty_current()
            if member_epoch > cur.member_epoch:
                return fail(
                    GroupErrorCode.FENCED_MEMBER_EPOCH,
                    f"epoch {member_epoch} is ahead of the coordinator's {cur.member_epoch}",
                )
            if member_epoch < cur.member_epoch and not (
                # The response that moved the member to its new epoch may have been lost: it
                # may come back with the previous epoch if it owns nothing it should not.
                member_epoch == cur.previous_member_epoch
                and owned is not None
                and owned <= cur.assigned_partitions
            ):
                return fail(
                    GroupErrorCode.FENCED_MEMBER_EPOCH,
                    f"epoch {member_epoch} is behind the coordinator's {cur.member_epoch}",
                )

        # ---- from here on the call succeeds: emit and apply
        if group is None:
            group = self._groups[group_id] = _Group(group_id)
        old_meta = group.members.get(member_id)
        if replaced is not None:
            old_meta = group.members[replaced]
            self._replace_static_member(group, replaced, member_id, records)
        elif not is_new and member_epoch == JOIN_GROUP_MEMBER_EPOCH:
            # A rejoin of a known member: the client owns nothing now, so neither does the member.
            self._emit(
                records,
                ConsumerGroupCurrentMemberAssignmentKey(group_id, member_id),
                self._empty_current(),
            )

        new_meta = ConsumerGroupMemberMetadataValue(
            # Like every optional heartbeat field, an absent instance id means "unchanged".
            instance_id=instance_id if instance_id is not None else (old_meta.instance_id if old_meta else None),
            rack_id=rack_id if rack_id is not None else (old_meta.rack_id if old_meta else None),
            client_id=client_id if client_id is not None else (old_meta.client_id if old_meta else ""),
            client_host=client_host if client_host is not None else (old_meta.client_host if old_meta else ""),
            subscribed_topic_names=topics if topics is not None else (old_meta.subscribed_topic_names if old_meta else ()),
            subscribed_topic_regex=None,
            rebalance_timeout_ms=(
                rebalance_timeout_ms
                if rebalance_timeout_ms is not None and rebalance_timeout_ms > 0
                else (old_meta.rebalance_timeout_ms if old_meta else self.config.default_rebalance_timeout_ms)
            ),
            server_assignor=server_assignor if server_assignor is not None else (old_meta.server_assignor if old_meta else None),
        )
        bump = False
        if new_meta != group.members.get(member_id):
            self._emit(records, ConsumerGroupMemberMetadataKey(group_id, member_id), new_meta)
        if (
            old_meta is None
            or old_meta.subscribed_topic_names != new_meta.subscribed_topic_names
            or old_meta.server_assignor != new_meta.server_assignor
        ):
            bump = True

        # The partition counts of everything the group subscribes to, as the node sees them now.
        subscribed = sorted({t for m in group.members.values() for t in m.subscribed_topic_names})
        topic_counts = tuple((t, max(0, int(topic_partition_counts.get(t, 0)))) for t in subscribed)
        if group.partition_metadata is None or group.partition_metadata.topics != topic_counts:
            bump = True
        new_epoch = group.group_epoch + 1 if bump else group.group_epoch
        if group.partition_metadata is None or group.partition_metadata.topics != topic_counts:
            self._emit(
                records,
                ConsumerGroupPartitionMetadataKey(group_id),
                ConsumerGroupPartitionMetadataValue(new_epoch, topic_counts),
            )
        if bump or group.epoch is None:
            self._emit(records, ConsumerGroupMetadataKey(group_id), ConsumerGroupMetadataValue(new_epoch))

        if group.group_epoch > group.assignment_epoch:
            self._compute_target_assignment(group, records)

        self._reconcile(group, member_id, owned, now_ms, records)
        self._set_deadline(True, (group_id, member_id), now_ms + self.config.session_timeout_ms)
        cur = group.current[member_id]
        return Result(
            HeartbeatResponse(
                GroupErrorCode.NONE,
                member_id,
                cur.member_epoch,
                self.config.heartbeat_interval_ms,
                cur.assigned_partitions,
            ),
            tuple(records),
        )

    @staticmethod
    def _empty_current() -> ConsumerGroupCurrentMemberAssignmentValue:
        return ConsumerGroupCurrentMemberAssignmentValue(0, 0, MemberState.STABLE, _EMPTY, _EMPTY)

    def _replace_static_member(self, group: _Group, old_id: str, new_id: str, records: list[GroupRecord]) -> None:
        """A static member's new incarnation takes over the old one's assignment, no rebalance."""
        gid = group.group_id
        old_meta = group.members[old_id]
        old_target = group.targets.get(old_id, _EMPTY)
        old_cur = group.current.get(old_id) or self._empty_current()
        # Tombstones first so the partitions are free when the new member claims them.
        self._remove_member_records(group, old_id, records)
        self._emit(records, ConsumerGroupMemberMetadataKey(gid, new_id), old_meta)
        if old_target:
            self._emit(
                records,
                ConsumerGroupTargetAssignmentMemberKey(gid, new_id),
                ConsumerGroupTargetAssignmentMemberValue(old_target),
            )
        self._emit(
            records,
            ConsumerGroupCurrentMemberAssignmentKey(gid, new_id),
            ConsumerGroupCurrentMemberAssignmentValue(
                0, 0, old_cur.state, old_cur.assigned_partitions, old_cur.partitions_pending_revocation
            ),
        )

    def _remove_member_records(self, group: _Group, member_id: str, records: list[GroupRecord]) -> None:
        gid = group.group_id
        # Kafka's order: current assignment (frees the partitions), target, then metadata.
        if member_id in group.current:
            self._emit(records, ConsumerGroupCurrentMemberAssignmentKey(gid, member_id), None)
        if member_id in group.targets:
            self._emit(records, ConsumerGroupTargetAssignmentMemberKey(gid, member_id), None)
        if member_id in group.members:
            self._emit(records, ConsumerGroupMemberMetadataKey(gid, member_id), None)
        self._set_deadline(True, (gid, member_id), None)
        self._set_deadline(False, (gid, member_id), None)

    def _remove_member(self, group: _Group, member_id: str, records: list[GroupRecord]) -> None:
        """Fence a member out; its partitions are free at once and the group epoch bumps."""
        self._remove_member_records(group, member_id, records)
        self._emit(
            records,
            ConsumerGroupMetadataKey(group.group_id),
            ConsumerGroupMetadataValue(group.group_epoch + 1),
        )

    def _group_assignor(self, group: _Group) -> str:
        # Kafka: the assignor most members ask for; none asked -> the first configured.
        votes: dict[str, int] = {}
        for meta in group.members.values():
            if meta.server_assignor is not None:
                votes[meta.server_assignor] = votes.get(meta.server_assignor, 0) + 1
        if not votes:
            return self.config.assignors[0]
        return max(self.config.assignors, key=lambda name: (votes.get(name, 0), -self.config.assignors.index(name)))

    def _compute_target_assignment(self, group: _Group, records: list[GroupRecord]) -> None:
        gid = group.group_id
        counts = group.partition_metadata.counts() if group.partition_metadata is not None else {}
        subscriptions = {
            member_id: MemberSubscription(
                member_id,
                meta.instance_id,
                frozenset(meta.subscribed_topic_names),
                group.targets.get(member_id, _EMPTY),
            )
            for member_id, meta in group.members.items()
        }
        new_targets = assignor_named(self._group_assignor(group)).assign(subscriptions, counts)
        for member_id in sorted(group.members):
            target = new_targets.get(member_id, _EMPTY)
            if target != group.targets.get(member_id, _EMPTY) or (member_id in group.targets) != bool(target):
                self._emit(
                    records,
                    ConsumerGroupTargetAssignmentMemberKey(gid, member_id),
                    ConsumerGroupTargetAssignmentMemberValue(target) if target else None,
                )
        self._emit(
            records,
            ConsumerGroupTargetAssignmentMetadataKey(gid),
            ConsumerGroupTargetAssignmentMetadataValue(group.group_epoch),
        )

    # ------------------------------------------------------------------------ reconciliation

    def _reconcile(
        self,
        group: _Group,
        member_id: str,
        owned: frozenset[TopicPartition] | None,
        now_ms: int,
        records: list[GroupRecord],
    ) -> None:
        """Move the member toward its target assignment (Kafka's CurrentAssignmentBuilder)."""
        cur = group.current.get(member_id)
        if cur is None:
            cur = self._empty_current()
        meta = group.members[member_id]
        target_epoch = group.assignment_epoch
        subscribed = frozenset(meta.subscribed_topic_names)
        target = frozenset(tp for tp in group.targets.get(member_id, _EMPTY) if tp.topic in subscribed)

        def owns_any(partitions: frozenset[TopicPartition]) -> bool:
            # Not reporting what it owns never counts as having revoked.
            return owned is None or not owned.isdisjoint(partitions)

        nxt = cur
        if cur.state == MemberState.STABLE:
            if cur.member_epoch != target_epoch:
                nxt = self._next_assignment(group, member_id, cur, target, target_epoch, owns_any)
        elif cur.state == MemberState.UNREVOKED_PARTITIONS:
            if not owns_any(cur.partitions_pending_revocation):
                nxt = self._next_assignment(group, member_id, cur, target, target_epoch, owns_any)
        else:  # UNRELEASED_PARTITIONS: take any partition that has been released since
            nxt = self._next_assignment(group, member_id, cur, target, target_epoch, owns_any)

        if member_id not in group.current or nxt != cur:
            self._transition(cur, nxt, target_epoch)
            self._emit(records, ConsumerGroupCurrentMemberAssignmentKey(group.group_id, member_id), nxt)
        key = (group.group_id, member_id)
        if nxt.state == MemberState.UNREVOKED_PARTITIONS:
            if cur.state != MemberState.UNREVOKED_PARTITIONS or key not in self._rebalance_deadlines:
                # KIP-848: a member gets its rebalance timeout to revoke, then it is fenced.
                self._set_deadline(False, key, now_ms + meta.rebalance_timeout_ms)
        else:
            self._set_deadline(False, key, None)

    @staticmethod
    def _next_assignment(
        group: _Group,
        member_id: str,
        cur: ConsumerGroupCurrentMemberAssignmentValue,
        target: frozenset[TopicPartition],
        target_epoch: int,
        owns_any: Callable[[frozenset[TopicPartition]], bool],
    ) -> ConsumerGroupCurrentMemberAssignmentValue:
        keep = cur.assigned_partitions & target
        revoke = cur.assigned_partitions - keep
        wanted = target - keep
        # A partition someone else still owns (assigned or pending revocation) is unreleased;
        # one this member itself still has pending revocation is not: it may simply keep it.
        unreleased = frozenset(tp for tp in wanted if group.owners.get(tp, member_id) != member_id)
        gained = wanted - unreleased
        if revoke and owns_any(revoke):
            return ConsumerGroupCurrentMemberAssignmentValue(
                cur.member_epoch,
                cur.previous_member_epoch,
                MemberState.UNREVOKED_PARTITIONS,
                keep,
                revoke,
            )
        previous = cur.member_epoch if target_epoch != cur.member_epoch else cur.previous_member_epoch
        return ConsumerGroupCurrentMemberAssignmentValue(
            target_epoch,
            previous,
            MemberState.UNRELEASED_PARTITIONS if unreleased else MemberState.STABLE,
            keep | gained,
            _EMPTY,
        )

    @staticmethod
    def _transition(
        cur: ConsumerGroupCurrentMemberAssignmentValue,
        nxt: ConsumerGroupCurrentMemberAssignmentValue,
        target_epoch: int,
    ) -> None:
        rule = MEMBER_TRANSITIONS.get((cur.state, nxt.state))
        if rule is None:
            raise IllegalMemberTransition(f"{cur.state.name} -> {nxt.state.name} is not a transition")
        if rule is EpochRule.KEEP and nxt.member_epoch != cur.member_epoch:
            raise IllegalMemberTransition(
                f"{cur.state.name} -> {nxt.state.name} must keep epoch {cur.member_epoch}, not {nxt.member_epoch}"
            )
        if rule is EpochRule.TARGET and nxt.member_epoch != target_epoch:
            raise IllegalMemberTransition(
                f"{cur.state.name} -> {nxt.state.name} must reach epoch {target_epoch}, not {nxt.member_epoch}"
            )
        if (nxt.state == MemberState.UNREVOKED_PARTITIONS) != bool(nxt.partitions_pending_revocation):
            raise IllegalMemberTransition(f"{nxt.state.name} with pending revocation {sorted(nxt.partitions_pending_revocation)}")
        if nxt.state == MemberState.UNREVOKED_PARTITIONS and not nxt.assigned_partitions <= cur.assigned_partitions:
            raise IllegalMemberTransition("a member must not gain partitions before it has revoked")

    # ------------------------------------------------------------------------------- timers

    def next_deadline(self) -> int | None:
        """The earliest time `tick` has something to do, or None."""
        deadlines = [*self._session_deadlines.values(), *self._rebalance_deadlines.values()]
        return min(deadlines) if deadlines else None

    def tick(self, now_ms: int) -> Result[tuple[ExpiredMember, ...]]:
        """Remove the members whose session or rebalance timeout has passed.

        A member that missed its session timeout is gone (static members too: the instance id is
        kept only within the session timeout); a member that has not revoked within its
        rebalance timeout is fenced, so that its partitions can move on.
        """
        self._check_loaded()
        self._record_time_ms = now_ms
        expired: list[ExpiredMember] = []
        for (gid, mid), deadline in sorted(self._session_deadlines.items()):
            if deadline <= now_ms:
                expired.append(ExpiredMember(gid, mid, "session"))
        session_expired = {(e.group_id, e.member_id) for e in expired}
        for (gid, mid), deadline in sorted(self._rebalance_deadlines.items()):
            if deadline <= now_ms and (gid, mid) not in session_expired:
                expired.append(ExpiredMember(gid, mid, "rebalance"))
        records: list[GroupRecord] = []
        for e in expired:
            group = self._groups.get(e.group_id)
            if group is None or e.member_id not in group.members:
                self._session_deadlines.pop((e.group_id, e.member_id), None)
                self._rebalance_deadlines.pop((e.group_id, e.member_id), None)
                continue
            self._remove_member(group, e.member_id, records)
        return Result(tuple(expired), tuple(records))

    # ----------------------------------------------------------------------- offset expiry

    def expire_offsets(self, now_ms: int) -> Result[tuple[ExpiredOffsets, ...]]:
        """Kafka's offset retention (KIP-211, offsets.retention.minutes), run every
        offsets_retention_check_interval_ms: tombstones for the committed offsets that expired.

        * An empty group's offsets expire once it has been empty for the retention (and the
          offset was committed at least that long ago: a reset-offsets of an empty group is
          kept for a whole retention, where Kafka's classic groups would drop it with the rest).
        * A group with members keeps the offsets of the topics its members subscribe to; those
          of other topics expire the retention after their commit.
        * A group that never had members (admin or simple-consumer commits only) loses each
          offset the retention after its commit.
        * An empty group left without offsets is deleted (tombstones for its records), as
          Kafka's cleanup does.
        """
        self._check_loaded()
        self._record_time_ms = now_ms
        retention = self.config.offsets_retention_ms
        records: list[GroupRecord] = []
        expired: list[ExpiredOffsets] = []
        for group_id in sorted(self._groups):
            group = self._groups[group_id]
            subscribed = {t for meta in group.members.values() for t in meta.subscribed_topic_names}
            empty_since = group.epoch_written_ms if not group.members else None
            gone = []
            for tp, value in sorted(group.offsets.items()):
                if tp.topic in subscribed:
                    continue
                since = value.commit_timestamp if empty_since is None else max(empty_since, value.commit_timestamp)
                if now_ms - since >= retention:
                    gone.append(tp)
            for tp in gone:
                self._emit(records, OffsetCommitKey(group_id, tp.topic, tp.partition), None)
            if not group.members and not group.offsets and group_id in self._groups:
                records.extend(self.delete_group(group_id).records)
            deleted = group_id not in self._groups  # (offsets alone may have been all it had)
            if gone or deleted:
                expired.append(ExpiredOffsets(group_id, tuple(gone), deleted))
        return Result(tuple(expired), tuple(records))

    # ------------------------------------------------------------------------------ offsets

    def _validate_member_epoch(
        self, group: _Group | None, member_id: str, member_epoch: int, *, fetch: bool
    ) -> tuple[GroupErrorCode, str]:
        """KIP-848's offset fencing (Kafka's ConsumerGroup.validateOffsetCommit/-Fetch)."""
        if fetch and not member_id and member_epoch < 0:
            return GroupErrorCode.NONE, ""  # an admin or simple consumer reads
        if not fetch and member_epoch < 0 and (group is None or not group.members):
            # An admin or simple-consumer commit: allowed only while nobody consumes.
            return GroupErrorCode.NONE, ""
        if group is None or member_id not in group.members:
            return GroupErrorCode.UNKNOWN_MEMBER_ID, f"member {member_id!r} is not in the group"
        expected = (group.current.get(member_id) or self._empty_current()).member_epoch
        if member_epoch > expected and not fetch:
            return GroupErrorCode.FENCED_MEMBER_EPOCH, f"epoch {member_epoch} is ahead of the member's {expected}"
        if member_epoch != expected:
            return GroupErrorCode.STALE_MEMBER_EPOCH, f"epoch {member_epoch} is not the member's {expected}"
        return GroupErrorCode.NONE, ""

    def commit_offsets(
        self,
        group_id: str,
        member_id: str,
        member_epoch: int,
        offsets: Mapping[TopicPartition, CommittedOffset],
        now_ms: int,
    ) -> Result[CommitResponse]:
        """OffsetCommit fenced by member epoch; `member_id` "" with epoch -1 is an admin commit."""
        self._check_loaded()
        if not group_id:
            return Result(CommitResponse(GroupErrorCode.INVALID_GROUP_ID, message="the group id must not be empty"))
        group = self._groups.get(group_id)
        error, message = self._validate_member_epoch(group, member_id, member_epoch, fetch=False)
        if error != GroupErrorCode.NONE:
            return Result(CommitResponse(error, message=message))
        return self._write_offsets(group_id, offsets, now_ms)

    def _write_offsets(
        self, group_id: str, offsets: Mapping[TopicPartition, CommittedOffset], now_ms: int
    ) -> Result[CommitResponse]:
        records: list[GroupRecord] = []
        partition_errors: dict[TopicPartition, GroupErrorCode] = {}
        for tp in sorted(offsets):
            entry = offsets[tp]
            if len(entry.metadata.encode("utf-8")) > self.config.offset_metadata_max_bytes:
                partition_errors[tp] = GroupErrorCode.OFFSET_METADATA_TOO_LARGE
                continue
            partition_errors[tp] = GroupErrorCode.NONE
            self._emit(
                records,
                OffsetCommitKey(group_id, tp.topic, tp.partition),
                OffsetCommitValue(entry.offset, entry.leader_epoch, entry.metadata, now_ms),
            )
        return Result(CommitResponse(GroupErrorCode.NONE, partition_errors), tuple(records))

    def fetch_offsets(
        self,
        group_id: str,
        partitions: Iterable[TopicPartition] | None = None,
        *,
        member_id: str = "",
        member_epoch: int = -1,
    ) -> FetchOffsetsResponse:
        """OffsetFetch: the committed offsets of `partitions` (None: all the group has).

        With a member id and epoch (a KIP-848 consumer), the epoch must be the member's current
        one (STALE_MEMBER_EPOCH otherwise). Read-only: no records, but answer only once earlier
        appends are committed, like every answer.
        """
        group = self._groups.get(group_id)
        error, message = self._validate_member_epoch(group, member_id, member_epoch, fetch=True)
        if error != GroupErrorCode.NONE:
            return FetchOffsetsResponse(error, message=message)
        stored = group.offsets if group is not None else {}
        wanted = sorted(stored) if partitions is None else sorted(set(partitions))
        out: dict[TopicPartition, CommittedOffset | None] = {}
        for tp in wanted:
            v = stored.get(tp)
            out[tp] = None if v is None else CommittedOffset(v.offset, v.leader_epoch, v.metadata, v.commit_timestamp)
        return FetchOffsetsResponse(GroupErrorCode.NONE, out)

    # ---------------------------------------------------------------------------- admin

    def _state(self, group: _Group) -> GroupState:
        if not group.members:
            return GroupState.EMPTY
        if group.group_epoch > group.assignment_epoch:
            return GroupState.ASSIGNING
        for member_id in group.members:
            cur = group.current.get(member_id)
            if cur is None or cur.state != MemberState.STABLE or cur.member_epoch != group.assignment_epoch:
                return GroupState.RECONCILING
        return GroupState.STABLE

    def list_groups(self) -> list[GroupListing]:
        return [GroupListing(gid, self._state(g)) for gid, g in sorted(self._groups.items())]

    def describe_group(self, group_id: str) -> GroupDescription:
        group = self._groups.get(group_id)
        if group is None:
            return GroupDescription(GroupErrorCode.GROUP_ID_NOT_FOUND, group_id, GroupState.DEAD)
        members = []
        for member_id, meta in sorted(group.members.items()):
            cur = group.current.get(member_id) or self._empty_current()
            members.append(
                MemberDescription(
                    member_id=member_id,
                    instance_id=meta.instance_id,
                    member_epoch=cur.member_epoch,
                    state=cur.state,
                    subscribed_topics=meta.subscribed_topic_names,
                    assignment=cur.assigned_partitions,
                    partitions_pending_revocation=cur.partitions_pending_revocation,
                    target_assignment=group.targets.get(member_id, _EMPTY),
                    client_id=meta.client_id,
                    client_host=meta.client_host,
                    rack_id=meta.rack_id,
                    rebalance_timeout_ms=meta.rebalance_timeout_ms,
                )
            )
        offsets = {
            tp: CommittedOffset(v.offset, v.leader_epoch, v.metadata, v.commit_timestamp)
            for tp, v in sorted(group.offsets.items())
        }
        return GroupDescription(
            GroupErrorCode.NONE,
            group_id,
            self._state(group),
            group.group_epoch,
            group.assignment_epoch,
            self._group_assignor(group),
            tuple(members),
            offsets,
        )

    def delete_group(self, group_id: str) -> Result[DeleteGroupResponse]:
        """DeleteGroups: only an empty group; writes tombstones for everything it has."""
        self._check_loaded()
        group = self._groups.get(group_id)
        if group is None:
            return Result(DeleteGroupResponse(GroupErrorCode.GROUP_ID_NOT_FOUND, f"group {group_id} does not exist"))
        if group.members:
            return Result(
                DeleteGroupResponse(GroupErrorCode.NON_EMPTY_GROUP, f"group {group_id} has {len(group.members)} members")
            )
        records: list[GroupRecord] = []
        for tp in sorted(group.offsets):
            self._emit(records, OffsetCommitKey(group_id, tp.topic, tp.partition), None)
        for member_id in sorted(set(group.targets) | set(group.current)):
            # Leftovers cannot exist without members, but a tombstone costs nothing.
            self._remove_member_records(group, member_id, records)
        if group.target_epoch is not None:
            self._emit(records, ConsumerGroupTargetAssignmentMetadataKey(group_id), None)
        if group.partition_metadata is not None:
            self._emit(records, ConsumerGroupPartitionMetadataKey(group_id), None)
        if group.epoch is not None:
            self._emit(records, ConsumerGroupMetadataKey(group_id), None)
        assert group_id not in self._groups
        return Result(DeleteGroupResponse(GroupErrorCode.NONE), tuple(records))

    def reset_offsets(
        self, group_id: str, offsets: Mapping[TopicPartition, int], now_ms: int
    ) -> Result[CommitResponse]:
        """Execute a reset-offsets plan (see group_reset.plan_reset_offsets).

        Refused with NON_EMPTY_GROUP while the group has members, like Kafka's
        "can only be reset if the group is inactive": a live member would overwrite the reset
        with its next commit.
        """
        self._check_loaded()
        group = self._groups.get(group_id)
        if group is not None and group.members:
            return Result(
                CommitResponse(
                    GroupErrorCode.NON_EMPTY_GROUP,
                    message=f"group {group_id} has {len(group.members)} live members; stop them first",
                )
            )
        if not group_id:
            return Result(CommitResponse(GroupErrorCode.INVALID_GROUP_ID, message="the group id must not be empty"))
        return self._write_offsets(group_id, {tp: CommittedOffset(o) for tp, o in offsets.items()}, now_ms)

    # ---------------------------------------------------------------------- introspection

    def group_ids(self) -> list[str]:
        return sorted(self._groups)

    def owners(self, group_id: str) -> dict[TopicPartition, str]:
        """Who owns each partition (assigned or pending revocation) in the coordinator's view."""
        group = self._groups.get(group_id)
        return dict(group.owners) if group is not None else {}

    def snapshot(self) -> dict[str, object]:
        """The durable state as plain data: equal after a replay of the emitted records."""
        out: dict[str, object] = {}
        for gid, g in sorted(self._groups.items()):
            out[gid] = {
                "epoch": g.epoch,
                "partition_metadata": g.partition_metadata,
                "target_epoch": g.target_epoch,
                "targets": dict(sorted(g.targets.items())),
                "members": dict(sorted(g.members.items())),
                "current": dict(sorted(g.current.items())),
                "owners": dict(sorted(g.owners.items())),
                "instances": dict(sorted(g.instances.items())),
                "offsets": dict(sorted(g.offsets.items())),
            }
        return out
