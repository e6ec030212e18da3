"""The rpk offset grammar of `tidelog consume -o` (REFERENCE.md §8)."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from tidelog.client.offsets import (
    EARLIEST,
    LATEST,
    BoundKind,
    OffsetBound,
    OffsetRange,
    PartitionBounds,
    parse_duration_ms,
    parse_offset_spec,
    parse_timestamp,
    resolve_end,
    resolve_start,
)

NOW = 1_700_000_000_000
HOUR = 3_600_000


def off(n: int) -> OffsetBound:
    return OffsetBound(BoundKind.OFFSET, n)


def ts(t: int) -> OffsetBound:
    return OffsetBound(BoundKind.TIMESTAMP, t)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("start", OffsetRange(EARLIEST)),
        ("oldest", OffsetRange(EARLIEST)),
        ("beginning", OffsetRange(EARLIEST)),
        ("end", OffsetRange(LATEST)),
        ("newest", OffsetRange(LATEST)),
        ("47", OffsetRange(off(47))),
        ("+3", OffsetRange(OffsetBound(BoundKind.FROM_START, 3))),
        ("-3", OffsetRange(OffsetBound(BoundKind.FROM_END, 3))),
        ("10:", OffsetRange(off(10))),
        (":10", OffsetRange(EARLIEST, off(10))),
        ("47:53", OffsetRange(off(47), off(53))),
        ("47-53", OffsetRange(off(47), off(53))),
        ("47:end", OffsetRange(off(47), LATEST)),
        (":end", OffsetRange(EARLIEST, LATEST)),
        ("start:end", OffsetRange(EARLIEST, LATEST)),
        ("@1700000000000", OffsetRange(ts(1_700_000_000_000))),
        ("@1700000000", OffsetRange(ts(1_700_000_000_000))),  # 10 digits: seconds
        ("@-1h", OffsetRange(ts(NOW - HOUR))),
        ("@-1h30m", OffsetRange(ts(NOW - HOUR - 30 * 60_000))),
        ("@-2h:1h", OffsetRange(ts(NOW - 2 * HOUR), ts(NOW - HOUR))),  # second relative to first
        ("@-1h:end", OffsetRange(ts(NOW - HOUR), LATEST)),
        ("@1000:2000", OffsetRange(ts(1000), ts(2000))),
    ],
)
def test_offset_grammar(text: str, expected: OffsetRange) -> None:
    assert parse_offset_spec(text, NOW) == expected


def test_dates_and_iso_times_are_utc_unless_zoned() -> None:
    day = int(datetime(2024, 5, 1, tzinfo=timezone.utc).timestamp() * 1000)
    assert parse_offset_spec("@2024-05-01", NOW) == OffsetRange(ts(day))
    assert parse_offset_spec("@2024-05-01T12:00:00Z", NOW) == OffsetRange(ts(day + 12 * HOUR))
    assert parse_offset_spec("@2024-05-01T12:00:00+02:00", NOW) == OffsetRange(ts(day + 10 * HOUR))
    assert parse_offset_spec("@2024-05-01T12:00:00:2024-05-02", NOW) == OffsetRange(
        ts(day + 12 * HOUR), ts(day + 24 * HOUR)
    )


@pytest.mark.parametrize("text", ["", "bogus", "1.5", "+x", "--3", "53:47", "5:5", "@", "@yesterday", "3:soon"])
def test_bad_offsets_are_rejected_with_the_grammar_in_the_message(text: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_offset_spec(text, NOW)
    assert "offset" in str(info.value) or "timestamp" in str(info.value)


def test_durations() -> None:
    assert parse_duration_ms("-1h") == -HOUR
    assert parse_duration_ms("+90s") == 90_000
    assert parse_duration_ms("500ms") == 500
    assert parse_duration_ms("1h2x") is None
    assert parse_duration_ms("12") is None
    assert parse_timestamp("-10m", NOW) == NOW - 600_000


def test_resolution_clamps_into_the_log() -> None:
    bounds = PartitionBounds(beginning=10, end=100, start_time_offset=42, end_time_offset=None)
    assert resolve_start(EARLIEST, bounds) == 10
    assert resolve_start(LATEST, bounds) == 100
    assert resolve_start(off(5), bounds) == 10
    assert resolve_start(off(500), bounds) == 100
    assert resolve_start(OffsetBound(BoundKind.FROM_START, 5), bounds) == 15
    assert resolve_start(OffsetBound(BoundKind.FROM_END, 5), bounds) == 95
    assert resolve_start(OffsetBound(BoundKind.FROM_END, 500), bounds) == 10
    assert resolve_start(ts(123), bounds) == 42
    assert resolve_start(ts(123), PartitionBounds(10, 100)) == 100  # nothing at/after: the end
    assert resolve_end(None, bounds) is None
    assert resolve_end(LATEST, bounds) == 100
    assert resolve_end(off(50), bounds) == 50
    assert resolve_end(ts(1), bounds) == 100  # no record at/after: up to the current end
