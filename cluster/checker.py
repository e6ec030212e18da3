"""The history checker of the chaos harness (issue 8, item 3): Jepsen's Kafka anomalies.

`check(history)` reads the operations of `tidelog.cluster.history` once, in history order, and
returns a `Verdict`. It keeps, per partition, the first record seen at each offset and, per value,
the first place it was seen, so its cost is O(records) dict work plus one sort of the read
offsets of each partition. A history of 1.2 million operations (4.9 million records returned)
reads and checks in about 30 s of CPU on a busy 2-core machine (`pytest -m bench -s
tests/cluster/test_checker.py`).

What the anomalies mean here (names as in jepsen.tests.kafka; see REFERENCE.md §6):

- lost-write: an acknowledged send (outcome "ok") whose value the final read of its partition
  does not hold, when that read is complete; or, when it is not, Jepsen's rule adapted to
  consumers that seek: no read ever returned the value acknowledged at offset a, yet a read went
  past a (the final read returned an offset b > a, or a consumer standing at or before a next
  returned some b > a).
- unseen: acknowledged, absent from an incomplete (or missing) final read, and not provably lost.
  Loss cannot be told from delay here, but nothing vouches for the record either: not valid.
- duplicate: one value at more than one offset (or partition). Offsets whose contents observers
  disagree about are left out of this test: they are reported as inconsistent-offsets, and a
  value merely shifted between two such offsets is not a second copy.
- inconsistent-offsets: one offset that held two different values across all reads and the
  offsets acknowledged to sends.
- nonmonotonic-poll / poll-skip: a consumer's successive records from one partition, within a
  poll or across its polls, go back (or repeat), or jump over an offset that some read shows
  holding a record, with no assign, seek or rebalance of that consumer in between. Offsets no
  read ever returned (control batches, compacted records) may be jumped over freely. After a
  seek or assign that names an offset, the next record must be the first at or after it.
- committed-offsets-backwards: a group's successive successful commits for one partition go
  down, with no seek (or assign to an offset) by a consumer of that group on that partition and
  no reset-offsets op in between. Also when a member that gains a partition in a rebalance
  starts reading it below an offset the group's commit had acknowledged before that rebalance
  (the coordinator lost the commit), again unless a seek or reset came between.
- unexpected: a value read that no send ever carried.
- aborted-read: a value read whose send failed with `definite: true`. A plain failed send may
  still have been written (the error is indefinite for a Kafka-like log), so reading it is only
  reported as `failed_but_present`, not as an anomaly.

The verdict is valid when no anomaly of any kind was found (unseen included).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from bisect import bisect_left, bisect_right
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from tidelog.cluster.history import (
    CommitOp,
    ConsumerEventKind,
    ConsumerEventOp,
    FinalReadOp,
    Op,
    Outcome,
    PollOp,
    ResetOffsetsOp,
    SendOp,
    TopicPartition,
    iter_history,
)

# How many skipped offsets an anomaly lists; the count is always complete.
SKIPPED_OFFSETS_SHOWN = 16


class AnomalyKind(StrEnum):
    LOST_WRITE = "lost-write"
    UNSEEN = "unseen"
    DUPLICATE = "duplicate"
    INCONSISTENT_OFFSETS = "inconsistent-offsets"
    NONMONOTONIC_POLL = "nonmonotonic-poll"
    POLL_SKIP = "poll-skip"
    COMMITTED_OFFSETS_BACKWARDS = "committed-offsets-backwards"
    UNEXPECTED = "unexpected"
    ABORTED_READ = "aborted-read"


class Source(StrEnum):
    """Which kind of operation an observation comes from (the history's op names)."""

    SEND = "send"
    POLL = "poll"
    FINAL_READ = "final-read"
    ASSIGN = "assign"
    SEEK = "seek"
    REBALANCE = "rebalance"
    COMMIT = "commit"
    RESET_OFFSETS = "reset-offsets"


class InvalidHistoryError(ValueError):
    """A history the checker cannot judge (the harness broke one of its promises)."""


@dataclass(frozen=True, slots=True)
class Observation:
    """One record (or commit, or seek) as one operation of the history saw it.

    `op_number` counts operations from 1 in history order: the line of the history file when it
    has no blank lines.
    """

    source: Source
    op_number: int
    topic: str
    partition: int | None
    offset: int | None
    value: str | None
    process: int | None = None
    consumer: str | None = None
    group: str | None = None
    outcome: Outcome | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "source": self.source.value, "op_number": self.op_number, "topic": self.topic,
            "partition": self.partition, "offset": self.offset, "value": self.value,
        }
        for key in ("process", "consumer", "group"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.outcome is not None:
            out["outcome"] = self.outcome.value
        return out


@dataclass(frozen=True, slots=True)
class Anomaly:
    kind: AnomalyKind
    topic: str
    partition: int | None
    message: str
    records: tuple[Observation, ...]
    details: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "kind": self.kind.value, "topic": self.topic, "partition": self.partition,
            "message": self.message, "records": [r.to_dict() for r in self.records],
        }
        if self.details:
            out["details"] = dict(self.details)
        return out


