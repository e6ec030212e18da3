"""Shared fixtures: real node processes (tests/support/nodes.py).

``cluster`` is one node, ``cluster3`` three; both stop every process by PID when the test ends,
whether it passed or failed (and atexit kills any left over if pytest itself dies).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from support.nodes import LocalCluster, start_cluster


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    """A running single-node cluster; ``cluster.bootstrap`` is its address."""
    local = start_cluster(tmp_path, nodes=1)
    try:
        yield local
    finally:
        local.stop_all()


@pytest.fixture
def cluster3(tmp_path: Path) -> Iterator[LocalCluster]:
    """A running three-node cluster; every node is a controller voter."""
    local = start_cluster(tmp_path, nodes=3)
    try:
        yield local
    finally:
        local.stop_all()
