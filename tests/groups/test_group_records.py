"""`__consumer_offsets` records: Kafka's layouts byte for byte, round trips, damage, hashing.

The independent oracle is kafka-python's protocol types (`kafka.protocol.old.types`): each
schema below is transcribed from Kafka's group-coordinator `common/message/*.json` files and
encoded by kafka-python, and our bytes must match exactly.
"""

from __future__ import annotations

import io
import struct
import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kafka.protocol.old.types import (
    UUID,
    CompactArray,
    CompactString,
    Int8,
    Int16,
    Int32,
    Int64,
    Schema,
    String,
    TaggedFields,
)

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
    CorruptGroupRecordError,
    GroupRecord,
    MemberState,
    OffsetCommitKey,
    OffsetCommitValue,
    TopicPartition,
    UnknownGroupRecordError,
    coordinator_partition,
    decode_key,
    decode_value,
    encode_key,
    encode_value,
    java_string_hash,
)
from tidelog.proto.records import Record, decode_records, encode_batch

TP = TopicPartition
names = st.text(min_size=0, max_size=12)
int32s = st.integers(-(2**31), 2**31 - 1)
int64s = st.integers(-(2**63), 2**63 - 1)
partition_sets = st.frozensets(st.builds(TP, st.sampled_from(["a", "b", "ü-topic"]), st.integers(0, 300)), max_size=20)

keys = st.one_of(
    st.builds(OffsetCommitKey, names, names, int32s),
    st.builds(ConsumerGroupMetadataKey, names),
    st.builds(ConsumerGroupPartitionMetadataKey, names),
    st.builds(ConsumerGroupMemberMetadataKey, names, names),
    st.builds(ConsumerGroupTargetAssignmentMetadataKey, names),
    st.builds(ConsumerGroupTargetAssignmentMemberKey, names, names),
    st.builds(ConsumerGroupCurrentMemberAssignmentKey, names, names),
)


def values_for(key: object) -> st.SearchStrategy[object]:
    if isinstance(key, OffsetCommitKey):
        return st.builds(OffsetCommitValue, int64s, int32s, names, int64s)
    if isinstance(key, ConsumerGroupMetadataKey):
        return st.builds(ConsumerGroupMetadataValue, int32s)
    if isinstance(key, ConsumerGroupPartitionMetadataKey):
        topics = st.dictionaries(names, st.integers(0, 10_000), max_size=5).map(lambda d: tuple(sorted(d.items())))
        return st.builds(ConsumerGroupPartitionMetadataValue, int32s, topics)
    if isinstance(key, ConsumerGroupMemberMetadataKey):
        return st.builds(
            ConsumerGroupMemberMetadataValue,
            st.none() | names,
            st.none() | names,
            names,
            names,
            st.lists(names, max_size=4).map(lambda xs: tuple(sorted(set(xs)))),
            st.none() | names,
            int32s,
            st.none() | st.sampled_from(["uniform", "range"]),
        )
    if isinstance(key, ConsumerGroupTargetAssignmentMetadataKey):
        return st.builds(ConsumerGroupTargetAssignmentMetadataValue, int32s)
    if isinstance(key, ConsumerGroupTargetAssignmentMemberKey):
        return st.builds(ConsumerGroupTargetAssignmentMemberValue, partition_sets)
    return st.builds(
        ConsumerGroupCurrentMemberAssignmentValue,
        int32s,
        int32s,
        st.sampled_from(list(MemberState)),
        partition_sets,
        partition_sets,
    )


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_every_record_round_trips_through_bytes(data: st.DataObject) -> None:
    key = data.draw(keys)
    value = data.draw(st.none() | values_for(key))
    assert decode_key(encode_key(key)) == key
    assert decode_value(key, encode_value(value)) == value


# ------------------------------------------------------------------ Kafka's layouts, by oracle

