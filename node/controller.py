"""The controller: validates admin requests against the metadata image and commits records.

The controller turns a request into metadata records (or a per-topic error) and commits them
through the `__cluster_metadata` Raft group (`MetadataQuorum`); every node folds the committed
records into its image. Decisions are serialised by one lock, and each waits until the leader
has applied everything committed before it, so each is validated against the image it commits
onto. The fold itself is defensive too (a CreateTopic for an existing name, or an assignment
for another topic id, is a no-op), so even a stale decision cannot corrupt the image.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from types import MappingProxyType

from tidelog.node.config import (
    CONSUMER_OFFSETS_TOPIC,
    METADATA_TOPIC,
    TOPIC_CONFIG_DEFAULTS,
    ConfigError,
    FlushPolicy,
    NodeConfig,
    is_internal_topic,
    topic_name_error,
    validate_topic_config,
)
from tidelog.node.metadata import (
    AllocateProducerIds,
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
from tidelog.node.partitions import open_log
from tidelog.node.replica import NotLeader, Replica, ReplicaClosed
from tidelog.proto import api_pb2
from tidelog.proto.common_pb2 import ErrorCode
from tidelog.proto.records import scan_batches
from tidelog.replication.messages import BeginQuorumEpoch, Message

log = logging.getLogger(__name__)

_READ_CHUNK = 1 << 20
METADATA_GROUP_ID = f"{METADATA_TOPIC}-0"
ADMIN_TIMEOUT_S = 10.0


# Producer ids a controller reserves per metadata record (Kafka's ProducerIdsBlock is 1000 too).
PRODUCER_ID_BLOCK_SIZE = 1000
# Kafka's settings for its offsets topic: compacted, with small segments so that compaction (and
# so a new coordinator's replay) keeps up. No time or size retention: deleting old segments would
# drop the latest value of keys not written since (an idle group's offsets and members).
OFFSETS_TOPIC_CONFIGS: Mapping[str, str] = MappingProxyType({"cleanup.policy": "compact",
                                                              "segment.bytes": "104857600",
                                                              "retention.ms": "-1",
                                                              "retention.bytes": "-1"})


class NotController(Exception):
    def __init__(self, leader_id: int | None) -> None:
        super().__init__(f"this node is not the controller (controller: {leader_id})")
        self.leader_id = leader_id


class MetadataQuorum:
    """The `__cluster_metadata` Raft group over the controller voters, and its applied image.

    Every node replicates the log (voters vote); committed records are folded, in order, into
    the image, and ``on_image`` runs after each change. The leader is the controller: `commit`
    proposes a batch of records and returns once they are committed and folded here.
    """

    def __init__(self, config: NodeConfig, send: Callable[[list[Message]], None],
                 on_image: Callable[[MetadataImage], Awaitable[None]],
                 on_role_change: Callable[[], None]) -> None:
        self.config = config
        self.directory = config.data_dir / f"{METADATA_TOPIC}-0"
        self._send = send
        self._on_image = on_image
        self._on_role_change = on_role_change
        self.image = MetadataImage()
        self.replica: Replica | None = None
        self._applied = 0
        self._image_changed = asyncio.Event()
        self._publish_lock = asyncio.Lock()

    async def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        storage = await asyncio.to_thread(open_log, self.directory, TOPIC_CONFIG_DEFAULTS)
        self._applied = storage.log_start_offset
        voters = tuple(v.node_id for v in self.config.voters)
        self.replica = Replica(
            METADATA_GROUP_ID, self.config.node_id, voters, self.directory,
            storage, self._send, FlushPolicy.ALWAYS, self.config.election_timeout_ms,
            on_role_change=lambda _: self._role_changed(), on_high_watermark=lambda _: self._apply_committed(),
            campaign_now=self.config.node_id == min(voters),
            observers=() if self.is_voter else (self.config.node_id,))

    @property
    def is_voter(self) -> bool:
        return self.config.node_id in {v.node_id for v in self.config.voters}

    def observe_leader(self, leader_id: int, epoch: int) -> None:
        """An observer learns the leader from a voter (it gets no BeginQuorumEpoch: the leader
        does not know it yet) and starts fetching; a stale epoch is corrected by the answer."""
        replica = self.replica
        if replica is None or self.is_voter or replica.closed or leader_id == self.config.node_id:
            return
        replica.receive(BeginQuorumEpoch(METADATA_GROUP_ID, leader_id, self.config.node_id, epoch))

    @property
    def is_leader(self) -> bool:
        return self.replica is not None and self.replica.is_leader

    @property
    def leader_id(self) -> int | None:
        return self.replica.leader_id if self.replica is not None else None

    def _role_changed(self) -> None:
        self._image_changed.set()
        self._on_role_change()

    def _apply_committed(self) -> None:
        replica = self.replica
        assert replica is not None
        high_watermark = replica.high_watermark
        records: list[tuple[int, MetadataRecord]] = []
        offset = self._applied
        while offset < high_watermark:
            data = replica.storage.read(offset, _READ_CHUNK)
            if not data:
                break
            for header in scan_batches(data, verify_crc=False):
                if header.next_offset > high_watermark:
                    break
                chunk = data[header.position:header.position + header.size]
                try:
                    records.extend(decode_records_batches(chunk))
                except Exception:
                    log.exception("undecodable metadata batch at offset %d skipped", header.base_offset)
                offset = header.next_offset
            else:
                continue
            break
        self._applied = offset
        image = fold(self.image, records)
        self.image = replace(image, offset=offset, epoch=replica.epoch)
        self._image_changed.set()
        asyncio.get_running_loop().create_task(self._publish())

    async def _publish(self) -> None:
        async with self._publish_lock:
            image = self.image
            try:
                await self._on_image(image)
            except Exception:
                log.exception("applying metadata image at offset %d failed", image.offset)

    async def wait_image_change(self, timeout: float) -> None:
        self._image_changed.clear()
        try:
            await asyncio.wait_for(self._image_changed.wait(), timeout)
        except TimeoutError:
            pass

    async def wait_leader_caught_up(self, timeout: float) -> None:
        """Wait until this node leads and has applied everything committed before its epoch."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            replica = self.replica
            if replica is not None and replica.is_leader and replica.high_watermark > 0 \
                    and self._applied >= replica.high_watermark:
                return
            remaining = deadline - loop.time()
            if remaining <= 0 or (replica is not None and not replica.is_leader and replica.leader_id is not None):
                raise NotController(self.leader_id)
            await self.wait_image_change(min(remaining, 0.1))

    async def commit(self, records: Sequence[MetadataRecord], timeout: float = 10.0) -> None:
        if not records:
            return
        replica = self.replica
        if replica is None or not replica.is_leader:
            raise NotController(self.leader_id)
        batch = encode_records_batch(records, int(time.time() * 1000))
        try:
            proposal, committed = replica.propose(batch)
            await asyncio.wait_for(committed, timeout)
        except (NotLeader, ReplicaClosed):
            raise NotController(self.leader_id) from None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self._applied <= proposal.last_offset:
            if loop.time() > deadline:
                raise TimeoutError()
            await self.wait_image_change(0.05)

    async def close(self) -> None:
        if self.replica is not None:
            await self.replica.close()


