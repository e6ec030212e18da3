"""Protobuf's wire format, for the few messages tidelog encodes and decodes by hand.

Those carry record batches (a produce request, a replication envelope): protobuf's Python
messages copy a bytes field on every parse, read and assignment, and these bytes are nearly all
the traffic. Hand-coding them keeps the records as views of the buffer gRPC delivered, with the
same bytes on the wire (see `tidelog.node.transport`, `tidelog.node.services` and the client's
produce request in `tidelog.client.producer`).
"""

from __future__ import annotations

WIRE_VARINT, WIRE_I64, WIRE_LEN, WIRE_I32 = 0, 1, 2, 5


def encode_varint(value: int) -> bytes:
    """An unsigned varint (lengths and keys)."""
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def read_varint(data: bytes, position: int) -> tuple[int, int]:
    """(value, position after it); IndexError when ``data`` ends inside it."""
    byte = data[position]
    if byte < 0x80:
        return byte, position + 1
    value = byte & 0x7F
    shift = 7
    position += 1
    while True:
        byte = data[position]
        value |= (byte & 0x7F) << shift
        position += 1
        if byte < 0x80:
            return value, position
        shift += 7
        if shift > 63:
            raise ValueError("varint longer than 10 bytes")


def signed(value: int) -> int:
    """An int32 or int64 field's value: negative numbers travel as 64-bit two's complement."""
    return value - (1 << 64) if value >= 1 << 63 else value


def skip_field(data: bytes, position: int, wire_type: int) -> int:
    """The position after a field's value (an unknown field, as protobuf skips them)."""
    if wire_type == WIRE_VARINT:
        return read_varint(data, position)[1]
    if wire_type == WIRE_LEN:
        length, position = read_varint(data, position)
        return position + length
    if wire_type == WIRE_I64:
        return position + 8
    if wire_type == WIRE_I32:
        return position + 4
    raise ValueError(f"unsupported wire type {wire_type}")


def length_delimited(data: bytes, position: int) -> tuple[int, int]:
    """(start, end) of a length-delimited value at ``position``; ValueError past the end."""
    length, start = read_varint(data, position)
    end = start + length
    if end > len(data):
        raise ValueError("a field runs past the end of its message")
    return start, end
