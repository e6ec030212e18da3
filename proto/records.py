"""Kafka RecordBatch v2 (magic 2), byte for byte (DESIGN.md §2).

Two paths:

* the **header-only path** for the broker (`scan_batches`, `scan_valid_prefix`,
  `stamp_batches`): it checks lengths, magic and CRC-32C and rewrites baseOffset and
  partitionLeaderEpoch in place (the CRC covers neither), never touching individual records;
* the **record path** for clients and compaction (`encode_batch`, `decode_batches`), and for
  the producer, which builds a batch record by record as it is sent (`append_record`, then
  `finish_batch`: the same bytes as `encode_batch`).

Field positions are named constants, as in Kafka's ``DefaultRecordBatch``. Every kind of bad
input raises `CorruptRecordError` with a reason: the decoder checks each length against the bytes
that remain before it slices, so a lying length field never causes a large allocation or a hang.
"""

from __future__ import annotations

import enum
import struct
import zlib
from dataclasses import dataclass
from typing import Iterator, NamedTuple, Sequence, TypeVar, Union

import crc32c as _crc32c
import lz4.frame

Buffer = Union[bytes, bytearray, memoryview]

# Header layout, big-endian: name = byte position (DefaultRecordBatch.java).
BASE_OFFSET_OFFSET = 0
BATCH_LENGTH_OFFSET = 8
PARTITION_LEADER_EPOCH_OFFSET = 12
MAGIC_OFFSET = 16
CRC_OFFSET = 17
ATTRIBUTES_OFFSET = 21
LAST_OFFSET_DELTA_OFFSET = 23
BASE_TIMESTAMP_OFFSET = 27
MAX_TIMESTAMP_OFFSET = 35
PRODUCER_ID_OFFSET = 43
PRODUCER_EPOCH_OFFSET = 51
BASE_SEQUENCE_OFFSET = 53
RECORDS_COUNT_OFFSET = 57
RECORDS_OFFSET = 61
BATCH_OVERHEAD = RECORDS_OFFSET
# batchLength counts the bytes after itself, i.e. the whole batch minus baseOffset and batchLength.
LOG_OVERHEAD = BATCH_LENGTH_OFFSET + 4

MAGIC = 2
COMPRESSION_CODEC_MASK = 0x07
TIMESTAMP_TYPE_MASK = 0x08
TRANSACTIONAL_FLAG_MASK = 0x10
CONTROL_FLAG_MASK = 0x20
DELETE_HORIZON_FLAG_MASK = 0x40

NO_PRODUCER_ID = -1
NO_PRODUCER_EPOCH = -1
NO_SEQUENCE = -1
NO_TIMESTAMP = -1

# The smallest record: length, attributes, timestampDelta, offsetDelta, keyLength, valueLength
# and headerCount, each one byte. Used to reject a record count that the bytes cannot hold.
MIN_RECORD_SIZE = 7
# A decompressed batch larger than this is treated as corrupt rather than allocated.
MAX_DECOMPRESSED_BYTES = 256 * 1024 * 1024

# LZ4 frame header: FLG is the byte after the 4-byte magic; bit 3 says a content size follows.
_LZ4_CONTENT_SIZE_FLAG = 0x08
# One input byte of an LZ4 block expands to at most 255 output bytes.
_LZ4_MAX_RATIO = 255

_HEADER = struct.Struct(">qiibIhiqqqhii")
assert _HEADER.size == BATCH_OVERHEAD
_BASE_OFFSET = struct.Struct(">q")
_INT32 = struct.Struct(">i")


