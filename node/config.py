"""Node configuration: a TOML file plus command-line flags (DESIGN.md §9).

Every key, its default and its meaning is in `NODE_KEYS` and `TOPIC_CONFIG_DEFAULTS`; the
`tidelog node start --help` text and docs are generated from them, so they cannot drift.
Flags win over the file; the file wins over defaults.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

DEFAULT_PORT = 9192
METADATA_TOPIC = "__cluster_metadata"
CONSUMER_OFFSETS_TOPIC = "__consumer_offsets"
MAX_TOPIC_NAME_LENGTH = 249
_TOPIC_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


class ConfigError(ValueError):
    """A configuration value that cannot be used; the message says which key and why."""


@dataclass(frozen=True, slots=True)
class Address:
    host: str
    port: int

    @classmethod
    def parse(cls, text: str, *, what: str = "address") -> Address:
        host, sep, port = text.strip().rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ConfigError(f"{what} must be HOST:PORT, got {text!r}")
        return cls(host.strip("[]"), int(port))

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Voter:
    node_id: int
    address: Address


def parse_voters(text: str) -> tuple[Voter, ...]:
    """``"1@host:port,2@host:port"`` → voters, in the given order, ids unique."""
    voters: list[Voter] = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        node_id, sep, address = item.partition("@")
        if not sep or not node_id.strip().lstrip("-").isdigit():
            raise ConfigError(f"controller voter must be ID@HOST:PORT, got {item!r}")
        voters.append(Voter(int(node_id), Address.parse(address, what="controller voter address")))
    ids = [voter.node_id for voter in voters]
    if len(set(ids)) != len(ids):
        raise ConfigError(f"controller voter ids must be unique, got {text!r}")
    return tuple(voters)


def format_voters(voters: tuple[Voter, ...]) -> str:
    return ",".join(f"{voter.node_id}@{voter.address}" for voter in voters)


# --- topic configs (Kafka's names and meanings) ---------------------------------------------


@dataclass(frozen=True, slots=True)
class TopicConfigKey:
    name: str
    default: str
    kind: str  # "int", "long", "enum", "ratio" (a number in [0, 1])
    doc: str
    minimum: int | None = None
    choices: tuple[str, ...] = ()


_TOPIC_KEYS: tuple[TopicConfigKey, ...] = (
    TopicConfigKey("cleanup.policy", "delete", "enum",
                   "delete: drop whole old segments by retention; compact: keep the latest record per key",
                   choices=("delete", "compact", "compact,delete", "delete,compact")),
    TopicConfigKey("retention.ms", "604800000", "long",
                   "delete segments whose newest record is older than this (-1: keep forever)", minimum=-1),
    TopicConfigKey("retention.bytes", "-1", "long",
                   "delete the oldest segments while a partition is larger than this (-1: no limit)",
                   minimum=-1),
    TopicConfigKey("segment.bytes", "1073741824", "int", "roll a new segment at this size", minimum=14),
    TopicConfigKey("segment.ms", "604800000", "long", "roll a new segment after this age", minimum=1),
    TopicConfigKey("max.message.bytes", "1048588", "int",
                   "the largest record batch a producer may send to this topic", minimum=0),
    TopicConfigKey("index.interval.bytes", "4096", "int",
                   "bytes between two entries of the sparse offset index", minimum=0),
    TopicConfigKey("delete.retention.ms", "86400000", "long",
                   "how long compaction keeps tombstones", minimum=0),
    TopicConfigKey("min.cleanable.dirty.ratio", "0.5", "ratio",
                   "compact a partition once the not yet compacted part is at least this share of "
                   "its compactable bytes (0 to 1)"),
)
TOPIC_CONFIG_KEYS: Mapping[str, TopicConfigKey] = MappingProxyType({k.name: k for k in _TOPIC_KEYS})
TOPIC_CONFIG_DEFAULTS: Mapping[str, str] = MappingProxyType({k.name: k.default for k in _TOPIC_KEYS})


def validate_topic_config(name: str, value: str) -> str:
    """The normalised value, or ConfigError saying what is wrong."""
    key = TOPIC_CONFIG_KEYS.get(name)
    if key is None:
        raise ConfigError(f"unknown topic config {name!r}; known: {', '.join(TOPIC_CONFIG_KEYS)}")
    value = str(value).strip()
    if key.kind == "ratio":
        try:
            ratio = float(value)
        except ValueError:
            raise ConfigError(f"{name} must be a number, got {value!r}") from None
        if not 0.0 <= ratio <= 1.0:
            raise ConfigError(f"{name} must be between 0 and 1, got {value!r}")
        return repr(ratio)
    if key.kind == "enum":
        normalised = value.replace(" ", "")
        if normalised not in key.choices:
            raise ConfigError(f"{name} must be one of {', '.join(key.choices)}, got {value!r}")
        return normalised
    try:
        number = int(value)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {value!r}") from None
    if key.minimum is not None and number < key.minimum:
        raise ConfigError(f"{name} must be at least {key.minimum}, got {number}")
    if key.kind == "int" and number > 2**31 - 1:
        raise ConfigError(f"{name} must fit in 32 bits, got {number}")
    return str(number)


def effective_topic_configs(overrides: Mapping[str, str], defaults: Mapping[str, str]) -> dict[str, str]:
    merged = dict(defaults)
    merged.update(overrides)
    return merged


def topic_name_error(name: str) -> str | None:
    """Why ``name`` is not a valid topic name (Kafka's rules), or None."""
    if not name:
        return "topic name is empty"
    if len(name) > MAX_TOPIC_NAME_LENGTH:
        return f"topic name is {len(name)} characters long; the limit is {MAX_TOPIC_NAME_LENGTH}"
    if name in (".", ".."):
        return f"topic name cannot be {name!r}"
    bad = sorted(set(name) - _TOPIC_NAME_CHARS)
    if bad:
        return f"topic name {name!r} has characters outside [a-zA-Z0-9._-]: {''.join(bad)!r}"
    return None


def is_internal_topic(name: str) -> bool:
    return name.startswith("__")


# --- node configuration ---------------------------------------------------------------------


class FlushPolicy:
    ALWAYS = "always"
    INTERVAL = "interval"
    CHOICES = (ALWAYS, INTERVAL)


@dataclass(frozen=True, slots=True)
class NodeKey:
    name: str
    default: Any
    doc: str


# The TOML keys of a node config file, with their defaults (None = required or derived).
NODE_KEYS: tuple[NodeKey, ...] = (
    NodeKey("node_id", None, "this node's id, an integer >= 0 unique in the cluster (required)"),
    NodeKey("listen", f"127.0.0.1:{DEFAULT_PORT}", "HOST:PORT the gRPC server binds"),
    NodeKey("advertised", None, "HOST:PORT clients and other nodes use to reach this node (default: listen)"),
    NodeKey("data_dir", None, "directory for partitions and metadata (required)"),
    NodeKey("controller_voters", None,
            "the metadata quorum as ID@HOST:PORT,... (default: this node alone)"),
    NodeKey("cluster_id", None, "cluster id written when the metadata log is created (default: random)"),
    NodeKey("flush", FlushPolicy.ALWAYS,
            "always: fsync appended data before it counts as committed (group commit); "
            "interval: fsync every flush_interval_ms, so a crash of every replica can lose the "
            "last interval of acknowledged records"),
    NodeKey("flush_interval_ms", 1000, "fsync period with flush = interval"),
    NodeKey("default_partitions", 1, "partitions of a topic created with num_partitions -1"),
    NodeKey("default_replication_factor", 1,
            "replication factor of a topic created with replication_factor -1 (capped at the node count)"),
    NodeKey("max_request_bytes", 104857600, "largest gRPC message the node accepts or sends"),
    NodeKey("fetch_max_wait_ms_limit", 30000, "cap on a Fetch's max_wait_ms"),
    NodeKey("election_timeout_ms", 1000,
            "Raft election timeout T of multi-replica groups (KRaft's default; the metadata quorum "
            "detects a silent leader after 2T). A crashed leader's node refuses connections and is "
            "replaced within a few round trips instead"),
    NodeKey("replica_fetch_max_wait_ms", 2000,
            "long-poll of partition replica fetches; an idle partition costs one fetch per follower "
            "per this, and a leader that stops answering (without crashing) is replaced after twice "
            "this (the metadata quorum keeps KRaft's 500 ms)"),
    NodeKey("retention_check_interval_ms", 300000,
            "how often segments past retention.ms / retention.bytes are deleted"),
    NodeKey("log_cleaner_interval_ms", 15000,
            "how often partitions of topics with cleanup.policy compact are checked for compaction"),
    NodeKey("shutdown_grace_ms", 5000, "on SIGTERM, how long in-flight requests may take to finish"),
    NodeKey("peer_addresses", {},
            "a table of node id to HOST:PORT overriding where this node's replication traffic to that "
            "peer goes (fault-injection proxies use it), e.g. peer_addresses = { \"2\" = \"127.0.0.1:19501\" }"),
    NodeKey("topic_defaults", {}, "a table of topic config defaults for this cluster, e.g. "
            "topic_defaults = { \"segment.bytes\" = \"1048576\" }"),
    NodeKey("offsets_topic_num_partitions", 16,
            f"partitions of {CONSUMER_OFFSETS_TOPIC}, created on the first consumer-group request "
            "(do not change it once the topic exists: it decides which partition holds each group)"),
    NodeKey("offsets_topic_replication_factor", 3,
            f"replication factor of {CONSUMER_OFFSETS_TOPIC} (capped at the number of nodes the cluster "
            "knows; the topic is not created while fewer are alive)"),
    NodeKey("group_consumer_session_timeout_ms", 45000,
            "a group member that has not heartbeated for this long is removed and its partitions move on"),
    NodeKey("group_consumer_heartbeat_interval_ms", 5000, "how often group members are told to heartbeat"),
    NodeKey("offsets_retention_minutes", 10080,
            "committed offsets of a group expire once it has been empty this long (KIP-211); with "
            "members, offsets of topics it no longer subscribes to expire this long after their "
            "commit. Fractions are allowed (0.05 = 3 s)"),
    NodeKey("offsets_retention_check_interval_ms", 600000, "how often committed offsets are checked for expiry"),
    NodeKey("group_coordinator_append_linger_ms", 8,
            "while a group coordinator's last batch is uncommitted or younger than this, later calls' "
            "records wait to share the next batch (Kafka's group.coordinator.append.linger.ms)"),
)


@dataclass(frozen=True, slots=True)
class NodeConfig:
    node_id: int
    data_dir: Path
    listen: Address = Address("127.0.0.1", DEFAULT_PORT)
    advertised: Address | None = None
    controller_voters: tuple[Voter, ...] = ()
    cluster_id: str | None = None
    flush: str = FlushPolicy.ALWAYS
    flush_interval_ms: int = 1000
    default_partitions: int = 1
    default_replication_factor: int = 1
    max_request_bytes: int = 104857600
    fetch_max_wait_ms_limit: int = 30000
    shutdown_grace_ms: int = 5000
    retention_check_interval_ms: int = 300000
    log_cleaner_interval_ms: int = 15000
    election_timeout_ms: int = 1000
    replica_fetch_max_wait_ms: int = 2000
    topic_defaults: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    peer_addresses: Mapping[int, Address] = field(default_factory=lambda: MappingProxyType({}))
    offsets_topic_num_partitions: int = 16
    offsets_topic_replication_factor: int = 3
    group_consumer_session_timeout_ms: int = 45000
    group_consumer_heartbeat_interval_ms: int = 5000
    offsets_retention_minutes: float = 10080
    offsets_retention_check_interval_ms: int = 600000
    group_coordinator_append_linger_ms: int = 8

    @property
    def advertised_address(self) -> Address:
        return self.advertised or self.listen

    @property
    def voters(self) -> tuple[Voter, ...]:
        """The metadata quorum; a node configured with none is a cluster of one."""
        return self.controller_voters or (Voter(self.node_id, self.advertised_address),)

    @property
    def topic_config_defaults(self) -> Mapping[str, str]:
        return MappingProxyType(effective_topic_configs(self.topic_defaults, TOPIC_CONFIG_DEFAULTS))


def _int(name: str, value: Any, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    try:
        number = int(value)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {value!r}") from None
    if number < minimum:
        raise ConfigError(f"{name} must be at least {minimum}, got {number}")
    return number


def _minutes(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ConfigError(f"{name} must be a number of minutes, got {value!r}")
    try:
        number = float(value)
    except ValueError:
        raise ConfigError(f"{name} must be a number of minutes, got {value!r}") from None
    if not number > 0 or number == float("inf"):
        raise ConfigError(f"{name} must be a positive number of minutes, got {value!r}")
    return number


def _peer_addresses(raw: Any) -> dict[int, Address]:
    """``{id: "HOST:PORT"}`` from TOML, or ``["ID=HOST:PORT", ...]`` from repeated flags."""
    if isinstance(raw, Mapping):
        items = list(raw.items())
    elif isinstance(raw, (list, tuple)):
        items = []
        for entry in raw:
            peer, sep, address = str(entry).partition("=")
            if not sep:
                raise ConfigError(f"peer address {entry!r} must look like ID=HOST:PORT")
            items.append((peer, address))
    else:
        raise ConfigError("peer_addresses must be a table of node id to HOST:PORT")
    return {
        _int("peer_addresses node id", peer): Address.parse(str(address), what="peer address")
        for peer, address in items
    }


def build_config(values: Mapping[str, Any]) -> NodeConfig:
    """A checked NodeConfig from a flat mapping of NODE_KEYS names (TOML values or flag strings)."""
    known = {key.name for key in NODE_KEYS}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown node config key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    if values.get("node_id") is None:
        raise ConfigError("node_id is required (--node-id or node_id in the config file)")
    if values.get("data_dir") is None:
        raise ConfigError("data_dir is required (--data-dir or data_dir in the config file)")
    flush = str(values.get("flush", FlushPolicy.ALWAYS))
    if flush not in FlushPolicy.CHOICES:
        raise ConfigError(f"flush must be one of {', '.join(FlushPolicy.CHOICES)}, got {flush!r}")
    topic_defaults_raw = values.get("topic_defaults") or {}
    if not isinstance(topic_defaults_raw, Mapping):
        raise ConfigError("topic_defaults must be a table of topic config names to values")
    topic_defaults = {k: validate_topic_config(k, str(v)) for k, v in topic_defaults_raw.items()}
    listen = Address.parse(str(values.get("listen") or f"127.0.0.1:{DEFAULT_PORT}"), what="listen")
    peer_addresses = _peer_addresses(values.get("peer_addresses") or {})
    advertised = values.get("advertised")
    voters = values.get("controller_voters")
    config = NodeConfig(
        node_id=_int("node_id", values["node_id"]),
        data_dir=Path(str(values["data_dir"])).expanduser().resolve(),
        listen=listen,
        advertised=Address.parse(str(advertised), what="advertised") if advertised else None,
        controller_voters=parse_voters(str(voters)) if voters else (),
        cluster_id=str(values["cluster_id"]) if values.get("cluster_id") else None,
        flush=flush,
        flush_interval_ms=_int("flush_interval_ms", values.get("flush_interval_ms", 1000), 1),
        default_partitions=_int("default_partitions", values.get("default_partitions", 1), 1),
        default_replication_factor=_int(
            "default_replication_factor", values.get("default_replication_factor", 1), 1),
        max_request_bytes=_int("max_request_bytes", values.get("max_request_bytes", 104857600), 1024),
        fetch_max_wait_ms_limit=_int(
            "fetch_max_wait_ms_limit", values.get("fetch_max_wait_ms_limit", 30000), 0),
        shutdown_grace_ms=_int("shutdown_grace_ms", values.get("shutdown_grace_ms", 5000), 0),
        election_timeout_ms=_int("election_timeout_ms", values.get("election_timeout_ms", 1000), 10),
        replica_fetch_max_wait_ms=_int(
            "replica_fetch_max_wait_ms", values.get("replica_fetch_max_wait_ms", 2000), 1),
        retention_check_interval_ms=_int(
            "retention_check_interval_ms", values.get("retention_check_interval_ms", 300000), 1),
        log_cleaner_interval_ms=_int(
            "log_cleaner_interval_ms", values.get("log_cleaner_interval_ms", 15000), 1),
        topic_defaults=MappingProxyType(topic_defaults),
        peer_addresses=MappingProxyType(peer_addresses),
        offsets_topic_num_partitions=_int(
            "offsets_topic_num_partitions", values.get("offsets_topic_num_partitions", 16), 1),
        offsets_topic_replication_factor=_int(
            "offsets_topic_replication_factor", values.get("offsets_topic_replication_factor", 3), 1),
        group_consumer_session_timeout_ms=_int(
            "group_consumer_session_timeout_ms", values.get("group_consumer_session_timeout_ms", 45000), 1),
        group_consumer_heartbeat_interval_ms=_int(
            "group_consumer_heartbeat_interval_ms", values.get("group_consumer_heartbeat_interval_ms", 5000), 1),
        offsets_retention_minutes=_minutes(
            "offsets_retention_minutes", values.get("offsets_retention_minutes", 10080)),
        offsets_retention_check_interval_ms=_int(
            "offsets_retention_check_interval_ms", values.get("offsets_retention_check_interval_ms", 600000), 1),
        group_coordinator_append_linger_ms=_int(
            "group_coordinator_append_linger_ms", values.get("group_coordinator_append_linger_ms", 8), 0),
    )
    own = next((v for v in config.controller_voters if v.node_id == config.node_id), None)
    if own is not None:
        if own.address.port != config.advertised_address.port:
            raise ConfigError(
                f"controller voter {own.node_id}@{own.address} does not match this node's "
                f"advertised address {config.advertised_address}")
    return config


def load_config(path: Path | None, overrides: Mapping[str, Any]) -> NodeConfig:
    """Defaults, then the TOML file at ``path``, then ``overrides`` (flags; None = not given)."""
    values: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as file:
                values.update(tomllib.load(file))
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    values.update({k: v for k, v in overrides.items() if v is not None})
    return build_config(values)


def with_changes(config: NodeConfig, **changes: Any) -> NodeConfig:
    return replace(config, **changes)
