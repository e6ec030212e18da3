"""`RaftConfig.lazy_follower_hw` (partitions' replication): the simulator's safety and liveness
checks hold with it, and it really sends fewer messages than the eager default."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from tidelog.replication.messages import FetchResponse
from tidelog.replication.raft import RaftConfig
from tidelog.replication.sim import SimConfig, run_seeds
from tidelog.replication.testing import Cluster

LAZY_SEEDS = 200


@dataclass(frozen=True, slots=True)
class LazySimConfig(SimConfig):
    def raft_config(self, max_fetch_bytes: int) -> RaftConfig:
        return RaftConfig.scaled(self.election_timeout_ms, max_fetch_bytes=max_fetch_bytes, lazy_follower_hw=True)


@pytest.mark.parametrize("nodes", [3, 5])
def test_faulty_seeds_run_clean_with_lazy_follower_hw(nodes: int) -> None:
    # One worker: the config subclass lives in this test module.
    summary = run_seeds(range(LAZY_SEEDS), LazySimConfig(nodes=nodes), workers=1, stop_on_violation=True)
    detail = "\n".join(f"seed {r.seed}: {r.violation}\n  " + "\n  ".join(r.trace[-15:])
                       for r in summary.violations)
    assert not summary.violations, detail
    assert summary.commits > 10 * summary.seeds


def _replicate(lazy: bool, proposals: int = 10) -> tuple[Cluster, int, int]:
    """Propose one batch at a time, each replicated and committed before the next; count the
    messages that took and the fetch answers that carried no records (HW-only)."""
    cluster = Cluster(config=RaftConfig.scaled(100, lazy_follower_hw=lazy))
    cluster.elect(1)
    cluster.settle()
    messages = hw_only = 0
    for i in range(proposals):
        proposal = cluster.propose(1, b"value-%d" % i)
        while cluster.inbox or cluster.flushes:
            for node_id in list(cluster.flushes):
                cluster.flush(node_id)
            pending, cluster.inbox = cluster.inbox, []
            for message in pending:
                messages += 1
                hw_only += isinstance(message, FetchResponse) and not message.records
                cluster.deliver(message)
        assert proposal in cluster.committed[1]
    return cluster, messages, hw_only


def test_lazy_follower_hw_halves_the_messages_and_followers_still_learn_the_hw() -> None:
    eager, eager_messages, eager_hw_only = _replicate(lazy=False)
    lazy, lazy_messages, lazy_hw_only = _replicate(lazy=True)
    assert eager_hw_only >= 10 and lazy_hw_only == 0
    assert lazy_messages <= eager_messages * 0.6, (lazy_messages, eager_messages)
    leader_hw = lazy[1].high_watermark
    assert eager[2].high_watermark == eager[3].high_watermark == eager[1].high_watermark
    assert lazy[2].high_watermark < leader_hw or lazy[3].high_watermark < leader_hw
    # ... and the followers learn the HW when the long-poll expires, with no new data.
    lazy.settle()
    assert lazy[2].high_watermark == lazy[3].high_watermark == leader_hw
