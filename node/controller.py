"""The controller: validates admin requests against the metadata image and commits records.

The controller turns a request into metadata records (or a per-topic error) and hands them to
the commit step. For a cluster of one the commit step is `LocalMetadataLog`: append to the
`__cluster_metadata-0` log, fsync, fold. The replicated metadata quorum replaces exactly that
step (propose to the Raft group, fold once committed); validation and record generation stay.
Decisions are serialised by one lock so each is validated against the image it commits onto.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterable, Mapping, Sequence

from tidelog.node.config import (
    METADATA_TOPIC,
    ConfigError,
    NodeConfig,
    is_internal_topic,
    topic_name_error,
    validate_topic_config,
)
from tidelog.node.metadata import (
    AlterConfig,
    AssignPartition,
    ClusterCreated,
    CreateTopic,
    DeleteTopic,
    MetadataImage,
    MetadataRecord,
    RegisterNode,
    assign_replicas,
    decode_records_batches,
    encode_records_batch,
    fold,
)
from tidelog.node.partitions import LOCAL_LEADER_EPOCH, _value, open_log
from tidelog.proto import api_pb2
from tidelog.proto.common_pb2 import ErrorCode

log = logging.getLogger(__name__)

_READ_CHUNK = 1 << 20


class LocalMetadataLog:
    """The metadata log of a cluster of one: committed once appended and fsynced here."""

    def __init__(self, data_dir: Path, topic_config_defaults: Mapping[str, str]) -> None:
        self.directory = data_dir / f"{METADATA_TOPIC}-0"
        self.directory.mkdir(parents=True, exist_ok=True)
        self._log = open_log(self.directory, topic_config_defaults)

    def replay(self) -> list[tuple[int, MetadataRecord]]:
        records: list[tuple[int, MetadataRecord]] = []
        offset = _value(self._log.log_start_offset)
        end = _value(self._log.end_offset)
        while offset < end:
            data = self._log.read(offset, _READ_CHUNK)
            data = getattr(data, "data", data)
            decoded = decode_records_batches(bytes(data))
            if not decoded:
                break
            records.extend(r for r in decoded if r[0] >= offset)
            offset = max(offset + 1, decoded[-1][0] + 1)
        return records

    async def commit(self, records: Sequence[MetadataRecord]) -> list[tuple[int, MetadataRecord]]:
        batch = bytearray(encode_records_batch(records, int(time.time() * 1000)))
        result = self._log.append(batch, LOCAL_LEADER_EPOCH)
        await asyncio.to_thread(self._log.flush)
        base = int(result.base_offset)
        return [(base + i, record) for i, record in enumerate(records)]

    @property
    def epoch(self) -> int:
        return LOCAL_LEADER_EPOCH

    def close(self) -> None:
        self._log.close()


def _result(name: str, code: int = ErrorCode.NONE, message: str = "") -> api_pb2.TopicResult:
    return api_pb2.TopicResult(name=name, error=code, error_message=message)


class Controller:
    def __init__(self, config: NodeConfig, metadata_log: LocalMetadataLog,
                 on_image: Callable[[MetadataImage], Awaitable[None]]) -> None:
        self.config = config
        self.metadata_log = metadata_log
        self.on_image = on_image
        self.image = MetadataImage()
        self.incarnation_id = uuid.uuid4().hex
        self._lock = asyncio.Lock()

    @property
    def controller_id(self) -> int:
        return self.config.node_id

    async def start(self) -> None:
        self.image = fold(MetadataImage(epoch=self.metadata_log.epoch), self.metadata_log.replay())
        if not self.image.cluster_id:
            cluster_id = self.config.cluster_id or uuid.uuid4().hex
            await self._commit([ClusterCreated(cluster_id)])
        address = self.config.advertised_address
        await self._commit([RegisterNode(self.config.node_id, address.host, address.port, "",
                                         self.incarnation_id)])

    async def _commit(self, records: Sequence[MetadataRecord]) -> None:
        if not records:
            return
        committed = await self.metadata_log.commit(records)
        self.image = fold(self.image, committed)
        await self.on_image(self.image)

    def live_node_ids(self) -> list[int]:
        # A cluster of one knows only itself is alive; liveness leases come with the quorum.
        return [self.config.node_id] if self.config.node_id in self.image.nodes else []

    def _leader_counts(self, image: MetadataImage) -> dict[int, int]:
        counts: dict[int, int] = {}
        for topic in image.topics.values():
            for partition in topic.partitions:
                counts[partition.preferred_leader] = counts.get(partition.preferred_leader, 0) + 1
        return counts

    def _validate_configs(self, configs: Mapping[str, str]) -> dict[str, str]:
        return {key: validate_topic_config(key, value) for key, value in configs.items()}

    # --- admin operations -----------------------------------------------------------------

    async def create_topics(self, topics: Iterable[api_pb2.NewTopic], validate_only: bool
                            ) -> list[api_pb2.TopicResult]:
        async with self._lock:
            results: list[api_pb2.TopicResult] = []
            records: list[MetadataRecord] = []
            image = self.image
            pending: dict[str, str] = {}  # names created earlier in this request
            counts = self._leader_counts(image)
            for new in topics:
                name = new.name
                error = topic_name_error(name)
                if error is None and name == METADATA_TOPIC:
                    error = f"{METADATA_TOPIC} is reserved for the metadata quorum"
                if error is not None:
                    results.append(_result(name, ErrorCode.INVALID_TOPIC_EXCEPTION, error))
                    continue
                if name in image.topics or name in pending:
                    results.append(_result(name, ErrorCode.TOPIC_ALREADY_EXISTS, f"topic {name!r} already exists"))
                    continue
                collision = next((t for t in [*image.topics, *pending]
                                  if t.replace(".", "_") == name.replace(".", "_")), None)
                if collision is not None:
                    results.append(_result(name, ErrorCode.INVALID_TOPIC_EXCEPTION,
                                           f"topic {name!r} collides with {collision!r} ('.' and '_' "
                                           "are interchangeable in metric names)"))
                    continue
                num_partitions = self.config.default_partitions if new.num_partitions == -1 else new.num_partitions
                if num_partitions <= 0:
                    results.append(_result(name, ErrorCode.INVALID_PARTITIONS,
                                           f"num_partitions must be positive or -1, got {new.num_partitions}"))
                    continue
                live = self.live_node_ids()
                factor = (min(self.config.default_replication_factor, len(live))
                          if new.replication_factor == -1 else new.replication_factor)
                if factor <= 0 or factor > len(live):
                    results.append(_result(
                        name, ErrorCode.INVALID_REPLICATION_FACTOR,
                        f"replication factor {new.replication_factor} must be between 1 and the "
                        f"{len(live)} live node(s)"))
                    continue
                try:
                    configs = self._validate_configs(dict(new.configs))
                except ConfigError as exc:
                    results.append(_result(name, ErrorCode.INVALID_CONFIG, str(exc)))
                    continue
                results.append(_result(name))
                if validate_only:
                    continue
                topic_id = uuid.uuid4().hex
                pending[name] = topic_id
                records.append(CreateTopic(name, topic_id, tuple(sorted(configs.items()))))
                replicas = assign_replicas(live, range(num_partitions), factor, counts)
                for index, replica_list in enumerate(replicas):
                    records.append(AssignPartition(name, topic_id, index, replica_list))
                    counts[replica_list[0]] = counts.get(replica_list[0], 0) + 1
            await self._commit(records)
            return results

    async def delete_topics(self, names: Iterable[str]) -> list[api_pb2.TopicResult]:
        async with self._lock:
            results = []
            records: list[MetadataRecord] = []
            deleting: set[str] = set()
            for name in names:
                topic = self.image.topics.get(name)
                if topic is None or name in deleting:
                    results.append(_result(name, ErrorCode.UNKNOWN_TOPIC_OR_PARTITION, f"no topic {name!r}"))
                    continue
                if is_internal_topic(name):
                    results.append(_result(name, ErrorCode.INVALID_REQUEST,
                                           f"{name!r} is an internal topic and cannot be deleted"))
                    continue
                deleting.add(name)
                records.append(DeleteTopic(name, topic.topic_id))
                results.append(_result(name))
            await self._commit(records)
            return results

    async def alter_configs(self, name: str, set_: Mapping[str, str], delete: Sequence[str],
                            validate_only: bool) -> api_pb2.TopicResult:
        async with self._lock:
            if self.image.topics.get(name) is None:
                return _result(name, ErrorCode.UNKNOWN_TOPIC_OR_PARTITION, f"no topic {name!r}")
            try:
                configs = self._validate_configs(set_)
                for key in delete:
                    validate_topic_config(key, self.config.topic_config_defaults.get(key, ""))
            except ConfigError as exc:
                return _result(name, ErrorCode.INVALID_CONFIG, str(exc))
            overlap = set(configs) & set(delete)
            if overlap:
                return _result(name, ErrorCode.INVALID_CONFIG,
                               f"config(s) both set and deleted: {', '.join(sorted(overlap))}")
            if not validate_only:
                await self._commit([AlterConfig(name, tuple(sorted(configs.items())), tuple(delete))])
            return _result(name)

    async def create_partitions(self, name: str, new_total: int, validate_only: bool) -> api_pb2.TopicResult:
        async with self._lock:
            topic = self.image.topics.get(name)
            if topic is None:
                return _result(name, ErrorCode.UNKNOWN_TOPIC_OR_PARTITION, f"no topic {name!r}")
            current = len(topic.partitions)
            if new_total <= current:
                return _result(name, ErrorCode.INVALID_PARTITIONS,
                               f"topic {name!r} has {current} partitions; the new count must be larger, "
                               f"got {new_total}")
            live = self.live_node_ids()
            factor = topic.replication_factor
            if factor > len(live):
                return _result(name, ErrorCode.INVALID_REPLICATION_FACTOR,
                               f"replication factor {factor} exceeds the {len(live)} live node(s)")
            if validate_only:
                return _result(name)
            replicas = assign_replicas(live, range(current, new_total), factor, self._leader_counts(self.image))
            await self._commit([AssignPartition(name, topic.topic_id, current + i, r)
                                for i, r in enumerate(replicas)])
            return _result(name)

    def describe(self) -> dict[str, Any]:
        return {"controller_id": self.controller_id, "voters": [v.node_id for v in self.config.voters]}
