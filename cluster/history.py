"""The client-visible history of a chaos run, as JSON lines (issue 8, item 1).

The harness appends one line per completed operation, in the order the operations completed;
`tidelog.cluster.checker` reads the lines back and judges them. This module is pure: no cluster,
no clock, no sockets. Each line is one JSON object whose `"op"` names its type:

    {"op": "send", "process": 3, "topic": "t", "value": "3-17", "outcome": "ok",
     "partition": 1, "offset": 42, "time": 12.5}
    {"op": "poll", "process": 4, "consumer": "c4", "group": "g", "topic": "t", "partition": 1,
     "records": [[42, "3-17"], [43, "2-9"]], "time": 12.6}
    {"op": "assign" | "seek" | "rebalance", "process": 4, "consumer": "c4",
     "partitions": [["t", 1], ["t", 2]], "offset": null, "time": 12.7}
    {"op": "commit", "group": "g", "topic": "t", "partition": 1, "offset": 44,
     "outcome": "ok", "time": 12.8}
    {"op": "reset-offsets", "group": "g", "topic": "t", "partition": 1, "offset": 0, "time": 13}
    {"op": "final-read", "topic": "t", "partition": 1, "records": [[0, "1-1"], ...],
     "complete": true}

Optional keys (default in brackets): every op's `"time"` [null]; send `"definite"` [false] and
`"error"` [null]; poll `"group"` [null]; assign/seek/rebalance `"group"` [null];
commit `"process"`, `"consumer"` [null]; final-read `"complete"` [true]. Keys this module does
not know are ignored, so the harness may add debugging fields; a missing required key or a
value of the wrong type is a `HistoryFormatError` naming the line.

What the harness must record for the checker to judge it:
- Every send once, with a value unique in the whole history, after it completed: "ok" with the
  partition and offset the broker acknowledged; "failed" when the client got an error (add
  `"definite": true` only when the error proves nothing was written); "unknown" on a timeout or
  a broken connection.
- Every poll, one op per partition it returned records for, with the offsets as returned, in
  the order each consumer made them (a consumer's ops must not be reordered among themselves).
  A consumer name stands for one consumer instance in one group: a restarted consumer gets a new
  name or an "assign"/"rebalance" op first.
- Every assign, seek and rebalance, before the next poll it affects, with the position set when
  it is known (`"offset"`, else null); every commit with its outcome (and the consumer, so a seek
  by that consumer counts as a reset of the group's offsets); every admin offset reset.
- After healing, a "final-read" of every partition of every topic written, from the log start to
  the high watermark, with `"complete": false` when the drain could not reach the end.
- Topics under test must not be compacted or trimmed by retention during the run.
"""

from __future__ import annotations

import io
import json
import os
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType
from typing import IO, Any, TypeAlias


class Outcome(StrEnum):
    """How an operation ended, as the client saw it."""

    OK = "ok"
    # The client got an error. For a send this is usually indefinite (the record may still have
    # been written, as with Kafka); `SendOp.definite` says when it is known not to have been.
    FAILED = "failed"
    # Timed out or the connection broke: the client cannot tell whether it took effect.
    UNKNOWN = "unknown"


class ConsumerEventKind(StrEnum):
    ASSIGN = "assign"
    SEEK = "seek"
    REBALANCE = "rebalance"


class HistoryFormatError(ValueError):
    """A history line that is not a well-formed operation."""

    def __init__(self, message: str, line_number: int | None = None) -> None:
        self.line_number = line_number
        where = f"history line {line_number}: " if line_number is not None else ""
        super().__init__(where + message)


Record: TypeAlias = tuple[int, str]
"""One record as read: (offset, value)."""

TopicPartition: TypeAlias = tuple[str, int]


@dataclass(frozen=True, slots=True)
class SendOp:
    """One produce of one record, after it completed."""

    process: int
    topic: str
    value: str
    outcome: Outcome
    partition: int | None = None
    offset: int | None = None
    time: float | None = None
    # True when the error proves the record was never written (e.g. rejected before it was sent
    # or a non-retriable validation error); then reading the value is an aborted read.
    definite: bool = False
    error: str | None = None


@dataclass(frozen=True, slots=True)
class PollOp:
    """What one poll returned for one partition (a poll touching three partitions is three ops)."""

    process: int
    consumer: str
    topic: str
    partition: int
    records: tuple[Record, ...]
    group: str | None = None
    time: float | None = None


