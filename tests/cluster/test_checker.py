"""The chaos history checker (issue 8, item 3): each anomaly on a hand-written history next to a
near-identical clean one, then a model that generates clean random histories which must check
valid, and single mutations of them that must yield exactly the expected anomaly kind.
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from collections.abc import Iterable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tidelog.cluster.checker import AnomalyKind, InvalidHistoryError, Source, Verdict, check
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
)

K = AnomalyKind


# --- terse constructors for hand-written histories ------------------------------------------


def send(value: str, partition: int | None = 0, offset: int | None = None,
         outcome: str = "ok", topic: str = "t", process: int = 0,
         definite: bool = False) -> SendOp:
    return SendOp(process, topic, value, Outcome(outcome), partition, offset, definite=definite)


def poll(consumer: str, partition: int, records: Iterable[tuple[int, str]], *,
         topic: str = "t", group: str | None = None, process: int = 1) -> PollOp:
    return PollOp(process, consumer, topic, partition, tuple(records), group=group)


def event(kind: str, consumer: str, partitions: Iterable[TopicPartition],
          offset: int | None = None, group: str | None = None, process: int = 1) -> ConsumerEventOp:
    return ConsumerEventOp(ConsumerEventKind(kind), process, consumer, tuple(partitions),
                           offset, group)


def commit(group: str, partition: int, offset: int, outcome: str = "ok",
           topic: str = "t", consumer: str | None = None) -> CommitOp:
    return CommitOp(group, topic, partition, offset, Outcome(outcome), consumer=consumer)


def final(partition: int, records: Iterable[tuple[int, str]], complete: bool = True,
          topic: str = "t") -> FinalReadOp:
    return FinalReadOp(topic, partition, tuple(records), complete)


def kinds(verdict: Verdict) -> set[AnomalyKind]:
    return set(verdict.anomaly_kinds)


def only(verdict: Verdict, kind: AnomalyKind):
    assert kinds(verdict) == {kind}, verdict.to_json()
    assert not verdict.valid
    (anomaly,) = verdict.anomalies[kind]
    return anomaly


def assert_valid(verdict: Verdict) -> None:
    assert verdict.valid, verdict.to_json()
    assert kinds(verdict) == set()


# --- lost-write and unseen ------------------------------------------------------------------


def test_lost_write_when_an_acknowledged_value_is_absent_from_a_complete_final_read() -> None:
    sends = [send("a", 0, 0), send("b", 0, 1)]
    anomaly = only(check([*sends, final(0, [(0, "a")])]), K.LOST_WRITE)
    (record,) = anomaly.records
    assert (record.source, record.value, record.partition, record.offset, record.process) == (
        Source.SEND, "b", 0, 1, 0)
    assert anomaly.details["rule"] == "absent-from-final-read"

    assert_valid(check([*sends, final(0, [(0, "a"), (1, "b")])]))


def test_lost_write_names_the_earlier_read_of_a_value_that_later_vanished() -> None:
    history = [send("a", 0, 0), poll("c", 0, [(0, "a")]), final(0, [])]
    anomaly = only(check(history), K.LOST_WRITE)
    assert [(r.source, r.offset, r.value) for r in anomaly.records] == [
        (Source.SEND, 0, "a"), (Source.POLL, 0, "a")]
    assert anomaly.records[1].consumer == "c"


def test_lost_write_by_jepsens_rule_when_a_read_went_past_it() -> None:
    # The final read is incomplete, but consumer c1 went from offset 0 to offset 2 while nothing
    # ever returned acknowledged offset 1 (so it is no poll-skip: no read shows 1 held a record).
    sends = [send("a", 0, 0), send("b", 0, 1), send("c", 0, 2)]
    history = [*sends, poll("c1", 0, [(0, "a")]), poll("c1", 0, [(2, "c")]),
               final(0, [(0, "a"), (2, "c")], complete=False)]
    anomaly = only(check(history), K.LOST_WRITE)
    assert anomaly.details["rule"] == "read-past"
    sent, later = anomaly.records
    assert (sent.value, sent.offset) == ("b", 1)
    assert later.source == Source.FINAL_READ and (later.value, later.offset) == ("c", 2)

    # Without the final read going past it, the consumer's step from 0 to 2 proves it.
    history[-1] = final(0, [(0, "a")], complete=False)
    kinds_found = check(history)
    assert kinds(kinds_found) == {K.LOST_WRITE, K.UNSEEN}  # c: polled, not in the final read
    (lost,) = kinds_found.anomalies[K.LOST_WRITE]
    assert [(r.source, r.offset, r.consumer) for r in lost.records] == [
        (Source.SEND, 1, None), (Source.POLL, 2, "c1")]

    # (Had b been read, the consumer's step over it would be a poll-skip instead.)
    history[3] = poll("c1", 0, [(0, "a"), (1, "b")])
    history[-1] = final(0, [(0, "a"), (1, "b"), (2, "c")], complete=False)
    assert_valid(check(history))


def test_read_past_looks_at_every_earlier_step_not_only_the_nearest() -> None:
    # c1 stepped from 0 to 10 (over acknowledged 8); c2's later-starting step 5 -> 6 does not
    # reach 8, and must not hide c1's.
    sends = [send("a", 0, 0), send("f", 0, 5), send("g", 0, 6), send("x", 0, 8),
             send("k", 0, 10)]
    history = [*sends, poll("c1", 0, [(0, "a"), (10, "k")]),
               event("seek", "c2", [("t", 0)], 5), poll("c2", 0, [(6, "g")]),
               final(0, [(0, "a"), (5, "f"), (6, "g"), (10, "k")], complete=False)]
    verdict = check(history)
    # f at 5 was jumped over by c2 (seek to 5, then 6) and by c1: poll-skips; x at 8 is lost.
    assert kinds(verdict) == {K.LOST_WRITE, K.POLL_SKIP}
    (lost,) = verdict.anomalies[K.LOST_WRITE]
    assert lost.details["value"] == "x"
    history[-1] = final(0, [(0, "a"), (5, "f"), (6, "g")], complete=False)
    (lost,) = check(history).anomalies[K.LOST_WRITE]
    assert (lost.records[1].consumer, lost.records[1].offset) == ("c1", 10)


def test_a_consumer_that_sought_past_a_record_does_not_prove_it_lost() -> None:
    sends = [send("a", 0, 0), send("b", 0, 1), send("c", 0, 2)]
    history = [*sends, poll("c1", 0, [(0, "a")]), event("seek", "c1", [("t", 0)], 2),
               poll("c1", 0, [(2, "c")]), final(0, [(0, "a")], complete=False)]
    verdict = check(history)
    assert kinds(verdict) == {K.UNSEEN}
    assert {a.details["value"] for a in verdict.anomalies[K.UNSEEN]} == {"b", "c"}


def test_unseen_is_not_lost_when_the_final_read_is_incomplete() -> None:
    sends = [send("a", 0, 0), send("b", 0, 1)]
    anomaly = only(check([*sends, final(0, [(0, "a")], complete=False)]), K.UNSEEN)
    assert [(r.value, r.offset) for r in anomaly.records] == [("b", 1)]

    # No final read of the partition at all: unseen too.
    assert kinds(check(sends)) == {K.UNSEEN}
    assert_valid(check([*sends, final(0, [(0, "a"), (1, "b")], complete=False)]))


def test_unacknowledged_sends_may_be_missing() -> None:
    history = [send("a", 0, 0), send("b", None, None, "failed"), send("c", None, None, "unknown"),
               final(0, [(0, "a")])]
    verdict = check(history)
    assert_valid(verdict)
    assert (verdict.stats.acknowledged, verdict.stats.failed, verdict.stats.unknown) == (1, 1, 1)


# --- duplicate and inconsistent-offsets -----------------------------------------------------


def test_duplicate_when_one_value_is_at_two_offsets() -> None:
    sends = [send("a", 0, 0), send("b", 0, 1), send("c", None, None, "unknown")]
    anomaly = only(check([*sends, final(0, [(0, "a"), (1, "b"), (2, "a")])]), K.DUPLICATE)
    assert anomaly.details["value"] == "a"
    assert sorted((r.offset, r.value) for r in anomaly.records) == [(0, "a"), (2, "a")]

    assert_valid(check([*sends, final(0, [(0, "a"), (1, "b"), (2, "c")])]))


def test_duplicate_across_partitions() -> None:
    history = [send("a", 0, 0), final(0, [(0, "a")]), final(1, [(0, "a")])]
    anomaly = only(check(history), K.DUPLICATE)
    assert {(r.partition, r.offset) for r in anomaly.records} == {(0, 0), (1, 0)}


def test_inconsistent_offsets_when_two_reads_disagree_about_an_offset() -> None:
    sends = [send("a", 0, 0), send("b", None, None, "unknown"), send("c", None, None, "unknown")]
    history = [*sends, poll("c1", 0, [(0, "a"), (1, "b")]), final(0, [(0, "a"), (1, "c")])]
    anomaly = only(check(history), K.INCONSISTENT_OFFSETS)
    assert anomaly.details["offset"] == 1
    assert [(r.source, r.offset, r.value) for r in anomaly.records] == [
        (Source.POLL, 1, "b"), (Source.FINAL_READ, 1, "c")]
    assert anomaly.records[0].consumer == "c1"

    history[-1] = final(0, [(0, "a"), (1, "b")])
    assert_valid(check(history))


def test_inconsistent_offsets_against_a_send_acknowledgement() -> None:
    sends = [send("a", 0, 0), send("b", 0, 1), send("c", 0, 1)]
    anomaly = only(check([*sends, final(0, [(0, "a"), (1, "b"), (2, "c")])]),
                   K.INCONSISTENT_OFFSETS)
    # c is acknowledged at 1 but read at 2: the offset disagreement, not a second copy of c.
    assert [(r.source, r.value) for r in anomaly.records] == [
        (Source.SEND, "b"), (Source.SEND, "c")]


# --- nonmonotonic-poll and poll-skip --------------------------------------------------------


def test_nonmonotonic_poll_when_a_consumer_goes_back_without_a_seek() -> None:
    sends = [send("a", 0, 0), send("b", 0, 1), send("c", 0, 2)]
    first = poll("c1", 0, [(0, "a"), (1, "b")])
    again = poll("c1", 0, [(1, "b"), (2, "c")])
    end = final(0, [(0, "a"), (1, "b"), (2, "c")])
    anomaly = only(check([*sends, first, again, end]), K.NONMONOTONIC_POLL)
    before, after = anomaly.records
    assert (before.op_number, before.offset, before.value) == (4, 1, "b")
    assert (after.op_number, after.offset, after.value, after.consumer) == (5, 1, "b", "c1")

    assert_valid(check([*sends, first, event("seek", "c1", [("t", 0)], 1), again, end]))
    # Another consumer re-reading is not this consumer going back.
    assert_valid(check([*sends, first, poll("c2", 0, [(1, "b"), (2, "c")]), end]))


def test_nonmonotonic_poll_inside_one_poll() -> None:
    sends = [send("a", 0, 0), send("b", 0, 1)]
    end = final(0, [(0, "a"), (1, "b")])
    only(check([*sends, poll("c1", 0, [(1, "b"), (0, "a")]), end]), K.NONMONOTONIC_POLL)
    assert_valid(check([*sends, poll("c1", 0, [(0, "a"), (1, "b")]), end]))


def test_any_assign_or_rebalance_forgets_the_position() -> None:
    sends = [send("a", 0, 0), send("b", 0, 1)]
    end = final(0, [(0, "a"), (1, "b")])
    for kind in ("assign", "rebalance"):
        history = [*sends, poll("c1", 0, [(0, "a"), (1, "b")]),
                   event(kind, "c1", [("t", 1)]), poll("c1", 0, [(0, "a")]), end]
        assert_valid(check(history))


def test_poll_skip_when_a_consumer_jumps_over_a_record_some_read_returned() -> None:
    sends = [send("a", 0, 0), send("b", 0, 1), send("c", 0, 2)]
    polls = [poll("c1", 0, [(0, "a")]), poll("c1", 0, [(2, "c")])]
    anomaly = only(check([*sends, *polls, final(0, [(0, "a"), (1, "b"), (2, "c")])]),
                   K.POLL_SKIP)
    before, after = anomaly.records
    assert (before.offset, before.value, after.offset, after.value) == (0, "a", 2, "c")
    assert anomaly.details["skipped_offsets"] == [1]

    # Offset 1 never held a record (a control batch): jumping over it is fine.
    sends = [send("a", 0, 0), send("c", 0, 2)]
    assert_valid(check([*sends, *polls, final(0, [(0, "a"), (2, "c")])]))


def test_poll_skip_after_a_seek_to_an_offset() -> None:
    sends = [send("a", 0, 0), send("b", 0, 1)]
    end = final(0, [(0, "a"), (1, "b")])
    seek = event("seek", "c1", [("t", 0)], 0)
    anomaly = only(check([*sends, seek, poll("c1", 0, [(1, "b")]), end]), K.POLL_SKIP)
    assert anomaly.records[0].source == Source.SEEK
    assert_valid(check([*sends, seek, poll("c1", 0, [(0, "a"), (1, "b")]), end]))
    # Records before the position a seek set are a step back.
    seek = event("seek", "c1", [("t", 0)], 1)
    only(check([*sends, seek, poll("c1", 0, [(0, "a"), (1, "b")]), end]), K.NONMONOTONIC_POLL)


# --- committed-offsets-backwards ------------------------------------------------------------


def test_committed_offsets_backwards_without_a_reset() -> None:
    base = [send("a", 0, 0), poll("c1", 0, [(0, "a")], group="g"), final(0, [(0, "a")])]
    anomaly = only(check([*base, commit("g", 0, 5), commit("g", 0, 3)]),
                   K.COMMITTED_OFFSETS_BACKWARDS)
    before, after = anomaly.records
    assert (before.source, before.offset, after.offset, after.group) == (Source.COMMIT, 5, 3, "g")

    assert_valid(check([*base, commit("g", 0, 5), commit("g", 0, 5), commit("g", 0, 6)]))
    # A seek by a consumer of the group (its group known from its polls) allows going back.
    seek = event("seek", "c1", [("t", 0)], 0)
    assert_valid(check([*base, commit("g", 0, 5), seek, commit("g", 0, 3)]))
    # So does an administrative reset.
    reset = ResetOffsetsOp("g", "t", 0, 0)
    assert_valid(check([*base, commit("g", 0, 5), reset, commit("g", 0, 3)]))
    # A failed or unknown commit does not order anything, and other groups and partitions
    # are separate.
    assert_valid(check([*base, commit("g", 0, 5), commit("g", 0, 3, "failed"),
                        commit("h", 0, 3), commit("g", 1, 3), commit("g", 0, 7)]))
    # A seek by a consumer of another group, or of another partition, does not.
    other = event("seek", "c9", [("t", 0)], 0, group="h")
    elsewhere = event("seek", "c1", [("t", 1)], 0)
    for history in ([*base, commit("g", 0, 5), other, commit("g", 0, 3)],
                    [*base, commit("g", 0, 5), elsewhere, commit("g", 0, 3)]):
        only(check(history), K.COMMITTED_OFFSETS_BACKWARDS)


# --- unexpected, aborted-read, failed-but-present ------------------------------------------


def test_unexpected_when_a_value_read_was_never_sent() -> None:
    anomaly = only(check([send("a", 0, 0), poll("c1", 0, [(0, "a"), (1, "z")]),
                          final(0, [(0, "a"), (1, "z")])]), K.UNEXPECTED)
    (record,) = anomaly.records
    assert (record.source, record.offset, record.value, record.consumer) == (
        Source.POLL, 1, "z", "c1")

    assert_valid(check([send("a", 0, 0), send("z", None, None, "unknown"),
                        poll("c1", 0, [(0, "a"), (1, "z")]), final(0, [(0, "a"), (1, "z")])]))


def test_aborted_read_only_for_a_definitely_failed_send() -> None:
    history = [send("a", 0, 0), send("x", None, None, "failed", definite=True),
               final(0, [(0, "a"), (1, "x")])]
    anomaly = only(check(history), K.ABORTED_READ)
    assert [(r.source, r.value, r.offset) for r in anomaly.records] == [
        (Source.SEND, "x", None), (Source.FINAL_READ, "x", 1)]

    history[1] = send("x", None, None, "failed")
    verdict = check(history)
    assert_valid(verdict)
    assert [(o.value, o.offset) for o in verdict.failed_but_present] == [("x", 1)]
    assert verdict.stats.failed_present == 1


def test_a_value_sent_twice_is_a_broken_history() -> None:
    with pytest.raises(InvalidHistoryError, match="sent by ops 1 and 2"):
        check([send("a", 0, 0), send("a", 0, 1)])


def test_verdict_json_is_one_line_with_counts_and_records() -> None:
    verdict = check([send("a", 0, 0), send("b", 0, 1), send("c", 0, 2), final(0, [])])
    line = verdict.to_json(limit=1)
    assert "\n" not in line
    data = json.loads(line)
    assert data["valid"] is False
    assert data["counts"]["lost-write"] == 3 and data["counts"]["duplicate"] == 0
    assert len(data["anomalies"]["lost-write"]) == 1
    assert data["anomalies"]["lost-write"][0]["records"][0]["value"] == "a"
    assert data["stats"]["acknowledged"] == 3


# --- a model of a correct log, and mutations of what it records ------------------------------


TOPICS = ("t0", "t1")
PARTITIONS = 2
ALL_TPS = [(topic, p) for topic in TOPICS for p in range(PARTITIONS)]


def test_a_member_that_gains_a_partition_below_an_acknowledged_commit() -> None:
    """The coordinator lost a commit: the partition's new owner starts below it."""
    base = [send("a", 0, 0), send("b", 0, 1), send("c", 0, 2),
            final(0, [(0, "a"), (1, "b"), (2, "c")]),
            event("rebalance", "m1", [("t", 0)], group="g"),
            poll("m1", 0, [(0, "a"), (1, "b")], group="g"),
            commit("g", 0, 2, consumer="m1"),  # acknowledged: m1 read up to 1
            event("rebalance", "m1", [("t", 0)], group="g"),  # m1 gives it up
            event("rebalance", "m2", [("t", 0)], group="g")]  # m2 gains it
    anomaly = only(check([*base, poll("m2", 0, [(1, "b"), (2, "c")], group="g")]),
                   K.COMMITTED_OFFSETS_BACKWARDS)
    before, after = anomaly.records
    assert (before.source, before.offset) == (Source.COMMIT, 2)
    assert (after.source, after.consumer) == (Source.POLL, "m2")
    # Starting at the commit is the protocol; an admin reset in between allows going back.
    assert_valid(check([*base, poll("m2", 0, [(2, "c")], group="g")]))
    reset = ResetOffsetsOp("g", "t", 0, 0)
    assert_valid(check([*base[:-1], reset, base[-1], poll("m2", 0, [(0, "a")], group="g")]))
    # A commit whose answer never came orders nothing.
    unknown = [*base[:6], commit("g", 0, 2, "unknown", consumer="m1"), *base[7:]]
    assert_valid(check([*unknown, poll("m2", 0, [(0, "a")], group="g")]))


