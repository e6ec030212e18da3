"""The producer's batch builder (`append_record` + `finish_batch`) writes the bytes `encode_batch`
writes for the same records, whichever of its paths each record takes."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tidelog.proto.records import (
    Compression,
    Record,
    append_record,
    decode_batches,
    encode_batch,
    finish_batch,
)

# Around the fast path's edges: negative, small and past-8192 timestamp deltas.
base_timestamps = st.integers(min_value=0, max_value=2**41)
deltas = st.sampled_from([0, 1, 63, 64, 8191, 8192]) | st.integers(min_value=-(2**20), max_value=2**20)
optional_bytes = st.none() | st.binary(max_size=64)
headers = st.lists(st.tuples(st.text(max_size=8), optional_bytes), max_size=3).map(tuple)
record_specs = st.lists(st.tuples(deltas, optional_bytes, optional_bytes, headers), min_size=1, max_size=30)
codecs = st.sampled_from([Compression.NONE, Compression.GZIP, Compression.LZ4])


def built(records: list[Record], **header: object) -> bytes:
    parts: list[bytes] = []
    base = records[0].timestamp
    for offset_delta, record in enumerate(records):
        append_record(parts, offset_delta, record.timestamp - base, record.key, record.value, record.headers)
    return finish_batch(parts, [record.timestamp for record in records], **header)  # type: ignore[arg-type]


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(base_timestamps, record_specs, codecs,
       st.tuples(st.integers(-1, 2**40), st.integers(-1, 2**15 - 1), st.integers(-1, 2**31 - 1)))
def test_built_batches_are_byte_identical_to_encode_batch(base, specs, codec, producer):
    records = [Record(0, base + delta if i else base, key, value, hdrs)
               for i, (delta, key, value, hdrs) in enumerate(specs)]
    producer_id, epoch, sequence = producer
    header = dict(compression=codec, producer_id=producer_id, producer_epoch=epoch,
                  base_sequence=sequence)
    assert built(records, **header) == encode_batch(records, **header)


@pytest.mark.parametrize("value_size", [8000, 8191, 8192, 20000])
def test_large_values_and_offsets_past_the_one_byte_tables_match_too(value_size: int) -> None:
    # Offsets past 8192 and values near the fast path's 8192-byte edge (varints of 2 and 3 bytes).
    records = [Record(0, 1000 + i % 3, None, bytes(value_size if i % 500 == 0 else 3), ())
               for i in range(8300)]
    batch = built(records, compression=Compression.NONE)
    assert batch == encode_batch(records)
    (decoded,) = decode_batches(batch)
    assert [r.offset for r in decoded.records()][-2:] == [8298, 8299]


def test_a_record_that_cannot_be_encoded_leaves_the_section_as_it_was() -> None:
    parts: list[bytes] = []
    append_record(parts, 0, 0, None, b"first", ())
    before = list(parts)
    with pytest.raises(AttributeError):
        append_record(parts, 1, 0, b"k", b"v", ((b"not a str", b"x"),))  # type: ignore[arg-type]
    assert parts == before
