"""Reset-offsets plans (Kafka's kafka-consumer-groups --reset-offsets rules), a pure function.

Moved from the coordinator's tests with the module (node/group_reset.py -> client/group_reset.py).
"""

from __future__ import annotations

import pytest

from tidelog.client.group_reset import (
    PartitionOffsets,
    ResetPlanError,
    ResetScenario,
    ResetSpec,
    lookup_timestamp,
    parse_datetime_ms,
    parse_duration_ms,
    plan_reset_offsets,
)
from tidelog.client.types import TopicPartition

TP = TopicPartition


def test_reset_plans_follow_kafkas_rules() -> None:
    parts = {
        TP("t", 0): PartitionOffsets(10, 100, committed=50, offset_for_timestamp=70),
        TP("t", 1): PartitionOffsets(0, 5, committed=None, offset_for_timestamp=None),
    }

    def plan(scenario: ResetScenario, value: int = 0) -> list[int]:
        return [e.new_offset for e in plan_reset_offsets(ResetSpec(scenario, value), parts)]

    assert plan(ResetScenario.TO_EARLIEST) == [10, 0]
    assert plan(ResetScenario.TO_LATEST) == [100, 5]
    assert plan(ResetScenario.TO_CURRENT) == [50, 5]
    assert plan(ResetScenario.TO_OFFSET, 3) == [10, 3]  # clamped into [start, end]
    assert plan(ResetScenario.TO_OFFSET, 1000) == [100, 5]
    assert plan(ResetScenario.TO_DATETIME, 123) == [70, 5]  # no record at/after the time: the end
    with pytest.raises(ResetPlanError):
        plan(ResetScenario.SHIFT_BY, -5)  # t:1 has nothing to shift
    del parts[TP("t", 1)]
    assert plan(ResetScenario.SHIFT_BY, -45) == [10]
    assert plan(ResetScenario.SHIFT_BY, 20) == [70]
    assert lookup_timestamp(ResetSpec(ResetScenario.BY_DURATION, 1000), 5000) == 4000
    assert lookup_timestamp(ResetSpec(ResetScenario.TO_OFFSET, 1), 5000) is None
    assert parse_duration_ms("PT15M") == 900_000
    assert parse_duration_ms("P1DT2H0.5S") == 93_600_500
    assert parse_datetime_ms("1970-01-01T00:00:01.500") == 1500
    assert parse_datetime_ms("1970-01-01T01:00:00+01:00") == 0
    for bad in ("P", "PT", "15M", "P1H"):
        with pytest.raises(ResetPlanError):
            parse_duration_ms(bad)
    with pytest.raises(ResetPlanError):
        parse_datetime_ms("yesterday")
