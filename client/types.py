"""Value types of the client's public surface (DESIGN.md §9)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, NamedTuple


@dataclass(frozen=True, slots=True, order=True)
class TopicPartition:
    topic: str
    partition: int

    def __str__(self) -> str:
        return f"{self.topic}-{self.partition}"


@dataclass(frozen=True, slots=True)
class NewTopic:
    """A topic to create; -1 means the cluster's default, as in Kafka's NewTopic."""

    name: str
    num_partitions: int = -1
    replication_factor: int = -1
    configs: Mapping[str, str] = field(default_factory=dict)


class RecordMetadata(NamedTuple):
    """Where a produced record landed. ``offset`` is -1 with ``acks=0``.

    A NamedTuple for the reason ConsumerRecord is one: the producer builds one per record (on
    its I/O thread), where a frozen dataclass cost four times as much (kafka-python's is a
    namedtuple too)."""

    topic: str
    partition: int
    offset: int
    timestamp: int

    @property
    def topic_partition(self) -> TopicPartition:
        return TopicPartition(self.topic, self.partition)


class ConsumerRecord(NamedTuple):
    """One consumed record. A NamedTuple because the consumer builds one per record on its
    hot path, where it costs a third of a frozen dataclass (kafka-python's is one too)."""

    topic: str
    partition: int
    offset: int
    timestamp: int
    key: object  # bytes | None, or whatever key_deserializer returns
    value: object
    headers: tuple[tuple[str, bytes | None], ...] = ()

    @property
    def topic_partition(self) -> TopicPartition:
        return TopicPartition(self.topic, self.partition)


@dataclass(frozen=True, slots=True)
class OffsetAndTimestamp:
    """An answer of `offsets_for_times`: the first offset at or after the asked time."""

    offset: int
    timestamp: int


@dataclass(frozen=True, slots=True)
class BrokerNode:
    node_id: int
    host: str
    port: int
    rack: str = ""
    alive: bool = True

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class PartitionInfo:
    partition: int
    leader: int  # -1 while no leader is known
    leader_epoch: int
    replicas: tuple[int, ...]
    in_sync_replicas: tuple[int, ...]
    offline_replicas: tuple[int, ...] = ()
    error: str = ""  # the error name, "" when none


@dataclass(frozen=True, slots=True)
class TopicListing:
    name: str
    internal: bool
    partition_count: int
    replication_factor: int


@dataclass(frozen=True, slots=True)
class TopicDescription:
    name: str
    topic_id: str
    internal: bool
    partitions: tuple[PartitionInfo, ...]
    configs: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class ClusterDescription:
    cluster_id: str
    controller_id: int
    nodes: tuple[BrokerNode, ...]
    controller_voters: tuple[int, ...]
    metadata_epoch: int
    metadata_offset: int


@dataclass(frozen=True, slots=True)
class GroupListing:
    group_id: str
    state: str  # "empty", "assigning", "reconciling", "stable", "dead"
    coordinator_id: int


@dataclass(frozen=True, slots=True)
class GroupMemberDescription:
    member_id: str
    instance_id: str | None
    member_epoch: int
    state: str
    subscribed_topics: tuple[str, ...]
    assignment: tuple[TopicPartition, ...]
    pending_revocation: tuple[TopicPartition, ...]
    target_assignment: tuple[TopicPartition, ...]
    client_id: str = ""
    client_host: str = ""


@dataclass(frozen=True, slots=True)
class GroupOffset:
    """One partition of a described group: its committed offset, the log end and the lag
    (end - committed); None where the group has no commit or the end is unknown."""

    topic: str
    partition: int
    committed: int | None
    end: int | None
    lag: int | None
    member_id: str | None = None  # the member that owns the partition now, if any

    @property
    def topic_partition(self) -> TopicPartition:
        return TopicPartition(self.topic, self.partition)


@dataclass(frozen=True, slots=True)
class GroupDescription:
    group_id: str
    state: str
    group_epoch: int
    assignment_epoch: int
    assignor: str
    coordinator_id: int
    members: tuple[GroupMemberDescription, ...]
    offsets: tuple[GroupOffset, ...]
