"""Raft messages between nodes: one long-lived gRPC stream per (sender, receiver) pair.

Every group's messages for a peer — partition replicas and the metadata quorum alike — go into
that peer's queue; the sender task drains the queue into one `Envelope` per write, so many
groups' fetches and answers share one HTTP/2 message (DESIGN.md §4). Raft tolerates loss, so a
broken stream simply drops what was queued and reconnects with backoff; nothing here retries a
message. Arriving envelopes also mark the peer alive, which is the node's liveness signal.

Envelopes also carry the partitions the sender leads (`LeaderEntry`), in full whenever they
change, so every node can route clients for partitions it does not host.

The stream's envelopes are `replication.proto`'s bytes, but encoded and decoded here rather than
by protobuf: a fetch response's records (nearly all the bytes) are joined once into the written
envelope, and the received ones are handed on as a memoryview into the envelope gRPC delivered,
where protobuf's set, encode, grow, serialize, parse and read would copy them six times.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any

import grpc
from tidelog.node.request_decoding import add_service
from tidelog.proto.wire import WIRE_LEN, WIRE_VARINT, encode_varint, read_varint, signed, skip_field
from tidelog.proto import replication_pb2 as pb
from tidelog.proto import replication_pb2_grpc
from tidelog.replication.messages import (
    BeginQuorumEpoch,
    EndQuorumEpoch,
    FetchError,
    FetchRequest,
    FetchResponse,
    Message,
    VoteRequest,
    VoteResponse,
)

log = logging.getLogger(__name__)

_KINDS: Mapping[type, str] = {
    VoteRequest: "vote_request",
    VoteResponse: "vote_response",
    BeginQuorumEpoch: "begin_quorum_epoch",
    EndQuorumEpoch: "end_quorum_epoch",
    FetchRequest: "fetch_request",
    FetchResponse: "fetch_response",
}
_CLASSES: Mapping[str, type] = {kind: cls for cls, kind in _KINDS.items()}
_FIELDS: Mapping[type, tuple[str, ...]] = {cls: tuple(f.name for f in fields(cls)) for cls in _KINDS}
_OPTIONAL = frozenset({"leader_id"})
_REPEATED = frozenset({"preferred_successors"})
MAX_QUEUE = 100_000
# A peer counts as alive while it sent us something this recently (its fetches long-poll for
# at most the Raft fetch wait, so a live voter writes at least that often).
ALIVE_WINDOW_S = 3.0
HEARTBEAT_S = 0.5
# How long one connection attempt may take. A node that was up and now *refuses* connections
# (TRANSIENT_FAILURE) is taken as crashed (see Replica.leader_node_down); a slow one is not.
CONNECT_TIMEOUT_S = 5.0


async def _connect(channel: grpc.aio.Channel) -> bool:
    """True once connected; False as soon as the connection attempt fails (refused)."""
    state = channel.get_state(try_to_connect=True)
    while state is not grpc.ChannelConnectivity.READY:
        if state is grpc.ChannelConnectivity.TRANSIENT_FAILURE:
            return False
        await channel.wait_for_state_change(state)
        state = channel.get_state(try_to_connect=True)
    return True


def to_proto(message: Message) -> pb.RaftMessage:
    out = pb.RaftMessage()
    fill_proto(out, message)
    return out


def fill_proto(out: pb.RaftMessage, message: Message) -> None:
    """Write ``message`` into ``out``, typically an entry just added to an envelope: building it
    in place spares the copy of its records that a separate message plus ``extend`` makes."""
    cls = type(message)
    # The two fetch messages are nearly all the traffic; they get field-by-field code.
    if cls is FetchResponse:
        _fill_fetch_response(out.fetch_response, message)  # type: ignore[arg-type]
        out.fetch_response.records = message.records  # type: ignore[attr-defined]
        return
    if cls is FetchRequest:
        request = out.fetch_request
        request.group_id = message.group_id
        request.src = message.src
        request.dst = message.dst
        request.epoch = message.epoch
        request.fetch_offset = message.fetch_offset
        request.last_fetched_epoch = message.last_fetched_epoch
        request.fetch_id = message.fetch_id
        request.high_watermark = message.high_watermark
        request.max_wait_ms = message.max_wait_ms
        return
    other = getattr(out, _KINDS[cls])
    for name in _FIELDS[cls]:
        value = getattr(message, name)
        if value is None:
            continue
        if isinstance(value, enum.Enum):
            value = value.value
        if name in _REPEATED:
            getattr(other, name).extend(value)
        else:
            setattr(other, name, value)


# Protobuf keys (field number << 3 | wire type) of replication.proto's fields used here.
_ENVELOPE_MESSAGE = b"\x12"  # Envelope.messages = 2, length-delimited
_RAFT_FETCH_RESPONSE = b"\x32"  # RaftMessage.fetch_response = 6, length-delimited
_FETCH_RESPONSE_RECORDS = b"\x52"  # FetchResponse.records = 10, length-delimited


def encode_envelope(src: int, messages: list[Message], leaders: Mapping[str, int] | None = None) -> bytes:
    """The bytes of a `pb.Envelope` (``leaders`` set: a complete list of what ``src`` leads).

    Protobuf merges concatenated encodings, and fields may come in any order, so the small
    fields are encoded by protobuf and a fetch response's records are appended after them:
    the records are copied once, by the final join.
    """
    head = pb.Envelope(src=src)
    if leaders is not None:
        head.leaders_complete = True
        head.leaders.extend(pb.LeaderEntry(group_id=g, epoch=e) for g, e in leaders.items())
    pieces: list[bytes] = [head.SerializeToString()]
    for message in messages:
        if type(message) is FetchResponse and message.records:
            records = message.records
            head_of_response = pb.FetchResponse()
            _fill_fetch_response(head_of_response, message)
            inner = head_of_response.SerializeToString()
            length = len(records)
            response_length = len(inner) + 1 + len(encode_varint(length)) + length
            raft_length = 1 + len(encode_varint(response_length)) + response_length
            pieces.append(b"".join((_ENVELOPE_MESSAGE, encode_varint(raft_length), _RAFT_FETCH_RESPONSE,
                                    encode_varint(response_length), inner, _FETCH_RESPONSE_RECORDS,
                                    encode_varint(length))))
            pieces.append(records)
        else:
            raw = to_proto(message).SerializeToString()
            pieces.append(_ENVELOPE_MESSAGE + encode_varint(len(raw)) + raw)
    return b"".join(pieces)


@dataclass(frozen=True, slots=True)
class Envelope:
    """A decoded `pb.Envelope`: its Raft messages, and ``leaders`` when it lists them all."""

    src: int
    messages: list[Message]
    leaders: dict[str, int] | None
    malformed: int  # Raft messages that could not be decoded and were left out


def _decode_fetch_response(data: bytes, view: memoryview, position: int, end: int) -> FetchResponse:
    """A `pb.FetchResponse` in ``data[position:end]``; its records stay a view of ``data``."""
    ints = [0] * 14
    leader_id: int | None = None
    group_id = ""
    records: bytes | memoryview = b""
    while position < end:
        key, position = read_varint(data, position)
        field, wire_type = key >> 3, key & 7
        if wire_type == WIRE_VARINT and field < 14:
            value, position = read_varint(data, position)
            if field == 5:
                leader_id = signed(value)
            else:
                ints[field] = signed(value)
        elif wire_type == WIRE_LEN and field in (1, 10):
            length, position = read_varint(data, position)
            if position + length > end:
                raise ValueError("field runs past its message")
            if field == 1:
                group_id = str(data[position:position + length], "utf-8")
            else:
                records = view[position:position + length]
            position += length
        else:
            position = skip_field(data, position, wire_type)
    if position != end:
        raise ValueError("fetch response runs past its message")
    return FetchResponse(group_id, ints[2], ints[3], ints[4], leader_id, FetchError(ints[6]), ints[7], ints[8],
                         ints[9], records, ints[11], ints[12], ints[13])  # type: ignore[arg-type]


def decode_envelope(data: bytes) -> Envelope:
    """`pb.Envelope` bytes as an `Envelope` (the stream's request deserializer): records are
    memoryviews of ``data``. A Raft message that cannot be decoded is counted and left out;
    a broken envelope raises ValueError, which fails the stream (the sender reconnects)."""
    view = memoryview(data)
    size = len(data)
    position = 0
    src = 0
    messages: list[Message] = []
    entries: list[pb.LeaderEntry] = []
    complete = False
    malformed = 0
    try:
        while position < size:
            key, position = read_varint(data, position)
            field, wire_type = key >> 3, key & 7
            if wire_type == WIRE_VARINT:
                value, position = read_varint(data, position)
                if field == 1:
                    src = signed(value)
                elif field == 4:
                    complete = bool(value)
                continue
            if wire_type != WIRE_LEN:
                position = skip_field(data, position, wire_type)
                continue
            length, position = read_varint(data, position)
            end = position + length
            if end > size:
                raise ValueError("field runs past the envelope")
            if field == 2:
                try:
                    messages.append(_decode_raft_message(data, view, position, end))
                except Exception:
                    malformed += 1
            elif field == 3:
                entries.append(pb.LeaderEntry.FromString(data[position:end]))
            position = end
    except IndexError:
        raise ValueError("truncated envelope") from None
    leaders = {e.group_id: e.epoch for e in entries} if complete else None
    return Envelope(src, messages, leaders, malformed)


def _decode_raft_message(data: bytes, view: memoryview, position: int, end: int) -> Message:
    key, inner = read_varint(data, position)
    if key == _RAFT_FETCH_RESPONSE[0]:
        length, inner = read_varint(data, inner)
        if inner + length == end:
            return _decode_fetch_response(data, view, inner, end)
    return from_proto(pb.RaftMessage.FromString(data[position:end]))


def _fill_fetch_response(sub: pb.FetchResponse, message: FetchResponse) -> None:
    """Every field but the records."""
    sub.group_id = message.group_id
    sub.src = message.src
    sub.dst = message.dst
    sub.epoch = message.epoch
    if message.leader_id is not None:
        sub.leader_id = message.leader_id
    sub.error = message.error.value
    sub.fetch_id = message.fetch_id
    sub.fetch_offset = message.fetch_offset
    sub.last_fetched_epoch = message.last_fetched_epoch
    sub.high_watermark = message.high_watermark
    sub.diverging_epoch = message.diverging_epoch
    sub.diverging_end_offset = message.diverging_end_offset


def from_proto(message: pb.RaftMessage) -> Message:
    kind = message.WhichOneof("kind")
    if kind is None:
        raise ValueError("empty Raft message")
    if kind == "fetch_response":
        r = message.fetch_response
        return FetchResponse(r.group_id, r.src, r.dst, r.epoch, r.leader_id if r.HasField("leader_id") else None,
                             FetchError(r.error), r.fetch_id, r.fetch_offset, r.last_fetched_epoch, r.records,
                             r.high_watermark, r.diverging_epoch, r.diverging_end_offset)
    if kind == "fetch_request":
        q = message.fetch_request
        return FetchRequest(q.group_id, q.src, q.dst, q.epoch, q.fetch_offset, q.last_fetched_epoch, q.fetch_id,
                            q.high_watermark, q.max_wait_ms)
    cls = _CLASSES[kind]
    sub = getattr(message, kind)
    values: dict[str, Any] = {}
    for name in _FIELDS[cls]:
        if name in _OPTIONAL:
            values[name] = getattr(sub, name) if sub.HasField(name) else None
        elif name in _REPEATED:
            values[name] = tuple(getattr(sub, name))
        elif name == "error":
            values[name] = FetchError(sub.error)
        else:
            values[name] = getattr(sub, name)
    return cls(**values)  # type: ignore[no-any-return]


class _Peer:
    def __init__(self, node_id: int, address: str) -> None:
        self.node_id = node_id
        self.address = address
        # (message, approximate size); converted to protobuf only when an envelope is built.
        self.queue: list[tuple[Message, int]] = []
        self.wakeup = asyncio.Event()
        self.send_leaders = True
        self.task: asyncio.Task[None] | None = None
        self.connected = False


class Transport:
    def __init__(self, node_id: int, deliver: Callable[[Message], None],
                 local_leaders: Callable[[], dict[str, int]], max_message_bytes: int,
                 on_peer_down: Callable[[int], None] = lambda node_id: None) -> None:
        self.node_id = node_id
        self._deliver = deliver
        self._on_peer_down = on_peer_down
        self._local_leaders = local_leaders
        self._max_message_bytes = max_message_bytes
        self._peers: dict[int, _Peer] = {}
        self._last_seen: dict[int, float] = {}
        # What each peer told us it leads: {peer: {group_id: epoch}}.
        self.remote_leaders: dict[int, dict[str, int]] = {}
        self._closing = False

    # --- peers ----------------------------------------------------------------------------

    def set_peers(self, addresses: Mapping[int, str]) -> None:
        """Open streams to new peers (or moved ones); close streams to peers that went away."""
        for node_id, address in addresses.items():
            if node_id == self.node_id:
                continue
            peer = self._peers.get(node_id)
            if peer is not None and peer.address == address:
                continue
            if peer is not None and peer.task is not None:
                peer.task.cancel()
            peer = self._peers[node_id] = _Peer(node_id, address)
            peer.task = asyncio.get_running_loop().create_task(self._run(peer))
        for node_id in [n for n in self._peers if n not in addresses]:
            peer = self._peers.pop(node_id)
            if peer.task is not None:
                peer.task.cancel()

    def alive(self, node_id: int) -> bool:
        if node_id == self.node_id:
            return True
        seen = self._last_seen.get(node_id)
        return seen is not None and asyncio.get_running_loop().time() - seen < ALIVE_WINDOW_S

    def leaders_changed(self) -> None:
        for peer in self._peers.values():
            peer.send_leaders = True
            peer.wakeup.set()

    # --- sending --------------------------------------------------------------------------

    def send(self, messages: list[Message]) -> None:
        for message in messages:
            peer = self._peers.get(message.dst)
            if peer is None:
                continue  # unknown node: Raft will retry once the peer is known
            if len(peer.queue) >= MAX_QUEUE:
                peer.queue.clear()  # the peer is not draining; Raft resends what matters
            records = message.records if type(message) is FetchResponse else b""
            peer.queue.append((message, len(records) + 64))
            peer.wakeup.set()

    async def _envelopes(self, peer: _Peer) -> AsyncIterator[bytes]:
        while not self._closing:
            if not peer.wakeup.is_set():
                # Under load messages queued during the previous write are already waiting:
                # no wait_for (a task and a timer each time) then.
                try:
                    # An idle pair still exchanges an empty envelope now and then: it is the
                    # liveness signal between nodes that share no busy group.
                    await asyncio.wait_for(peer.wakeup.wait(), HEARTBEAT_S)
                except TimeoutError:
                    pass
            peer.wakeup.clear()
            leaders = None
            if peer.send_leaders:
                peer.send_leaders = False
                leaders = self._local_leaders()
            queued, peer.queue = peer.queue, []
            # Keep each write under the gRPC message limit; records dominate the size.
            budget = self._max_message_bytes // 2
            size = 0
            for index, (_, approximate) in enumerate(queued):
                size += approximate
                if size > budget and index > 0:
                    peer.queue = queued[index:] + peer.queue
                    peer.wakeup.set()
                    queued = queued[:index]
                    break
            yield encode_envelope(self.node_id, [message for message, _ in queued], leaders)

    async def _run(self, peer: _Peer) -> None:
        backoff = 0.05
        options = [("grpc.max_send_message_length", self._max_message_bytes),
                   ("grpc.max_receive_message_length", self._max_message_bytes),
                   ("grpc.keepalive_time_ms", 10000),
                   ("grpc.initial_reconnect_backoff_ms", 50),
                   ("grpc.max_reconnect_backoff_ms", 1000)]
        was_up = False
        while not self._closing:
            channel = grpc.aio.insecure_channel(peer.address, options=options)
            try:
                try:
                    ready: bool | None = await asyncio.wait_for(_connect(channel), CONNECT_TIMEOUT_S)
                except TimeoutError:
                    ready = None  # slow, not gone: keep trying without declaring it down
                if ready is False and was_up:
                    # It was up and now refuses connections: its process is gone.
                    was_up = False
                    self._last_seen.pop(peer.node_id, None)
                    self.remote_leaders.pop(peer.node_id, None)
                    log.info("node %d (%s) is down", peer.node_id, peer.address)
                    self._on_peer_down(peer.node_id)
                if not ready:
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 1.0)
                    continue
                was_up = True
                backoff = 0.05
                # The envelopes are already bytes (encode_envelope): no request serializer.
                stream = channel.stream_stream(STREAM_METHOD, request_serializer=None,
                                               response_deserializer=pb.Envelope.FromString)
                peer.send_leaders = True
                peer.wakeup.set()
                call = stream(self._envelopes(peer))
                peer.connected = True
                async for _ in call:
                    pass
            except asyncio.CancelledError:
                raise
            except grpc.RpcError as exc:
                if peer.connected:
                    log.debug("stream to node %d (%s) broke: %s", peer.node_id, peer.address, exc.code())
            except Exception:
                log.exception("stream to node %d failed", peer.node_id)
            finally:
                peer.connected = False
                peer.queue.clear()
                await channel.close(grace=None)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 1.0)

    # --- receiving ------------------------------------------------------------------------

    def on_envelope(self, envelope: Envelope) -> None:
        self._last_seen[envelope.src] = asyncio.get_running_loop().time()
        if envelope.leaders is not None:
            self.remote_leaders[envelope.src] = envelope.leaders
        if envelope.malformed:
            log.warning("dropping %d malformed Raft message(s) from node %d", envelope.malformed, envelope.src)
        for message in envelope.messages:
            if message.dst != self.node_id:
                continue
            try:
                self._deliver(message)
            except Exception:
                log.exception("delivering %s from node %d failed", type(message).__name__, envelope.src)

    def remote_leader(self, group_id: str) -> tuple[int, int] | None:
        """(node, epoch) of the newest leader any peer claims for ``group_id``."""
        best: tuple[int, int] | None = None
        for node_id, leaders in self.remote_leaders.items():
            epoch = leaders.get(group_id)
            if epoch is not None and (best is None or epoch > best[1]) and self.alive(node_id):
                best = (node_id, epoch)
        return best

    async def close(self) -> None:
        # Give queued messages (a resigning leader's EndQuorumEpoch) a moment to leave.
        deadline = asyncio.get_running_loop().time() + 0.3
        while any(p.queue and p.connected for p in self._peers.values()):
            if asyncio.get_running_loop().time() > deadline:
                break
            await asyncio.sleep(0.01)
        self._closing = True
        tasks = [p.task for p in self._peers.values() if p.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._peers.clear()


class ReplicationService(replication_pb2_grpc.ReplicationServicer):
    def __init__(self, transport: Transport, register: Callable[[pb.RegisterRequest], Any]) -> None:
        self.transport = transport
        self._register = register
        self._streams: set[asyncio.Task[Any]] = set()

    async def Stream(self, request_iterator: AsyncIterator[Envelope], context: grpc.aio.ServicerContext
                     ) -> AsyncIterator[pb.Envelope]:
        task = asyncio.current_task()
        if task is not None:
            self._streams.add(task)
        try:
            async for envelope in request_iterator:
                self.transport.on_envelope(envelope)
        finally:
            if task is not None:
                self._streams.discard(task)
        return
        yield  # pragma: no cover - makes this a response stream that never sends

    def cancel_streams(self) -> None:
        """End every inbound stream (shutdown): they never finish on their own."""
        for task in list(self._streams):
            task.cancel()

    async def Register(self, request: pb.RegisterRequest, context: grpc.aio.ServicerContext
                       ) -> pb.RegisterResponse:
        return await self._register(request)  # type: ignore[no-any-return]


STREAM_METHOD = "/tidelog.internal.Replication/Stream"


def add_replication_service(service: ReplicationService, server: grpc.aio.Server) -> None:
    """`replication_pb2_grpc.add_ReplicationServicer_to_server`, but with the stream's envelopes
    decoded by `decode_envelope` (records as views of the received bytes), and undecodable
    requests answered INVALID_ARGUMENT (node/request_decoding.py)."""
    add_service(server, pb, "Replication", service, {"Stream": decode_envelope})
