"""`tidelog perf consume` with a trace of what it handed out, for tests/bench/shortfall_hunt.py.

    python tests/support/perf_consume_traced.py TRACE.json perf consume TOPIC --bootstrap ...

Runs the CLI unchanged, except that every `Consumer.poll` answer is recorded per partition
(count, first and last offset, every gap and step back), and that just before the consumer
closes (after success or a shortfall alike) its per-partition fetch state is captured: the
position, fetch offset, in-flight flag, buffered answers, error and back-off of each partition.
Both go to TRACE.json, so a short consume tells a consumer that skipped batches (a gap in what
it handed out) from one that stalled (a partition whose position stopped below the log end).
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from tidelog.client import consumer as consumer_module


class _Trace:
    def __init__(self) -> None:
        self.partitions: dict[int, dict[str, Any]] = {}
        self.state: dict[str, Any] = {}
        self.polls = 0

    def record(self, records: list[Any]) -> None:
        self.polls += 1
        for record in records:
            seen = self.partitions.get(record.partition)
            if seen is None:
                seen = self.partitions[record.partition] = {
                    "count": 0, "first": record.offset, "last": None, "gaps": [], "back": []}
            last = seen["last"]
            if last is not None and record.offset != last + 1:
                # A jump over one offset is the leader-change marker's; the trace keeps all.
                (seen["gaps"] if record.offset > last else seen["back"]).append([last, record.offset])
            seen["last"] = record.offset
            seen["count"] += 1

    def capture(self, core: Any) -> None:
        snapshot = core.metadata.snapshot
        partitions = {}
        for tp, state in core._assignment.items():
            partitions[tp.partition] = {
                "position": state.position,
                "fetch_offset": state.fetch_offset,
                "in_flight": state.in_flight,
                "buffered": [[c.fetch_offset, c.next_offset, len(c.batches), c.index, len(c.records)]
                             for c in state.buffered],
                "error": repr(state.error) if state.error is not None else None,
                "retry_in": round(state.retry_at - time.monotonic(), 3),
                "high_watermark": state.high_watermark,
                "paused": state.paused,
                "epoch": state.epoch,
                "leader": snapshot.leader_id(tp),
            }
        self.state = {"partitions": partitions,
                      "fetches": {str(node): sorted(tp.partition for tp in getattr(task, "tidelog_partitions", ()))
                                  for node, task in core._fetches.items()}}


def main() -> None:
    trace_path, argv = sys.argv[1], sys.argv[2:]
    trace = _Trace()
    poll, close = consumer_module.Consumer.poll, consumer_module.Consumer.close

    def traced_poll(self: Any, timeout_ms: float = 0, max_records: int | None = None) -> list[Any]:
        records = poll(self, timeout_ms, max_records)
        trace.record(records)
        return records

    def traced_close(self: Any, timeout: float | None = None) -> None:
        if not trace.state:
            try:
                self._call(lambda: trace.capture(self._core))
            except Exception as exc:  # noqa: BLE001 - the trace must not hide the run's outcome
                trace.state = {"capture_failed": repr(exc)}
        close(self, timeout)

    consumer_module.Consumer.poll = traced_poll  # type: ignore[method-assign]
    consumer_module.Consumer.close = traced_close  # type: ignore[method-assign]
    from tidelog.cluster.cli import main as cli_main

    code = 1
    try:
        sys.argv = ["tidelog", *argv]
        code = cli_main()
    finally:
        with open(trace_path, "w") as out:
            json.dump({"polls": trace.polls, "seen": trace.partitions, "state": trace.state}, out)
    sys.exit(code)


if __name__ == "__main__":
    main()
