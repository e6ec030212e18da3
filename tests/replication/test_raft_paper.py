"""The Raft core against the rules it implements, in the style of etcd's raft_paper_test.go.

Each test names the rule it pins down and cites where it comes from: the Raft paper (Ongaro and
Ousterhout, "In Search of an Understandable Consensus Algorithm", extended version) by section,
or the KIP that changes it for KRaft (KIP-595 pull replication, KIP-996 pre-vote, KIP-853
voter changes).
"""

from __future__ import annotations

import dataclasses
import random

import pytest

from tidelog.replication.log import MemoryLog
from tidelog.replication.messages import (
    NO_DIVERGENCE,
    BeginQuorumEpoch,
    EndQuorumEpoch,
    FetchError,
    FetchRequest,
    FetchResponse,
    VoteRequest,
    VoteResponse,
    coalesce,
)
from tidelog.replication.raft import (
    TRANSITIONS,
    IllegalTransitionError,
    MembershipChangeError,
    NotLeaderError,
    QuorumState,
    RaftConfig,
    RaftGroup,
    Role,
    TruncationBelowHighWatermarkError,
)
from tidelog.replication.testing import GROUP, Cluster, batch

T = 100  # election timeout of RaftConfig.scaled(100)


def lone(node_id: int = 1, voters=(1, 2, 3), **kwargs) -> RaftGroup:
    return RaftGroup(
        GROUP,
        node_id,
        voters,
        log=kwargs.pop("log", MemoryLog()),
        config=RaftConfig.scaled(T),
        rng=random.Random(1),
        **kwargs,
    )


def vote_request(
    src: int, dst: int, epoch: int, last_epoch: int = 0, end_offset: int = 0, pre_vote: bool = False
):
    return VoteRequest(GROUP, src, dst, epoch, last_epoch, end_offset, pre_vote)


def fill(log: MemoryLog, *epochs: int) -> MemoryLog:
    """Leader-append one single-record batch per given epoch."""
    for epoch in epochs:
        log.append(batch(b"e%d" % epoch), epoch)
    log.flush()
    return log


# --- §5.1 terms ----------------------------------------------------------------------------------


@pytest.mark.parametrize("role", [Role.UNATTACHED, Role.FOLLOWER, Role.CANDIDATE, Role.LEADER])
def test_update_epoch_from_higher_epoch_message(role: Role) -> None:
    """§5.1: "If one server's current term is smaller than the other's, then it updates its
    current term to the larger value. If a candidate or leader discovers that its term is out of
    date, it immediately reverts to follower state." (KIP-595: via BeginQuorumEpoch.)"""
    cluster = Cluster()
    if role is Role.FOLLOWER or role is Role.LEADER:
        cluster.elect(1)
    target = 1 if role is Role.LEADER else 2
    if role is Role.CANDIDATE:
        cluster.elect(1)
        cluster.tick(2, 3 * T)  # fetch timeout: prospective
        cluster.deliver(VoteResponse(GROUP, 3, 2, cluster[2].epoch, True, True, None))
        assert cluster[2].role is Role.CANDIDATE
    epoch = cluster[target].epoch + 5
    cluster.deliver(BeginQuorumEpoch(GROUP, 3, target, epoch))
    assert cluster[target].epoch == epoch
    assert cluster[target].role is Role.FOLLOWER
    assert cluster[target].leader_id == 3
    assert cluster.persisted[target] == QuorumState(epoch, None, 3)


def test_reject_requests_with_stale_epoch() -> None:
    """§5.1: "If a server receives a request with a stale term number, it rejects the request."
    KIP-595: a Fetch with an old epoch gets FENCED_LEADER_EPOCH and the current epoch."""
    cluster = Cluster()
    cluster.elect(1)
    cluster.elect(2)  # epoch 2 now
    out = cluster.deliver(vote_request(3, 2, epoch=1, last_epoch=9, end_offset=99))
    (response,) = out.messages
    assert isinstance(response, VoteResponse) and not response.granted and response.epoch == cluster[2].epoch
    out = cluster.deliver(FetchRequest(GROUP, 3, 2, 1, 0, 0, 1, 0, 50))
    (fetch_response,) = out.messages
    assert isinstance(fetch_response, FetchResponse)
    assert fetch_response.error is FetchError.FENCED_LEADER_EPOCH
    assert (fetch_response.epoch, fetch_response.leader_id) == (cluster[2].epoch, 2)


# --- §5.2 leader election ----------------------------------------------------------------------


def test_start_as_unattached() -> None:
    """§5.2: "When servers start up, they begin as followers." KRaft: Unattached, no leader known."""
    group = lone()
    assert group.role is Role.UNATTACHED and group.epoch == 0 and group.leader_id is None


def test_restart_after_leading_comes_back_resigned() -> None:
    """KIP-595 (QuorumState): a replica whose persisted state says it led the epoch restarts as
    Resigned; it cannot know what it appended, so it never leads that epoch again."""
    group = lone(quorum_state=QuorumState(4, 1, 1))
    assert group.role is Role.RESIGNED and group.epoch == 4
    with pytest.raises(NotLeaderError):
        group.propose(batch(b"x"))