KEY_GROUP = Schema(("type", Int16), ("group", String("utf-8")))
KEY_GROUP_MEMBER = Schema(("type", Int16), ("group", String("utf-8")), ("member", String("utf-8")))
KEY_OFFSET = Schema(("type", Int16), ("group", String("utf-8")), ("topic", String("utf-8")), ("partition", Int32))
# OffsetCommitValue.json v3 (non-flexible).
VALUE_OFFSET_V3 = Schema(
    ("version", Int16), ("offset", Int64), ("leaderEpoch", Int32), ("metadata", String("utf-8")), ("commitTimestamp", Int64)
)
VALUE_EPOCH = Schema(("version", Int16), ("epoch", Int32), ("tags", TaggedFields))
VALUE_PARTITION_METADATA = Schema(
    ("version", Int16),
    ("epoch", Int32),
    (
        "topics",
        CompactArray(
            ("topicId", UUID),
            ("topicName", CompactString("utf-8")),
            ("numPartitions", Int32),
            ("partitionRacks", CompactArray(("partition", Int32), ("racks", CompactArray(CompactString("utf-8"))), ("tags", TaggedFields))),
            ("tags", TaggedFields),
        ),
    ),
    ("tags", TaggedFields),
)
VALUE_MEMBER_METADATA = Schema(
    ("version", Int16),
    ("instanceId", CompactString("utf-8")),
    ("rackId", CompactString("utf-8")),
    ("clientId", CompactString("utf-8")),
    ("clientHost", CompactString("utf-8")),
    ("subscribedTopicNames", CompactArray(CompactString("utf-8"))),
    ("subscribedTopicRegex", CompactString("utf-8")),
    ("rebalanceTimeoutMs", Int32),
    ("serverAssignor", CompactString("utf-8")),
    ("tags", TaggedFields),
)
# tidelog's variant of Kafka's TopicPartitions struct: the topic name where Kafka has TopicId.
TOPIC_PARTITIONS = CompactArray(("topicName", CompactString("utf-8")), ("partitions", CompactArray(Int32)), ("tags", TaggedFields))
VALUE_TARGET_MEMBER = Schema(("version", Int16), ("topicPartitions", TOPIC_PARTITIONS), ("tags", TaggedFields))
VALUE_CURRENT = Schema(
    ("version", Int16),
    ("memberEpoch", Int32),
    ("previousMemberEpoch", Int32),
    ("state", Int8),
    ("assignedPartitions", TOPIC_PARTITIONS),
    ("partitionsPendingRevocation", TOPIC_PARTITIONS),
    ("tags", TaggedFields),
)


def _grouped(partitions: frozenset[TopicPartition]) -> list[tuple[str, list[int], dict]]:
    by_topic: dict[str, list[int]] = {}
    for tp in sorted(partitions):
        by_topic.setdefault(tp.topic, []).append(tp.partition)
    return [(t, ps, {}) for t, ps in by_topic.items()]


def test_keys_are_kafkas_non_flexible_layout_with_the_type_first() -> None:
    """OffsetCommitKey.json (apiKey 1), ConsumerGroup*Key.json (apiKeys 3-8): int16 type, int16 strings."""
    assert encode_key(OffsetCommitKey("grp", "topic", 7)) == KEY_OFFSET.encode((1, "grp", "topic", 7))
    assert encode_key(ConsumerGroupMetadataKey("grp")) == KEY_GROUP.encode((3, "grp"))
    assert encode_key(ConsumerGroupPartitionMetadataKey("grp")) == KEY_GROUP.encode((4, "grp"))
    assert encode_key(ConsumerGroupMemberMetadataKey("grp", "m1")) == KEY_GROUP_MEMBER.encode((5, "grp", "m1"))
    assert encode_key(ConsumerGroupTargetAssignmentMetadataKey("grp")) == KEY_GROUP.encode((6, "grp"))
    assert encode_key(ConsumerGroupTargetAssignmentMemberKey("grp", "m1")) == KEY_GROUP_MEMBER.encode((7, "grp", "m1"))
    assert encode_key(ConsumerGroupCurrentMemberAssignmentKey("grp", "m1")) == KEY_GROUP_MEMBER.encode((8, "grp", "m1"))


