"""The record decoder's two ways through a record and its two ways of building one.

A record that is a value followed by a header count of 0 (what nearly every producer writes)
takes a short path that checks it with one test; every other record, and every damaged one,
takes the field-by-field path. A consumer's records get (topic, partition) built into the one
tuple per record; any other head is joined on. These pin down that each pair gives the same
answer, and that a batch stamped with the log's append time gives that time to every record.
"""

from __future__ import annotations

import struct
from collections import namedtuple

import crc32c
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tidelog.client.types import ConsumerRecord
from tidelog.proto import records as r
from tidelog.proto.records import CorruptRecordError, Record, decode_batches, encode_batch

optional_bytes = st.none() | st.binary(max_size=300)
headers = st.lists(st.tuples(st.text(max_size=4), optional_bytes), max_size=2).map(tuple)
records_strategy = st.lists(
    st.builds(Record, offset=st.just(0), timestamp=st.integers(0, 2**41), key=optional_bytes,
              value=optional_bytes, headers=st.just(()) | headers),
    min_size=1,
    max_size=80,  # past 64 records the offset deltas take two bytes
)
codecs = st.sampled_from(["none", "lz4"])


# The consumer's record type, and one with a longer head.
Wide = ConsumerRecord
Wider = namedtuple("Wider", ("cluster",) + ConsumerRecord._fields)


def _resign(batch: bytearray) -> bytearray:
    struct.pack_into(">I", batch, r.CRC_OFFSET, crc32c.crc32c(bytes(batch[r.ATTRIBUTES_OFFSET:])))
    return batch


def _decodes(batch: bytes | bytearray) -> dict[str, object]:
    """What each way of building records makes of ``batch``: its records, or the error."""
    out: dict[str, object] = {}
    for name, build in (("record", lambda b: b.records_as(Record)),
                        ("pair", lambda b: [tuple(x)[2:] for x in b.records_as(Wide, ("t", 1))]),
                        ("triple", lambda b: [tuple(x)[3:] for x in b.records_as(Wider, ("c", "t", 1))])):
        try:
            out[name] = [tuple(x) for b in decode_batches(batch) for x in build(b)]
        except CorruptRecordError:
            out[name] = CorruptRecordError
    return out


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(records_strategy, codecs, st.integers(0, 2**40))
def test_every_head_builds_the_same_records_as_record(records, codec, base_offset):
    batch = encode_batch(records, base_offset=base_offset, compression=codec)
    (decoded,) = decode_batches(batch)
    want = [Record(base_offset + i, x.timestamp, x.key, x.value, x.headers) for i, x in enumerate(records)]
    assert decoded.records_as(Record) == want
    wide = decoded.records_as(Wide, ("t", 7))
    assert wide == [Wide("t", 7, *x) for x in want]
    assert all(type(x) is Wide for x in wide)
    assert decoded.records_as(Wider, ("c", "t", 7)) == [Wider("c", "t", 7, *x) for x in want]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(records_strategy, st.data())
def test_a_damaged_record_reads_alike_or_fails_alike_whatever_the_head(records, data):
    """Damage behind a valid CRC (what a buggy writer makes): the short path may not accept a
    record the field-by-field path refuses, nor read it differently."""
    batch = bytearray(encode_batch(records))
    for _ in range(data.draw(st.integers(1, 3))):
        position = data.draw(st.integers(r.BATCH_OVERHEAD, len(batch) - 1))
        batch[position] = data.draw(st.integers(0, 255))
    results = _decodes(_resign(batch))
    assert results["pair"] == results["record"] == results["triple"]


def test_a_header_count_that_is_not_the_records_last_byte_is_refused():
    batch = bytearray(encode_batch([Record(0, 1, None, b"abc")]))
    # Make the value one byte shorter: its last byte now stands where the header count was
    # read, and the real header count is a byte the record does not account for.
    value_length_at = len(batch) - 1 - 3 - 1
    assert batch[value_length_at] == 6  # zig-zag 3
    batch[value_length_at] = 4
    batch[-2] = 0
    assert all(result is CorruptRecordError for result in _decodes(_resign(batch)).values())


def test_a_header_count_with_no_headers_after_it_is_refused():
    batch = bytearray(encode_batch([Record(0, 1, None, b"abc")]))
    assert batch[-1] == 0  # the header count, the record's last byte
    batch[-1] = 2  # zig-zag 1: one header, and no byte left for it
    assert all(result is CorruptRecordError for result in _decodes(_resign(batch)).values())


def test_log_append_time_stamps_every_record_with_the_batchs_max_timestamp():
    batch = bytearray(encode_batch([Record(0, 10, None, b"a"), Record(0, 20, b"k", b"b", (("h", None),))],
                                   base_offset=5))
    struct.pack_into(">h", batch, r.ATTRIBUTES_OFFSET, r.TIMESTAMP_TYPE_MASK)
    struct.pack_into(">q", batch, r.MAX_TIMESTAMP_OFFSET, 99)
    (decoded,) = decode_batches(_resign(batch))
    assert decoded.log_append_time
    assert decoded.records_as(Record) == [Record(5, 99, None, b"a"), Record(6, 99, b"k", b"b", (("h", None),))]
    wide = decoded.records_as(Wide, ("t", 0))
    assert wide == [Wide("t", 0, 5, 99, None, b"a"), Wide("t", 0, 6, 99, b"k", b"b", (("h", None),))]
    assert all(type(x) is Wide for x in wide)