def test_election_timeout_is_randomized_between_t_and_2t() -> None:
    """§5.2: "election timeouts are chosen randomly from a fixed interval (e.g., 150–300ms)";
    KRaft: election.timeout.ms T, randomized in [T, 2T)."""
    deadlines = set()
    for seed in range(200):
        group = RaftGroup(
            GROUP, 1, (1, 2, 3), log=MemoryLog(), config=RaftConfig.scaled(T), rng=random.Random(seed)
        )
        deadlines.add(group.next_deadline())
    assert min(deadlines) >= T and max(deadlines) < 2 * T
    assert len(deadlines) > 50


def test_election_timeout_starts_pre_vote_without_changing_epoch() -> None:
    """KIP-996: on election timeout a voter becomes Prospective and asks for pre-votes for
    epoch+1; its own epoch, vote and persisted state do not change."""
    cluster = Cluster()
    out = cluster.tick(1, 2 * T)
    assert cluster[1].role is Role.PROSPECTIVE and cluster[1].epoch == 0
    assert out.quorum_state is None
    requests = [m for m in out.messages if isinstance(m, VoteRequest)]
    assert sorted(m.dst for m in requests) == [2, 3]
    assert all(m.pre_vote and m.epoch == 1 for m in requests)


def test_pre_vote_changes_no_state_on_the_receiver() -> None:
    """KIP-996: "a replica receiving a pre-vote ... does not change state"; it grants if the
    requester's log is up to date and it has no live leader."""
    cluster = Cluster()
    out = cluster.deliver(vote_request(1, 2, epoch=7, pre_vote=True))
    (response,) = out.messages
    assert response.granted and response.pre_vote
    assert cluster[2].epoch == 0 and cluster[2].voted_for is None and out.quorum_state is None


def test_pre_vote_majority_makes_a_candidate_that_persists_before_asking() -> None:
    """§5.2: "a follower increments its current term and transitions to candidate state. It
    then votes for itself"; Figure 2: persist currentTerm and votedFor before responding to
    RPCs — our Output carries the new quorum state with the VoteRequests it must precede."""
    cluster = Cluster()
    cluster.tick(1, 2 * T)
    cluster.take()
    out = cluster.deliver(VoteResponse(GROUP, 2, 1, 0, True, True, None))
    assert cluster[1].role is Role.CANDIDATE
    assert out.quorum_state == QuorumState(1, 1, None)
    requests = [m for m in out.messages if isinstance(m, VoteRequest)]
    assert sorted(m.dst for m in requests) == [2, 3] and all(
        not m.pre_vote and m.epoch == 1 for m in requests
    )


@pytest.mark.parametrize(
    "size, grants, wins",
    [(1, 0, True), (3, 0, False), (3, 1, True), (5, 1, False), (5, 2, True)],
)
def test_candidate_wins_with_a_majority(size: int, grants: int, wins: bool) -> None:
    """§5.2: "A candidate wins an election if it receives votes from a majority of the servers
    in the full cluster for the same term." """
    voters = tuple(range(1, size + 1))
    group = RaftGroup(GROUP, 1, voters, log=MemoryLog(), config=RaftConfig.scaled(T), rng=random.Random(3))
    group.tick(2 * T)
    for voter in voters[1:]:
        group.receive(VoteResponse(GROUP, voter, 1, 0, True, True, None))  # pre-votes
        if group.role is Role.CANDIDATE:
            break
    assert group.role is (Role.LEADER if size == 1 else Role.CANDIDATE)
    for voter in voters[1 : 1 + grants]:
        group.receive(VoteResponse(GROUP, voter, 1, group.epoch, True, False, None))
    for voter in voters[1 + grants :]:
        group.receive(VoteResponse(GROUP, voter, 1, group.epoch, False, False, None))
    assert (group.role is Role.LEADER) == wins


def test_vote_at_most_once_per_epoch_first_come_first_served() -> None:
    """§5.2: "Each server will vote for at most one candidate in a given term, on a
    first-come-first-served basis"; a repeated request from the same candidate is granted again."""
    cluster = Cluster()
    first = cluster.deliver(vote_request(2, 1, epoch=1))
    second = cluster.deliver(vote_request(3, 1, epoch=1))
    again = cluster.deliver(vote_request(2, 1, epoch=1))
    assert first.messages[0].granted and not second.messages[0].granted and again.messages[0].granted
    assert first.quorum_state == QuorumState(1, 2, None)
    assert cluster.persisted[1].voted_for == 2


def test_vote_survives_a_restart() -> None:
    """§5.2 / Figure 2: votedFor is persistent state; after a crash the voter still refuses a
    second candidate in the same epoch."""
    cluster = Cluster()
    cluster.deliver(vote_request(2, 1, epoch=1))
    cluster.crash(1)
    assert not cluster.deliver(vote_request(3, 1, epoch=1)).messages[0].granted