class CorruptRecordError(ValueError):
    """Bytes that are not a valid sequence of RecordBatch v2 batches."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Compression(enum.IntEnum):
    NONE = 0
    GZIP = 1
    SNAPPY = 2
    LZ4 = 3
    ZSTD = 4

    @classmethod
    def parse(cls, name: str | Compression | None) -> Compression:
        # None is "no compression", as kafka-python's and aiokafka's compression_type=None.
        if name is None:
            return cls.NONE
        if isinstance(name, Compression):
            return name
        try:
            return cls[name.upper()]
        except (KeyError, AttributeError):
            raise ValueError(
                f"unknown compression {name!r}; choose one of none, gzip, lz4"
            ) from None


_SUPPORTED_CODECS = frozenset({Compression.NONE, Compression.GZIP, Compression.LZ4})


class Record(NamedTuple):
    """One record. A NamedTuple, not a dataclass: consumers build one per record, and a
    NamedTuple costs a fifth of a frozen dataclass to construct."""

    offset: int
    timestamp: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes | None], ...] = ()


@dataclass(frozen=True, slots=True)
class BatchHeader:
    """The 61-byte header of one batch, read without decoding any record."""

    position: int
    size: int
    base_offset: int
    partition_leader_epoch: int
    attributes: int
    last_offset_delta: int
    base_timestamp: int
    max_timestamp: int
    producer_id: int
    producer_epoch: int
    base_sequence: int
    record_count: int

    @property
    def last_offset(self) -> int:
        return self.base_offset + self.last_offset_delta

    @property
    def next_offset(self) -> int:
        return self.base_offset + self.last_offset_delta + 1

    @property
    def compression(self) -> Compression:
        return Compression(self.attributes & COMPRESSION_CODEC_MASK)

    @property
    def is_control(self) -> bool:
        return bool(self.attributes & CONTROL_FLAG_MASK)

    @property
    def is_transactional(self) -> bool:
        return bool(self.attributes & TRANSACTIONAL_FLAG_MASK)

    @property
    def log_append_time(self) -> bool:
        return bool(self.attributes & TIMESTAMP_TYPE_MASK)

    @property
    def last_sequence(self) -> int:
        if self.base_sequence == NO_SEQUENCE:
            return NO_SEQUENCE
        return (self.base_sequence + self.last_offset_delta) & 0x7FFFFFFF


def _read_header(view: memoryview, position: int, *, verify_crc: bool) -> BatchHeader:
    """Parse and check the batch starting at ``position``; ``view`` may hold more after it."""
    available = len(view) - position
    if available < LOG_OVERHEAD:
        raise CorruptRecordError(
            f"truncated batch at byte {position}: {available} bytes, need at least {LOG_OVERHEAD}"
        )
    (batch_length,) = _INT32.unpack_from(view, position + BATCH_LENGTH_OFFSET)
    size = batch_length + LOG_OVERHEAD
    if size < BATCH_OVERHEAD:
        raise CorruptRecordError(
            f"batch at byte {position} declares length {batch_length}, "
            f"less than the {BATCH_OVERHEAD - LOG_OVERHEAD}-byte minimum"
        )
    if size > available:
        raise CorruptRecordError(
            f"truncated batch at byte {position}: declares {size} bytes, {available} present"
        )
    magic = view[position + MAGIC_OFFSET]
    if magic != MAGIC:
        raise CorruptRecordError(f"batch at byte {position} has magic {magic}; only magic 2 is supported")
    (
        base_offset,
        _,
        partition_leader_epoch,
        _,
        crc,
        attributes,
        last_offset_delta,
        base_timestamp,
        max_timestamp,
        producer_id,
        producer_epoch,
        base_sequence,
        record_count,
    ) = _HEADER.unpack_from(view, position)
    if verify_crc:
        actual = _crc32c.crc32c(view[position + ATTRIBUTES_OFFSET : position + size])
        if actual != crc:
            raise CorruptRecordError(
                f"CRC mismatch in batch at byte {position}: stored {crc:#010x}, computed {actual:#010x}"
            )
    if record_count < 0 or last_offset_delta < 0 or last_offset_delta < record_count - 1:
        raise CorruptRecordError(
            f"batch at byte {position} has record count {record_count} and "
            f"lastOffsetDelta {last_offset_delta}, which cannot both be right"
        )
    codec = attributes & COMPRESSION_CODEC_MASK
    if codec > Compression.ZSTD:
        raise CorruptRecordError(f"batch at byte {position} names unknown compression codec {codec}")
    if codec == Compression.NONE and record_count * MIN_RECORD_SIZE > size - BATCH_OVERHEAD:
        raise CorruptRecordError(
            f"batch at byte {position} claims {record_count} records in "
            f"{size - BATCH_OVERHEAD} bytes of uncompressed data"
        )
    return BatchHeader(
        position=position,
        size=size,
        base_offset=base_offset,
        partition_leader_epoch=partition_leader_epoch,
        attributes=attributes,
        last_offset_delta=last_offset_delta,
        base_timestamp=base_timestamp,
        max_timestamp=max_timestamp,
        producer_id=producer_id,
        producer_epoch=producer_epoch,
        base_sequence=base_sequence,
        record_count=record_count,
    )


def scan_batches(buf: Buffer, *, verify_crc: bool = True) -> list[BatchHeader]:
    """Headers of every batch in ``buf``, which must be whole valid batches and nothing else."""
    view = memoryview(buf).cast("B")
    headers: list[BatchHeader] = []
    position = 0
    while position < len(view):
        header = _read_header(view, position, verify_crc=verify_crc)
        headers.append(header)
        position += header.size
    return headers


def scan_valid_prefix(buf: Buffer, *, verify_crc: bool = True) -> tuple[list[BatchHeader], int]:
    """Headers of the longest valid prefix of ``buf`` and its length; stops at a torn tail."""
    view = memoryview(buf).cast("B")
    headers: list[BatchHeader] = []
    position = 0
    while position < len(view):
        try:
            header = _read_header(view, position, verify_crc=verify_crc)
        except CorruptRecordError:
            break
        headers.append(header)
        position += header.size
    return headers, position


def stamp_batches(buf: bytearray | memoryview, base_offset: int, partition_leader_epoch: int) -> int:
    """Give the batches in ``buf`` contiguous offsets from ``base_offset`` and the epoch, in place.

    ``buf`` must already have passed `scan_batches`. Returns the next offset to assign.
    """
    view = memoryview(buf).cast("B")
    position = 0
    next_offset = base_offset
    while position < len(view):
        (batch_length,) = _INT32.unpack_from(view, position + BATCH_LENGTH_OFFSET)
        (last_offset_delta,) = _INT32.unpack_from(view, position + LAST_OFFSET_DELTA_OFFSET)
        _BASE_OFFSET.pack_into(view, position + BASE_OFFSET_OFFSET, next_offset)
        _INT32.pack_into(view, position + PARTITION_LEADER_EPOCH_OFFSET, partition_leader_epoch)
        next_offset += last_offset_delta + 1
        position += batch_length + LOG_OVERHEAD
    return next_offset


# --- varints (zig-zag, as protobuf's sint32/sint64) -----------------------------------------


def _write_varint(out: bytearray, value: int) -> None:
    zigzag = (value << 1) ^ (value >> 63)
    zigzag &= 0xFFFFFFFFFFFFFFFF
    while zigzag > 0x7F:
        out.append((zigzag & 0x7F) | 0x80)
        zigzag >>= 7
    out.append(zigzag)


def _read_varint(view: Buffer, position: int, end: int, max_bytes: int) -> tuple[int, int]:
    result = 0
    shift = 0
    for i in range(max_bytes):
        if position + i >= end:
            raise CorruptRecordError("varint runs past the end of the record")
        byte = view[position + i]
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return (result >> 1) ^ -(result & 1), position + i + 1
        shift += 7
    raise CorruptRecordError(f"varint longer than {max_bytes} bytes")


# --- encoding -------------------------------------------------------------------------------


def _varint_bytes(value: int) -> bytes:
    out = bytearray()
    _write_varint(out, value)
    return bytes(out)


# Zig-zag varints of 0..8191 (one or two bytes): nearly every delta and length in a batch.
_SMALL_VARINTS = tuple(_varint_bytes(v) for v in range(8192))
_NULL_LENGTH = _varint_bytes(-1)
_NO_HEADERS = _varint_bytes(0)


# Fields that sit next to each other in a record, for `append_record`: the attributes byte (0,
# unused in v2) with a timestamp delta, and a null key's length with a value's length.
_ATTRIBUTES_AND_TIMESTAMP_DELTA = tuple(b"\x00" + varint for varint in _SMALL_VARINTS)
_NULL_KEY_AND_VALUE_LENGTH = tuple(_NULL_LENGTH + varint for varint in _SMALL_VARINTS)


def _varint(value: int) -> bytes:
    if 0 <= value < 8192:
        return _SMALL_VARINTS[value]
    return _varint_bytes(value)


def _write_bytes(out: bytearray, data: bytes | None) -> None:
    if data is None:
        out += _NULL_LENGTH
    else:
        out += _varint(len(data))
        out += data


def _encode_headers(headers: Sequence[tuple[str, bytes | None]]) -> bytes:
    out = bytearray(_varint(len(headers)))
    for header_key, header_value in headers:
        _write_bytes(out, header_key.encode("utf-8"))
        _write_bytes(out, header_value)
    return bytes(out)


def _compress(codec: Compression, data: Buffer) -> bytes:
    if codec is Compression.LZ4:
        # Kafka's framing: an LZ4 frame with independent 64 KiB blocks, no content size and no
        # content checksum (Lz4BlockOutputStream).
        return lz4.frame.compress(
            data,
            block_size=lz4.frame.BLOCKSIZE_MAX64KB,
            block_linked=False,
            content_checksum=False,
            store_size=False,
        )
    if codec is Compression.GZIP:
        compressor = zlib.compressobj(wbits=31)
        return compressor.compress(data) + compressor.flush()
    raise ValueError(f"compression {codec.name.lower()} is not supported; use none, gzip or lz4")


def _decompress(codec: Compression, data: memoryview) -> bytes:
    if codec not in _SUPPORTED_CODECS:
        raise CorruptRecordError(f"compression {codec.name.lower()} is not supported by this tidelog")
    try:
        if (
            codec is Compression.LZ4
            and len(data) > 4
            and not data[4] & _LZ4_CONTENT_SIZE_FLAG
            and len(data) * _LZ4_MAX_RATIO <= MAX_DECOMPRESSED_BYTES
        ):
            # Without a stored content size (which lz4 would trust and allocate), the output of
            # a frame is bounded by LZ4's maximum ratio, so the one-shot call (twice as fast)
            # cannot be made to allocate more than the cap. lz4 reads the view in place.
            out = lz4.frame.decompress(data)
            complete = True
        elif codec is Compression.LZ4:
            decompressor = lz4.frame.LZ4FrameDecompressor()
            out = decompressor.decompress(bytes(data), max_length=MAX_DECOMPRESSED_BYTES)
            complete = decompressor.eof
        else:
            zdecompressor = zlib.decompressobj(wbits=31)
            out = zdecompressor.decompress(bytes(data), MAX_DECOMPRESSED_BYTES)
            complete = zdecompressor.eof
    except (RuntimeError, zlib.error, ValueError) as exc:
        raise CorruptRecordError(f"{codec.name.lower()} data does not decompress: {exc}") from None
    if not complete:
        raise CorruptRecordError(
            f"{codec.name.lower()} data is truncated or expands past {MAX_DECOMPRESSED_BYTES} bytes"
        )
    return out


def append_record(
    out: list[bytes],
    offset_delta: int,
    timestamp_delta: int,
    key: bytes | None,
    value: bytes | None,
    headers: Sequence[tuple[str, bytes | None]],
) -> None:
    """Add one record's bytes to a batch's records section as it is built (Kafka's
    MemoryRecordsBuilder): the same bytes `encode_batch` writes for it, so `finish_batch` over
    ``out`` then makes the same batch. The producer calls this per record, in `send`,
    so that no record waits in a queue as a tuple of Python objects: bytes objects are not
    tracked by the garbage collector.

    The section is a list of parts, joined once by `finish_batch`, rather than a growing
    bytearray, which is reallocated (and copied) every eighth of its size: that took a sixth of
    the producer's per-record CPU. Nothing is added unless the whole record is: a failure
    leaves ``out`` as it was.
    """
    if (key is None and value is not None and not headers and 0 <= timestamp_delta < 8192
            and 0 <= offset_delta < 8192 and len(value) < 8192):
        # The common case (no key, no headers, small deltas): every varint is a table lookup
        # and neighbouring fields come from one table entry.
        head = _ATTRIBUTES_AND_TIMESTAMP_DELTA[timestamp_delta]
        offset_part = _SMALL_VARINTS[offset_delta]
        value_head = _NULL_KEY_AND_VALUE_LENGTH[len(value)]
        length = len(head) + len(offset_part) + len(value_head) + len(value) + 1
        out += (_SMALL_VARINTS[length] if length < 8192 else _varint_bytes(length), head,
                offset_part, value_head, value, _NO_HEADERS)
        return
    out.append(_encode_one(offset_delta, timestamp_delta, key, value, headers))


def _encode_one(
    offset_delta: int,
    timestamp_delta: int,
    key: bytes | None,
    value: bytes | None,
    headers: Sequence[tuple[str, bytes | None]],
) -> bytes:
    """One record: the general case of `append_record`."""
    body = bytearray(b"\x00")
    body += _varint(timestamp_delta)
    body += _varint(offset_delta)
    _write_bytes(body, key)
    _write_bytes(body, value)
    body += _encode_headers(headers) if headers else _NO_HEADERS
    return _varint(len(body)) + bytes(body)


def finish_batch(
    records: list[bytes],
    timestamps: Sequence[int],
    *,
    base_offset: int = 0,
    compression: str | Compression = "none",
    producer_id: int = NO_PRODUCER_ID,
    producer_epoch: int = NO_PRODUCER_EPOCH,
    base_sequence: int = NO_SEQUENCE,
    partition_leader_epoch: int = 0,
    is_transactional: bool = False,
    is_control: bool = False,
) -> bytes:
    """The batch around a records section built with `append_record` (its parts), whose
    records had ``timestamps`` (one each, in order; the first is the batch's base timestamp)."""
    if not timestamps:
        raise ValueError("a batch needs at least one record")
    return _finish(b"".join(records), len(timestamps), timestamps[0], max(timestamps),
                   Compression.parse(compression), base_offset, producer_id, producer_epoch,
                   base_sequence, partition_leader_epoch, is_transactional, is_control)


def encode_batch(
    records: Sequence[Record],
    *,
    base_offset: int = 0,
    compression: str | Compression = "none",
    producer_id: int = NO_PRODUCER_ID,
    producer_epoch: int = NO_PRODUCER_EPOCH,
    base_sequence: int = NO_SEQUENCE,
    partition_leader_epoch: int = 0,
    is_transactional: bool = False,
    is_control: bool = False,
) -> bytes:
    """One batch holding ``records`` (Records, or plain tuples of a Record's fields); record i
    gets offset ``base_offset + i``. Built as the producer builds its batches (`append_record`,
    then `finish_batch`), so the format has one record encoder."""
    if not records:
        raise ValueError("a batch needs at least one record")
    base_timestamp = records[0][1]
    parts: list[bytes] = []
    timestamps: list[int] = []
    for index, (_, timestamp, key, value, headers) in enumerate(records):
        append_record(parts, index, timestamp - base_timestamp, key, value, headers)
        timestamps.append(timestamp)
    return finish_batch(parts, timestamps, base_offset=base_offset, compression=compression,
                        producer_id=producer_id, producer_epoch=producer_epoch,
                        base_sequence=base_sequence, partition_leader_epoch=partition_leader_epoch,
                        is_transactional=is_transactional, is_control=is_control)


def _finish(
    payload: Buffer,
    count: int,
    base_timestamp: int,
    max_timestamp: int,
    codec: Compression,
    base_offset: int,
    producer_id: int,
    producer_epoch: int,
    base_sequence: int,
    partition_leader_epoch: int,
    is_transactional: bool,
    is_control: bool,
) -> bytes:
    """Compress the records section and put the header (and its CRC) in front."""
    if codec is not Compression.NONE:
        payload = _compress(codec, payload)
    attributes = codec.value
    if is_transactional:
        attributes |= TRANSACTIONAL_FLAG_MASK
    if is_control:
        attributes |= CONTROL_FLAG_MASK
    header = bytearray(BATCH_OVERHEAD)
    _HEADER.pack_into(
        header,
        0,
        base_offset,
        BATCH_OVERHEAD + len(payload) - LOG_OVERHEAD,
        partition_leader_epoch,
        MAGIC,
        0,
        attributes,
        count - 1,
        base_timestamp,
        max_timestamp,
        producer_id,
        producer_epoch,
        base_sequence,
        count,
    )
    # The CRC runs over the header's tail and then the payload, so the payload is copied once,
    # into the returned bytes.
    crc = _crc32c.crc32c(payload, _crc32c.crc32c(memoryview(header)[ATTRIBUTES_OFFSET:]))
    struct.pack_into(">I", header, CRC_OFFSET, crc)
    header += payload
    return bytes(header)


# --- decoding -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RecordBatch(BatchHeader):
    """A checked batch: its header fields plus the bytes to decode records from on demand."""

    buffer: memoryview

    def records(self) -> Iterator[Record]:
        return iter(self.records_as(Record))

    def records_as(self, record_type: type[_RecordT], head: tuple = ()) -> list[_RecordT]:
        """Every record of the batch as ``record_type`` built from ``head + (offset, timestamp,
        key, value, headers)``: a consumer gets its own record type with the topic and partition
        in front in one step, instead of building a `Record` and then copying it into another
        tuple (which was a fifth of its decoding). ``record_type`` is a tuple subclass, such as
        a NamedTuple, whose fields are those."""
        payload = self.buffer[BATCH_OVERHEAD : self.size]
        codec = self.attributes & COMPRESSION_CODEC_MASK
        # Indexing `bytes` is the cheapest access CPython offers: the payload is copied into one
        # once per batch (a decompressed payload already is one).
        data = bytes(payload) if codec == Compression.NONE else _decompress(Compression(codec), payload)
        try:
            return _decode_records_unchecked(self, data, record_type, head)
        except IndexError:
            # A varint's fast path ran off the end of the data: the lengths before it lied.
            raise CorruptRecordError("a record runs past the end of its batch") from None


_RecordT = TypeVar("_RecordT", bound=tuple)  # type: ignore[type-arg]

# The zig-zag value of a varint's first byte when that byte is the whole varint (< 0x80); the
# decoder reads this table only for such bytes.
_ONE_BYTE_VARINT = tuple((b >> 1) ^ -(b & 1) for b in range(0x80))


def _two_byte_varints() -> tuple[int, ...]:
    # Indexed by first + (second << 7) for a first byte >= 0x80 and a second < 0x80, which is
    # the 14-bit value (first & 0x7F) | (second << 7) shifted up by 0x80: one addition, one
    # shift and one lookup instead of the masking, shifting and zig-zag arithmetic.
    table = [0] * (0x100 + (0x7F << 7))
    for first in range(0x80, 0x100):
        for second in range(0x80):
            raw = (first & 0x7F) | (second << 7)
            table[first + (second << 7)] = (raw >> 1) ^ -(raw & 1)
    return tuple(table)


_TWO_BYTE_VARINT = _two_byte_varints()


def _decode_records_unchecked(
    batch: BatchHeader, data: bytes, record_type: type[_RecordT], head: tuple  # type: ignore[type-arg]
) -> list[_RecordT]:
    # The consumer's hot path, so varints of one and two bytes (nearly every length, delta and
    # count in a batch is below 8192) are decoded inline through the tables above; longer ones
    # go through _read_varint. Every field is still checked against its record's end; an index
    # past the data raises IndexError, which the caller turns into CorruptRecordError.
    out: list[_RecordT] = []
    append = out.append
    end = len(data)
    count = batch.record_count
    if count * MIN_RECORD_SIZE > end:
        raise CorruptRecordError(f"{count} records cannot fit in {end} bytes")
    base_offset = batch.base_offset
    base_timestamp = batch.base_timestamp
    max_delta = batch.last_offset_delta
    # A consumer's (topic, partition) goes into the one tuple built per record: `head + fields`
    # built a second tuple per record, a twentieth of the decode.
    pair = len(head) == 2
    h0, h1 = head if pair else (None, None)
    read = _read_varint
    new_tuple = tuple.__new__
    one = _ONE_BYTE_VARINT
    two = _TWO_BYTE_VARINT
    p = 0
    for _ in range(count):
        b = data[p]
        if b < 0x80:
            length = one[b]
            p += 1
        else:
            c = data[p + 1]
            if c < 0x80:
                length = two[b + (c << 7)]
                p += 2
            else:
                length, p = read(data, p, end, 5)
        record_end = p + length
        if length < MIN_RECORD_SIZE - 1 or record_end > end:
            raise CorruptRecordError(f"record length {length} does not fit the batch")
        # data[p] is the record's attributes byte, unused in v2.
        b = data[p + 1]
        if b < 0x80:
            timestamp = base_timestamp + one[b]
            p += 2
        else:
            c = data[p + 2]
            if c < 0x80:
                timestamp = base_timestamp + two[b + (c << 7)]
                p += 3
            else:
                timestamp_delta, p = read(data, p + 1, record_end, 10)
                timestamp = base_timestamp + timestamp_delta
        b = data[p]
        if b < 0x80:
            offset_delta = one[b]
            p += 1
        else:
            c = data[p + 1]
            if c < 0x80:  # records 64..8191 of a batch
                offset_delta = two[b + (c << 7)]
                p += 2
            else:
                offset_delta, p = read(data, p, record_end, 5)
        if offset_delta < 0 or offset_delta > max_delta:
            raise CorruptRecordError(f"record offset delta {offset_delta} outside 0..{max_delta}")
        if data[p] == 1:  # -1: a null key, the common case
            key = None
            p += 1
        else:
            key, p = _decode_bytes(data, p, record_end)
        b = data[p]
        if b < 0x80:
            value_length = one[b]
            p += 1
        else:
            c = data[p + 1]
            if c < 0x80:
                value_length = two[b + (c << 7)]
                p += 2
            else:
                value_length, p = read(data, p, record_end, 5)
        value_end = p + value_length
        if value_end + 1 == record_end and value_length >= 0 and data[value_end] == 0:
            # The common record: a value, then a header count of 0 as its last byte. Every
            # field read so far lies before value_end, so inside the record: the one test
            # stands for the value's bound check, the headers' and the length's.
            value: bytes | None = data[p:value_end]
            headers: tuple[tuple[str, bytes | None], ...] = ()
        else:
            if value_length < 0:
                value = None
            elif value_length > record_end - p:
                raise CorruptRecordError(f"value of {value_length} bytes runs past the end of its record")
            else:
                value = data[p:value_end]
                p = value_end
            if p < record_end and data[p] == 0:
                headers = ()
                p += 1
            else:
                header_count, p = read(data, p, record_end, 5)
                headers, p = _decode_headers(data, p, record_end, header_count)
            if p != record_end:
                raise CorruptRecordError(
                    f"record declares {length} bytes but its fields take {length - (record_end - p)}"
                )
        p = record_end
        # tuple.__new__ skips a NamedTuple's Python-level __new__: a tenth of the decode cost.
        if pair:
            append(new_tuple(record_type, (h0, h1, base_offset + offset_delta, timestamp, key, value, headers)))
        else:
            append(new_tuple(record_type, head + (base_offset + offset_delta, timestamp, key, value, headers)))
    if p != end:
        raise CorruptRecordError(f"{end - p} bytes left over after {count} records")
    if batch.log_append_time:
        # The broker's append time stands for every record's: rare, so kept off the loop above.
        at = len(head) + 1
        stamp = (batch.max_timestamp,)
        return [new_tuple(record_type, r[:at] + stamp + r[at + 1:]) for r in out]
    return out


def _decode_bytes(data: bytes, position: int, end: int) -> tuple[bytes | None, int]:
    length, position = _read_varint(data, position, end, 5)
    if length < 0:
        return None, position
    if length > end - position:
        raise CorruptRecordError(f"field of {length} bytes runs past the end of its record")
    return data[position : position + length], position + length


def _decode_headers(
    data: bytes, position: int, end: int, count: int
) -> tuple[tuple[tuple[str, bytes | None], ...], int]:
    if count < 0 or count * 2 > end - position:
        raise CorruptRecordError(f"header count {count} does not fit the record")
    headers = []
    for _ in range(count):
        raw_key, position = _decode_bytes(data, position, end)
        if raw_key is None:
            raise CorruptRecordError("record header with a null key")
        try:
            header_key = raw_key.decode("utf-8")
        except UnicodeDecodeError:
            raise CorruptRecordError("record header key is not UTF-8") from None
        header_value, position = _decode_bytes(data, position, end)
        headers.append((header_key, header_value))
    return tuple(headers), position


def decode_batches(buf: Buffer, *, verify_crc: bool = True) -> Iterator[RecordBatch]:
    """Each batch of ``buf`` in turn, checked as `scan_batches` checks it."""
    view = memoryview(buf).cast("B")
    position = 0
    while position < len(view):
        header = _read_header(view, position, verify_crc=verify_crc)
        fields = {name: getattr(header, name) for name in BatchHeader.__dataclass_fields__}
        yield RecordBatch(**fields, buffer=view[position : position + header.size])
        position += header.size


def decode_records(buf: Buffer) -> list[Record]:
    """Every record of every non-control batch in ``buf``: what a consumer sees."""
    return [
        record
        for batch in decode_batches(buf)
        if not batch.is_control
        for record in batch.records()
    ]
