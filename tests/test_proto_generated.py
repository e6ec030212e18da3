"""The committed generated modules must match what the `.proto` files produce today."""

from __future__ import annotations

from pathlib import Path

from tidelog.proto import generate


def test_committed_generated_modules_are_fresh(tmp_path: Path) -> None:
    fresh = {p.name: p.read_bytes() for p in generate.generate(tmp_path)}
    committed = {p.name: p.read_bytes() for p in generate.committed_files()}
    assert fresh.keys() == committed.keys(), "run: python -m tidelog.proto.generate"
    stale = sorted(name for name in fresh if fresh[name] != committed[name])
    assert not stale, f"stale generated modules {stale}; run: python -m tidelog.proto.generate"


def test_generated_modules_import_through_the_tidelog_namespace() -> None:
    from tidelog.proto import common_pb2

    assert common_pb2.ErrorCode.Name(6) == "NOT_LEADER_OR_FOLLOWER"
