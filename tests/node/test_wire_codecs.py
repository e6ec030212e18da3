"""The node's hand-written protobuf codecs against protobuf itself.

Produce requests and replication envelopes are decoded (and envelopes encoded) by hand so that
record bytes stay views of gRPC's buffer (proto/wire.py). These properties pin them to the
protobuf messages they stand for: the same fields out of the same bytes, and on bytes that are
not such a message a ValueError (which gRPC turns into an error status), never another exception.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from tidelog.node.services import decode_produce_request
from tidelog.node.transport import decode_envelope, encode_envelope, from_proto
from tidelog.proto import api_pb2
from tidelog.proto import replication_pb2 as pb
from tidelog.replication.messages import (
    BeginQuorumEpoch,
    EndQuorumEpoch,
    FetchError,
    FetchRequest,
    FetchResponse,
    VoteRequest,
    VoteResponse,
)

INT32 = st.integers(-(2**31), 2**31 - 1)
INT64 = st.integers(-(2**63), 2**63 - 1)
NAMES = st.text(max_size=20)
RECORDS = st.binary(max_size=300)

fetch_responses = st.builds(
    FetchResponse, group_id=NAMES, src=INT32, dst=INT32, epoch=INT32, leader_id=st.none() | INT32,
    error=st.sampled_from(FetchError), fetch_id=INT64, fetch_offset=INT64, last_fetched_epoch=INT32,
    records=RECORDS, high_watermark=INT64, diverging_epoch=INT32, diverging_end_offset=INT64)
fetch_requests = st.builds(
    FetchRequest, group_id=NAMES, src=INT32, dst=INT32, epoch=INT32, fetch_offset=INT64,
    last_fetched_epoch=INT32, fetch_id=INT64, high_watermark=INT64, max_wait_ms=INT32)
vote_requests = st.builds(
    VoteRequest, group_id=NAMES, src=INT32, dst=INT32, epoch=INT32, last_epoch=INT32, end_offset=INT64,
    pre_vote=st.booleans())
messages = st.lists(fetch_responses | fetch_requests | vote_requests, max_size=5)
leaders = st.none() | st.dictionaries(NAMES, INT32, max_size=4)


def settled(message: object) -> object:
    """Records compared by value: the decoder hands them out as memoryviews."""
    if isinstance(message, FetchResponse):
        return message.__class__(**{**{f: getattr(message, f) for f in message.__dataclass_fields__},
                                    "records": bytes(message.records)})
    return message


@given(src=INT32, sent=messages, led=leaders)
def test_an_envelope_decodes_to_what_was_encoded_and_to_what_protobuf_reads(
        src: int, sent: list, led: dict[str, int] | None) -> None:
    data = encode_envelope(src, sent, led)
    envelope = decode_envelope(data)
    assert envelope.src == src and envelope.malformed == 0
    assert [settled(m) for m in envelope.messages] == sent
    assert envelope.leaders == led
    parsed = pb.Envelope.FromString(data)  # the hand-made bytes are a valid Envelope
    assert [settled(from_proto(m)) for m in parsed.messages] == sent
    assert parsed.src == src and parsed.leaders_complete == (led is not None)


@given(src=INT32, sent=messages, led=leaders, cut=st.integers(min_value=0))
def test_a_truncated_envelope_is_refused_with_value_error_or_read_as_a_prefix(
        src: int, sent: list, led: dict[str, int] | None, cut: int) -> None:
    data = encode_envelope(src, sent, led)
    cut %= len(data) + 1
    try:
        envelope = decode_envelope(data[:cut])
    except ValueError:
        return
    # Accepted: then what it read is a prefix of what was sent (a message cut inside its own
    # bytes is counted as malformed, never read as something else).
    assert [settled(m) for m in envelope.messages] == sent[:len(envelope.messages)]


produce_partitions = st.builds(api_pb2.ProducePartitionData, topic=NAMES, partition=INT32, records=RECORDS)
produce_requests = st.builds(api_pb2.ProduceRequest, acks=st.sampled_from([-1, 0, 1]) | INT32, timeout_ms=INT32,
                             partitions=st.lists(produce_partitions, max_size=5))


@given(request=produce_requests)
def test_a_produce_request_decodes_as_protobuf_parses_it(request: api_pb2.ProduceRequest) -> None:
    decoded = decode_produce_request(request.SerializeToString())
    assert (decoded.acks, decoded.timeout_ms) == (request.acks, request.timeout_ms)
    assert [(p.topic, p.partition, bytes(p.records)) for p in decoded.partitions] == \
        [(p.topic, p.partition, p.records) for p in request.partitions]


@given(request=produce_requests, junk=st.binary(max_size=40), cut=st.integers(min_value=0))
def test_bytes_that_are_not_a_produce_request_raise_value_error(
        request: api_pb2.ProduceRequest, junk: bytes, cut: int) -> None:
    data = request.SerializeToString()
    cut %= len(data) + 1
    for candidate in (data[:cut], junk, data[:cut] + junk):
        try:
            decode_produce_request(candidate)
        except ValueError:
            pass


def test_every_raft_message_kind_crosses_and_a_malformed_one_is_counted() -> None:
    others = [VoteResponse("t-1@abc", 1, 2, 5, False, True, None), BeginQuorumEpoch("t-1@abc", 1, 2, 6),
              EndQuorumEpoch("t-1@abc", 1, 2, 6, (3, 2))]
    broken = b"\x12\x03\x32\x05\x08"  # a fetch response claiming 5 bytes inside 3
    envelope = decode_envelope(encode_envelope(1, others[:1]) + broken + encode_envelope(0, others[1:]))
    assert envelope.malformed == 1 and envelope.messages == others


def test_a_produce_request_skips_unknown_fields_as_protobuf_does() -> None:
    # Field 9 (varint) and field 10 (length-delimited) are unknown at both levels.
    partition = b"\x0a\x01t" + b"\x48\x05" + b"\x10\x02" + b"\x52\x02ab" + b"\x1a\x03xyz"
    data = b"\x08\x01" + b"\x48\x07" + b"\x1a" + bytes([len(partition)]) + partition + b"\x52\x01z"
    parsed = api_pb2.ProduceRequest.FromString(data)
    decoded = decode_produce_request(data)
    assert decoded.acks == parsed.acks == 1
    assert [(p.topic, p.partition, bytes(p.records)) for p in decoded.partitions] == [("t", 2, b"xyz")] == \
        [(p.topic, p.partition, p.records) for p in parsed.partitions]