@dataclass(frozen=True, slots=True)
class ConsumerEventOp:
    """An assignment change, seek, or group rebalance of one consumer.

    After one, the consumer's next poll of the partitions involved need not continue where the
    previous poll stopped. `offset`, when known, is the position the listed partitions were set
    to, and the consumer's next record from each must be the first record at or after it.
    """

    kind: ConsumerEventKind
    process: int
    consumer: str
    partitions: tuple[TopicPartition, ...]
    offset: int | None = None
    group: str | None = None
    time: float | None = None


@dataclass(frozen=True, slots=True)
class CommitOp:
    """A group offset commit for one partition."""

    group: str
    topic: str
    partition: int
    offset: int
    outcome: Outcome
    process: int | None = None
    consumer: str | None = None
    time: float | None = None


@dataclass(frozen=True, slots=True)
class ResetOffsetsOp:
    """An administrative reset of a group's committed offset (the one legal way to go back
    without a consumer seeking)."""

    group: str
    topic: str
    partition: int
    offset: int | None = None
    time: float | None = None


@dataclass(frozen=True, slots=True)
class FinalReadOp:
    """The drain after the faults healed: everything one partition holds, from its start."""

    topic: str
    partition: int
    records: tuple[Record, ...]
    # False when the drain could not read to the end (a partition still unavailable, a deadline
    # hit): acknowledged records missing from it are then "unseen", not "lost".
    complete: bool = True
    time: float | None = None


Op: TypeAlias = SendOp | PollOp | ConsumerEventOp | CommitOp | ResetOffsetsOp | FinalReadOp


# --- encoding ------------------------------------------------------------------------------


def op_to_dict(op: Op) -> dict[str, Any]:
    """The JSON object for one operation, keys in the documented order."""
    if isinstance(op, SendOp):
        out: dict[str, Any] = {
            "op": "send", "process": op.process, "topic": op.topic, "value": op.value,
            "outcome": op.outcome.value, "partition": op.partition, "offset": op.offset,
            "time": op.time,
        }
        if op.definite:
            out["definite"] = True
        if op.error is not None:
            out["error"] = op.error
        return out
    if isinstance(op, PollOp):
        return {
            "op": "poll", "process": op.process, "consumer": op.consumer, "group": op.group,
            "topic": op.topic, "partition": op.partition,
            "records": [[offset, value] for offset, value in op.records], "time": op.time,
        }
    if isinstance(op, ConsumerEventOp):
        out = {
            "op": op.kind.value, "process": op.process, "consumer": op.consumer,
            "partitions": [[topic, partition] for topic, partition in op.partitions],
            "offset": op.offset, "time": op.time,
        }
        if op.group is not None:
            out["group"] = op.group
        return out
    if isinstance(op, CommitOp):
        out = {
            "op": "commit", "group": op.group, "topic": op.topic, "partition": op.partition,
            "offset": op.offset, "outcome": op.outcome.value, "time": op.time,
        }
        if op.process is not None:
            out["process"] = op.process
        if op.consumer is not None:
            out["consumer"] = op.consumer
        return out
    if isinstance(op, ResetOffsetsOp):
        return {
            "op": "reset-offsets", "group": op.group, "topic": op.topic,
            "partition": op.partition, "offset": op.offset, "time": op.time,
        }
    if isinstance(op, FinalReadOp):
        out = {
            "op": "final-read", "topic": op.topic, "partition": op.partition,
            "records": [[offset, value] for offset, value in op.records],
            "complete": op.complete,
        }
        if op.time is not None:
            out["time"] = op.time
        return out
    raise TypeError(f"not a history op: {op!r}")


def op_to_json(op: Op) -> str:
    """One history line, without the newline."""
    return json.dumps(op_to_dict(op), ensure_ascii=False, separators=(",", ":"))


# --- decoding ------------------------------------------------------------------------------


