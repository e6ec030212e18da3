"""The fault injectors on their own (fast, default suite): the partition proxy against echo
servers, the segment damage against real segment files, and the verdict's --allow."""

from __future__ import annotations

import random
import socket
import socketserver
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from tidelog.cluster.chaos import ChaosConfig, RunReport
from tidelog.cluster.checker import AnomalyKind, check
from tidelog.cluster.faults import (
    DiskMode,
    ProxyNet,
    batch_starts,
    damage_segment,
    newest_segment,
    partition_pairs,
    faketime_library,
)
from tidelog.cluster.history import FinalReadOp, Outcome, SendOp
from tidelog.node.storage import PartitionLog
from tidelog.proto import records as codec


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(65536):
            self.request.sendall(data)


@pytest.fixture
def echo_ports() -> Iterator[dict[int, int]]:
    servers = []
    for _ in range(3):
        server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
    try:
        yield {i + 1: s.server_address[1] for i, s in enumerate(servers)}
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()


def _connect(address: str) -> socket.socket:
    host, port = address.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=5)
    return sock


def _recv_exactly(sock: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            break
        data += chunk
    return data


def _nothing_arrives(sock: socket.socket, wait: float = 0.5) -> bool:
    sock.settimeout(wait)
    try:
        return sock.recv(1) == b""  # closed would also be "nothing forwarded"
    except TimeoutError:
        return True
    finally:
        sock.settimeout(5)


def test_proxy_forwards_holds_while_blocked_and_delivers_after_heal(echo_ports: dict[int, int]) -> None:
    proxies = ProxyNet(echo_ports)
    try:
        assert proxies.address(1, 2).startswith("127.0.0.1:")
        assert proxies.peer_args(1) == ["--peer-address", f"2={proxies.address(1, 2)}",
                                        "--peer-address", f"3={proxies.address(1, 3)}"]
        old = _connect(proxies.address(1, 2))
        old.sendall(b"hello")
        assert _recv_exactly(old, 5) == b"hello"

        proxies.block([(1, 2)])
        assert proxies.blocked() == [(1, 2), (2, 1)] or _wait_blocked(proxies)
        old.sendall(b"during")
        fresh = _connect(proxies.address(2, 1))  # the other direction is cut too
        fresh.sendall(b"new")
        other = _connect(proxies.address(1, 3))  # an uncut link still works
        other.sendall(b"ok")
        assert _recv_exactly(other, 2) == b"ok"
        assert _nothing_arrives(old)
        assert _nothing_arrives(fresh)

        proxies.heal()
        assert _recv_exactly(old, 6) == b"during"  # held, not dropped: TCP retransmits
        assert _recv_exactly(fresh, 3) == b"new"
        for sock in (old, fresh, other):
            sock.close()
    finally:
        proxies.close()


def _wait_blocked(proxies: ProxyNet) -> bool:
    import time
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if proxies.blocked() == [(1, 2), (2, 1)]:
            return True
        time.sleep(0.01)
    return False


def test_partition_pairs() -> None:
    rng = random.Random(1)
    assert sorted(partition_pairs("isolate", [1, 2, 3], 2, rng)) == [(2, 1), (2, 3)]
    bridge = partition_pairs("bridge", [1, 2, 3], 2, rng)
    assert sorted(tuple(sorted(p)) for p in bridge) == [(1, 3)]  # 2 still talks to both


def _segment(tmp_path: Path, batches: int) -> Path:
    log = PartitionLog.open(tmp_path / "t-0")
    for i in range(batches):
        log.append(codec.encode_batch([codec.Record(0, 0, None, f"v{i}-{j}".encode()) for j in range(3)]),
                   1)
    log.flush()
    log.close()
    segment = newest_segment(tmp_path / "t-0")
    assert segment is not None
    return segment


@pytest.mark.parametrize("mode", list(DiskMode))
def test_damage_cuts_the_tail(tmp_path: Path, mode: DiskMode) -> None:
    segment = _segment(tmp_path, 10)
    before = segment.read_bytes()
    starts = batch_starts(before)
    assert len(starts) == 10
    damage = damage_segment(segment, mode, random.Random(7))
    assert damage is not None
    after = segment.read_bytes()
    assert before.startswith(after) and len(after) < len(before)
    if mode is DiskMode.TEAR:
        assert starts[-1] < len(after)  # a partial last batch remains
        assert len(batch_starts(after)) == 9
    else:
        assert len(after) in starts
        assert len(batch_starts(after)) == 10 - damage.batches_cut


def test_allowed_anomalies_are_listed_but_do_not_fail(tmp_path: Path) -> None:
    history = [
        SendOp(1, "t", "p1-1", Outcome.OK, 0, 0),
        SendOp(1, "t", "p1-2", Outcome.OK, 0, 1),
        FinalReadOp("t", 0, ((0, "p1-1"), (1, "p1-2"), (2, "p1-2"))),
    ]
    verdict = check(history)
    assert verdict.anomaly_kinds == {AnomalyKind.DUPLICATE}
    strict = RunReport(ChaosConfig(1, 1, (), tmp_path / "h"), verdict=verdict)
    assert not strict.valid and strict.failing_kinds() == ["duplicate"]
    lenient = RunReport(ChaosConfig(1, 1, (), tmp_path / "h", allow=frozenset({AnomalyKind.DUPLICATE})),
                        verdict=verdict)
    out = lenient.to_dict()
    assert lenient.valid and out["valid"]
    assert "duplicate" not in out["checker"]["anomalies"]
    assert len(out["allowed_anomalies"]["duplicate"]) == 1


def test_faketime_library_moves_a_process_clock_forward(tmp_path: Path) -> None:
    """The clock fault's mechanism (`NodeProc.jump_clock`): rewriting the timestamp file of a
    process running under the library found (the test extra's build first) moves both its wall
    and its monotonic clock forward by the jump, while the process runs."""
    import os
    import subprocess
    import sys

    library = faketime_library()
    assert library is not None, "the test extra installs libfaketime; reinstall with '.[test]'"
    clock_file = tmp_path / "faketime.rc"
    clock_file.write_text("+0\n")
    env = {**os.environ, "LD_PRELOAD": str(library), "FAKETIME_TIMESTAMP_FILE": str(clock_file),
           "FAKETIME_NO_CACHE": "1"}
    # Prints its clocks, then again after each line it reads from stdin.
    probe = ("import sys, time\n"
             "print(time.time(), time.monotonic(), flush=True)\n"
             "for _ in sys.stdin:\n"
             "    print(time.time(), time.monotonic(), flush=True)\n")
    with subprocess.Popen([sys.executable, "-c", probe], env=env, stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, text=True) as process:
        try:
            assert process.stdin is not None and process.stdout is not None
            wall0, mono0 = map(float, process.stdout.readline().split())
            clock_file.write_text("+3600\n")
            process.stdin.write("\n")
            process.stdin.flush()
            wall1, mono1 = map(float, process.stdout.readline().split())
        finally:
            process.kill()
    assert 3590 < wall1 - wall0 < 3660
    assert 3590 < mono1 - mono0 < 3660
