"""Records of the internal `__consumer_offsets` topic (DESIGN.md §7, REFERENCE.md §4).

Every record the group coordinator writes is a Kafka record whose key starts with an int16 that
names the record type (Kafka calls it the key "version") and whose value starts with an int16
value version. The types and their numbers are Kafka's (group-coordinator's
`common/message/*Key.json` `apiKey`s):

| type | key fields | value |
| --- | --- | --- |
| 0, 1 | OffsetCommitKey{group, topic, partition int32} | OffsetCommitValue v0-v3 (v3 written) |
| 3 | ConsumerGroupMetadataKey{group} | ConsumerGroupMetadataValue{epoch} |
| 4 | ConsumerGroupPartitionMetadataKey{group} | topics and partition counts the target was computed for |
| 5 | ConsumerGroupMemberMetadataKey{group, member} | instance id, rack, client, subscription, rebalance timeout, assignor |
| 6 | ConsumerGroupTargetAssignmentMetadataKey{group} | {assignment epoch} |
| 7 | ConsumerGroupTargetAssignmentMemberKey{group, member} | the member's target partitions |
| 8 | ConsumerGroupCurrentMemberAssignmentKey{group, member} | member epoch, previous epoch, state, assigned, pending revocation |

A value of None is a tombstone: the key is deleted (and compaction later drops it).

Keys are never "flexible" (int16-length strings), exactly as Kafka writes them, so the bytes of a
key are stable and compaction can compare keys byte for byte. Offset commit values are Kafka's
OffsetCommitValue v3 byte for byte. The KIP-848 values are Kafka's flexible encoding (compact
strings and arrays, an empty tagged-field section), with one deliberate difference: tidelog topics
have no topic id, so where Kafka writes `TopicId uuid` in the assignment records (types 7, 8) we
write the topic name as a compact string; in the partition metadata record (type 4) Kafka's layout
is kept whole and the topic id is written as the all-zero uuid.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field
from typing import Iterable, Union

Buffer = Union[bytes, bytearray, memoryview]

_INT8 = struct.Struct(">b")
_INT16 = struct.Struct(">h")
_INT32 = struct.Struct(">i")
_INT64 = struct.Struct(">q")
_ZERO_UUID = bytes(16)


class CorruptGroupRecordError(ValueError):
    """A `__consumer_offsets` key or value that cannot be decoded."""


class UnknownGroupRecordError(CorruptGroupRecordError):
    """A record type or value version this coordinator does not know (written by a newer one)."""


@dataclass(frozen=True, slots=True, order=True)
class TopicPartition:
    topic: str
    partition: int

    def __str__(self) -> str:
        return f"{self.topic}:{self.partition}"


class RecordType(enum.IntEnum):
    """The int16 at the start of every key (Kafka's coordinator record `apiKey`)."""

    OFFSET_COMMIT_V0 = 0  # the key layout is the same as type 1; Kafka reads both
    OFFSET_COMMIT = 1
    GROUP_METADATA = 2  # the classic protocol's group record; tidelog never writes it
    CONSUMER_GROUP_METADATA = 3
    CONSUMER_GROUP_PARTITION_METADATA = 4
    CONSUMER_GROUP_MEMBER_METADATA = 5
    CONSUMER_GROUP_TARGET_ASSIGNMENT_METADATA = 6
    CONSUMER_GROUP_TARGET_ASSIGNMENT_MEMBER = 7
    CONSUMER_GROUP_CURRENT_MEMBER_ASSIGNMENT = 8


class MemberState(enum.IntEnum):
    """A member's reconciliation state, stored as an int8 (Kafka's `MemberState` bytes)."""

    STABLE = 0  # the member has its whole target assignment at the target epoch
    UNREVOKED_PARTITIONS = 1  # the member must first revoke partitions; its epoch is held back
    UNRELEASED_PARTITIONS = 2  # at the target epoch, but waits for partitions others still own


# --------------------------------------------------------------------------------------- keys


@dataclass(frozen=True, slots=True)
class OffsetCommitKey:
    group_id: str
    topic: str
    partition: int


@dataclass(frozen=True, slots=True)
class ConsumerGroupMetadataKey:
    group_id: str


@dataclass(frozen=True, slots=True)
class ConsumerGroupPartitionMetadataKey:
    group_id: str


@dataclass(frozen=True, slots=True)
class ConsumerGroupMemberMetadataKey:
    group_id: str
    member_id: str


@dataclass(frozen=True, slots=True)
class ConsumerGroupTargetAssignmentMetadataKey:
    group_id: str


@dataclass(frozen=True, slots=True)
class ConsumerGroupTargetAssignmentMemberKey:
    group_id: str
    member_id: str


@dataclass(frozen=True, slots=True)
class ConsumerGroupCurrentMemberAssignmentKey:
    group_id: str
    member_id: str


GroupRecordKey = Union[
    OffsetCommitKey,
    ConsumerGroupMetadataKey,
    ConsumerGroupPartitionMetadataKey,
    ConsumerGroupMemberMetadataKey,
    ConsumerGroupTargetAssignmentMetadataKey,
    ConsumerGroupTargetAssignmentMemberKey,
    ConsumerGroupCurrentMemberAssignmentKey,
]

# ------------------------------------------------------------------------------------- values


@dataclass(frozen=True, slots=True)
class OffsetCommitValue:
    offset: int
    leader_epoch: int = -1  # -1: unknown (Kafka's default before v3)
    metadata: str = ""
    commit_timestamp: int = -1
    expire_timestamp: int = -1  # only in v1; read, never written


@dataclass(frozen=True, slots=True)
class ConsumerGroupMetadataValue:
    epoch: int


@dataclass(frozen=True, slots=True)
class ConsumerGroupPartitionMetadataValue:
    """The subscribed topics' partition counts the group's target assignment is based on."""

    epoch: int
    topics: tuple[tuple[str, int], ...]  # (topic name, partition count), sorted by name

    def counts(self) -> dict[str, int]:
        return dict(self.topics)


@dataclass(frozen=True, slots=True)
class ConsumerGroupMemberMetadataValue:
    instance_id: str | None
    rack_id: str | None
    client_id: str
    client_host: str
    subscribed_topic_names: tuple[str, ...]  # sorted
    subscribed_topic_regex: str | None
    rebalance_timeout_ms: int
    server_assignor: str | None


@dataclass(frozen=True, slots=True)
class ConsumerGroupTargetAssignmentMetadataValue:
    assignment_epoch: int


@dataclass(frozen=True, slots=True)
class ConsumerGroupTargetAssignmentMemberValue:
    partitions: frozenset[TopicPartition]


@dataclass(frozen=True, slots=True)
class ConsumerGroupCurrentMemberAssignmentValue:
    member_epoch: int
    previous_member_epoch: int
    state: MemberState
    assigned_partitions: frozenset[TopicPartition]
    partitions_pending_revocation: frozenset[TopicPartition] = field(default=frozenset())


GroupRecordValue = Union[
    OffsetCommitValue,
    ConsumerGroupMetadataValue,
    ConsumerGroupPartitionMetadataValue,
    ConsumerGroupMemberMetadataValue,
    ConsumerGroupTargetAssignmentMetadataValue,
    ConsumerGroupTargetAssignmentMemberValue,
    ConsumerGroupCurrentMemberAssignmentValue,
]

# ---------------------------------------------------------------------------- wire primitives


class _Writer:
    __slots__ = ("out",)

    def __init__(self) -> None:
        self.out = bytearray()

    def int8(self, v: int) -> None:
        self.out += _INT8.pack(v)

    def int16(self, v: int) -> None:
        self.out += _INT16.pack(v)

    def int32(self, v: int) -> None:
        self.out += _INT32.pack(v)

    def int64(self, v: int) -> None:
        self.out += _INT64.pack(v)

    def uvarint(self, v: int) -> None:
        if v < 0:
            raise ValueError(f"unsigned varint cannot hold {v}")
        while v >= 0x80:
            self.out.append((v & 0x7F) | 0x80)
            v >>= 7
        self.out.append(v)

    def string(self, s: str | None) -> None:
        """A classic (non-flexible) string: int16 length, -1 for null."""
        if s is None:
            self.int16(-1)
            return
        data = s.encode("utf-8")
        if len(data) > 0x7FFF:
            raise ValueError(f"string of {len(data)} bytes is too long for an int16 length")
        self.int16(len(data))
        self.out += data

    def compact_string(self, s: str | None) -> None:
        if s is None:
            self.uvarint(0)
            return
        data = s.encode("utf-8")
        self.uvarint(len(data) + 1)
        self.out += data

    def compact_array_len(self, n: int) -> None:
        self.uvarint(n + 1)

    def no_tagged_fields(self) -> None:
        self.uvarint(0)

    def uuid(self, raw: bytes) -> None:
        assert len(raw) == 16
        self.out += raw


class _Reader:
    __slots__ = ("view", "pos")

    def __init__(self, buf: Buffer) -> None:
        self.view = memoryview(buf)
        self.pos = 0

    def _take(self, n: int) -> memoryview:
        if n < 0 or self.pos + n > len(self.view):
            raise CorruptGroupRecordError(
                f"needs {n} bytes at position {self.pos}, {len(self.view) - self.pos} remain"
            )
        chunk = self.view[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def int8(self) -> int:
        return _INT8.unpack(self._take(1))[0]

    def int16(self) -> int:
        return _INT16.unpack(self._take(2))[0]

    def int32(self) -> int:
        return _INT32.unpack(self._take(4))[0]

    def int64(self) -> int:
        return _INT64.unpack(self._take(8))[0]

    def uvarint(self) -> int:
        value = 0
        for shift in range(0, 35, 7):
            byte = self._take(1)[0]
            value |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return value
        raise CorruptGroupRecordError("unsigned varint longer than 5 bytes")

    def _utf8(self, n: int) -> str:
        try:
            return str(self._take(n), "utf-8")
        except UnicodeDecodeError as e:
            raise CorruptGroupRecordError(f"string is not UTF-8: {e}") from None

    def string(self) -> str:
        s = self.nullable_string()
        if s is None:
            raise CorruptGroupRecordError("null where a string is required")
        return s

    def nullable_string(self) -> str | None:
        n = self.int16()
        if n == -1:
            return None
        if n < 0:
            raise CorruptGroupRecordError(f"negative string length {n}")
        return self._utf8(n)

    def compact_string(self) -> str:
        s = self.compact_nullable_string()
        if s is None:
            raise CorruptGroupRecordError("null where a string is required")
        return s

    def compact_nullable_string(self) -> str | None:
        n = self.uvarint()
        return None if n == 0 else self._utf8(n - 1)

    def compact_array_len(self) -> int:
        n = self.uvarint()
        if n == 0:
            raise CorruptGroupRecordError("null where an array is required")
        # Each element takes at least one byte: a count larger than the rest is a lie.
        if n - 1 > len(self.view) - self.pos:
            raise CorruptGroupRecordError(f"array of {n - 1} elements cannot fit")
        return n - 1

    def skip_tagged_fields(self) -> None:
        # Tagged fields are optional by definition (a newer writer's hash, timestamp, ...):
        # skipping them is how Kafka's older readers stay compatible.
        for _ in range(self.uvarint()):
            self.uvarint()  # tag
            self._take(self.uvarint())

    def uuid(self) -> bytes:
        return bytes(self._take(16))

    def expect_end(self, what: str) -> None:
        if self.pos != len(self.view):
            raise CorruptGroupRecordError(f"{len(self.view) - self.pos} trailing bytes after {what}")


def _write_partitions(w: _Writer, partitions: Iterable[TopicPartition]) -> None:
    by_topic: dict[str, list[int]] = {}
    for tp in sorted(partitions):
        by_topic.setdefault(tp.topic, []).append(tp.partition)
    w.compact_array_len(len(by_topic))
    for topic, parts in by_topic.items():
        w.compact_string(topic)
        w.compact_array_len(len(parts))
        for p in parts:
            w.int32(p)
        w.no_tagged_fields()


def _read_partitions(r: _Reader) -> frozenset[TopicPartition]:
    out: list[TopicPartition] = []
    for _ in range(r.compact_array_len()):
        topic = r.compact_string()
        for _ in range(r.compact_array_len()):
            out.append(TopicPartition(topic, r.int32()))
        r.skip_tagged_fields()
    return frozenset(out)


# ----------------------------------------------------------------------------------- encoders


def encode_key(key: GroupRecordKey) -> bytes:
    w = _Writer()
    if isinstance(key, OffsetCommitKey):
        w.int16(RecordType.OFFSET_COMMIT)
        w.string(key.group_id)
        w.string(key.topic)
        w.int32(key.partition)
    elif isinstance(key, ConsumerGroupMetadataKey):
        w.int16(RecordType.CONSUMER_GROUP_METADATA)
        w.string(key.group_id)
    elif isinstance(key, ConsumerGroupPartitionMetadataKey):
        w.int16(RecordType.CONSUMER_GROUP_PARTITION_METADATA)
        w.string(key.group_id)
    elif isinstance(key, ConsumerGroupMemberMetadataKey):
        w.int16(RecordType.CONSUMER_GROUP_MEMBER_METADATA)
        w.string(key.group_id)
        w.string(key.member_id)
    elif isinstance(key, ConsumerGroupTargetAssignmentMetadataKey):
        w.int16(RecordType.CONSUMER_GROUP_TARGET_ASSIGNMENT_METADATA)
        w.string(key.group_id)
    elif isinstance(key, ConsumerGroupTargetAssignmentMemberKey):
        w.int16(RecordType.CONSUMER_GROUP_TARGET_ASSIGNMENT_MEMBER)
        w.string(key.group_id)
        w.string(key.member_id)
    elif isinstance(key, ConsumerGroupCurrentMemberAssignmentKey):
        w.int16(RecordType.CONSUMER_GROUP_CURRENT_MEMBER_ASSIGNMENT)
        w.string(key.group_id)
        w.string(key.member_id)
    else:
        raise TypeError(f"not a group record key: {key!r}")
    return bytes(w.out)


def decode_key(buf: Buffer) -> GroupRecordKey:
    r = _Reader(buf)
    kind = r.int16()
    key: GroupRecordKey
    if kind in (RecordType.OFFSET_COMMIT_V0, RecordType.OFFSET_COMMIT):
        key = OffsetCommitKey(r.string(), r.string(), r.int32())
    elif kind == RecordType.CONSUMER_GROUP_METADATA:
        key = ConsumerGroupMetadataKey(r.string())
    elif kind == RecordType.CONSUMER_GROUP_PARTITION_METADATA:
        key = ConsumerGroupPartitionMetadataKey(r.string())
    elif kind == RecordType.CONSUMER_GROUP_MEMBER_METADATA:
        key = ConsumerGroupMemberMetadataKey(r.string(), r.string())
    elif kind == RecordType.CONSUMER_GROUP_TARGET_ASSIGNMENT_METADATA:
        key = ConsumerGroupTargetAssignmentMetadataKey(r.string())
    elif kind == RecordType.CONSUMER_GROUP_TARGET_ASSIGNMENT_MEMBER:
        key = ConsumerGroupTargetAssignmentMemberKey(r.string(), r.string())
    elif kind == RecordType.CONSUMER_GROUP_CURRENT_MEMBER_ASSIGNMENT:
        key = ConsumerGroupCurrentMemberAssignmentKey(r.string(), r.string())
    else:
        raise UnknownGroupRecordError(f"unknown __consumer_offsets record type {kind}")
    r.expect_end("the key")
    return key


OFFSET_COMMIT_VALUE_VERSION = 3  # Kafka's writers use v3 unless an expire timestamp is given


def encode_value(value: GroupRecordValue | None) -> bytes | None:
    """The value bytes; None (a tombstone) stays None."""
    if value is None:
        return None
    w = _Writer()
    if isinstance(value, OffsetCommitValue):
        w.int16(OFFSET_COMMIT_VALUE_VERSION)
        w.int64(value.offset)
        w.int32(value.leader_epoch)
        w.string(value.metadata)
        w.int64(value.commit_timestamp)
    elif isinstance(value, ConsumerGroupMetadataValue):
        w.int16(0)
        w.int32(value.epoch)
        w.no_tagged_fields()
    elif isinstance(value, ConsumerGroupPartitionMetadataValue):
        w.int16(0)
        w.int32(value.epoch)
        w.compact_array_len(len(value.topics))
        for name, count in value.topics:
            w.uuid(_ZERO_UUID)
            w.compact_string(name)
            w.int32(count)
            w.compact_array_len(0)  # PartitionRacks: tidelog has no racks yet
            w.no_tagged_fields()
        w.no_tagged_fields()
    elif isinstance(value, ConsumerGroupMemberMetadataValue):
        w.int16(0)
        w.compact_string(value.instance_id)
        w.compact_string(value.rack_id)
        w.compact_string(value.client_id)
        w.compact_string(value.client_host)
        w.compact_array_len(len(value.subscribed_topic_names))
        for name in value.subscribed_topic_names:
            w.compact_string(name)
        w.compact_string(value.subscribed_topic_regex)
        w.int32(value.rebalance_timeout_ms)
        w.compact_string(value.server_assignor)
        w.no_tagged_fields()
    elif isinstance(value, ConsumerGroupTargetAssignmentMetadataValue):
        w.int16(0)
        w.int32(value.assignment_epoch)
        w.no_tagged_fields()
    elif isinstance(value, ConsumerGroupTargetAssignmentMemberValue):
        w.int16(0)
        _write_partitions(w, value.partitions)
        w.no_tagged_fields()
    elif isinstance(value, ConsumerGroupCurrentMemberAssignmentValue):
        w.int16(0)
        w.int32(value.member_epoch)
        w.int32(value.previous_member_epoch)
        w.int8(value.state)
        _write_partitions(w, value.assigned_partitions)
        _write_partitions(w, value.partitions_pending_revocation)
        w.no_tagged_fields()
    else:
        raise TypeError(f"not a group record value: {value!r}")
    return bytes(w.out)


def _decode_offset_commit_value(r: _Reader, version: int) -> OffsetCommitValue:
    if not 0 <= version <= 4:
        raise UnknownGroupRecordError(f"unknown OffsetCommitValue version {version}")
    offset = r.int64()
    leader_epoch = r.int32() if version >= 3 else -1
    if version >= 4:
        metadata = r.compact_string()
    else:
        metadata = r.string()
    commit_timestamp = r.int64()
    expire_timestamp = r.int64() if version == 1 else -1
    if version >= 4:
        r.skip_tagged_fields()
    return OffsetCommitValue(offset, leader_epoch, metadata, commit_timestamp, expire_timestamp)


def decode_value(key: GroupRecordKey, buf: Buffer | None) -> GroupRecordValue | None:
    """Decode the value of `key` (the key says what the value is); None stays None."""
    if buf is None:
        return None
    r = _Reader(buf)
    version = r.int16()
    value: GroupRecordValue
    if isinstance(key, OffsetCommitKey):
        value = _decode_offset_commit_value(r, version)
        r.expect_end("OffsetCommitValue")
        return value
    if version != 0:
        raise UnknownGroupRecordError(f"unknown value version {version} for {type(key).__name__}")
    if isinstance(key, ConsumerGroupMetadataKey):
        value = ConsumerGroupMetadataValue(r.int32())
    elif isinstance(key, ConsumerGroupPartitionMetadataKey):
        epoch = r.int32()
        topics: list[tuple[str, int]] = []
        for _ in range(r.compact_array_len()):
            r.uuid()
            name = r.compact_string()
            count = r.int32()
            for _ in range(r.compact_array_len()):
                r.int32()
                for _ in range(r.compact_array_len()):
                    r.compact_string()
                r.skip_tagged_fields()
            r.skip_tagged_fields()
            topics.append((name, count))
        value = ConsumerGroupPartitionMetadataValue(epoch, tuple(topics))
    elif isinstance(key, ConsumerGroupMemberMetadataKey):
        instance_id = r.compact_nullable_string()
        rack_id = r.compact_nullable_string()
        client_id = r.compact_string()
        client_host = r.compact_string()
        names = tuple(r.compact_string() for _ in range(r.compact_array_len()))
        regex = r.compact_nullable_string()
        rebalance_timeout_ms = r.int32()
        assignor = r.compact_nullable_string()
        value = ConsumerGroupMemberMetadataValue(
            instance_id, rack_id, client_id, client_host, names, regex, rebalance_timeout_ms, assignor
        )
    elif isinstance(key, ConsumerGroupTargetAssignmentMetadataKey):
        value = ConsumerGroupTargetAssignmentMetadataValue(r.int32())
    elif isinstance(key, ConsumerGroupTargetAssignmentMemberKey):
        value = ConsumerGroupTargetAssignmentMemberValue(_read_partitions(r))
    elif isinstance(key, ConsumerGroupCurrentMemberAssignmentKey):
        member_epoch = r.int32()
        previous_epoch = r.int32()
        raw_state = r.int8()
        try:
            state = MemberState(raw_state)
        except ValueError:
            raise UnknownGroupRecordError(f"unknown member state {raw_state}") from None
        assigned = _read_partitions(r)
        pending = _read_partitions(r)
        value = ConsumerGroupCurrentMemberAssignmentValue(
            member_epoch, previous_epoch, state, assigned, pending
        )
    else:
        raise TypeError(f"not a group record key: {key!r}")
    r.skip_tagged_fields()
    r.expect_end(type(value).__name__)
    return value


@dataclass(frozen=True, slots=True)
class GroupRecord:
    """One record for the node to append to the coordinator's `__consumer_offsets` partition.

    `key`/`value` are the bytes of a Kafka record (tidelog.proto.records.Record key/value);
    `value` None is a tombstone. The typed forms ride along so the coordinator and tests need
    not decode what they just encoded.
    """

    key: bytes
    value: bytes | None
    typed_key: GroupRecordKey = field(compare=False, repr=False)
    typed_value: GroupRecordValue | None = field(compare=False, repr=False)

    @classmethod
    def of(cls, key: GroupRecordKey, value: GroupRecordValue | None) -> GroupRecord:
        return cls(encode_key(key), encode_value(value), key, value)


# --------------------------------------------------------------------- coordinator partition


def java_string_hash(s: str) -> int:
    """Java's `String.hashCode()`: s[0]*31^(n-1) + ... over UTF-16 code units, as an int32."""
    h = 0
    data = s.encode("utf-16-be")
    for i in range(0, len(data), 2):
        h = (31 * h + ((data[i] << 8) | data[i + 1])) & 0xFFFFFFFF
    return h - (1 << 32) if h & 0x80000000 else h


def coordinator_partition(group_id: str, num_partitions: int) -> int:
    """The `__consumer_offsets` partition of a group: `Utils.abs(groupId.hashCode()) % n`.

    Kafka's `Utils.abs` maps Integer.MIN_VALUE to 0 (plain `Math.abs` would leave it negative).
    """
    if num_partitions <= 0:
        raise ValueError(f"num_partitions must be positive, got {num_partitions}")
    h = java_string_hash(group_id)
    return (0 if h == -(1 << 31) else abs(h)) % num_partitions