def model_history(rnd: random.Random, steps: int) -> list[Op]:
    """A history a correct cluster could produce: unique values, control-batch gaps, failed and
    unknown sends that were sometimes written anyway, two consumers of group "g" that rebalance
    and commit, and a standalone consumer that assigns and seeks back and forth."""
    log: dict[TopicPartition, list[tuple[int, str]]] = {tp: [] for tp in ALL_TPS}
    next_offset = dict.fromkeys(ALL_TPS, 0)
    history: list[Op] = []
    positions: dict[str, dict[TopicPartition, int]] = {"g1": {}, "g2": {}, "solo": {}}
    committed: dict[TopicPartition, int] = {}
    groups = {"g1": "g", "g2": "g", "solo": None}
    process_of = {"g1": 10, "g2": 11, "solo": 12}
    counter = 0

    def rebalance() -> None:
        tps = ALL_TPS[:]
        rnd.shuffle(tps)
        cut = rnd.randint(0, len(tps))
        for consumer, owned in (("g1", tps[:cut]), ("g2", tps[cut:])):
            positions[consumer] = {tp: committed.get(tp, 0) for tp in owned}
            history.append(event("rebalance", consumer, sorted(owned), None, group="g",
                                 process=process_of[consumer]))

    def assign_solo() -> None:
        owned = rnd.sample(ALL_TPS, rnd.randint(1, len(ALL_TPS)))
        offset = rnd.choice([None, rnd.randint(0, 3)])
        positions["solo"] = dict.fromkeys(owned, 0 if offset is None else offset)
        history.append(event("assign", "solo", sorted(owned), offset, process=12))

    rebalance()
    assign_solo()
    for _ in range(steps):
        action = rnd.choices(
            ["send", "poll", "commit", "seek", "rebalance", "assign"], [10, 8, 3, 2, 1, 1])[0]
        if action == "send":
            topic, partition = tp = rnd.choice(ALL_TPS)
            counter += 1
            value = f"v{counter}"
            if rnd.random() < 0.15:
                next_offset[tp] += 1  # a control batch takes an offset no read ever returns
            outcome = rnd.choices(["ok", "failed", "unknown"], [8, 1, 1])[0]
            written = outcome == "ok" or rnd.random() < 0.5
            offset = next_offset[tp]
            if written:
                log[tp].append((offset, value))
                next_offset[tp] += 1
            if outcome == "ok":
                history.append(send(value, partition, offset, topic=topic, process=rnd.randint(0, 2)))
            else:
                history.append(send(value, None, None, outcome, topic=topic,
                                    process=rnd.randint(0, 2)))
        elif action == "poll":
            consumer = rnd.choice(list(positions))
            if not positions[consumer]:
                continue
            tp = rnd.choice(sorted(positions[consumer]))
            start = positions[consumer][tp]
            records = [r for r in log[tp] if r[0] >= start][: rnd.randint(0, 4)]
            if records:
                positions[consumer][tp] = records[-1][0] + 1
            history.append(poll(consumer, tp[1], records, topic=tp[0], group=groups[consumer],
                                process=process_of[consumer]))
        elif action == "commit":
            consumer = rnd.choice(["g1", "g2"])
            if not positions[consumer]:
                continue
            tp = rnd.choice(sorted(positions[consumer]))
            # A position behind the last commit comes only from a seek since that commit, so
            # committing it is a legitimate step back.
            outcome = rnd.choices(["ok", "failed", "unknown"], [8, 1, 1])[0]
            if outcome == "ok":
                committed[tp] = positions[consumer][tp]
            history.append(commit("g", tp[1], positions[consumer][tp], outcome, topic=tp[0],
                                  consumer=consumer))
        elif action == "seek":
            consumer = rnd.choice(list(positions))
            if not positions[consumer]:
                continue
            tp = rnd.choice(sorted(positions[consumer]))
            offset = rnd.randint(0, next_offset[tp])
            positions[consumer][tp] = offset
            history.append(event("seek", consumer, [tp], offset, process=process_of[consumer]))
            if groups[consumer] is not None and rnd.random() < 0.5:
                committed[tp] = offset  # committing a position behind the last commit
                history.append(commit("g", tp[1], offset, topic=tp[0], consumer=consumer))
        elif action == "rebalance":
            rebalance()
        else:
            assign_solo()
    for topic, partition in ALL_TPS:
        history.append(final(partition, log[(topic, partition)], topic=topic))
    return history


