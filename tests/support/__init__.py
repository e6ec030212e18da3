"""Helpers for process-level tests: real node processes on loopback (see nodes.py).

Import as ``from support import start_cluster, NodeProcess`` (pytest puts tests/ on sys.path
through tests/conftest.py), or simply use the ``cluster`` / ``cluster3`` fixtures.
"""

from support.nodes import (
    LocalCluster,
    NodeProcess,
    NodeStartError,
    free_port,
    free_ports,
    probe,
    start_cluster,
)

__all__ = ["LocalCluster", "NodeProcess", "NodeStartError", "free_port", "free_ports", "probe", "start_cluster"]