@dataclass(frozen=True, slots=True)
class Stats:
    ops: int
    sends: int
    acknowledged: int  # sends with outcome ok
    failed: int
    unknown: int  # sends with outcome unknown (timed out, connection lost)
    polls: int
    records_polled: int  # records returned by polls, repeats included
    final_read_records: int
    values_read: int  # distinct values returned by polls or final reads
    acknowledged_read: int  # acknowledged values some read returned
    unknown_present: int  # unknown-outcome sends whose value some read returned
    failed_present: int  # failed sends whose value some read returned
    commits: int
    commits_ok: int
    partitions_final_read: int
    partitions_final_read_incomplete: int

    def to_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}


@dataclass(frozen=True, slots=True)
class Verdict:
    valid: bool
    anomalies: Mapping[AnomalyKind, tuple[Anomaly, ...]]  # every kind, possibly empty
    stats: Stats
    # Reads of values whose send failed indefinitely: information, not an anomaly.
    failed_but_present: tuple[Observation, ...] = ()

    @property
    def counts(self) -> dict[AnomalyKind, int]:
        return {kind: len(self.anomalies.get(kind, ())) for kind in AnomalyKind}

    @property
    def anomaly_kinds(self) -> frozenset[AnomalyKind]:
        return frozenset(kind for kind, found in self.anomalies.items() if found)

    def to_dict(self, limit: int | None = None) -> dict[str, Any]:
        """A JSON-ready dict; `limit` caps the items listed per kind (counts stay complete)."""
        return {
            "valid": self.valid,
            "anomaly_kinds": sorted(kind.value for kind in self.anomaly_kinds),
            "counts": {kind.value: count for kind, count in self.counts.items()},
            "stats": self.stats.to_dict(),
            "anomalies": {
                kind.value: [a.to_dict() for a in found[:limit]]
                for kind, found in self.anomalies.items() if found
            },
            "failed_but_present": [o.to_dict() for o in self.failed_but_present[:limit]],
        }

    def to_json(self, limit: int | None = None) -> str:
        """The verdict as one line of JSON."""
        return json.dumps(self.to_dict(limit), ensure_ascii=False, separators=(",", ":"))


# A sighting is (op_number, op): enough to build an Observation later, and cheaper than building
# one for every record when almost none will ever be reported.
Sighting = tuple[int, Op]


def _observe(number: int, op: Op, tp: TopicPartition | None = None,
             offset: int | None = None, value: str | None = None) -> Observation:
    if isinstance(op, SendOp):
        return Observation(Source.SEND, number, op.topic, op.partition, op.offset, op.value,
                           process=op.process, outcome=op.outcome)
    if isinstance(op, PollOp):
        return Observation(Source.POLL, number, op.topic, op.partition, offset, value,
                           process=op.process, consumer=op.consumer, group=op.group)
    if isinstance(op, FinalReadOp):
        return Observation(Source.FINAL_READ, number, op.topic, op.partition, offset, value)
    if isinstance(op, ConsumerEventOp):
        topic, partition = tp if tp is not None else ("", None)
        return Observation(Source(op.kind.value), number, topic, partition, op.offset, None,
                           process=op.process, consumer=op.consumer, group=op.group)
    if isinstance(op, CommitOp):
        return Observation(Source.COMMIT, number, op.topic, op.partition, op.offset, None,
                           process=op.process, consumer=op.consumer, group=op.group,
                           outcome=op.outcome)
    if isinstance(op, ResetOffsetsOp):
        return Observation(Source.RESET_OFFSETS, number, op.topic, op.partition, op.offset,
                           None, group=op.group)
    raise TypeError(f"not a history op: {op!r}")


