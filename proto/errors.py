"""The error model shared by node and client (DESIGN.md §6).

Codes are the `ErrorCode` enum of common.proto, with Kafka's names and numbers; which of them a
client may retry is decided here, once, so the broker's answers and the client's retry loop
agree.
"""

from __future__ import annotations

from tidelog.proto.common_pb2 import ErrorCode

# Kafka's RetriableException subclasses, for the codes we use.
RETRIABLE: frozenset[int] = frozenset(
    {
        ErrorCode.CORRUPT_MESSAGE,  # Kafka retries it: the bytes may have been damaged in flight
        ErrorCode.UNKNOWN_TOPIC_OR_PARTITION,  # metadata may not have propagated yet
        ErrorCode.LEADER_NOT_AVAILABLE,
        ErrorCode.NOT_LEADER_OR_FOLLOWER,
        ErrorCode.REQUEST_TIMED_OUT,
        ErrorCode.COORDINATOR_LOAD_IN_PROGRESS,
        ErrorCode.COORDINATOR_NOT_AVAILABLE,
        ErrorCode.NOT_COORDINATOR,
        ErrorCode.NOT_ENOUGH_REPLICAS,
        ErrorCode.NOT_ENOUGH_REPLICAS_AFTER_APPEND,
        ErrorCode.NOT_CONTROLLER,
        ErrorCode.FENCED_LEADER_EPOCH,
        ErrorCode.UNKNOWN_LEADER_EPOCH,
        ErrorCode.OFFSET_NOT_AVAILABLE,
        ErrorCode.REBALANCE_IN_PROGRESS,
    }
)


def error_name(code: int) -> str:
    try:
        return ErrorCode.Name(code)
    except ValueError:
        return f"UNKNOWN_ERROR_CODE_{code}"


def is_retriable(code: int) -> bool:
    return code in RETRIABLE


class TidelogError(Exception):
    """An error answered by the cluster (or raised by the client on its behalf)."""

    def __init__(self, code: int, message: str = "") -> None:
        self.code = code
        self.name = error_name(code)
        self.message = message
        super().__init__(f"{self.name}: {message}" if message else self.name)

    @property
    def retriable(self) -> bool:
        return is_retriable(self.code)
