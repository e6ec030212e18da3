"""The RecordBatch v2 codec: round trips, Kafka's byte layout, and bad input (DESIGN.md §2)."""

from __future__ import annotations

import struct
from typing import NamedTuple

import crc32c
import lz4.frame
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kafka.record.default_records import DefaultRecordBatch, DefaultRecordBatchBuilder

from tidelog.proto import records as r
from tidelog.proto.records import (
    CorruptRecordError,
    Record,
    decode_batches,
    decode_records,
    encode_batch,
    scan_batches,
    scan_valid_prefix,
    stamp_batches,
)

KAFKA_CODEC = {"none": 0, "gzip": 1, "lz4": 3}

timestamps = st.integers(min_value=0, max_value=2**41)
optional_bytes = st.none() | st.binary(max_size=64)
headers = st.lists(st.tuples(st.text(max_size=8), optional_bytes), max_size=3).map(tuple)
records_strategy = st.lists(
    st.builds(Record, offset=st.just(0), timestamp=timestamps, key=optional_bytes,
              value=optional_bytes, headers=headers),
    min_size=1,
    max_size=20,
)
codecs = st.sampled_from(["none", "gzip", "lz4"])


def _expected(records: list[Record], base_offset: int) -> list[Record]:
    return [
        Record(base_offset + i, rec.timestamp, rec.key, rec.value, rec.headers)
        for i, rec in enumerate(records)
    ]


@given(records_strategy, codecs, st.integers(min_value=0, max_value=2**40))
def test_round_trip_keeps_every_field_and_numbers_offsets_from_base(records, codec, base_offset):
    batch = encode_batch(records, base_offset=base_offset, compression=codec)
    (decoded,) = list(decode_batches(batch))
    assert decoded.base_offset == base_offset
    assert decoded.last_offset == base_offset + len(records) - 1
    assert decoded.record_count == len(records)
    assert decoded.max_timestamp == max(rec.timestamp for rec in records)
    assert decoded.compression.name.lower() == codec
    assert list(decoded.records()) == _expected(records, base_offset)


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(records_strategy, codecs)
def test_kafka_python_reads_what_we_write(records, codec):
    batch = encode_batch(records, base_offset=7, compression=codec, producer_id=42,
                         producer_epoch=3, base_sequence=11, partition_leader_epoch=5)
    theirs = DefaultRecordBatch(batch)
    assert theirs.validate_crc()
    assert (theirs.base_offset, theirs.producer_id, theirs.producer_epoch, theirs.base_sequence) == (7, 42, 3, 11)
    assert theirs.compression_type == KAFKA_CODEC[codec]
    got = [(m.offset, m.timestamp, m.key, m.value, tuple(m.headers)) for m in theirs]
    want = [(x.offset, x.timestamp, x.key, x.value, x.headers) for x in _expected(records, 7)]
    assert got == want


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(records_strategy, codecs)
def test_we_read_what_kafka_python_writes(records, codec):
    builder = DefaultRecordBatchBuilder(
        magic=2, compression_type=KAFKA_CODEC[codec], is_transactional=False,
        producer_id=-1, producer_epoch=-1, base_sequence=-1, batch_size=1 << 30,
    )
    for i, rec in enumerate(records):
        builder.append(i, rec.timestamp, rec.key, rec.value, list(rec.headers))
    batch = bytes(builder.build())
    (header,) = scan_batches(batch)
    assert header.record_count == len(records)
    assert decode_records(batch) == _expected(records, 0)


# Records whose varints take one, two and three bytes: values and keys across the 64-byte and
# 8192-byte steps of a zig-zag varint, timestamp deltas across the same steps (milliseconds
# apart up to hours), and batches of more than 64 records (two-byte offset deltas).
_sizes = st.sampled_from([0, 1, 63, 64, 65, 200, 8191, 8192, 9000])
# Built from a size and one byte, not drawn byte by byte: hypothesis's buffer is far smaller
# than a batch of such records.
_wide_bytes = st.none() | st.builds(lambda n, b: bytes([b]) * n, _sizes, st.integers(0, 255))
_wide_batches = st.tuples(
    st.integers(min_value=0, max_value=2**41),
    st.lists(st.tuples(st.sampled_from([0, 1, 63, 64, 8191, 8192, 3_600_000]), _wide_bytes,
                       _wide_bytes, headers), min_size=1, max_size=150),
)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(_wide_batches, codecs)
def test_every_varint_width_decodes_as_kafka_python_writes_it(batch_spec, codec):
    base_timestamp, specs = batch_spec
    builder = DefaultRecordBatchBuilder(
        magic=2, compression_type=KAFKA_CODEC[codec], is_transactional=False,
        producer_id=-1, producer_epoch=-1, base_sequence=-1, batch_size=1 << 30,
    )
    want = []
    for i, (delta, key, value, record_headers) in enumerate(specs):
        builder.append(i, base_timestamp + delta, key, value, list(record_headers))
        want.append(Record(i, base_timestamp + delta, key, value, record_headers))
    assert decode_records(bytes(builder.build())) == want