@pytest.mark.parametrize(
    "candidate, granted",
    [((1, 2), False), ((2, 1), False), ((2, 2), True), ((2, 3), True), ((3, 1), True)],
)
def test_vote_only_for_an_up_to_date_log(candidate: tuple[int, int], granted: bool) -> None:
    """§5.4.1: "If the logs have last entries with different terms, then the log with the later
    term is more up-to-date. If the logs end with the same term, then whichever log is longer is
    more up-to-date." Voter's log: last epoch 2, end offset 2."""
    group = lone(log=fill(MemoryLog(), 1, 2))
    last_epoch, end_offset = candidate
    group.receive(vote_request(2, 1, epoch=5, last_epoch=last_epoch, end_offset=end_offset))
    assert group.take_output().messages[0].granted is granted


class _ForgetfulLog(MemoryLog):
    """A log that, once emptied, no longer knows the epoch its prefix ended in."""

    @property
    def last_epoch(self) -> int:
        return super().last_epoch if self.batch_count() else 0


def test_a_voter_that_cannot_place_its_own_log_refuses_votes() -> None:
    """§5.4.1 needs the voter's own (last epoch, end offset). An empty log at offset 7 that
    reports epoch 0 would rank below any candidate of epoch >= 1, including one that lacks the
    committed entries below 7; such a voter must refuse rather than guess."""
    log = _ForgetfulLog(start_offset=7, start_epoch=3)
    group = lone(log=log)
    group.receive(vote_request(2, 1, epoch=5, last_epoch=1, end_offset=2))
    assert not group.take_output().messages[0].granted
    group = lone(log=MemoryLog(start_offset=7, start_epoch=3))
    group.receive(vote_request(2, 1, epoch=5, last_epoch=1, end_offset=2))
    assert not group.take_output().messages[0].granted  # (1, 2) < (3, 7)
    group = lone(log=MemoryLog(start_offset=7, start_epoch=3))
    group.receive(vote_request(2, 1, epoch=5, last_epoch=3, end_offset=7))
    assert group.take_output().messages[0].granted


def test_candidate_recognizes_leader_of_its_epoch() -> None:
    """§5.2: "If the leader's term ... is at least as large as the candidate's current term,
    then the candidate recognizes the leader as legitimate and returns to follower state."
    KIP-595: the leader announces itself with BeginQuorumEpoch."""
    cluster = Cluster()
    cluster.tick(1, 2 * T)
    cluster.take()
    cluster.deliver(VoteResponse(GROUP, 2, 1, 0, True, True, None))
    assert cluster[1].role is Role.CANDIDATE
    cluster.deliver(BeginQuorumEpoch(GROUP, 3, 1, cluster[1].epoch))
    assert cluster[1].role is Role.FOLLOWER and cluster[1].leader_id == 3


def test_split_vote_candidate_retries_after_timeout() -> None:
    """§5.2: "If many followers become candidates at the same time, votes could be split ...
    each candidate will time out and start a new election". With pre-vote the candidate goes
    back to Prospective and then runs in a higher epoch."""
    cluster = Cluster()
    cluster.tick(1, 2 * T)
    cluster.take()
    cluster.deliver(VoteResponse(GROUP, 2, 1, 0, True, True, None))
    cluster.take()
    epoch = cluster[1].epoch
    cluster.tick(1, 3 * T + cluster.config.election_backoff_max_ms)
    assert cluster[1].role is Role.PROSPECTIVE
    cluster.run()
    assert cluster[1].role is Role.LEADER and cluster[1].epoch == epoch + 1


def test_follower_with_live_leader_rejects_pre_votes() -> None:
    """KIP-996: a follower that hears from its leader refuses pre-votes, so a replica that was
    partitioned away cannot disrupt the quorum when it comes back."""
    cluster = Cluster()
    cluster.elect(1)
    out = cluster.deliver(
        vote_request(3, 2, epoch=cluster[2].epoch + 1, last_epoch=9, end_offset=99, pre_vote=True)
    )
    assert not out.messages[0].granted
    assert cluster[2].role is Role.FOLLOWER