def check(history: Iterable[Op]) -> Verdict:
    """Judge a whole history (ops in the order they completed)."""
    state = _HistoryState()
    for number, op in enumerate(history, start=1):
        state.add(number, op)
    return state.verdict()


def check_file(path: str | os.PathLike[str]) -> Verdict:
    """Check a JSON-lines history file, streaming it (the file is never held in memory)."""
    return check(iter_history(path))


# A consumer's place in one partition: the next offset it must return, and what put it there
# (the previous record it returned, or the seek that set it).
_Position = tuple[int, int, Op, int | None, str | None]  # next, op_number, op, offset, value


class _HistoryState:
    """Everything the checker keeps while it reads the history once."""

    def __init__(self) -> None:
        self.ops = 0
        self.sends: dict[str, Sighting] = {}
        # tp -> offset -> (value, op_number, op) of the first sighting of that offset.
        self.at_offset: dict[TopicPartition, dict[int, tuple[str, int, Op]]] = defaultdict(dict)
        # tp -> offset -> value -> first sighting, only for offsets seen holding two values.
        self.conflicts: dict[TopicPartition, dict[int, dict[str, Sighting]]] = defaultdict(dict)
        # value -> (tp, offset, op_number, op) of the first place it was seen.
        self.first_place: dict[str, tuple[TopicPartition, int, int, Op]] = {}
        # value -> (tp, offset) -> first sighting, only for values seen in two places.
        self.more_places: dict[str, dict[tuple[TopicPartition, int], Sighting]] = {}
        # value -> (tp, offset, op_number, op) of the first read (poll or final read) of it.
        self.first_read: dict[str, tuple[TopicPartition, int, int, Op]] = {}
        self.read_offsets: dict[TopicPartition, set[int]] = defaultdict(set)
        # tp -> (offset, value, op_number, op) of the highest record final reads returned.
        self.final_max: dict[TopicPartition, tuple[int, str, int, Op]] = {}
        self.final_values: dict[TopicPartition, set[str]] = {}
        self.final_complete: dict[TopicPartition, bool] = {}
        self.positions: dict[tuple[str, TopicPartition], _Position] = {}
        self.consumer_partitions: dict[str, set[TopicPartition]] = defaultdict(set)
        self.consumer_group: dict[str, str] = {}
        self.backwards: list[tuple[tuple[str, TopicPartition], _Position, int, int, Op, str]] = []
        self.gaps: list[tuple[tuple[str, TopicPartition], _Position, int, int, Op, str]] = []
        self.last_commit: dict[tuple[str, TopicPartition], Sighting] = {}
        self.commit_drops: list[tuple[str, TopicPartition, Sighting, Sighting]] = []
        # The group's last acknowledged commit when a member gained a partition: its first
        # record from the partition must not be below it.
        self.start_floor: dict[tuple[str, TopicPartition], Sighting] = {}
        self.start_drops: list[tuple[str, TopicPartition, Sighting, Sighting]] = []
        # (op_number, group or None, consumer or None, partitions, op) of each commit reset.
        self.resets: list[tuple[int, str | None, str | None, tuple[TopicPartition, ...], Op]] = []
        self.polls = 0
        self.records_polled = 0
        self.final_read_records = 0
        self.commits = 0
        self.commits_ok = 0

    # --- reading ------------------------------------------------------------------------

    def add(self, number: int, op: Op) -> None:
        self.ops += 1
        if isinstance(op, PollOp):
            self._poll(number, op)
        elif isinstance(op, SendOp):
            self._send(number, op)
        elif isinstance(op, FinalReadOp):
            self._final_read(number, op)
        elif isinstance(op, ConsumerEventOp):
            self._consumer_event(number, op)
        elif isinstance(op, CommitOp):
            self._commit(number, op)
        elif isinstance(op, ResetOffsetsOp):
            self.resets.append((number, op.group, None, ((op.topic, op.partition),), op))
        else:
            raise InvalidHistoryError(f"op {number} is not a history op: {op!r}")

    def _send(self, number: int, op: SendOp) -> None:
        earlier = self.sends.get(op.value)
        if earlier is not None:
            raise InvalidHistoryError(
                f"value {op.value!r} is sent by ops {earlier[0]} and {number}: the checker "
                "needs every value sent once"
            )
        self.sends[op.value] = (number, op)
        if op.outcome is Outcome.OK and op.partition is not None and op.offset is not None:
            self._place((op.topic, op.partition), op.offset, op.value, number, op)

    def _place(self, tp: TopicPartition, offset: int, value: str, number: int, op: Op) -> None:
        """Note that `op` saw `value` at `offset` of `tp`."""
        offsets = self.at_offset[tp]
        seen = offsets.get(offset)
        if seen is None:
            offsets[offset] = (value, number, op)
        elif seen[0] != value:
            self._conflict(tp, offset, seen, value, number, op)
        else:
            return  # the value's place was noted with the offset's first sighting
        self._value_at(value, tp, offset, number, op)

    def _conflict(self, tp: TopicPartition, offset: int, seen: tuple[str, int, Op], value: str,
                  number: int, op: Op) -> None:
        values = self.conflicts[tp].setdefault(offset, {seen[0]: (seen[1], seen[2])})
        values.setdefault(value, (number, op))

    def _value_at(self, value: str, tp: TopicPartition, offset: int, number: int,
                  op: Op) -> None:
        place = self.first_place.get(value)
        if place is None:
            self.first_place[value] = (tp, offset, number, op)
        elif place[0] != tp or place[1] != offset:
            self.more_places.setdefault(value, {}).setdefault((tp, offset), (number, op))

    def _read(self, tp: TopicPartition, records: tuple[tuple[int, str], ...], number: int,
              op: Op) -> None:
        # The hot loop of the checker: most records are re-reads of an offset already seen
        # with the same value, which cost two lookups and a set insert here.
        offsets = self.at_offset[tp]
        read_offsets = self.read_offsets[tp]
        first_read = self.first_read
        for offset, value in records:
            read_offsets.add(offset)
            seen = offsets.get(offset)
            if seen is None:
                offsets[offset] = (value, number, op)
                self._value_at(value, tp, offset, number, op)
            elif seen[0] != value:
                self._conflict(tp, offset, seen, value, number, op)
                self._value_at(value, tp, offset, number, op)
            if value not in first_read:
                first_read[value] = (tp, offset, number, op)

    def _poll(self, number: int, op: PollOp) -> None:
        self.polls += 1
        records = op.records
        self.records_polled += len(records)
        tp = (op.topic, op.partition)
        if op.group is not None:
            self.consumer_group[op.consumer] = op.group
        self._read(tp, records, number, op)
        if not records:
            return
        key = (op.consumer, tp)
        self.consumer_partitions[op.consumer].add(tp)
        position = self.positions.get(key)
        if position is not None:
            self._step(key, position, records[0], number, op)
        elif op.group is not None:
            floor = self.start_floor.pop(key, None)
            if floor is not None and records[0][0] < floor[1].offset:  # type: ignore[union-attr]
                self.start_drops.append((op.group, tp, floor, (number, op)))
        previous_offset = records[0][0]
        for i in range(1, len(records)):
            offset = records[i][0]
            if offset != previous_offset + 1:
                before = records[i - 1]
                self._step(key, (before[0] + 1, number, op, before[0], before[1]), records[i],
                           number, op)
            previous_offset = offset
        last_offset, last_value = records[-1]
        self.positions[key] = (last_offset + 1, number, op, last_offset, last_value)

    def _step(self, key: tuple[str, TopicPartition], position: _Position,
              record: tuple[int, str], number: int, op: Op) -> None:
        """Judge the consumer's next record against where it stood."""
        offset, value = record
        if offset < position[0]:
            self.backwards.append((key, position, offset, number, op, value))
        elif offset > position[0]:
            # Whether this jumped over a record is only known once every read is in.
            self.gaps.append((key, position, offset, number, op, value))

    def _final_read(self, number: int, op: FinalReadOp) -> None:
        tp = (op.topic, op.partition)
        self.final_read_records += len(op.records)
        self._read(tp, op.records, number, op)
        if op.records:
            top_offset, top_value = max(op.records)
            best = self.final_max.get(tp)
            if best is None or top_offset > best[0]:
                self.final_max[tp] = (top_offset, top_value, number, op)
        values = self.final_values.setdefault(tp, set())
        values.update(value for _, value in op.records)
        # A partition drained in several pieces is complete only if every piece says so.
        self.final_complete[tp] = self.final_complete.get(tp, True) and op.complete

    def _consumer_event(self, number: int, op: ConsumerEventOp) -> None:
        if op.group is not None:
            self.consumer_group[op.consumer] = op.group
        owned = self.consumer_partitions[op.consumer]
        if op.kind is ConsumerEventKind.SEEK:
            forgotten: Iterable[TopicPartition] = op.partitions
        else:
            # A new assignment (or a rebalance) may legitimately restart any partition from its
            # committed offset, so no continuity is expected across it.
            forgotten = list(owned)
        for tp in forgotten:
            self.positions.pop((op.consumer, tp), None)
        if op.offset is not None:
            for tp in op.partitions:
                self.positions[(op.consumer, tp)] = (op.offset, number, op, None, None)
                owned.add(tp)
        if op.kind is ConsumerEventKind.SEEK or op.offset is not None:
            self.resets.append((number, op.group, op.consumer, op.partitions, op))
        elif op.kind is ConsumerEventKind.REBALANCE and op.group is not None:
            for tp in op.partitions:
                commit = self.last_commit.get((op.group, tp))
                if commit is None:
                    self.start_floor.pop((op.consumer, tp), None)
                else:
                    self.start_floor[(op.consumer, tp)] = commit

    def _commit(self, number: int, op: CommitOp) -> None:
        self.commits += 1
        if op.consumer is not None:
            self.consumer_group.setdefault(op.consumer, op.group)
        if op.outcome is not Outcome.OK:
            return  # an unknown commit may or may not have taken effect; only ok ones order
        self.commits_ok += 1
        key = (op.group, (op.topic, op.partition))
        last = self.last_commit.get(key)
        if last is not None and op.offset < last[1].offset:  # type: ignore[union-attr]
            self.commit_drops.append((op.group, (op.topic, op.partition), last, (number, op)))
        self.last_commit[key] = (number, op)

    # --- judging ------------------------------------------------------------------------

    def verdict(self) -> Verdict:
        found: dict[AnomalyKind, list[Anomaly]] = {kind: [] for kind in AnomalyKind}
        bad_places = self._inconsistent_offsets(found[AnomalyKind.INCONSISTENT_OFFSETS])
        self._duplicates(bad_places, found[AnomalyKind.DUPLICATE])
        failed_present, unknown_present = self._reads_of_unacknowledged(
            found[AnomalyKind.UNEXPECTED], found[AnomalyKind.ABORTED_READ]
        )
        acknowledged, failed, unknown, acknowledged_read = self._lost_and_unseen(
            found[AnomalyKind.LOST_WRITE], found[AnomalyKind.UNSEEN]
        )
        self._poll_order(found[AnomalyKind.NONMONOTONIC_POLL], found[AnomalyKind.POLL_SKIP])
        self._commit_order(found[AnomalyKind.COMMITTED_OFFSETS_BACKWARDS])
        stats = Stats(
            ops=self.ops, sends=len(self.sends), acknowledged=acknowledged, failed=failed,
            unknown=unknown, polls=self.polls, records_polled=self.records_polled,
            final_read_records=self.final_read_records, values_read=len(self.first_read),
            acknowledged_read=acknowledged_read, unknown_present=unknown_present,
            failed_present=len(failed_present), commits=self.commits,
            commits_ok=self.commits_ok, partitions_final_read=len(self.final_complete),
            partitions_final_read_incomplete=sum(
                1 for complete in self.final_complete.values() if not complete
            ),
        )
        anomalies = {kind: tuple(items) for kind, items in found.items()}
        return Verdict(
            valid=not any(anomalies.values()), anomalies=anomalies, stats=stats,
            failed_but_present=tuple(failed_present),
        )

    def _inconsistent_offsets(self, out: list[Anomaly]) -> set[tuple[TopicPartition, int]]:
        bad: set[tuple[TopicPartition, int]] = set()
        for tp, offsets in self.conflicts.items():
            for offset in sorted(offsets):
                values = offsets[offset]
                bad.add((tp, offset))
                records = tuple(
                    _observe(number, op, tp, offset, value)
                    for value, (number, op) in values.items()
                )
                out.append(Anomaly(
                    AnomalyKind.INCONSISTENT_OFFSETS, tp[0], tp[1],
                    f"offset {offset} of {tp[0]}/{tp[1]} held {len(values)} different values: "
                    + ", ".join(repr(v) for v in values),
                    records, {"offset": offset, "values": list(values)},
                ))
        return bad

    def _duplicates(self, bad_places: set[tuple[TopicPartition, int]],
                    out: list[Anomaly]) -> None:
        for value, others in self.more_places.items():
            tp, offset, number, op = self.first_place[value]
            places = {(tp, offset): (number, op), **others}
            agreed = [place for place in places if place not in bad_places]
            if len(agreed) < 2:
                continue
            records = tuple(
                _observe(n, o, place[0], place[1], value) for place, (n, o) in places.items()
            )
            out.append(Anomaly(
                AnomalyKind.DUPLICATE, tp[0], tp[1],
                f"value {value!r} is at {len(places)} places: "
                + ", ".join(f"{t}/{p}@{off}" for (t, p), off in places),
                records,
                {"value": value, "places": [[t, p, off] for (t, p), off in places]},
            ))

    def _first_read(self, value: str) -> Observation:
        tp, offset, number, op = self.first_read[value]
        return _observe(number, op, tp, offset, value)

    def _reads_of_unacknowledged(
        self, unexpected: list[Anomaly], aborted: list[Anomaly]
    ) -> tuple[list[Observation], int]:
        failed_present: list[Observation] = []
        unknown_present = 0
        for value in self.first_read:
            sent = self.sends.get(value)
            if sent is None:
                read = self._first_read(value)
                unexpected.append(Anomaly(
                    AnomalyKind.UNEXPECTED, read.topic, read.partition,
                    f"value {value!r} was read at {read.topic}/{read.partition}@{read.offset} "
                    "but never sent",
                    (read,), {"value": value},
                ))
                continue
            number, send = sent
            assert isinstance(send, SendOp)
            if send.outcome is Outcome.UNKNOWN:
                unknown_present += 1
            elif send.outcome is Outcome.FAILED:
                read = self._first_read(value)
                if send.definite:
                    aborted.append(Anomaly(
                        AnomalyKind.ABORTED_READ, read.topic, read.partition,
                        f"value {value!r} was read at {read.topic}/{read.partition}@"
                        f"{read.offset} but its send failed definitely ({send.error})",
                        (_observe(number, send), read), {"value": value},
                    ))
                else:
                    failed_present.append(read)
        return failed_present, unknown_present

    def _lost_and_unseen(self, lost: list[Anomaly],
                         unseen: list[Anomaly]) -> tuple[int, int, int, int]:
        acknowledged = failed = unknown = acknowledged_read = 0
        final_by_topic: dict[str, list[TopicPartition]] = defaultdict(list)
        for tp in self.final_complete:
            final_by_topic[tp[0]].append(tp)
        passed_over = self._read_past_index()
        for value, (number, send) in self.sends.items():
            assert isinstance(send, SendOp)
            if send.outcome is Outcome.FAILED:
                failed += 1
                continue
            if send.outcome is Outcome.UNKNOWN:
                unknown += 1
                continue
            acknowledged += 1
            was_read = value in self.first_read
            acknowledged_read += was_read
            if send.partition is not None:
                drained = [(send.topic, send.partition)]
                drained = [tp for tp in drained if tp in self.final_complete]
            else:
                drained = final_by_topic.get(send.topic, [])
            if any(value in self.final_values[tp] for tp in drained):
                continue
            complete = bool(drained) and all(self.final_complete[tp] for tp in drained)
            sent = _observe(number, send)
            where = f"{send.topic}/{send.partition}@{send.offset}"
            if complete:
                records = (sent, self._first_read(value)) if was_read else (sent,)
                lost.append(Anomaly(
                    AnomalyKind.LOST_WRITE, send.topic, send.partition,
                    f"value {value!r} acknowledged at {where} is not in the final read"
                    + (" (earlier reads returned it)" if was_read else ""),
                    records, {"value": value, "rule": "absent-from-final-read"},
                ))
                continue
            passed = (
                passed_over(send.topic, send.partition, send.offset)
                if not was_read and send.partition is not None and send.offset is not None
                else None
            )
            if passed is not None:
                lost.append(Anomaly(
                    AnomalyKind.LOST_WRITE, send.topic, send.partition,
                    f"value {value!r} acknowledged at {where} was never read, but a read went "
                    f"past it to offset {passed.offset}",
                    (sent, passed), {"value": value, "rule": "read-past"},
                ))
                continue
            unseen.append(Anomaly(
                AnomalyKind.UNSEEN, send.topic, send.partition,
                f"value {value!r} acknowledged at {where} is not in the final read, which is "
                + ("incomplete" if drained else "missing"),
                (sent,), {"value": value, "read_earlier": was_read},
            ))
        return acknowledged, failed, unknown, acknowledged_read

    def _read_past_index(self) -> Callable[[str, int, int], Observation | None]:
        """Jepsen's lost-write rule, for partitions whose final read is incomplete: a record
        acknowledged at offset a that no read returned is lost if some read went past it.

        Jepsen takes any read of an offset b > a. Our consumers also seek forward, so here a
        read counts only if it passed over a: the final read (which reads from the start)
        returned some b > a, or a consumer standing at or before a next returned some b > a.
        Those consumer steps are exactly the forward gaps collected while reading.
        """
        spans: dict[TopicPartition, list[tuple[int, int, int]]] = defaultdict(list)
        for i, ((_, tp), position, offset, _, _, _) in enumerate(self.gaps):
            spans[tp].append((position[0], offset, i))
        # Per partition: gap starts in order, and the furthest-reaching gap among those so far.
        index: dict[TopicPartition, tuple[list[int], list[tuple[int, int]]]] = {}
        for tp, items in spans.items():
            items.sort()
            starts, reach = [], []
            best = (-1, -1)
            for start, end, i in items:
                if end > best[0]:
                    best = (end, i)
                starts.append(start)
                reach.append(best)
            index[tp] = (starts, reach)

        def passed_over(topic: str, partition: int, offset: int) -> Observation | None:
            tp = (topic, partition)
            top = self.final_max.get(tp)
            if top is not None and top[0] > offset:
                top_offset, top_value, number, op = top
                return _observe(number, op, tp, top_offset, top_value)
            if tp not in index:
                return None
            starts, reach = index[tp]
            at = bisect_right(starts, offset)
            if at == 0 or reach[at - 1][0] <= offset:
                return None
            _, _, read_offset, number, op, value = self.gaps[reach[at - 1][1]]
            return _observe(number, op, tp, read_offset, value)

        return passed_over

    def _poll_order(self, backwards: list[Anomaly], skips: list[Anomaly]) -> None:
        for (consumer, tp), position, offset, number, op, value in self.backwards:
            before = self._position_observation(position, tp)
            after = _observe(number, op, tp, offset, value)
            backwards.append(Anomaly(
                AnomalyKind.NONMONOTONIC_POLL, tp[0], tp[1],
                f"consumer {consumer} read {tp[0]}/{tp[1]}@{offset} after "
                + _position_text(position),
                (before, after),
                {"consumer": consumer, "expected": position[0], "within_poll": position[2] is op},
            ))
        known = {tp: sorted(offsets) for tp, offsets in self.read_offsets.items()}
        for (consumer, tp), position, offset, number, op, value in self.gaps:
            offsets = known.get(tp, [])
            lo = bisect_left(offsets, position[0])
            hi = bisect_left(offsets, offset, lo)
            if hi == lo:
                continue  # nothing anyone read lies in the gap: control batches or compaction
            before = self._position_observation(position, tp)
            after = _observe(number, op, tp, offset, value)
            skipped = offsets[lo:min(hi, lo + SKIPPED_OFFSETS_SHOWN)]
            skips.append(Anomaly(
                AnomalyKind.POLL_SKIP, tp[0], tp[1],
                f"consumer {consumer} read {tp[0]}/{tp[1]}@{offset} after "
                + _position_text(position) + f", skipping {hi - lo} records",
                (before, after),
                {"consumer": consumer, "expected": position[0], "within_poll": position[2] is op,
                 "skipped_count": hi - lo, "skipped_offsets": skipped},
            ))

    @staticmethod
    def _position_observation(position: _Position, tp: TopicPartition) -> Observation:
        _, number, op, offset, value = position
        return _observe(number, op, tp, offset, value)

    def _commit_order(self, out: list[Anomaly]) -> None:
        if not self.commit_drops and not self.start_drops:
            return
        reset_lines: dict[tuple[str, TopicPartition], list[int]] = defaultdict(list)
        for number, group, consumer, partitions, _ in self.resets:
            group = group if group is not None else self.consumer_group.get(consumer or "")
            if group is None:
                continue
            for tp in partitions:
                reset_lines[(group, tp)].append(number)  # history order: already sorted
        for group, tp, (number_before, before), (number_after, after) in [*self.commit_drops,
                                                                           *self.start_drops]:
            lines = reset_lines.get((group, tp), [])
            if bisect_right(lines, number_before) < bisect_left(lines, number_after):
                continue  # a seek or reset between the two allows going back
            assert isinstance(before, CommitOp)
            if isinstance(after, CommitOp):
                what = f"committed {tp[0]}/{tp[1]} offset {after.offset} after {before.offset}"
            else:
                assert isinstance(after, PollOp)
                what = (f"member {after.consumer} gained {tp[0]}/{tp[1]} and read from offset "
                        f"{after.records[0][0]}, below the acknowledged commit {before.offset}")
            out.append(Anomaly(
                AnomalyKind.COMMITTED_OFFSETS_BACKWARDS, tp[0], tp[1], f"group {group} {what}",
                (_observe(number_before, before), _observe(number_after, after)),
                {"group": group},
            ))


def _position_text(position: _Position) -> str:
    next_offset, number, op, offset, _ = position
    if offset is None:
        assert isinstance(op, ConsumerEventOp)
        return f"a {op.kind.value} to offset {next_offset} (op {number})"
    return f"offset {offset} (op {number})"


def main(argv: list[str] | None = None) -> int:
    """`python -m tidelog.cluster.checker HISTORY`: print the verdict; exit 1 on anomalies."""
    parser = argparse.ArgumentParser(description="Check a tidelog chaos history (JSON lines).")
    parser.add_argument("history", help="history file written by `tidelog cluster chaos`")
    parser.add_argument("--limit", type=int, default=20,
                        help="anomalies listed per kind (counts are always complete)")
    args = parser.parse_args(argv)
    verdict = check_file(args.history)
    print(verdict.to_json(limit=args.limit))
    return 0 if verdict.valid else 1


if __name__ == "__main__":
    sys.exit(main())