def test_records_as_builds_the_callers_record_type_with_its_fields_in_front():
    class Wide(NamedTuple):
        topic: str
        partition: int
        offset: int
        timestamp: int
        key: bytes | None
        value: bytes | None
        headers: tuple = ()

    batch = encode_batch([Record(0, 5, b"k", b"v", (("h", b"x"),)), Record(0, 6, None, None)],
                         base_offset=3, compression="lz4")
    (decoded,) = decode_batches(batch)
    assert decoded.records_as(Wide, ("t", 2)) == [
        Wide("t", 2, 3, 5, b"k", b"v", (("h", b"x"),)), Wide("t", 2, 4, 6, None, None, ())]
    assert all(type(w) is Wide for w in decoded.records_as(Wide, ("t", 2)))
    assert [type(x) for x in decoded.records()] == [Record, Record]


def test_header_fields_sit_at_kafkas_byte_positions():
    batch = encode_batch([Record(0, 1000, b"k", b"v"), Record(0, 1005, None, b"w")],
                         base_offset=9, producer_id=77, producer_epoch=2, base_sequence=4,
                         partition_leader_epoch=6, is_control=True)
    assert struct.unpack_from(">q", batch, 0)[0] == 9
    assert struct.unpack_from(">i", batch, 8)[0] == len(batch) - 12
    assert struct.unpack_from(">i", batch, 12)[0] == 6
    assert batch[16] == 2
    assert struct.unpack_from(">I", batch, 17)[0] == crc32c.crc32c(batch[21:])
    assert struct.unpack_from(">h", batch, 21)[0] == 0x20  # control bit, no compression
    assert struct.unpack_from(">i", batch, 23)[0] == 1
    assert struct.unpack_from(">qq", batch, 27) == (1000, 1005)
    assert struct.unpack_from(">qhii", batch, 43) == (77, 2, 4, 2)


def test_lz4_payload_is_a_frame_with_independent_blocks_and_no_content_size():
    batch = encode_batch([Record(0, 1, None, b"x" * 200_000)], compression="lz4")
    payload = batch[r.BATCH_OVERHEAD:]
    assert struct.unpack_from("<I", payload, 0)[0] == 0x184D2204
    flg, bd = payload[4], payload[5]
    assert flg >> 6 == 1, "frame version 01"
    assert flg & 0x20, "block independence set, as Kafka requires"
    assert not flg & 0x08, "no content size"
    assert not flg & 0x04, "no content checksum"
    assert (bd >> 4) & 0x7 == 4, "64 KiB maximum block size"
    assert lz4.frame.decompress(bytes(payload))


def test_scan_and_stamp_assign_contiguous_offsets_and_the_epoch_without_breaking_the_crc():
    batches = b"".join(
        encode_batch([Record(0, 5, None, b"a")] * n) for n in (3, 1, 4)
    )
    buf = bytearray(batches)
    assert stamp_batches(buf, 100, 7) == 108
    headers = scan_batches(buf)
    assert [(h.base_offset, h.last_offset, h.partition_leader_epoch) for h in headers] == [
        (100, 102, 7), (103, 103, 7), (104, 107, 7)
    ]
    assert [rec.offset for rec in decode_records(buf)] == list(range(100, 108))


def test_unknown_codec_in_a_batch_is_a_clear_error():
    batch = bytearray(encode_batch([Record(0, 1, None, b"v")]))
    struct.pack_into(">h", batch, 21, 6)
    struct.pack_into(">I", batch, 17, crc32c.crc32c(bytes(batch[21:])))
    with pytest.raises(CorruptRecordError, match="unknown compression codec 6"):
        scan_batches(batch)


def test_unsupported_codec_name_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown compression 'brotli'"):
        encode_batch([Record(0, 1, None, b"v")], compression="brotli")