histories = st.builds(
    model_history, st.randoms(use_true_random=False), st.integers(min_value=5, max_value=120)
)


@settings(max_examples=100, deadline=None)
@given(histories)
def test_model_histories_are_valid(history: list[Op]) -> None:
    verdict = check(history)
    assert_valid(verdict)
    written_failed = {
        op.value for op in history if isinstance(op, SendOp) and op.outcome is Outcome.FAILED
    } & {value for op in history if isinstance(op, FinalReadOp) for _, value in op.records}
    assert {o.value for o in verdict.failed_but_present} == written_failed


def _final_reads(history: list[Op]) -> list[int]:
    return [i for i, op in enumerate(history) if isinstance(op, FinalReadOp)]


def _replace_records(history: list[Op], index: int, records: list[tuple[int, str]]) -> list[Op]:
    op = history[index]
    assert isinstance(op, FinalReadOp)
    mutated = history[:]
    mutated[index] = FinalReadOp(op.topic, op.partition, tuple(records), op.complete)
    return mutated


def _end_offset(history: list[Op], topic: str, partition: int) -> int:
    """An offset past every offset anything in the history mentions for the partition."""
    offsets = [-1]
    for op in history:
        if isinstance(op, (PollOp, FinalReadOp)) and (op.topic, op.partition) == (topic, partition):
            offsets += [offset for offset, _ in op.records]
        elif isinstance(op, ConsumerEventOp) and (topic, partition) in op.partitions:
            offsets.append(op.offset if op.offset is not None else -1)
    return max(offsets) + 1


