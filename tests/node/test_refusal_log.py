"""Undecodable requests are logged at most once per interval per service, with a count of the
ones refused in between (node/request_decoding.py): a client sending garbage in a loop gets
INVALID_ARGUMENT every time but cannot flood the node's log."""

from __future__ import annotations

import logging

import pytest

from tidelog.node.request_decoding import RefusalLog


def test_one_line_per_interval_and_the_count_of_the_rest(caplog: pytest.LogCaptureFixture) -> None:
    now = [100.0]
    refusals = RefusalLog(interval_s=10.0, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="tidelog.node.request_decoding"):
        refusals.refused("tidelog.ProduceRequest", "ipv4:127.0.0.1:1", "truncated varint")
        for _ in range(1000):
            now[0] += 0.001
            refusals.refused("tidelog.ProduceRequest", "ipv4:127.0.0.1:1", "truncated varint")
        assert len(caplog.records) == 1
        now[0] = 110.0
        refusals.refused("tidelog.OffsetCommitRequest", "ipv4:127.0.0.1:2", "bad field")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines
    assert lines[0] == "refused an undecodable tidelog.ProduceRequest from ipv4:127.0.0.1:1: truncated varint"
    assert lines[1] == ("refused an undecodable tidelog.OffsetCommitRequest from ipv4:127.0.0.1:2: bad field "
                        "(1000 more refused since the last such line)")