def _resign(batch: bytearray) -> bytearray:
    struct.pack_into(">I", batch, 17, crc32c.crc32c(bytes(batch[21:])))
    return batch


@pytest.mark.parametrize(
    "damage, reason",
    [
        (lambda b: b[:30], "truncated"),
        (lambda b: b[:-1], "truncated"),
        (lambda b: b[:16] + b"\x01" + b[17:], "magic 1"),
        (lambda b: b[:-1] + bytes([b[-1] ^ 0xFF]), "CRC mismatch"),
        (lambda b: b[:8] + struct.pack(">i", 2**31 - 1) + b[12:], "truncated"),
        (lambda b: b[:8] + struct.pack(">i", 3) + b[12:], "less than"),
        (lambda b: _resign(bytearray(b[:57] + struct.pack(">i", 10**6) + b[61:])), "cannot"),
    ],
)
def test_damaged_batches_raise_corrupt_record_error_with_a_reason(damage, reason):
    batch = encode_batch([Record(0, 1, b"key", b"value"), Record(0, 2, None, b"v2")])
    with pytest.raises(CorruptRecordError, match=reason):
        list(decode_records(damage(batch)))


def test_a_varint_that_never_ends_is_rejected():
    batch = bytearray(encode_batch([Record(0, 1, b"key", b"value")]))
    batch[r.BATCH_OVERHEAD:] = b"\xff" * (len(batch) - r.BATCH_OVERHEAD)
    with pytest.raises(CorruptRecordError, match="varint"):
        decode_records(_resign(batch))


def test_scan_valid_prefix_stops_at_a_torn_tail():
    good = encode_batch([Record(0, 1, None, b"a")]) + encode_batch([Record(0, 2, None, b"b")])
    torn = good + encode_batch([Record(0, 3, None, b"c")])[:-5]
    headers, valid = scan_valid_prefix(torn)
    assert (len(headers), valid) == (2, len(good))


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(records_strategy, codecs, st.data())
def test_arbitrary_damage_only_ever_raises_corrupt_record_error(records, codec, data):
    """A flipped, cut or overwritten byte anywhere: CorruptRecordError or valid records, never a crash."""
    batch = bytearray(encode_batch(records, compression=codec))
    kind = data.draw(st.sampled_from(["flip", "cut", "overwrite", "resigned-overwrite"]))
    position = data.draw(st.integers(0, len(batch) - 1))
    if kind == "cut":
        batch = batch[:position]
    else:
        batch[position] = data.draw(st.integers(0, 255))
        if kind == "flip":
            batch[position] ^= 0xFF
        if kind == "resigned-overwrite" and position >= 21:
            _resign(batch)
    try:
        for decoded in decode_batches(batch):
            for record in decoded.records():
                assert isinstance(record, Record)
    except CorruptRecordError as exc:
        assert exc.reason


@settings(max_examples=200)
@given(st.binary(max_size=300))
def test_random_bytes_never_raise_anything_but_corrupt_record_error(blob):
    try:
        decode_records(blob)
    except CorruptRecordError:
        pass


def test_lz4_frames_with_a_stored_content_size_take_the_bounded_path_and_decode():
    """Another writer may store the content size; lz4 would trust it, so we stream those frames."""
    records = [Record(0, 1, None, b"y" * 5000), Record(0, 2, b"k", b"z")]
    batch = bytearray(encode_batch(records))
    payload = lz4.frame.compress(bytes(batch[r.BATCH_OVERHEAD:]), store_size=True)
    assert payload[4] & 0x08
    framed = bytearray(batch[: r.BATCH_OVERHEAD] + payload)
    struct.pack_into(">i", framed, 8, len(framed) - 12)
    struct.pack_into(">h", framed, 21, 3)
    assert [rec.value for rec in decode_records(_resign(framed))] == [b"y" * 5000, b"z"]


def test_compression_names_parse_case_blind_and_none_means_uncompressed() -> None:
    Compression = r.Compression
    assert Compression.parse(None) is Compression.NONE
    assert Compression.parse("LZ4") is Compression.LZ4 and Compression.parse("none") is Compression.NONE
    assert Compression.parse(Compression.GZIP) is Compression.GZIP
    for bad in ("brotli", 3):
        with pytest.raises(ValueError, match="unknown compression"):
            Compression.parse(bad)  # type: ignore[arg-type]
