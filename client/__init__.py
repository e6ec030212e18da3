"""The tidelog client library (DESIGN.md §9).

    from tidelog.client import AdminClient, Consumer, Producer

    with AdminClient("127.0.0.1:9192") as admin:
        admin.create_topic("orders", num_partitions=3)
    with Producer("127.0.0.1:9192") as producer:
        producer.send("orders", b"hello", key=b"alice").result()
    with Consumer("127.0.0.1:9192", topics=["orders"], auto_offset_reset="earliest") as consumer:
        for record in consumer:
            print(record.offset, record.key, record.value)
    with Consumer("127.0.0.1:9192", group_id="billing") as consumer:  # a consumer group
        consumer.subscribe(["orders"], on_assign=print, on_revoke=print)
        records = consumer.poll(1000)  # positions are auto-committed; close() leaves the group

Each client also exists as an asyncio class (`AsyncProducer`, `AsyncConsumer`,
`AsyncAdminClient`); the sync classes run the async core on one background thread per object.
``bootstrap`` is a list of "host:port" or a comma-separated string. Errors from the cluster are
`TidelogError` (``.code``, ``.name``, ``.retriable``); `ClusterUnreachableError` is the one for
"no node answered".
"""

from __future__ import annotations

from tidelog.client.admin import AdminClient, AsyncAdminClient
from tidelog.client.connection import ClusterUnreachableError
from tidelog.client.consumer import AsyncConsumer, Consumer
from tidelog.client.group_reset import ResetPlanEntry, ResetScenario, ResetSpec
from tidelog.client.producer import AsyncProducer, Producer
from tidelog.client.types import (
    BrokerNode,
    ClusterDescription,
    ConsumerRecord,
    GroupDescription,
    GroupListing,
    GroupMemberDescription,
    GroupOffset,
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
    "GroupDescription",
    "GroupListing",
    "GroupMemberDescription",
    "GroupOffset",
    "NewTopic",
    "OffsetAndTimestamp",
    "PartitionInfo",
    "Producer",
    "RecordMetadata",
    "ResetPlanEntry",
    "ResetScenario",
    "ResetSpec",
    "TidelogError",
    "TopicDescription",
    "TopicListing",
    "TopicPartition",
]