def _required(obj: dict[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    if key not in obj:
        raise HistoryFormatError(f"{obj.get('op')!r} op lacks {key!r}")
    value = obj[key]
    # bool is an int in Python; a true/false where a number belongs is a harness bug.
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise HistoryFormatError(f"{key!r} must be {_type_name(kind)}, got {value!r}")
    return value


def _optional(obj: dict[str, Any], key: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
    value = obj.get(key)
    if value is None:
        return default
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise HistoryFormatError(f"{key!r} must be {_type_name(kind)} or null, got {value!r}")
    return value


def _type_name(kind: type | tuple[type, ...]) -> str:
    if isinstance(kind, tuple):
        return " or ".join(k.__name__ for k in kind)
    return kind.__name__


def _time(obj: dict[str, Any]) -> float | None:
    value = _optional(obj, "time", (int, float))
    return None if value is None else float(value)


def _outcome(obj: dict[str, Any]) -> Outcome:
    raw = _required(obj, "outcome", str)
    outcome = _OUTCOMES.get(raw)
    if outcome is None:
        raise HistoryFormatError(f"unknown outcome {raw!r}")
    return outcome


def _records(obj: dict[str, Any]) -> tuple[Record, ...]:
    raw = _required(obj, "records", list)
    records = []
    for pair in raw:
        if (
            not isinstance(pair, list) or len(pair) != 2
            or type(pair[0]) is not int or not isinstance(pair[1], str)
        ):
            raise HistoryFormatError(f"a record must be [offset, value], got {pair!r}")
        records.append((pair[0], pair[1]))
    return tuple(records)


def _partitions(obj: dict[str, Any]) -> tuple[TopicPartition, ...]:
    raw = _required(obj, "partitions", list)
    partitions = []
    for pair in raw:
        if (
            not isinstance(pair, list) or len(pair) != 2
            or not isinstance(pair[0], str) or type(pair[1]) is not int
        ):
            raise HistoryFormatError(f"a partition must be [topic, partition], got {pair!r}")
        partitions.append((pair[0], pair[1]))
    return tuple(partitions)


_OUTCOMES: Mapping[str, Outcome] = MappingProxyType({o.value: o for o in Outcome})


class _NotPlain(Exception):
    """A line the fast path will not vouch for; the checked path then parses or rejects it."""


def _fast_records(raw: Any) -> tuple[Record, ...]:
    records = []
    for offset, value in raw:
        if type(offset) is not int or type(value) is not str:
            raise _NotPlain
        records.append((offset, value))
    return tuple(records)


def _fast_op(obj: Any) -> Op:
    """Sends and polls are nearly every line of a history: build them with one type check per
    field and no per-field calls. Anything unusual goes to the checked path."""
    kind = obj["op"]
    if kind == "poll":
        process, consumer, topic = obj["process"], obj["consumer"], obj["topic"]
        partition, group, time = obj["partition"], obj.get("group"), obj.get("time")
        if (
            type(process) is not int or type(consumer) is not str or type(topic) is not str
            or type(partition) is not int or (group is not None and type(group) is not str)
            or (time is not None and type(time) is not float)
        ):
            raise _NotPlain
        return PollOp(process, consumer, topic, partition, _fast_records(obj["records"]), group,
                      time)
    if kind == "send":
        process, topic, value = obj["process"], obj["topic"], obj["value"]
        partition, offset, time = obj.get("partition"), obj.get("offset"), obj.get("time")
        if (
            type(process) is not int or type(topic) is not str or type(value) is not str
            or (partition is not None and type(partition) is not int)
            or (offset is not None and type(offset) is not int)
            or (time is not None and type(time) is not float)
            or "definite" in obj or "error" in obj
        ):
            raise _NotPlain
        return SendOp(process, topic, value, _OUTCOMES[obj["outcome"]], partition, offset, time)
    raise _NotPlain


def op_from_dict(obj: dict[str, Any]) -> Op:
    """The operation for one decoded JSON object; raises HistoryFormatError if malformed."""
    try:
        return _fast_op(obj)
    except (_NotPlain, KeyError, TypeError, ValueError):
        return _checked_op(obj)


def _checked_op(obj: dict[str, Any]) -> Op:
    if not isinstance(obj, dict):
        raise HistoryFormatError(f"a history line must be a JSON object, got {obj!r}")
    kind = obj.get("op")
    if kind == "send":
        return SendOp(
            process=_required(obj, "process", int),
            topic=_required(obj, "topic", str),
            value=_required(obj, "value", str),
            outcome=_outcome(obj),
            partition=_optional(obj, "partition", int),
            offset=_optional(obj, "offset", int),
            time=_time(obj),
            definite=_optional(obj, "definite", bool, False),
            error=_optional(obj, "error", str),
        )
    if kind == "poll":
        return PollOp(
            process=_required(obj, "process", int),
            consumer=_required(obj, "consumer", str),
            topic=_required(obj, "topic", str),
            partition=_required(obj, "partition", int),
            records=_records(obj),
            group=_optional(obj, "group", str),
            time=_time(obj),
        )
    if kind in ("assign", "seek", "rebalance"):
        return ConsumerEventOp(
            kind=ConsumerEventKind(kind),
            process=_required(obj, "process", int),
            consumer=_required(obj, "consumer", str),
            partitions=_partitions(obj),
            offset=_optional(obj, "offset", int),
            group=_optional(obj, "group", str),
            time=_time(obj),
        )
    if kind == "commit":
        return CommitOp(
            group=_required(obj, "group", str),
            topic=_required(obj, "topic", str),
            partition=_required(obj, "partition", int),
            offset=_required(obj, "offset", int),
            outcome=_outcome(obj),
            process=_optional(obj, "process", int),
            consumer=_optional(obj, "consumer", str),
            time=_time(obj),
        )
    if kind == "reset-offsets":
        return ResetOffsetsOp(
            group=_required(obj, "group", str),
            topic=_required(obj, "topic", str),
            partition=_required(obj, "partition", int),
            offset=_optional(obj, "offset", int),
            time=_time(obj),
        )
    if kind == "final-read":
        return FinalReadOp(
            topic=_required(obj, "topic", str),
            partition=_required(obj, "partition", int),
            records=_records(obj),
            complete=_optional(obj, "complete", bool, True),
            time=_time(obj),
        )
    raise HistoryFormatError(f"unknown op {kind!r}")


def op_from_json(line: str, line_number: int | None = None) -> Op:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise HistoryFormatError(f"not JSON: {exc}", line_number) from None
    try:
        return op_from_dict(obj)
    except HistoryFormatError as exc:
        if exc.line_number is None and line_number is not None:
            raise HistoryFormatError(str(exc), line_number) from None
        raise


# --- files ---------------------------------------------------------------------------------


def iter_history(source: str | os.PathLike[str] | IO[str]) -> Iterator[Op]:
    """Stream the operations of a history file (a path or an open text file), one per line.

    Streaming keeps a multi-million-op history out of memory; blank lines are skipped. Line
    numbers in errors count from 1.
    """
    if isinstance(source, (str, os.PathLike)):
        with open(source, encoding="utf-8") as file:
            yield from _iter_lines(file)
    else:
        yield from _iter_lines(source)


def _iter_lines(file: IO[str]) -> Iterator[Op]:
    for number, line in enumerate(file, start=1):
        if line.strip():
            yield op_from_json(line, number)


def read_history(source: str | os.PathLike[str] | IO[str]) -> list[Op]:
    return list(iter_history(source))


def write_history(ops: Iterable[Op], target: str | os.PathLike[str] | IO[str]) -> int:
    """Write operations as JSON lines; returns how many were written."""
    if isinstance(target, (str, os.PathLike)):
        with open(target, "w", encoding="utf-8") as file:
            return _write_lines(ops, file)
    return _write_lines(ops, target)


def _write_lines(ops: Iterable[Op], file: IO[str]) -> int:
    count = 0
    for op in ops:
        file.write(op_to_json(op))
        file.write("\n")
        count += 1
    return count


def dumps_history(ops: Iterable[Op]) -> str:
    buffer = io.StringIO()
    _write_lines(ops, buffer)
    return buffer.getvalue()


class HistoryWriter:
    """Appends operations to a history file as they complete, from any thread.

    Each line is flushed when written so that a harness killed mid-run leaves a readable prefix.
    Record an op when it *completes*, so that a consumer's polls appear in the order it made them.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self._file: IO[str] = open(path, "a", encoding="utf-8")
        self._lock = threading.Lock()
        self.count = 0
        # The first write that failed (a full disk): the history has holes from then on, so
        # no verdict may be drawn from it (a send that was never recorded reads as unexpected).
        self.failed: OSError | None = None

    def record(self, op: Op) -> None:
        line = op_to_json(op) + "\n"
        with self._lock:
            try:
                self._file.write(line)
                self._file.flush()
            except OSError as exc:
                if self.failed is None:
                    self.failed = exc
                raise
            self.count += 1

    def close(self) -> None:
        with self._lock:
            self._file.close()

    def __enter__(self) -> HistoryWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
