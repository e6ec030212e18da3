"""A node whose metadata replica fails stops with a non-zero status instead of lingering.

The failure is a real one: the node's next write of its metadata quorum state cannot create its
temporary file (a directory stands at that path, as a full or broken disk would refuse it), and
an election, forced by killing the controller, makes every surviving voter write that state.
"""

from __future__ import annotations

import time
from pathlib import Path

from support.nodes import probe, start_cluster


def test_a_node_whose_metadata_replica_fails_exits_non_zero(tmp_path: Path) -> None:
    with start_cluster(tmp_path, 3) as cluster:
        answer = probe(cluster.nodes[0].address)
        assert answer is not None and answer.controller_id >= 0
        controller = cluster.node(answer.controller_id)
        victim = next(n for n in cluster.nodes if n is not controller)
        (victim.data_dir / "__cluster_metadata-0" / "quorum-state.tmp").mkdir()
        controller.kill()
        deadline = time.monotonic() + 60
        while victim.running() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert victim.returncode == 1, f"node {victim.node_id} still running or exited {victim.returncode}"
        log = victim.log_path.read_text()
        assert "the metadata replica failed" in log and "stopped cleanly" in log
        # The third node keeps the process it had: its metadata replica is healthy.
        survivor = next(n for n in cluster.nodes if n not in (controller, victim))
        assert survivor.running()