def _result(name: str, code: int = ErrorCode.NONE, message: str = "") -> api_pb2.TopicResult:
    return api_pb2.TopicResult(name=name, error=code, error_message=message)


class Controller:
    """Admin operations, run on the controller leader (the metadata quorum's leader)."""

    def __init__(self, config: NodeConfig, quorum: MetadataQuorum, alive: Callable[[int], bool]) -> None:
        self.config = config
        self.quorum = quorum
        self._alive = alive
        self._lock = asyncio.Lock()
        # Producer ids [next, end) of the block this node reserved and has not handed out yet.
        self._producer_ids = (0, 0)

    @property
    def image(self) -> MetadataImage:
        return self.quorum.image

    @property
    def controller_id(self) -> int:
        leader = self.quorum.leader_id
        return leader if leader is not None else -1

    async def _commit(self, records: Sequence[MetadataRecord]) -> None:
        await self.quorum.commit(records)

    async def ensure_cluster_created(self) -> None:
        async with self._lock:
            await self.quorum.wait_leader_caught_up(ADMIN_TIMEOUT_S)
            if not self.image.cluster_id:
                await self._commit([ClusterCreated(self.config.cluster_id or uuid.uuid4().hex)])

    async def register(self, registration: RegisterNode) -> None:
        async with self._lock:
            await self.quorum.wait_leader_caught_up(ADMIN_TIMEOUT_S)
            current = self.image.nodes.get(registration.node_id)
            if current is None or (current.host, current.port, current.rack, current.incarnation_id) != (
                    registration.host, registration.port, registration.rack, registration.incarnation_id):
                await self._commit([registration])

    async def allocate_producer_id(self) -> int:
        """A producer id no one has had: out of this node's block, reserving a new block through
        the metadata log (committed before any of its ids is handed out) when it is used up."""
        async with self._lock:
            next_id, end = self._producer_ids
            if next_id >= end:
                await self.quorum.wait_leader_caught_up(ADMIN_TIMEOUT_S)
                first = self.image.next_producer_id
                await self._commit([AllocateProducerIds(self.config.node_id, first, PRODUCER_ID_BLOCK_SIZE)])
                next_id, end = first, first + PRODUCER_ID_BLOCK_SIZE
            self._producer_ids = (next_id + 1, end)
            return next_id

    def offsets_topic_replication_factor(self) -> int:
        """min(offsets_topic_replication_factor, the nodes the cluster knows).

        Known nodes are the registered ones and the controller voters, so a cluster whose
        first group request arrives before every voter has registered still gets the full
        factor (creation then waits, with a retriable error, until enough nodes are alive),
        not an offsets topic with fewer replicas for ever.
        """
        known = set(self.image.nodes) | {v.node_id for v in self.config.voters}
        return max(1, min(self.config.offsets_topic_replication_factor, len(known)))

    def live_node_ids(self) -> list[int]:
        return sorted(n for n in self.image.nodes if self._alive(n))

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
            await self.quorum.wait_leader_caught_up(ADMIN_TIMEOUT_S)
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
                live = self.live_node_ids()
                default_partitions = self.config.default_partitions
                default_factor = min(self.config.default_replication_factor, len(live))
                requested_configs = dict(new.configs)
                if name == CONSUMER_OFFSETS_TOPIC:
                    # Created by the first group request on any node (GroupHost): the cluster's
                    # offsets-topic settings, unless an operator creating it says otherwise.
                    default_partitions = self.config.offsets_topic_num_partitions
                    default_factor = self.offsets_topic_replication_factor()
                    requested_configs = {**OFFSETS_TOPIC_CONFIGS, **requested_configs}
                num_partitions = default_partitions if new.num_partitions == -1 else new.num_partitions
                if num_partitions <= 0:
                    results.append(_result(name, ErrorCode.INVALID_PARTITIONS,
                                           f"num_partitions must be positive or -1, got {new.num_partitions}"))
                    continue
                factor = default_factor if new.replication_factor == -1 else new.replication_factor
                if factor <= 0 or factor > len(live):
                    results.append(_result(
                        name, ErrorCode.INVALID_REPLICATION_FACTOR,
                        f"replication factor {new.replication_factor} must be between 1 and the "
                        f"{len(live)} live node(s)"))
                    continue
                try:
                    configs = self._validate_configs(requested_configs)
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
            await self.quorum.wait_leader_caught_up(ADMIN_TIMEOUT_S)
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
            await self.quorum.wait_leader_caught_up(ADMIN_TIMEOUT_S)
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
            await self.quorum.wait_leader_caught_up(ADMIN_TIMEOUT_S)
            topic = self.image.topics.get(name)
            if topic is None:
                return _result(name, ErrorCode.UNKNOWN_TOPIC_OR_PARTITION, f"no topic {name!r}")
            if name == CONSUMER_OFFSETS_TOPIC:
                # hash(group) mod N places every group: a new N would strand their offsets.
                return _result(name, ErrorCode.INVALID_REQUEST,
                               f"the partition count of {name} decides which partition holds each group; "
                               "it cannot change")
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