@settings(max_examples=100, deadline=None)
@given(int64s, int32s, names, int64s)
def test_offset_commit_value_is_kafkas_v3(offset: int, leader_epoch: int, metadata: str, ts: int) -> None:
    """OffsetCommitValue.json: v3 = offset int64, leaderEpoch int32, metadata string, commitTimestamp int64."""
    ours = encode_value(OffsetCommitValue(offset, leader_epoch, metadata, ts))
    assert ours == VALUE_OFFSET_V3.encode((3, offset, leader_epoch, metadata, ts))


def test_older_offset_commit_values_decode() -> None:
    """v0 has no leader epoch; v1 adds expireTimestamp (Kafka still reads both)."""
    key = OffsetCommitKey("g", "t", 0)
    v0 = struct.pack(">hq", 0, 42) + String("utf-8").encode("md") + struct.pack(">q", 1000)
    v1 = struct.pack(">hq", 1, 42) + String("utf-8").encode("md") + struct.pack(">qq", 1000, 2000)
    assert decode_value(key, v0) == OffsetCommitValue(42, -1, "md", 1000, -1)
    assert decode_value(key, v1) == OffsetCommitValue(42, -1, "md", 1000, 2000)
    # v4 is the first flexible version: compact metadata and a tagged-field section.
    v4 = struct.pack(">hqi", 4, 42, 3) + CompactString("utf-8").encode("md") + struct.pack(">q", 1000) + b"\x00"
    assert decode_value(key, v4) == OffsetCommitValue(42, 3, "md", 1000, -1)
    # The legacy key type 0 names the same record.
    assert decode_key(KEY_OFFSET.encode((0, "g", "t", 0))) == key


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_consumer_group_values_match_kafkas_flexible_layout(data: st.DataObject) -> None:
    """ConsumerGroup*Value.json v0: compact strings/arrays and an empty tagged-field section."""
    epoch = data.draw(int32s)
    assert encode_value(ConsumerGroupMetadataValue(epoch)) == VALUE_EPOCH.encode((0, epoch))
    assert encode_value(ConsumerGroupTargetAssignmentMetadataValue(epoch)) == VALUE_EPOCH.encode((0, epoch))

    topics = tuple(sorted(data.draw(st.dictionaries(names, st.integers(0, 5000), max_size=4)).items()))
    expected = VALUE_PARTITION_METADATA.encode((0, epoch, [(uuid.UUID(int=0), n, c, [], {}) for n, c in topics]))
    assert encode_value(ConsumerGroupPartitionMetadataValue(epoch, topics)) == expected

    meta = data.draw(values_for(ConsumerGroupMemberMetadataKey("g", "m")))
    assert isinstance(meta, ConsumerGroupMemberMetadataValue)
    assert encode_value(meta) == VALUE_MEMBER_METADATA.encode(
        (
            0,
            meta.instance_id,
            meta.rack_id,
            meta.client_id,
            meta.client_host,
            list(meta.subscribed_topic_names),
            meta.subscribed_topic_regex,
            meta.rebalance_timeout_ms,
            meta.server_assignor,
        )
    )

    target = data.draw(partition_sets)
    assert encode_value(ConsumerGroupTargetAssignmentMemberValue(target)) == VALUE_TARGET_MEMBER.encode((0, _grouped(target)))

    cur = data.draw(values_for(ConsumerGroupCurrentMemberAssignmentKey("g", "m")))
    assert isinstance(cur, ConsumerGroupCurrentMemberAssignmentValue)
    raw = encode_value(cur)
    assert raw == VALUE_CURRENT.encode(
        (
            0,
            cur.member_epoch,
            cur.previous_member_epoch,
            int(cur.state),
            _grouped(cur.assigned_partitions),
            _grouped(cur.partitions_pending_revocation),
        )
    )
    # And kafka-python reads ours back.
    decoded = VALUE_CURRENT.decode(io.BytesIO(raw))
    assert decoded[1:4] == (cur.member_epoch, cur.previous_member_epoch, int(cur.state))