MUTATIONS = ["drop-acked", "duplicate", "swap", "reorder-polls", "insert-unsent"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(histories, st.sampled_from(MUTATIONS), st.randoms(use_true_random=False))
def test_each_mutation_of_a_model_history_yields_its_anomaly(
    history: list[Op], mutation: str, rnd: random.Random
) -> None:
    acked = {op.value: op for op in history if isinstance(op, SendOp) and op.outcome is Outcome.OK}
    finals = _final_reads(history)
    if mutation == "drop-acked":
        candidates = [(i, value) for i in finals for _, value in history[i].records
                      if value in acked]
        if not candidates:
            return
        index, value = rnd.choice(candidates)
        mutated = _replace_records(history, index,
                                   [r for r in history[index].records if r[1] != value])
        anomaly = only(check(mutated), K.LOST_WRITE)
        assert anomaly.records[0].value == value
    elif mutation == "duplicate":
        candidates = [i for i in finals if history[i].records]
        if not candidates:
            return
        index = rnd.choice(candidates)
        op = history[index]
        value = rnd.choice(op.records)[1]
        extra = (_end_offset(history, op.topic, op.partition), value)
        anomaly = only(check(_replace_records(history, index, [*op.records, extra])), K.DUPLICATE)
        assert anomaly.details["value"] == value
    elif mutation == "swap":
        # Two acknowledged records of one partition trade places in the final read; the
        # acknowledgements still say where each one went.
        candidates = [i for i in finals
                      if sum(value in acked for _, value in history[i].records) >= 2]
        if not candidates:
            return
        index = rnd.choice(candidates)
        records = list(history[index].records)
        i, j = rnd.sample([k for k, (_, value) in enumerate(records) if value in acked], 2)
        (oi, vi), (oj, vj) = records[i], records[j]
        records[i], records[j] = (oi, vj), (oj, vi)
        verdict = check(_replace_records(history, index, records))
        assert kinds(verdict) == {K.INCONSISTENT_OFFSETS}, verdict.to_json()
        assert {a.details["offset"] for a in verdict.anomalies[K.INCONSISTENT_OFFSETS]} == {oi, oj}
    elif mutation == "reorder-polls":
        pair = _consecutive_polls(history)
        if pair is None:
            return
        a, b = pair
        mutated = history[:]
        mutated[a], mutated[b] = history[b], history[a]
        verdict = check(mutated)
        # Going back is always there; jumping over the moved poll's records as well, whenever
        # the consumer had a position before the pair or polls again after it.
        assert K.NONMONOTONIC_POLL in kinds(verdict), verdict.to_json()
        assert kinds(verdict) <= {K.NONMONOTONIC_POLL, K.POLL_SKIP}, verdict.to_json()
        back = verdict.anomalies[K.NONMONOTONIC_POLL][0]
        assert [r.op_number for r in back.records] == [a + 1, b + 1]
        assert back.records[1].offset == history[a].records[0][0]
    else:
        index = rnd.choice(finals)
        op = history[index]
        extra = (_end_offset(history, op.topic, op.partition), "never-sent")
        anomaly = only(check(_replace_records(history, index, [*op.records, extra])), K.UNEXPECTED)
        assert anomaly.records[0].value == "never-sent"


def _consecutive_polls(history: list[Op]) -> tuple[int, int] | None:
    """Two non-empty polls of one consumer and partition with nothing of that consumer on that
    partition between them (no poll, assign, seek or rebalance)."""
    last: dict[tuple[str, TopicPartition], int] = {}
    for i, op in enumerate(history):
        if isinstance(op, ConsumerEventOp):
            for key in [key for key in last if key[0] == op.consumer]:
                del last[key]
        elif isinstance(op, PollOp) and op.records:
            key = (op.consumer, (op.topic, op.partition))
            if key in last:
                return last[key], i
            last[key] = i
    return None


# --- scale ----------------------------------------------------------------------------------


@pytest.mark.bench
def test_bench_a_million_op_history(tmp_path) -> None:
    """Not a timed assertion: prints how long a large generated history takes to check, from
    memory and from its JSON-lines file (run with -m bench -s)."""
    import time

    from tidelog.cluster.checker import check_file
    from tidelog.cluster.history import write_history

    ops: list[Op] = []
    offsets: dict[int, int] = defaultdict(int)
    positions: dict[tuple[int, int], int] = defaultdict(int)
    logs: dict[int, list[tuple[int, str]]] = defaultdict(list)
    for n in range(700_000):
        partition = n % 16
        offset = offsets[partition]
        offsets[partition] += 1
        ops.append(send(f"v{n}", partition, offset))
        logs[partition].append((offset, f"v{n}"))
        if n % 3 == 2:
            for consumer in range(2):
                key = (consumer, partition)
                start = positions[key]
                records = logs[partition][start:start + 8]
                positions[key] = start + len(records)
                ops.append(poll(f"c{consumer}", partition, records))
    ops += [final(p, logs[p]) for p in range(16)]
    began, cpu = time.perf_counter(), time.process_time()
    verdict = check(ops)
    print(f"\n{len(ops)} ops checked in memory in {time.perf_counter() - began:.1f} s "
          f"({time.process_time() - cpu:.1f} s CPU)")
    assert verdict.valid
    path = tmp_path / "history.jsonl"
    write_history(ops, path)
    del ops
    began, cpu = time.perf_counter(), time.process_time()
    verdict = check_file(path)
    print(f"read and checked from {path.stat().st_size >> 20} MiB in "
          f"{time.perf_counter() - began:.1f} s ({time.process_time() - cpu:.1f} s CPU)")
    assert verdict.valid and verdict.stats.acknowledged == 700_000
