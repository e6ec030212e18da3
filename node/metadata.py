"""Cluster metadata: records, and the immutable image they fold into (DESIGN.md §5).

The metadata log is a sequence of small records (RegisterNode, CreateTopic, AssignPartition,
...). Every node folds the committed records, in order, into a `MetadataImage`; everything that
serves requests reads one image and never sees a half-applied change. The records are stored in
the `__cluster_metadata` partition as Kafka record batches whose record key is the record type and
whose value is JSON: one batch per controller decision, so a topic and its partition assignments
commit together or not at all.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from types import MappingProxyType
from typing import Any, Union

from tidelog.proto import records as codec


@dataclass(frozen=True, slots=True)
class ClusterCreated:
    cluster_id: str


@dataclass(frozen=True, slots=True)
class RegisterNode:
    node_id: int
    host: str
    port: int
    rack: str
    # A fresh id every time the process starts, so a restarted node is told apart from a zombie.
    incarnation_id: str


@dataclass(frozen=True, slots=True)
class CreateTopic:
    name: str
    topic_id: str
    configs: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class AssignPartition:
    topic: str
    topic_id: str
    partition: int
    replicas: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class DeleteTopic:
    name: str
    topic_id: str


@dataclass(frozen=True, slots=True)
class AlterConfig:
    topic: str
    set: tuple[tuple[str, str], ...] = ()
    delete: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class AllocateProducerIds:
    """Producer ids [first_id, first_id + count) reserved for ``node_id`` to hand out locally.

    Blocks are committed before any id of them is handed out and never reused, so ids are unique
    across the cluster and across restarts; a block a node does not use up is simply skipped.
    """

    node_id: int
    first_id: int
    count: int


MetadataRecord = Union[ClusterCreated, RegisterNode, CreateTopic, AssignPartition, DeleteTopic, AlterConfig,
                       AllocateProducerIds]
RECORD_TYPES: Mapping[str, type] = MappingProxyType(
    {cls.__name__: cls for cls in (ClusterCreated, RegisterNode, CreateTopic, AssignPartition, DeleteTopic,
                                   AlterConfig, AllocateProducerIds)}
)


class MetadataDecodeError(ValueError):
    pass


def encode_record(record: MetadataRecord) -> tuple[bytes, bytes]:
    """(key, value) of the log record holding ``record``."""
    return type(record).__name__.encode(), json.dumps(asdict(record), separators=(",", ":")).encode()


def _tuples(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_tuples(item) for item in value)
    return value


def decode_record(key: bytes | None, value: bytes | None) -> MetadataRecord:
    name = (key or b"").decode()
    cls = RECORD_TYPES.get(name)
    if cls is None or value is None:
        raise MetadataDecodeError(f"unknown metadata record type {name!r}")
    raw = json.loads(value)
    try:
        return cls(**{f.name: _tuples(raw[f.name]) for f in fields(cls)})
    except KeyError as exc:
        raise MetadataDecodeError(f"{name} record lacks field {exc}") from None


def encode_records_batch(records: Iterable[MetadataRecord], timestamp_ms: int) -> bytes:
    entries = [codec.Record(offset=i, timestamp=timestamp_ms, key=k, value=v)
               for i, (k, v) in enumerate(encode_record(r) for r in records)]
    return codec.encode_batch(entries)


def decode_records_batches(buf: bytes | memoryview) -> list[tuple[int, MetadataRecord]]:
    """(offset, record) of every non-control record in ``buf``."""
    out: list[tuple[int, MetadataRecord]] = []
    for batch in codec.decode_batches(buf):
        if batch.is_control:
            continue
        for record in batch.records():
            out.append((record.offset, decode_record(record.key, record.value)))
    return out


# --- the image ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NodeRegistration:
    node_id: int
    host: str
    port: int
    rack: str
    incarnation_id: str


@dataclass(frozen=True, slots=True)
class PartitionImage:
    partition: int
    replicas: tuple[int, ...]

    @property
    def preferred_leader(self) -> int:
        return self.replicas[0] if self.replicas else -1


@dataclass(frozen=True, slots=True)
class TopicImage:
    name: str
    topic_id: str
    configs: Mapping[str, str]  # overrides only; defaults are the cluster's
    partitions: tuple[PartitionImage, ...] = ()

    @property
    def replication_factor(self) -> int:
        return len(self.partitions[0].replicas) if self.partitions else 0

    @property
    def internal(self) -> bool:
        return self.name.startswith("__")


def _frozen(mapping: Mapping[Any, Any]) -> Mapping[Any, Any]:
    return MappingProxyType(dict(mapping))


@dataclass(frozen=True, slots=True)
class MetadataImage:
    cluster_id: str = ""
    nodes: Mapping[int, NodeRegistration] = field(default_factory=lambda: MappingProxyType({}))
    topics: Mapping[str, TopicImage] = field(default_factory=lambda: MappingProxyType({}))
    # The offset after the last record folded in, and the epoch of the metadata quorum.
    offset: int = 0
    epoch: int = 0
    # The first producer id no AllocateProducerIds record has reserved yet.
    next_producer_id: int = 0

    def topic(self, name: str) -> TopicImage | None:
        return self.topics.get(name)

    def partition(self, topic: str, partition: int) -> PartitionImage | None:
        image = self.topics.get(topic)
        if image is None or not 0 <= partition < len(image.partitions):
            return None
        return image.partitions[partition]

    def apply(self, record: MetadataRecord, offset: int) -> MetadataImage:
        """The image after ``record`` (at log ``offset``); records that no longer apply are no-ops."""
        image = replace(self, offset=offset + 1)
        if isinstance(record, ClusterCreated):
            return replace(image, cluster_id=image.cluster_id or record.cluster_id)
        if isinstance(record, RegisterNode):
            nodes = dict(self.nodes)
            nodes[record.node_id] = NodeRegistration(
                record.node_id, record.host, record.port, record.rack, record.incarnation_id)
            return replace(image, nodes=_frozen(nodes))
        if isinstance(record, CreateTopic):
            if record.name in self.topics:
                return image
            topics = dict(self.topics)
            topics[record.name] = TopicImage(record.name, record.topic_id, _frozen(dict(record.configs)))
            return replace(image, topics=_frozen(topics))
        if isinstance(record, AssignPartition):
            topic = self.topics.get(record.topic)
            if topic is None or topic.topic_id != record.topic_id:
                return image
            partitions = list(topic.partitions)
            assignment = PartitionImage(record.partition, tuple(record.replicas))
            if record.partition < len(partitions):
                partitions[record.partition] = assignment
            elif record.partition == len(partitions):
                partitions.append(assignment)
            else:
                return image  # partitions are created in order; a gap means a bad record
            topics = dict(self.topics)
            topics[record.topic] = replace(topic, partitions=tuple(partitions))
            return replace(image, topics=_frozen(topics))
        if isinstance(record, DeleteTopic):
            topic = self.topics.get(record.name)
            if topic is None or topic.topic_id != record.topic_id:
                return image
            topics = dict(self.topics)
            del topics[record.name]
            return replace(image, topics=_frozen(topics))
        if isinstance(record, AlterConfig):
            topic = self.topics.get(record.topic)
            if topic is None:
                return image
            configs = dict(topic.configs)
            configs.update(dict(record.set))
            for key in record.delete:
                configs.pop(key, None)
            topics = dict(self.topics)
            topics[record.topic] = replace(topic, configs=_frozen(configs))
            return replace(image, topics=_frozen(topics))
        if isinstance(record, AllocateProducerIds):
            return replace(image, next_producer_id=max(self.next_producer_id, record.first_id + record.count))
        raise TypeError(f"not a metadata record: {record!r}")


def fold(image: MetadataImage, records: Iterable[tuple[int, MetadataRecord]]) -> MetadataImage:
    for offset, record in records:
        image = image.apply(record, offset)
    return image


def assign_replicas(
    node_ids: Iterable[int],
    partitions: range,
    replication_factor: int,
    existing_leader_counts: Mapping[int, int],
) -> list[tuple[int, ...]]:
    """Replica lists for ``partitions``, spreading leaders and replicas evenly.

    Round-robin over the sorted node ids, starting each new topic at the node that currently
    leads the fewest partitions, so many small topics do not all put their leader on node 1.
    """
    nodes = sorted(node_ids)
    if replication_factor > len(nodes):
        raise ValueError("replication factor above node count")
    start = min(range(len(nodes)), key=lambda i: (existing_leader_counts.get(nodes[i], 0), i))
    out = []
    for index, _ in enumerate(partitions):
        first = (start + index) % len(nodes)
        out.append(tuple(nodes[(first + j) % len(nodes)] for j in range(replication_factor)))
    return out
