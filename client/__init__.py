"""The tidelog client library (DESIGN.md §9).

    from tidelog.client import Producer, Consumer, AdminClient, TopicPartition, NewTopic

Each client also exists as an asyncio class (`AsyncProducer`, `AsyncConsumer`,
`AsyncAdminClient`); the sync classes run the async core on one background thread per object.
"""

from __future__ import annotations

from tidelog.client.admin import AdminClient, AsyncAdminClient
from tidelog.client.connection import ClusterUnreachableError
from tidelog.client.consumer import AsyncConsumer, Consumer
from tidelog.client.producer import AsyncProducer, Producer
from tidelog.client.types import (
    BrokerNode,
    ClusterDescription,
    ConsumerRecord,
    NewTopic,
    OffsetAndTimestamp,
    PartitionInfo,
    RecordMetadata,
    TopicDescription,
    TopicListing,
    TopicPartition,
)
from tidelog.proto.errors import TidelogError

__all__ = [
    "AdminClient",
    "AsyncAdminClient",
    "AsyncConsumer",
    "AsyncProducer",
    "BrokerNode",
    "ClusterDescription",
    "ClusterUnreachableError",
    "Consumer",
    "ConsumerRecord",
    "NewTopic",
    "OffsetAndTimestamp",
    "PartitionInfo",
    "Producer",
    "RecordMetadata",
    "TidelogError",
    "TopicDescription",
    "TopicListing",
    "TopicPartition",
]
