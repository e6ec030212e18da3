"""The offset vocabulary of `tidelog consume -o` (rpk's grammar, REFERENCE.md §8).

    start | oldest | earliest     the log start offset
    end | newest | latest         the current end (only records produced from now on)
    N                             offset N
    +N                            N after the start offset
    -N                            N before the end offset
    N: | :M | N:M | N-M | N:end   ranges; the end is exclusive; ":end" means the end offset
                                  at the time the command starts (read what is there, then exit)
    @T | @T1:T2 | @T1:end         by time: the first offset whose timestamp is >= T, up to the
                                  first whose timestamp is >= T2

T is epoch milliseconds (or 10 digits: epoch seconds), an ISO-8601 date or date-time
(YYYY-MM-DD, 2024-05-01T12:00:00Z; a time without a zone is UTC), or a Go-style duration
relative to now (-1h, -90m, -1h30m); a duration for T2 is relative to T1.

Parsing is pure: `parse_offset_spec` turns text into an `OffsetRange` of `OffsetBound`s, which
the command then resolves against each partition's beginning/end offsets and time index.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from datetime import datetime, timezone


class BoundKind(enum.Enum):
    EARLIEST = "earliest"
    LATEST = "latest"
    OFFSET = "offset"
    FROM_START = "from_start"
    FROM_END = "from_end"
    TIMESTAMP = "timestamp"


@dataclass(frozen=True, slots=True)
class OffsetBound:
    kind: BoundKind
    value: int = 0


@dataclass(frozen=True, slots=True)
class OffsetRange:
    start: OffsetBound
    end: OffsetBound | None = None  # None: keep following the partition


EARLIEST = OffsetBound(BoundKind.EARLIEST)
LATEST = OffsetBound(BoundKind.LATEST)

_START_WORDS = {
    "start": EARLIEST, "oldest": EARLIEST, "earliest": EARLIEST, "beginning": EARLIEST,
    "end": LATEST, "newest": LATEST, "latest": LATEST,
}
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_DURATION_MS = {"ns": 1e-6, "us": 1e-3, "µs": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}


def _error(text: str, why: str) -> ValueError:
    return ValueError(
        f"invalid offset {text!r}: {why} (use start, end, N, +N, -N, N:M, @TIMESTAMP or @T1:T2)"
    )


def parse_duration_ms(text: str) -> int | None:
    """A Go-style signed duration (``-1h30m``, ``+10s``, ``500ms``) in ms, or None if not one."""
    sign = 1
    body = text
    if body[:1] in "+-":
        sign = -1 if body[0] == "-" else 1
        body = body[1:]
    if not body:
        return None
    position = 0
    total = 0.0
    for match in _DURATION_PART.finditer(body):
        if match.start() != position:
            return None
        total += float(match.group(1)) * _DURATION_MS[match.group(2)]
        position = match.end()
    if position != len(body):
        return None
    return sign * int(round(total))


def parse_timestamp(text: str, now_ms: int, relative_to_ms: int | None = None) -> int:
    """Epoch ms for T (see the module doc). Durations are relative to ``relative_to_ms`` or now."""
    if not text:
        raise ValueError("empty timestamp")
    if text.isdigit():
        value = int(text)
        return value * 1000 if len(text) == 10 else value
    duration = parse_duration_ms(text)
    if duration is not None:
        return (now_ms if relative_to_ms is None else relative_to_ms) + duration
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(
            f"invalid timestamp {text!r}: use epoch ms, YYYY-MM-DD, ISO-8601 or a duration like -1h"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return int(moment.timestamp() * 1000)


def _parse_start(text: str, whole: str) -> OffsetBound:
    if text == "":
        return EARLIEST
    if text in _START_WORDS:
        return _START_WORDS[text]
    if text.isdigit():
        return OffsetBound(BoundKind.OFFSET, int(text))
    if text[0] == "+" and text[1:].isdigit():
        return OffsetBound(BoundKind.FROM_START, int(text[1:]))
    if text[0] == "-" and text[1:].isdigit():
        return OffsetBound(BoundKind.FROM_END, int(text[1:]))
    raise _error(whole, f"{text!r} is not an offset")


def _parse_end(text: str, whole: str) -> OffsetBound | None:
    if text == "":
        return None
    if text in ("end", "newest", "latest"):
        return LATEST
    if text.isdigit():
        return OffsetBound(BoundKind.OFFSET, int(text))
    raise _error(whole, f"{text!r} is not an end offset")


def parse_offset_spec(text: str, now_ms: int) -> OffsetRange:
    """Parse ``-o`` text. An end bound of kind LATEST means the end offset at start-up."""
    spec = text.strip().lower() if not text.startswith("@") else text.strip()
    if not spec:
        raise _error(text, "empty")
    if spec.startswith("@"):
        first, second = _split_time_range(spec[1:], now_ms, text)
        if first == "":
            start: OffsetBound = EARLIEST
            start_ms = None
        else:
            start_ms = parse_timestamp(first, now_ms)
            start = OffsetBound(BoundKind.TIMESTAMP, start_ms)
        if second is None or second == "":
            return OffsetRange(start)
        if second.lower() == "end":
            return OffsetRange(start, LATEST)
        return OffsetRange(start, OffsetBound(BoundKind.TIMESTAMP, parse_timestamp(second, now_ms, start_ms)))
    if ":" in spec:
        first, _, second = spec.partition(":")
        range_ = OffsetRange(_parse_start(first, text), _parse_end(second, text))
    elif re.fullmatch(r"\d+-\d+", spec):
        first, _, second = spec.partition("-")
        range_ = OffsetRange(_parse_start(first, text), _parse_end(second, text))
    else:
        range_ = OffsetRange(_parse_start(spec, text))
    end = range_.end
    if (
        end is not None
        and end.kind is BoundKind.OFFSET
        and range_.start.kind is BoundKind.OFFSET
        and end.value <= range_.start.value
    ):
        raise _error(text, "the end must be after the start")
    return range_


def _parses(text: str, now_ms: int) -> bool:
    if text == "" or text.lower() == "end":
        return True
    try:
        parse_timestamp(text, now_ms)
        return True
    except ValueError:
        return False


def _split_time_range(body: str, now_ms: int, whole: str) -> tuple[str, str | None]:
    """Split ``T1:T2``; ISO times have colons of their own, so try each colon in turn."""
    if not body:
        raise _error(whole, "a time is missing after @")
    if _parses(body, now_ms) and body.lower() != "end":
        return body, None
    for i, ch in enumerate(body):
        if ch == ":" and _parses(body[:i], now_ms) and _parses(body[i + 1 :], now_ms):
            return body[:i], body[i + 1 :]
    # Neither a time nor a range of two: let the parser name the problem.
    first, _, second = body.partition(":")
    parse_timestamp(first, now_ms)
    parse_timestamp(second, now_ms)
    raise _error(whole, "not a time or a range of times")


@dataclass(frozen=True, slots=True)
class PartitionBounds:
    """What a resolved range needs to know of one partition."""

    beginning: int
    end: int
    start_time_offset: int | None = None  # offsets_for_times(start) when the start is a time
    end_time_offset: int | None = None


def resolve_start(bound: OffsetBound, bounds: PartitionBounds) -> int:
    """The first offset to read, clamped into [beginning, end]."""
    if bound.kind is BoundKind.EARLIEST:
        offset = bounds.beginning
    elif bound.kind is BoundKind.LATEST:
        offset = bounds.end
    elif bound.kind is BoundKind.OFFSET:
        offset = bound.value
    elif bound.kind is BoundKind.FROM_START:
        offset = bounds.beginning + bound.value
    elif bound.kind is BoundKind.FROM_END:
        offset = bounds.end - bound.value
    else:
        offset = bounds.end if bounds.start_time_offset is None else bounds.start_time_offset
    return max(bounds.beginning, min(offset, bounds.end))


def resolve_end(bound: OffsetBound | None, bounds: PartitionBounds) -> int | None:
    """The offset to stop before, or None to keep following."""
    if bound is None:
        return None
    if bound.kind is BoundKind.LATEST:
        return bounds.end
    if bound.kind is BoundKind.OFFSET:
        return bound.value
    if bound.kind is BoundKind.TIMESTAMP:
        return bounds.end if bounds.end_time_offset is None else bounds.end_time_offset
    raise ValueError(f"{bound.kind.value} cannot end a range")
