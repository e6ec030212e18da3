"""The chaos history's JSON-lines format (issue 8, item 1): every op type round-trips, and a
malformed line is a named error that says which line."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tidelog.cluster.history import (
    CommitOp,
    ConsumerEventKind,
    ConsumerEventOp,
    FinalReadOp,
    HistoryFormatError,
    HistoryWriter,
    Outcome,
    PollOp,
    ResetOffsetsOp,
    SendOp,
    dumps_history,
    iter_history,
    op_from_json,
    op_to_json,
    read_history,
    write_history,
)

names = st.text(min_size=1, max_size=8)
values = st.text(max_size=12)  # any text, including quotes, newlines and non-ASCII
ints = st.integers(min_value=0, max_value=2**63 - 1)
times = st.none() | st.floats(allow_nan=False, allow_infinity=False)
outcomes = st.sampled_from(Outcome)
records = st.lists(st.tuples(ints, values), max_size=5).map(tuple)
partitions = st.lists(st.tuples(names, ints), max_size=4).map(tuple)

ops = st.one_of(
    st.builds(SendOp, process=ints, topic=names, value=values, outcome=outcomes,
              partition=st.none() | ints, offset=st.none() | ints, time=times,
              definite=st.booleans(), error=st.none() | values),
    st.builds(PollOp, process=ints, consumer=names, topic=names, partition=ints, records=records,
              group=st.none() | names, time=times),
    st.builds(ConsumerEventOp, kind=st.sampled_from(ConsumerEventKind), process=ints,
              consumer=names, partitions=partitions, offset=st.none() | ints,
              group=st.none() | names, time=times),
    st.builds(CommitOp, group=names, topic=names, partition=ints, offset=ints, outcome=outcomes,
              process=st.none() | ints, consumer=st.none() | names, time=times),
    st.builds(ResetOffsetsOp, group=names, topic=names, partition=ints,
              offset=st.none() | ints, time=times),
    st.builds(FinalReadOp, topic=names, partition=ints, records=records,
              complete=st.booleans(), time=times),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(ops, max_size=20))
def test_every_op_round_trips_through_json_lines(history) -> None:
    text = dumps_history(history)
    assert text.count("\n") == len(history)  # one op per line, whatever the values hold
    assert read_history(io.StringIO(text)) == history


def test_the_documented_lines_parse() -> None:
    lines = [
        '{"op": "send", "process": 3, "topic": "t", "value": "3-17", "outcome": "ok", '
        '"partition": 1, "offset": 42, "time": 12.5}',
        '{"op": "send", "process": 3, "topic": "t", "value": "3-18", "outcome": "failed", '
        '"partition": null, "offset": null, "time": 12.5, "definite": true, "error": "TOO_LARGE"}',
        '{"op": "poll", "process": 4, "consumer": "c4", "group": "g", "topic": "t", '
        '"partition": 1, "records": [[42, "3-17"], [43, "2-9"]], "time": 12.6}',
        '{"op": "seek", "process": 4, "consumer": "c4", "partitions": [["t", 1]], '
        '"offset": 0, "time": 12.7}',
        '{"op": "commit", "group": "g", "topic": "t", "partition": 1, "offset": 44, '
        '"outcome": "ok", "time": 12.8}',
        '{"op": "final-read", "topic": "t", "partition": 1, "records": [[42, "3-17"]]}',
        '{"op": "reset-offsets", "group": "g", "topic": "t", "partition": 1, "offset": 0}',
    ]
    history = read_history(io.StringIO("\n".join(lines) + "\n\n"))
    assert history[0] == SendOp(3, "t", "3-17", Outcome.OK, 1, 42, 12.5)
    assert history[1].definite and history[1].error == "TOO_LARGE"
    assert history[2].records == ((42, "3-17"), (43, "2-9"))
    assert history[3] == ConsumerEventOp(ConsumerEventKind.SEEK, 4, "c4", (("t", 1),), 0,
                                         time=12.7)
    assert history[4].outcome is Outcome.OK
    assert history[5] == FinalReadOp("t", 1, ((42, "3-17"),), complete=True)
    assert history[6] == ResetOffsetsOp("g", "t", 1, 0)


def test_unknown_keys_are_ignored() -> None:
    op = op_from_json('{"op": "final-read", "topic": "t", "partition": 0, "records": [], '
                      '"debug": {"leader": 2}}')
    assert op == FinalReadOp("t", 0, ())


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("not json", "not JSON"),
        ("[1, 2]", "must be a JSON object"),
        ('{"op": "delete"}', "unknown op 'delete'"),
        ('{"op": "send", "process": 1, "topic": "t", "outcome": "ok"}', "lacks 'value'"),
        ('{"op": "send", "process": 1, "topic": "t", "value": 7, "outcome": "ok"}',
         "'value' must be str"),
        ('{"op": "send", "process": true, "topic": "t", "value": "v", "outcome": "ok"}',
         "'process' must be int"),
        ('{"op": "send", "process": 1, "topic": "t", "value": "v", "outcome": "maybe"}',
         "unknown outcome 'maybe'"),
        ('{"op": "poll", "process": 1, "consumer": "c", "topic": "t", "partition": 0, '
         '"records": [[1]]}', "a record must be [offset, value]"),
        ('{"op": "poll", "process": 1, "consumer": "c", "topic": "t", "partition": 0, '
         '"records": [["1", "v"]]}', "a record must be [offset, value]"),
        ('{"op": "assign", "process": 1, "consumer": "c", "partitions": [["t"]]}',
         "a partition must be [topic, partition]"),
        ('{"op": "final-read", "topic": "t", "partition": 0, "records": [], "complete": 1}',
         "'complete' must be bool"),
    ],
)
def test_a_malformed_line_is_a_named_error_with_its_line_number(line: str, message: str) -> None:
    text = op_to_json(FinalReadOp("t", 0, ())) + "\n" + line + "\n"
    with pytest.raises(HistoryFormatError, match=re.escape(message)) as caught:
        read_history(io.StringIO(text))
    assert caught.value.line_number == 2
    assert str(caught.value).startswith("history line 2: ")


def test_files_stream_and_the_writer_appends_flushed_lines(tmp_path: Path) -> None:
    path = tmp_path / "history.jsonl"
    first = [SendOp(0, "t", "a", Outcome.OK, 0, 0, 1.0)]
    assert write_history(first, path) == 1
    later = [PollOp(1, "c", "t", 0, ((0, "a"),)), FinalReadOp("t", 0, ((0, "a"),))]
    with HistoryWriter(path) as writer:
        writer.record(later[0])
        # Flushed at once, so a harness killed here leaves a readable prefix.
        assert len(path.read_text().splitlines()) == 2
        writer.record(later[1])
    assert writer.count == 2
    streamed = iter_history(path)
    assert next(streamed) == first[0]
    assert list(streamed) == later
    assert all(json.loads(line)["op"] for line in path.read_text().splitlines())


def test_a_writer_that_cannot_write_says_so(tmp_path: Path) -> None:
    """A full disk leaves holes in the history; the writer keeps the first error so the run
    reports it instead of judging a history with missing sends."""
    import errno

    class FullDisk:
        def write(self, text: str) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

        def flush(self) -> None:
            pass

        def close(self) -> None:
            pass

    writer = HistoryWriter(tmp_path / "h.jsonl")
    writer.record(SendOp(1, "t", "p1-1", Outcome.OK, 0, 0))
    assert writer.failed is None and writer.count == 1
    writer._file.close()
    writer._file = FullDisk()  # type: ignore[assignment]
    with pytest.raises(OSError):
        writer.record(SendOp(1, "t", "p1-2", Outcome.OK, 0, 1))
    assert writer.failed is not None and writer.failed.errno == errno.ENOSPC
    assert writer.count == 1
