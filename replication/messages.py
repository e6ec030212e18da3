"""The messages Raft groups exchange (KIP-595 RPCs), as plain values.

Every message names its group, its source and destination node and the sender's epoch, so the
node can route it and can carry many groups' messages between one pair of nodes in one gRPC call:
a `FetchRequest` is one *entry* of the node-level replica fetch; `coalesce` groups a step's
messages by destination so the node sends one request per peer.

Epochs start at 1; epoch 0 means "no epoch yet" (an empty log's last epoch is 0).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass

NO_EPOCH = 0
NO_DIVERGENCE = -1


class FetchError(enum.Enum):
    """Why a fetch was refused; names follow Kafka's error codes."""

    NONE = 0
    # The fetcher's epoch is older than ours: it must learn the new epoch (carried in the response).
    FENCED_LEADER_EPOCH = 1
    # The fetcher knows a newer epoch than we do: we are not its leader and cannot help.
    UNKNOWN_LEADER_EPOCH = 2
    # Same epoch, but we are not (or no longer) the leader of it.
    NOT_LEADER_OR_FOLLOWER = 3
    # The fetch offset is below the leader's log start (retention deleted it): the follower
    # empties its log and starts again at the leader's log start, carried in
    # ``diverging_end_offset`` (KRaft would send a snapshot id there; partitions have none).
    OFFSET_OUT_OF_RANGE = 4


@dataclass(frozen=True, slots=True)
class VoteRequest:
    """Asks for a vote (KIP-595) or, with ``pre_vote``, whether a vote would be granted (KIP-996).

    ``epoch`` is the epoch the candidate is standing in; for a pre-vote it is the sender's current
    epoch + 1, the epoch it would stand in, and the receiver changes no state for it.
    """

    group_id: str
    src: int
    dst: int
    epoch: int
    last_epoch: int
    end_offset: int
    pre_vote: bool


@dataclass(frozen=True, slots=True)
class VoteResponse:
    """``epoch`` is the responder's epoch after handling the request; ``leader_id`` its leader hint."""

    group_id: str
    src: int
    dst: int
    epoch: int
    granted: bool
    pre_vote: bool
    leader_id: int | None


@dataclass(frozen=True, slots=True)
class BeginQuorumEpoch:
    """The new leader (``src``) announces itself; pull-based Raft has no heartbeats to do it."""

    group_id: str
    src: int
    dst: int
    epoch: int


@dataclass(frozen=True, slots=True)
class EndQuorumEpoch:
    """The leader (``src``) of ``epoch`` resigns; the first of ``preferred_successors`` should run."""

    group_id: str
    src: int
    dst: int
    epoch: int
    preferred_successors: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class FetchRequest:
    """One group's entry in a replica fetch (KIP-595).

    ``fetch_offset`` is the follower's log end offset, all of it flushed; ``last_fetched_epoch``
    the epoch of the batch before it. ``fetch_id`` is echoed so the follower can discard stale
    or duplicated responses. ``high_watermark`` is what the follower knows, so that the leader
    parks (long-polls) the fetch only when the follower is missing neither data nor the HW.
    """

    group_id: str
    src: int
    dst: int
    epoch: int
    fetch_offset: int
    last_fetched_epoch: int
    fetch_id: int
    high_watermark: int
    max_wait_ms: int


@dataclass(frozen=True, slots=True)
class FetchResponse:
    """Batches from ``fetch_offset`` on, or a divergence, or an error with the responder's view.

    With ``diverging_epoch`` != NO_DIVERGENCE the follower must truncate to
    (``diverging_epoch``, ``diverging_end_offset``) per KIP-595 and fetch again.
    """

    group_id: str
    src: int
    dst: int
    epoch: int
    leader_id: int | None
    error: FetchError
    fetch_id: int
    fetch_offset: int
    last_fetched_epoch: int
    records: bytes
    high_watermark: int
    diverging_epoch: int
    diverging_end_offset: int


Message = VoteRequest | VoteResponse | BeginQuorumEpoch | EndQuorumEpoch | FetchRequest | FetchResponse


def coalesce(messages: Iterable[Message]) -> dict[int, list[Message]]:
    """Group messages by destination node, keeping their order, for one call per peer.

    The node calls this on the messages of many groups' outputs; every list it returns can
    travel as one request (the fetches inside it as the entries of one replica fetch).
    """
    by_destination: dict[int, list[Message]] = {}
    for message in messages:
        by_destination.setdefault(message.dst, []).append(message)
    return by_destination
