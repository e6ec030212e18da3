"""Reset-offsets plans (Kafka's `kafka-consumer-groups --reset-offsets`), as a pure function.

Planning needs each partition's log start and end offsets and, for a time-based reset, the first
offset at or after a timestamp (ListOffsets by timestamp). The caller fetches those from the
partition leaders, `plan_reset_offsets` turns them into new offsets, and the admin client executes
the plan as an admin OffsetCommit (empty member id, epoch -1), which the coordinator refuses with
NON_EMPTY_GROUP while the group has members. Without `--execute` the plan is only printed.

Kafka's rules: `--to-offset` and `--shift-by` are clamped into [log start, log end]; a time with
no record at or after it resets to the log end; `--to-current` keeps the committed offset (the log
end when there is none). Pure: no I/O, no clock (callers pass `now_ms`).
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Mapping

from tidelog.client.types import TopicPartition


class ResetScenario(enum.Enum):
    TO_EARLIEST = "to-earliest"
    TO_LATEST = "to-latest"
    TO_CURRENT = "to-current"
    TO_OFFSET = "to-offset"  # value: the offset
    SHIFT_BY = "shift-by"  # value: the shift, may be negative
    TO_DATETIME = "to-datetime"  # value: epoch milliseconds
    BY_DURATION = "by-duration"  # value: milliseconds before now


class ResetPlanError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class ResetSpec:
    scenario: ResetScenario
    value: int = 0


@dataclass(frozen=True, slots=True)
class PartitionOffsets:
    log_start_offset: int
    log_end_offset: int
    committed: int | None = None
    # The first offset whose timestamp is >= lookup_timestamp(spec); None if there is none.
    offset_for_timestamp: int | None = None


@dataclass(frozen=True, slots=True)
class ResetPlanEntry:
    topic_partition: TopicPartition
    current: int | None
    new_offset: int


def lookup_timestamp(spec: ResetSpec, now_ms: int) -> int | None:
    """The timestamp whose offset the caller must look up, or None for offset-based resets."""
    if spec.scenario is ResetScenario.TO_DATETIME:
        return spec.value
    if spec.scenario is ResetScenario.BY_DURATION:
        return now_ms - spec.value
    return None


def _clamp(offset: int, p: PartitionOffsets) -> int:
    return max(p.log_start_offset, min(offset, p.log_end_offset))


def plan_reset_offsets(spec: ResetSpec, partitions: Mapping[TopicPartition, PartitionOffsets]) -> list[ResetPlanEntry]:
    plan = []
    for tp in sorted(partitions):
        p = partitions[tp]
        s = spec.scenario
        if s is ResetScenario.TO_EARLIEST:
            new = p.log_start_offset
        elif s is ResetScenario.TO_LATEST:
            new = p.log_end_offset
        elif s is ResetScenario.TO_CURRENT:
            new = p.committed if p.committed is not None else p.log_end_offset
        elif s is ResetScenario.TO_OFFSET:
            new = _clamp(spec.value, p)
        elif s is ResetScenario.SHIFT_BY:
            if p.committed is None:
                raise ResetPlanError(f"{tp} has no committed offset to shift")
            new = _clamp(p.committed + spec.value, p)
        else:  # TO_DATETIME, BY_DURATION
            new = p.log_end_offset if p.offset_for_timestamp is None else _clamp(p.offset_for_timestamp, p)
        plan.append(ResetPlanEntry(tp, p.committed, new))
    return plan


_DURATION = re.compile(
    r"^P(?:(?P<days>\d+(?:\.\d+)?)D)?(?:T(?:(?P<hours>\d+(?:\.\d+)?)H)?(?:(?P<minutes>\d+(?:\.\d+)?)M)?"
    r"(?:(?P<seconds>\d+(?:\.\d+)?)S)?)?$"
)


def parse_duration_ms(text: str) -> int:
    """An ISO-8601 duration as Kafka's --by-duration takes it: PnDTnHnMnS (e.g. PT15M, P1DT2H)."""
    m = _DURATION.match(text.strip().upper())
    if m is None or text.strip().upper() in ("P", "PT") or text.strip().upper().endswith("T"):
        raise ResetPlanError(f"{text!r} is not an ISO-8601 duration like P1DT2H30M or PT15M")
    parts = {k: float(v) if v else 0.0 for k, v in m.groupdict().items()}
    seconds = parts["days"] * 86400 + parts["hours"] * 3600 + parts["minutes"] * 60 + parts["seconds"]
    return round(seconds * 1000)


def parse_datetime_ms(text: str) -> int:
    """Kafka's --to-datetime: 'YYYY-MM-DDTHH:mm:SS.sss', optionally with a zone (Z, +01:00).

    Without a zone the time is UTC (Kafka uses the tool's local zone; a server-side default
    must not depend on where the node runs).
    """
    t = text.strip()
    if t.endswith("Z"):
        t = t[:-1] + "+00:00"
    try:
        dt = datetime.fromisoformat(t)
    except ValueError:
        raise ResetPlanError(f"{text!r} is not a datetime like 2024-05-01T12:00:00.000") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return round(dt.timestamp() * 1000)