def test_partitioned_replica_does_not_disrupt_the_leader() -> None:
    """KIP-996 motivation: a replica cut off from the leader times out, fails its pre-vote and
    never bumps the epoch, so when the partition heals the leader is undisturbed."""
    cluster = Cluster()
    cluster.elect(1)
    epoch = cluster[1].epoch
    for _ in range(40):
        cluster.tick_all(T // 4)
        cluster.run(drop=lambda m: 3 in (m.src, m.dst))
    assert Role.PROSPECTIVE in cluster.roles[3]  # it did time out and ask
    assert cluster[3].epoch == epoch
    cluster.settle()
    assert cluster[1].role is Role.LEADER and cluster[1].epoch == epoch and cluster[3].role is Role.FOLLOWER


def test_observer_never_runs() -> None:
    """KIP-595: observers replicate through Fetch but never vote or become candidates."""
    cluster = Cluster(voters=(1, 2, 3), observers=(4,))
    cluster.tick(4, 10 * T)
    assert cluster[4].role is Role.UNATTACHED and cluster[4].next_deadline() > 10**12
    cluster.elect(1)
    cluster.propose(1, b"x")
    cluster.settle()
    assert cluster[4].role is Role.FOLLOWER and cluster[4].high_watermark == cluster[1].high_watermark
    with pytest.raises(IllegalTransitionError):
        cluster[4]._transition(Role.PROSPECTIVE)


def test_illegal_transitions_raise_a_named_error() -> None:
    """h11-style explicit state machine: every move not in TRANSITIONS raises at once."""
    for old, allowed in TRANSITIONS.items():
        for new in Role:
            group = lone()
            group._role = old
            if new in allowed:
                continue
            with pytest.raises(IllegalTransitionError):
                group._transition(new)
    assert Role.LEADER not in TRANSITIONS[Role.UNATTACHED]


# --- §5.3 log replication (pull, KIP-595) ------------------------------------------------------


def test_new_leader_appends_leader_change_batch() -> None:
    """KIP-595: "the new leader ... appends a LeaderChangeMessage" (a control batch), which plays
    the part of the no-op entry of §8 ("each leader commit a blank no-op entry into the log at
    the start of its term")."""
    cluster = Cluster()
    cluster.elect(1)
    log = cluster.logs[1]
    assert log.end_offset == 1 and log.last_epoch == cluster[1].epoch
    assert cluster[1].high_watermark == 1  # committed once a majority flushed it


def test_proposal_commits_on_majority_and_reaches_followers() -> None:
    """§5.3: "When the entry has been safely replicated ..., the leader applies the entry ...
    and returns the result"; followers learn the commit index (here: the HW in Fetch responses)."""
    cluster = Cluster()
    cluster.elect(1)
    proposal = cluster.propose(1, b"a", b"b")
    cluster.run(drop=lambda m: m.dst == 3 or m.src == 3)
    assert cluster.committed[1] == [proposal]
    assert cluster[1].high_watermark == proposal.last_offset + 1
    assert cluster[2].high_watermark == proposal.last_offset + 1
    assert cluster.logs[3].end_offset == 1


def test_only_flushed_offsets_count_toward_the_high_watermark() -> None:
    """DESIGN §3/§4: an entry counts on a replica only once it is durable there (Raft Figure 2:
    persist before responding). The leader's own unflushed append does not commit anything."""
    cluster = Cluster(voters=(1,))
    cluster.elect(1)
    proposal = cluster.propose(1, b"a")
    assert cluster[1].high_watermark == 1 and not cluster.committed[1]
    cluster.flush(1)
    assert cluster[1].high_watermark == proposal.last_offset + 1
    assert cluster.committed[1] == [proposal]


def test_follower_reports_only_flushed_offsets() -> None:
    """DESIGN §4: a follower fetches again (reporting its new fetch offset) only after the
    records it appended are flushed, so the leader never counts volatile data."""
    cluster = Cluster()
    cluster.elect(1)
    cluster.propose(1, b"a")
    cluster.flush(1)
    responses = cluster.take(lambda m: isinstance(m, FetchResponse) and m.dst == 2)
    for response in responses:
        cluster.deliver(response)
    assert cluster.logs[2].end_offset == 2
    assert not any(isinstance(m, FetchRequest) and m.src == 2 for m in cluster.inbox)
    cluster.flush(2)
    (fetch,) = [m for m in cluster.inbox if isinstance(m, FetchRequest) and m.src == 2]
    assert fetch.fetch_offset == 2


def test_leader_answers_a_diverging_fetch_with_epoch_and_end_offset() -> None:
    """KIP-595 (validateOffsetAndEpoch): if the follower's last fetched epoch ends earlier in the
    leader's log, or does not exist there, the response carries DivergingEpoch(epoch, end offset)."""
    cluster = Cluster(logs={1: fill(MemoryLog(), 1, 1, 3)}, states={1: QuorumState(3)})
    cluster.elect(1)
    cluster.take()
    out = cluster.deliver(FetchRequest(GROUP, 2, 1, cluster[1].epoch, 5, 2, 1, 0, 50))
    (response,) = out.messages
    assert (response.diverging_epoch, response.diverging_end_offset) == (1, 2)
    out = cluster.deliver(FetchRequest(GROUP, 3, 1, cluster[1].epoch, 2, 1, 1, 0, 50))
    (response,) = out.messages
    assert response.diverging_epoch == NO_DIVERGENCE and response.records


def test_follower_truncates_a_divergent_tail_and_converges() -> None:
    """§5.3: "the leader handles inconsistencies by forcing the followers' logs to duplicate its
    own"; KIP-595: the follower truncates to the diverging end offset and fetches again."""
    logs = {1: fill(MemoryLog(), 1, 1, 3), 2: fill(MemoryLog(), 1, 1, 2, 2, 2), 3: fill(MemoryLog(), 1)}
    cluster = Cluster(logs=logs, states={1: QuorumState(3), 2: QuorumState(3), 3: QuorumState(3)})
    cluster.elect(1)
    cluster.propose(1, b"new")
    cluster.settle()
    leader_log = cluster.logs[1]
    assert [o.truncated_to for o in cluster.outputs[2] if o.truncated_to is not None] == [2]
    for node_id in (2, 3):
        log = cluster.logs[node_id]
        assert log.end_offset == leader_log.end_offset
        assert log.read(0, 1 << 20) == leader_log.read(0, 1 << 20)


def test_follower_never_truncates_below_its_high_watermark() -> None:
    """§5.4 (committed entries are never overwritten); KRaft throws when the leader asks for a
    truncation below the high watermark rather than carrying on."""
    cluster = Cluster()
    cluster.elect(1)
    cluster.propose(1, b"a")
    cluster.settle()
    follower = cluster[2]
    assert follower.high_watermark == 2
    follower._fetch_inflight = True
    bad = FetchResponse(
        GROUP,
        1,
        2,
        follower.epoch,
        1,
        FetchError.NONE,
        follower._fetch_id,
        2,
        follower.log.last_epoch,
        b"",
        2,
        0,
        0,
    )
    with pytest.raises(TruncationBelowHighWatermarkError):
        follower.receive(bad)


def test_follower_high_watermark_never_goes_back_under_a_new_leader() -> None:
    """KIP-595: followers learn the HW from fetch responses; a new leader may not know the
    latest HW yet (it learns it by committing its own epoch), and a follower keeps what it knew."""
    cluster = Cluster()
    cluster.elect(1)
    cluster.propose(1, b"x")
    cluster.flush(1)
    cluster.run(drop=lambda m: isinstance(m, FetchRequest) and m.src == 2 and m.fetch_offset == 2)
    assert (cluster[2].high_watermark, cluster[3].high_watermark) == (1, 2)
    assert cluster.logs[2].end_offset == 2
    cluster.elect(2)
    assert cluster[3].leader_id == 2 and cluster[3].high_watermark == 3
    hw_changes = [o.high_watermark for o in cluster.outputs[3] if o.high_watermark is not None]
    assert hw_changes == sorted(set(hw_changes))


def test_follower_behind_the_leaders_log_start_starts_over_there() -> None:
    """Kafka (OFFSET_OUT_OF_RANGE, truncateFullyAndStartAt): when retention deleted what a
    lagging follower still lacks, it empties its log and fetches from the leader's log start."""
    cluster = Cluster()
    cluster.elect(1)
    for value in (b"a", b"b", b"c"):
        cluster.propose(1, value)
        cluster.run(drop=lambda m: 3 in (m.src, m.dst))
    hw = cluster[1].high_watermark
    assert hw == 4 and cluster.logs[3].end_offset == 1
    assert cluster.logs[1].delete_before(3) == 3
    cluster.settle()
    assert cluster.logs[3].start_offset == 3
    assert cluster.logs[3].read(3, 1 << 20) == cluster.logs[1].read(3, 1 << 20)
    assert cluster[3].high_watermark == hw
    assert [o.truncated_to for o in cluster.outputs[3] if o.truncated_to is not None] == [3]


def test_fetch_long_poll_parks_until_data_arrives() -> None:
    """KIP-595 / DESIGN §4: a fetch with nothing new waits at the leader (long-poll) and is
    answered as soon as a proposal appends data, so replication costs no extra round trip."""
    cluster = Cluster()
    cluster.elect(1)
    cluster.settle(rounds=1, step_ms=1)
    assert not cluster.inbox  # both followers' fetches are parked
    cluster.propose(1, b"x")
    responses = [m for m in cluster.inbox if isinstance(m, FetchResponse)]
    assert sorted(m.dst for m in responses) == [2, 3] and all(m.records for m in responses)


def test_parked_fetch_is_answered_at_max_wait() -> None:
    """KIP-595: the leader answers a parked fetch, empty, when its max wait elapses."""
    cluster = Cluster()
    cluster.elect(1)
    cluster.settle(rounds=1, step_ms=1)
    assert not cluster.inbox
    cluster.tick(1, cluster.config.fetch_max_wait_ms)
    responses = [m for m in cluster.inbox if isinstance(m, FetchResponse)]
    assert sorted(m.dst for m in responses) == [2, 3] and not any(m.records for m in responses)


def test_stale_and_duplicated_fetch_responses_are_ignored() -> None:
    """KIP-595 transport assumptions are weak (retries, reordering): a follower applies only the
    response to its outstanding fetch, so a duplicate can never be appended twice."""
    cluster = Cluster()
    cluster.elect(1)
    cluster.propose(1, b"x")
    cluster.flush(1)
    (response,) = cluster.take(lambda m: isinstance(m, FetchResponse) and m.dst == 2)
    cluster.deliver(response)
    end = cluster.logs[2].end_offset
    cluster.deliver(response)
    assert cluster.logs[2].end_offset == end


def test_corrupt_records_are_not_appended_and_the_fetch_is_retried() -> None:
    """DESIGN §2/§3: every batch is CRC-checked on the way in; a corrupt fetch response (bit
    flip on the wire) appends nothing and the follower asks again."""
    cluster = Cluster()
    cluster.elect(1)
    cluster.propose(1, b"x")
    cluster.flush(1)
    (response,) = cluster.take(lambda m: isinstance(m, FetchResponse) and m.dst == 2)
    flipped = bytearray(response.records)
    flipped[-1] ^= 0xFF
    end = cluster.logs[2].end_offset
    cluster.deliver(dataclasses.replace(response, records=bytes(flipped)))
    assert cluster.logs[2].end_offset == end
    cluster.settle()
    assert cluster.logs[2].read(0, 1 << 20) == cluster.logs[1].read(0, 1 << 20)


# --- §5.4 safety --------------------------------------------------------------------------------


def test_commit_only_through_an_entry_of_the_current_epoch() -> None:
    """§5.4.2: "Raft never commits log entries from previous terms by counting replicas. Only
    log entries from the leader's current term are committed by counting replicas." (Figure 8)"""
    logs = {1: fill(MemoryLog(), 1, 2, 2), 2: fill(MemoryLog(), 1), 3: fill(MemoryLog(), 1)}
    config = RaftConfig.scaled(T, max_fetch_bytes=1)  # one batch per fetch response
    cluster = Cluster(logs=logs, states={n: QuorumState(2) for n in (1, 2, 3)}, config=config)
    cluster.tick(1, 2 * T)
    cluster.run(drop=lambda m: isinstance(m, (FetchRequest, FetchResponse)))
    assert cluster[1].role is Role.LEADER
    leader_change_offset = 3
    cluster.flush(1)
    # Node 2 fetches the epoch-2 entries one by one: a majority holds them, nothing commits.
    for _ in range(2):
        cluster.tick(2, cluster.config.fetch_max_wait_ms + cluster.config.request_timeout_ms)
        fetches = cluster.take(lambda m: isinstance(m, FetchRequest) and m.src == 2)
        cluster.inbox.clear()
        cluster.deliver(fetches[-1])
        (response,) = cluster.take(lambda m: isinstance(m, FetchResponse) and m.dst == 2)
        cluster.deliver(response)
        cluster.flush(2)
    assert cluster.logs[2].end_offset == leader_change_offset
    fetch = [m for m in cluster.take() if isinstance(m, FetchRequest) and m.src == 2][-1]
    cluster.deliver(fetch)
    assert cluster[1].high_watermark <= 1
    # Once node 2 holds the leader-change batch of the current epoch, everything commits.
    cluster.run()
    cluster.run()
    assert cluster[1].high_watermark == leader_change_offset + 1


def test_quorum_state_is_persisted_with_the_vote_it_grants() -> None:
    """Figure 2: "Persistent state on all servers (Updated on stable storage before responding
    to RPCs)". The vote and the response travel in one Output, state first."""
    group = lone()
    group.receive(vote_request(2, 1, epoch=3))
    out = group.take_output()
    assert out.quorum_state == QuorumState(3, 2, None)
    assert out.messages[0].granted


# --- KIP-595 check quorum, Begin/EndQuorumEpoch -------------------------------------------------


def test_leader_resigns_without_fetches_from_a_majority() -> None:
    """KIP-595 fetch.timeout.ms: "Maximum time a leader can go without receiving valid fetch ...
    from a majority of the quorum before resigning." """
    cluster = Cluster()
    cluster.elect(1)
    cluster.propose(1, b"x")
    cluster.inbox.clear()
    cluster.tick(1, cluster.config.fetch_timeout_ms + 1)
    assert cluster[1].role is Role.RESIGNED
    assert cluster.failed[1] and not cluster.committed[1]
    ends = [m for m in cluster.inbox if isinstance(m, EndQuorumEpoch)]
    assert sorted(m.dst for m in ends) == [2, 3]


def test_leader_with_fetching_majority_keeps_leading() -> None:
    """KIP-595 check quorum, the other way: fetches from one follower of three keep the quorum."""
    cluster = Cluster()
    cluster.elect(1)
    for _ in range(10):
        cluster.tick_all(T // 2)
        cluster.run(drop=lambda m: 3 in (m.src, m.dst))
    assert cluster[1].role is Role.LEADER


def test_observers_count_neither_for_commit_nor_for_check_quorum() -> None:
    """KIP-595: the high watermark is computed from the voters' fetch offsets only, and only
    voters' fetches keep a leader in office; observers merely follow."""
    cluster = Cluster(voters=(1, 2, 3), observers=(4, 5))
    cluster.elect(1)
    hw = cluster[1].high_watermark
    cluster.propose(1, b"x")
    for _ in range(60):
        cluster.tick_all(10)
        cluster.run(drop=lambda m: bool({m.src, m.dst} & {2, 3}))
    assert cluster.logs[4].end_offset == cluster.logs[1].end_offset  # observers did fetch it
    assert cluster[1].high_watermark == hw
    assert Role.RESIGNED in cluster.roles[1] and cluster[1].role is not Role.LEADER


def test_end_quorum_epoch_lets_the_preferred_successor_run_first() -> None:
    """KIP-595 EndQuorumEpoch: a resigning leader names preferred successors (most caught up
    first) and they start the election without waiting out the fetch timeout."""
    cluster = Cluster()
    cluster.elect(1)
    epoch = cluster[1].epoch
    cluster[1].resign()
    cluster.apply(1)
    (end2,) = [m for m in cluster.inbox if isinstance(m, EndQuorumEpoch) and m.dst == 2]
    successor = end2.preferred_successors[0]
    cluster.run()
    cluster.tick(successor, 1)
    cluster.run()
    assert cluster[successor].role is Role.LEADER and cluster[successor].epoch == epoch + 1


def test_new_leader_announces_itself_with_begin_quorum_epoch() -> None:
    """KIP-595: "BeginQuorumEpoch ... sent by a newly elected leader to inform voters" since
    there are no heartbeats; it is resent to replicas that have not fetched yet."""
    cluster = Cluster()
    cluster.tick(1, 2 * T)
    cluster.run(drop=lambda m: m.dst == 3 or m.src == 3)
    assert cluster[1].role is Role.LEADER and cluster[3].leader_id is None
    cluster.tick(1, cluster.config.request_timeout_ms)
    begins = [m for m in cluster.inbox if isinstance(m, BeginQuorumEpoch)]
    assert [m.dst for m in begins] == [3]
    cluster.run()
    assert cluster[3].role is Role.FOLLOWER and cluster[3].leader_id == 1


def test_describe_quorum_reports_the_leaders_view_of_each_replica() -> None:
    """KIP-595 DescribeQuorum: the leader knows every replica's fetch offset and last fetch."""
    cluster = Cluster(voters=(1, 2, 3), observers=(4,))
    cluster.elect(1)
    cluster.propose(1, b"x")
    cluster.run(drop=lambda m: 3 in (m.src, m.dst))
    described = cluster[1].describe()
    assert (described.role, described.leader_id, described.voters) == (Role.LEADER, 1, (1, 2, 3))
    by_node = {r.node_id: r for r in described.replicas}
    assert sorted(by_node) == [2, 3, 4]
    assert by_node[2].fetch_offset == described.log_end_offset == described.high_watermark
    assert by_node[3].fetch_offset < by_node[2].fetch_offset
    assert cluster[2].describe().replicas == ()


# --- proposals -------------------------------------------------------------------------------------


def test_proposal_to_a_follower_raises_not_leader_with_hint() -> None:
    cluster = Cluster()
    cluster.elect(1)
    with pytest.raises(NotLeaderError) as error:
        cluster[2].propose(batch(b"x"))
    assert error.value.leader_id == 1


def test_pending_proposals_fail_when_the_leader_steps_down() -> None:
    """§5.2/§8: a deposed leader cannot know whether its uncommitted entries survive; it
    reports them failed (outcome unknown) so clients retry."""
    cluster = Cluster()
    cluster.elect(1)
    proposal = cluster.propose(1, b"x")
    cluster.inbox.clear()
    cluster.deliver(BeginQuorumEpoch(GROUP, 2, 1, cluster[1].epoch + 1))
    assert cluster.failed[1] == [proposal]


# --- KIP-853 voter changes --------------------------------------------------------------------------


def test_voter_change_one_at_a_time() -> None:
    """KIP-853: voters are added and removed one at a time; a second change waits for the first
    to commit (Raft dissertation §4.1)."""
    cluster = Cluster(voters=(1, 2, 3), observers=(4, 5))
    cluster.elect(1)
    with pytest.raises(MembershipChangeError):
        cluster[1].propose_voters((1, 2, 3, 4, 5))
    cluster[1].propose_voters((1, 2, 3, 4))
    cluster.apply(1)
    assert cluster[1].voters == (1, 2, 3, 4)  # effective when appended
    with pytest.raises(MembershipChangeError):
        cluster[1].propose_voters((1, 2, 3))
    cluster.settle()
    assert all(cluster[n].voters == (1, 2, 3, 4) for n in (1, 2, 3, 4, 5))
    cluster[1].propose_voters((1, 2, 3))
    cluster.apply(1)
    cluster.settle()
    assert cluster[4].voters == (1, 2, 3)


def test_no_voter_change_before_the_leader_commits_its_epoch() -> None:
    """Ongaro, "bug in single-server membership changes" (raft-dev, 2015): a new leader must
    commit an entry of its own term before it may append a configuration change."""
    cluster = Cluster(voters=(1, 2, 3), observers=(4,))
    cluster.tick(1, 2 * T)
    cluster.run(drop=lambda m: isinstance(m, (FetchRequest, FetchResponse)))
    assert cluster[1].role is Role.LEADER and cluster[1].high_watermark == 0
    with pytest.raises(MembershipChangeError):
        cluster[1].propose_voters((1, 2, 3, 4))
    cluster.settle()
    cluster[1].propose_voters((1, 2, 3, 4))


def test_added_voter_counts_toward_the_quorum_once_appended() -> None:
    """KIP-853: the new voter set takes effect when the record is appended, not when committed:
    from then on the HW needs a majority of the new set."""
    cluster = Cluster(voters=(1, 2, 3), observers=(4, 5))
    cluster.elect(1)
    cluster[1].propose_voters((1, 2, 3, 4))
    cluster.apply(1)
    cluster.settle()
    cluster[1].propose_voters((1, 2, 3, 4, 5))
    cluster.apply(1)
    cluster.settle()
    hw = cluster[1].high_watermark
    # Three of five voters are away: nothing more commits.
    cluster.propose(1, b"x")
    for _ in range(5):
        cluster.tick_all(10)
        cluster.run(drop=lambda m: bool({m.src, m.dst} & {3, 4, 5}))
    assert cluster[1].high_watermark == hw


def test_removed_leader_steps_down_once_the_removal_commits() -> None:
    """KIP-853 / Raft dissertation §4.2.2: a leader removed from the voters keeps leading until
    the change commits (not counting itself), then steps down; the others elect a successor."""
    cluster = Cluster(voters=(1, 2, 3))
    cluster.elect(1)
    cluster[1].propose_voters((2, 3))
    cluster.apply(1)
    assert cluster[1].role is Role.LEADER
    for _ in range(10):
        cluster.run()
        cluster.tick_all(1)
    assert cluster[1].role is Role.RESIGNED and not cluster[1].is_voter
    for _ in range(40):
        cluster.tick_all(T // 4)
        cluster.run()
        if cluster.leader() in (2, 3):
            break
    assert cluster.leader() in (2, 3)
    assert cluster[1].role is Role.FOLLOWER  # it stays on as an observer


def test_retention_keeps_the_latest_voters_record_for_restarts() -> None:
    """KIP-853 keeps the voter set in the log (and in snapshots, which we do not have): a
    restart reads it back, so retention must not delete the latest voters record. Found by the
    simulator: a restarted voter fell back to the bootstrap voters and counted a wrong majority."""
    cluster = Cluster(voters=(1, 2, 3), observers=(4,))
    cluster.elect(1)
    cluster[1].propose_voters((1, 2, 3, 4))
    cluster.apply(1)
    cluster.settle()
    record = cluster.logs[2].end_offset - 1
    for value in (b"a", b"b", b"c"):
        cluster.propose(1, value)
    cluster.settle()
    follower = cluster[2]
    assert follower.high_watermark > record + 1
    assert follower.retention_limit == record
    cluster.logs[2].delete_before(follower.retention_limit)
    assert cluster.crash(2).voters == (1, 2, 3, 4)


def test_voter_change_reverts_when_truncated() -> None:
    """KIP-853: the voter set is whatever the log holds; truncating an uncommitted voters
    record restores the previous set."""
    cluster = Cluster(voters=(1, 2, 3), observers=(4,))
    cluster.elect(1)
    follower = cluster[2]
    cluster[1].propose_voters((1, 2, 3, 4))
    cluster.apply(1)
    cluster.flush(1)
    cluster.run()
    assert follower.voters == (1, 2, 3, 4)
    follower._hw = 0
    follower._truncate_to(1)
    assert follower.voters == (1, 2, 3)


# --- messages ---------------------------------------------------------------------------------------


def test_coalesce_groups_messages_by_destination_in_order() -> None:
    """DESIGN §4: one replica-fetch stream per node pair carries every group's fetch."""
    fetches = [FetchRequest(f"g{i}", 2, 1 + i % 2, 1, i, 1, i, 0, 50) for i in range(6)]
    by_destination = coalesce(fetches)
    assert sorted(by_destination) == [1, 2]
    assert [m.group_id for m in by_destination[1]] == ["g0", "g2", "g4"]
    assert [m.group_id for m in by_destination[2]] == ["g1", "g3", "g5"]


def test_flush_from_before_a_truncation_is_ignored() -> None:
    """A flush that raced with a truncation must not count the new bytes at the same offsets:
    the Flush generation changes on truncation."""
    cluster = Cluster()
    cluster.elect(1)
    follower = cluster[2]
    follower._request_flush()
    old_generation = follower._flush_generation
    follower._hw = 0
    follower._truncate_to(0)
    follower.log.append_replicated(cluster.logs[1].read(0, 1 << 20))
    follower.flush_completed(1, old_generation)
    assert follower.flushed_offset == 0