def test_unknown_tagged_fields_from_a_newer_writer_are_skipped() -> None:
    """Kafka 4.1 adds MetadataHash as tag 0 of ConsumerGroupMetadataValue; older readers skip it."""
    raw = Schema(("version", Int16), ("epoch", Int32), ("tags", TaggedFields)).encode((0, 9, {0: struct.pack(">q", 1234)}))
    assert decode_value(ConsumerGroupMetadataKey("g"), raw) == ConsumerGroupMetadataValue(9)


def test_tombstones_are_none_on_both_sides() -> None:
    key = ConsumerGroupMemberMetadataKey("g", "m")
    assert encode_value(None) is None
    assert decode_value(key, None) is None
    rec = GroupRecord.of(key, None)
    assert rec.value is None and rec.key == encode_key(key)


def test_records_travel_inside_a_kafka_record_batch() -> None:
    """The node appends GroupRecord key/value bytes as tidelog.proto.records.Record."""
    recs = [
        GroupRecord.of(OffsetCommitKey("g", "t", 1), OffsetCommitValue(5, 0, "", 99)),
        GroupRecord.of(ConsumerGroupMemberMetadataKey("g", "m"), None),
    ]
    batch = encode_batch([Record(0, 99, r.key, r.value) for r in recs], base_offset=0)
    back = decode_records(batch)
    assert [(decode_key(r.key), decode_value(decode_key(r.key), r.value)) for r in back] == [
        (r.typed_key, r.typed_value) for r in recs
    ]


def test_unknown_record_type_and_version_are_named_errors() -> None:
    with pytest.raises(UnknownGroupRecordError):
        decode_key(KEY_GROUP.encode((9, "g")))  # a share-group record: not ours
    with pytest.raises(UnknownGroupRecordError):
        decode_value(ConsumerGroupMetadataKey("g"), VALUE_EPOCH.encode((1, 5)))
    with pytest.raises(UnknownGroupRecordError):
        decode_value(OffsetCommitKey("g", "t", 0), struct.pack(">hq", 5, 1))


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_damaged_bytes_raise_corrupt_group_record_error_and_nothing_else(data: st.DataObject) -> None:
    key = data.draw(keys)
    value = data.draw(values_for(key))
    raw_key = bytearray(encode_key(key))
    raw_value = bytearray(encode_value(value) or b"")
    target = data.draw(st.sampled_from(["key", "value"]))
    buf = raw_key if target == "key" else raw_value
    action = data.draw(st.sampled_from(["truncate", "flip", "append"]))
    if action == "truncate" and buf:
        del buf[data.draw(st.integers(0, len(buf) - 1)) :]
    elif action == "flip" and buf:
        buf[data.draw(st.integers(0, len(buf) - 1))] ^= data.draw(st.integers(1, 255))
    else:
        buf += data.draw(st.binary(min_size=1, max_size=4))
    try:
        k = decode_key(bytes(raw_key))
        decode_value(k, bytes(raw_value))
    except CorruptGroupRecordError:
        pass


# -------------------------------------------------------------------- coordinator partition


@pytest.mark.parametrize(
    ("s", "java_hash"),
    [
        ("", 0),
        ("a", 97),
        ("hello", 99162322),
        ("Hello World", -862545276),
        ("Aa", 2112),
        ("BB", 2112),
        ("polygenelubricants", -(2**31)),  # the classic String whose hashCode is Integer.MIN_VALUE
        ("\U0001f600", 1772899),  # one code point, two UTF-16 code units: 0xD83D*31 + 0xDE00
    ],
)
def test_java_string_hash_matches_java(s: str, java_hash: int) -> None:
    assert java_string_hash(s) == java_hash


def test_coordinator_partition_is_kafkas_utils_abs_hash_mod_n() -> None:
    """Kafka: Utils.abs(groupId.hashCode()) % offsets.topic.num.partitions; Utils.abs(MIN_VALUE) == 0."""
    assert coordinator_partition("hello", 50) == 99162322 % 50
    assert coordinator_partition("Hello World", 16) == 862545276 % 16
    assert coordinator_partition("polygenelubricants", 7) == 0
    with pytest.raises(ValueError):
        coordinator_partition("g", 0)
