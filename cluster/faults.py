"""Fault injectors of the chaos harness (issue 8, item 2).

What each fault does, to real node processes on loopback:

- kill: SIGKILL one node (a random one, the controller, or the leader of a partition under
  test), keep it down a while, start it again on the same data dir.
- pause: SIGSTOP one node for longer than the Raft election timeout, then SIGCONT: the node
  neither crashes nor answers, so its peers must replace it by timeouts alone.
- disk: SIGKILL one node, then damage the newest segment of one of its partitions under test
  before it starts again: "tear" cuts the file inside its last batch (a torn write), "truncate"
  cuts whole batches off its end (writes the disk lost). With ``flush = always`` those batches
  were fsynced, so this is the loss of acknowledged data on one replica, which the Raft
  majority must cover.
- partition: inter-node traffic runs through `ProxyNet`, one TCP forwarder per ordered pair
  (src, dst), which each node uses to reach its peers (the node flag ``--peer-address``).
  Blocking a pair stops its bytes in both directions and holds new connections without
  connecting them, as a switch that drops packets would; unblocking lets the held bytes go on,
  as TCP retransmission would. Clients still reach every node directly.
- clock: the node runs under libfaketime (LD_PRELOAD of the build the PyPI package
  ``libfaketime`` ships, or Debian's), and a jump moves both its wall clock and its monotonic
  clock forward by seconds to hours at once, so every timer of the node fires together, as after a VM stall or a
  clock step. Forward only: libfaketime cannot move the monotonic clock back (a negative offset
  is ignored), and faking only the wall clock breaks its sleeps (EINVAL), so this is the one
  clock fault we can inject for real per process. Stepping the host clock instead would hit
  every other process on a shared machine, and CLOCK_MONOTONIC cannot be set at all.

Everything here binds and connects to 127.0.0.1 only, and every wait is bounded.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Protocol

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
# A proxy link holds at most this many connections (Raft uses one stream per peer pair; the
# rest are reconnects): past it, new connections are closed at once.
MAX_CONNECTIONS_PER_LINK = 32
CHUNK_BYTES = 65536
# Segment file names: 20-digit base offset + ".log" (tidelog.node.storage).
SEGMENT_NAME_DIGITS = 20
BATCH_LENGTH_OFFSET = 8  # baseOffset (8 bytes), then batchLength (4 bytes), big-endian
BATCH_LOG_OVERHEAD = 12


class FaultKind(StrEnum):
    KILL = "kill"
    PAUSE = "pause"
    PARTITION = "partition"
    DISK = "disk"
    CLOCK = "clock"


FAKETIME_GLOB = "/usr/lib/*/faketime/libfaketime.so.1"


def faketime_library() -> Path | None:
    """The libfaketime shared library: the one the PyPI package ``libfaketime`` ships (in the test
    extra, so every machine that installs the tests has the same build), else Debian's."""
    import glob
    import importlib.util
    spec = importlib.util.find_spec("libfaketime")
    if spec is not None and spec.origin is not None:
        vendored = Path(spec.origin).parent / "vendor" / "libfaketime" / "src" / "libfaketime.so.1"
        if vendored.is_file():
            return vendored
    found = sorted(glob.glob(FAKETIME_GLOB))
    return Path(found[0]) if found else None


class FaultUnavailable(RuntimeError):
    """A fault kind that cannot run in this setup; the message says why."""


# --- nodes ---------------------------------------------------------------------------------


class ChaosNode(Protocol):
    """A node process the nemeses can act on."""

    node_id: int

    @property
    def address(self) -> str: ...

    @property
    def data_dir(self) -> Path: ...

    def running(self) -> bool: ...

    def kill(self) -> None: ...

    def start(self) -> None: ...

    def pause(self) -> None: ...

    def resume(self) -> None: ...

    def stop(self) -> None: ...


def _signal_pid(pid: int | None, signum: int) -> None:
    if pid is None:
        return
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


@dataclass(eq=False)
class OwnedNode:
    """A node process the harness started itself (``python -m tidelog.node.main``)."""

    node_id: int
    port: int
    data_dir: Path
    config: Mapping[str, object]
    extra_args: Sequence[str] = ()
    process: subprocess.Popen[bytes] | None = None
    paused: bool = False
    # With libfaketime: the node's clocks run this many seconds ahead (only ever grows).
    faketime: Path | None = None
    clock_offset_s: int = 0

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "node.log"

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        if self.running():
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        config_path = self.data_dir / "node.toml"
        config_path.write_text("".join(f"{k} = {_toml(v)}\n" for k, v in self.config.items()))
        env = None
        if self.faketime is not None:
            self._write_clock_file()
            env = {**os.environ, "LD_PRELOAD": str(self.faketime),
                   "FAKETIME_TIMESTAMP_FILE": str(self.clock_file),
                   # Re-read the offset at most once a second: a jump lands within a second.
                   "FAKETIME_CACHE_DURATION": "1"}
        with open(self.log_path, "ab") as log_file:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "tidelog.node.main", "--config", str(config_path),
                 *self.extra_args],
                stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C of the driver must not reach the nodes first
                env=env,
            )
        self.paused = False

    @property
    def clock_file(self) -> Path:
        return self.data_dir / "faketime.rc"

    def _write_clock_file(self) -> None:
        tmp = self.clock_file.with_suffix(".tmp")
        tmp.write_text(f"+{self.clock_offset_s}\n")
        os.replace(tmp, self.clock_file)

    def jump_clock(self, seconds: int) -> None:
        """Move the node's wall and monotonic clocks forward by ``seconds``."""
        if self.faketime is None:
            raise FaultUnavailable("clock jumps need libfaketime (Debian package libfaketime)")
        assert seconds > 0, "libfaketime cannot move the monotonic clock back"
        self.clock_offset_s += seconds
        self._write_clock_file()

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            _signal_pid(self.process.pid, signal.SIGKILL)
            self.process.wait(10)
        self.paused = False

    def stop(self, timeout: float = 10.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        _signal_pid(self.process.pid, signal.SIGCONT)
        _signal_pid(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
        self.paused = False

    def pause(self) -> None:
        if self.running():
            _signal_pid(self.pid, signal.SIGSTOP)
            self.paused = True

    def resume(self) -> None:
        if self.running():
            _signal_pid(self.pid, signal.SIGCONT)
        self.paused = False


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f'"{k}" = {_toml(v)}' for k, v in value.items()) + " }"
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


# --- disk faults ---------------------------------------------------------------------------


class DiskMode(StrEnum):
    TEAR = "tear"          # cut inside the last batch
    TRUNCATE = "truncate"  # cut whole batches off the end


@dataclass(frozen=True, slots=True)
class DiskDamage:
    path: str
    mode: DiskMode
    size_before: int
    size_after: int
    batches_cut: int

    def to_dict(self) -> dict[str, object]:
        return {"path": self.path, "mode": self.mode.value, "size_before": self.size_before,
                "size_after": self.size_after, "batches_cut": self.batches_cut}


def batch_starts(segment: bytes) -> list[int]:
    """File positions of the whole batches at the start of a segment (a torn tail is ignored)."""
    starts = []
    position = 0
    while position + BATCH_LOG_OVERHEAD <= len(segment):
        (length,) = struct.unpack_from(">i", segment, position + BATCH_LENGTH_OFFSET)
        end = position + BATCH_LOG_OVERHEAD + length
        if length <= 0 or end > len(segment):
            break
        starts.append(position)
        position = end
    return starts


def newest_segment(partition_dir: Path) -> Path | None:
    segments = sorted(
        p for p in partition_dir.iterdir()
        if p.suffix == ".log" and len(p.stem) == SEGMENT_NAME_DIGITS and p.stem.isdigit()
        and p.stat().st_size > 0
    )
    return segments[-1] if segments else None


def partition_dirs(data_dir: Path, topics: Sequence[str]) -> list[Path]:
    """The node's replica directories (``<topic>-<partition>``) of the given topics."""
    out = []
    for topic in topics:
        for path in data_dir.glob(f"{topic}-*"):
            suffix = path.name[len(topic) + 1:]
            if path.is_dir() and suffix.isdigit():
                out.append(path)
    return sorted(out)


def damage_segment(path: Path, mode: DiskMode, rng: random.Random, max_batches: int = 8
                   ) -> DiskDamage | None:
    """Tear or truncate the tail of one segment file; None if it holds no whole batch."""
    data = path.read_bytes()
    starts = batch_starts(data)
    if not starts:
        return None
    end = len(data)
    if mode is DiskMode.TEAR:
        last = starts[-1]
        # Somewhere strictly inside the last batch: its header or its records, never whole.
        cut = rng.randrange(last + 1, end) if end - last > 1 else last
        cut_batches = 1
    else:
        cut_batches = rng.randint(1, min(max_batches, len(starts)))
        cut = starts[-cut_batches]
    with open(path, "r+b") as file:
        file.truncate(cut)
        file.flush()
        os.fsync(file.fileno())
    return DiskDamage(str(path), mode, end, cut, cut_batches)


# --- the fault-injecting TCP proxy ---------------------------------------------------------


@dataclass(eq=False)
class _Link:
    src: int
    dst: int
    target_port: int
    server: asyncio.base_events.Server | None = None
    open: asyncio.Event = field(default_factory=asyncio.Event)
    connections: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])


class ProxyNet:
    """One TCP forwarder per ordered node pair on 127.0.0.1, with block/unblock per pair.

    Runs its own asyncio loop on a daemon thread. ``address(src, dst)`` is what node ``src``
    must use to reach node ``dst`` (``--peer-address dst=...`` on src).
    """

    def __init__(self, node_ports: Mapping[int, int]) -> None:
        for port in node_ports.values():
            assert 0 < port < 65536
        self._node_ports = dict(node_ports)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="chaos-proxy",
                                        daemon=True)
        self._links: dict[tuple[int, int], _Link] = {}
        self._thread.start()
        try:
            self._call(self._start_links(), timeout=10)
        except BaseException:
            self.close()
            raise

    def _call(self, coro: object, timeout: float = 10.0) -> object:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)  # type: ignore[arg-type]

    async def _start_links(self) -> None:
        for src in self._node_ports:
            for dst, port in self._node_ports.items():
                if src == dst:
                    continue
                link = _Link(src, dst, port)
                link.open.set()
                link.server = await asyncio.start_server(
                    lambda r, w, link=link: self._accept(link, r, w), LOOPBACK, 0)
                self._links[(src, dst)] = link

    def address(self, src: int, dst: int) -> str:
        return f"{LOOPBACK}:{self._links[(src, dst)].port}"

    def peer_args(self, src: int) -> list[str]:
        """The node flags that send src's peer traffic through the proxies."""
        args = []
        for dst in sorted(self._node_ports):
            if dst != src:
                args += ["--peer-address", f"{dst}={self.address(src, dst)}"]
        return args

    def blocked(self) -> list[tuple[int, int]]:
        return sorted(pair for pair, link in self._links.items() if not link.open.is_set())

    def block(self, pairs: Sequence[tuple[int, int]]) -> None:
        """Cut the listed links (each in both directions)."""
        def apply() -> None:
            for a, b in pairs:
                self._links[(a, b)].open.clear()
                self._links[(b, a)].open.clear()
        self._loop.call_soon_threadsafe(apply)

    def heal(self) -> None:
        def apply() -> None:
            for link in self._links.values():
                link.open.set()
        self._loop.call_soon_threadsafe(apply)

    async def _accept(self, link: _Link, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        if len(link.connections) >= MAX_CONNECTIONS_PER_LINK:
            writer.close()
            return
        task = asyncio.current_task()
        assert task is not None
        link.connections.add(task)
        upstream: asyncio.StreamWriter | None = None
        try:
            # A blocked link holds new connections unconnected, as dropped SYNs would.
            await link.open.wait()
            up_reader, upstream = await asyncio.wait_for(
                asyncio.open_connection(LOOPBACK, link.target_port), timeout=5)
            await asyncio.gather(self._pump(link, reader, upstream),
                                 self._pump(link, up_reader, writer))
        except (TimeoutError, OSError):
            pass
        finally:
            link.connections.discard(task)
            for w in (writer, upstream):
                if w is not None:
                    w.close()

    @staticmethod
    async def _pump(link: _Link, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
                    ) -> None:
        try:
            while True:
                data = await reader.read(CHUNK_BYTES)
                # At most one chunk waits here while blocked; TCP flow control holds the rest.
                await link.open.wait()
                if not data:
                    break
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            if writer.can_write_eof():
                try:
                    writer.write_eof()
                except OSError:
                    pass

    def close(self) -> None:
        async def shutdown() -> None:
            for link in self._links.values():
                link.open.set()
                if link.server is not None:
                    link.server.close()
            # Cancelled and awaited while the loop still runs: a connection task left pending
            # when the loop stops closes its sockets only when collected, on a closed loop
            # (an "Event loop is closed" error in whatever test runs then). Accepts already
            # scheduled join the set on their first step, hence the rounds.
            for _ in range(3):
                tasks = [task for link in self._links.values() for task in link.connections]
                if not tasks:
                    break
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                await asyncio.sleep(0)
        if self._loop.is_running():
            try:
                asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(5)
            except Exception:  # closing anyway
                pass
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)


def partition_modes(node_ids: Sequence[int]) -> tuple[str, ...]:
    """Modes. "isolate": the target (random, the controller or a leader) from every other node;
    "bridge": the target is the only node the two halves of the rest can both reach."""
    return ("isolate", "bridge") if len(node_ids) >= 3 else ("isolate",)


def partition_pairs(mode: str, node_ids: Sequence[int], target: int, rng: random.Random
                    ) -> list[tuple[int, int]]:
    """The node pairs to cut: one node from all others, or (bridge) two halves that share one
    node, which still talks to both."""
    others = [n for n in node_ids if n != target]
    if mode == "bridge":
        # target is the bridge; split the rest into two sides that cannot talk to each other.
        rest = others[:]
        rng.shuffle(rest)
        half = len(rest) // 2
        left, right = rest[:half], rest[half:]
        return [(a, b) for a in left for b in right]
    return [(target, other) for other in others]


# --- the cluster as the nemeses see it -----------------------------------------------------


class ClusterView(Protocol):
    nodes: Sequence[ChaosNode]

    def controller_id(self) -> int | None: ...

    def leader_of(self, topic: str, partition: int) -> int | None: ...


@dataclass(frozen=True, slots=True)
class FaultEvent:
    """One fault as it was applied, for the run report and VERIFICATION.md."""

    kind: FaultKind
    target: str
    nodes: tuple[int, ...]
    start: float
    end: float | None = None
    detail: Mapping[str, object] = field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        return {"kind": self.kind.value, "target": self.target, "nodes": list(self.nodes),
                "start": round(self.start, 3),
                "end": None if self.end is None else round(self.end, 3), **self.detail}


class Nemesis:
    """Applies one fault at a time, chosen from a seeded RNG, and heals it."""

    def __init__(self, view: ClusterView, kinds: Sequence[FaultKind], rng: random.Random,
                 topics: Sequence[tuple[str, int]], *, proxies: ProxyNet | None,
                 election_timeout_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.view = view
        self.kinds = list(kinds)
        self.rng = rng
        self.topics = list(topics)  # (topic, partitions)
        self.proxies = proxies
        self.election_timeout_s = election_timeout_s
        self.clock = clock
        self.events: list[FaultEvent] = []
        self._heal: Callable[[], dict[str, object]] | None = None
        self._current: FaultEvent | None = None
        self._bag: list[FaultKind] = []

    @property
    def active(self) -> bool:
        return self._current is not None

    def fault_duration(self, kind: FaultKind) -> float:
        if kind is FaultKind.PAUSE:
            # Longer than the election timeout (and than twice it, the fetch timeout).
            return self.rng.uniform(2.5, 5.0) * self.election_timeout_s
        return self.rng.uniform(2.0, 8.0)

    def _target(self) -> tuple[str, ChaosNode]:
        choice = self.rng.choice(("random", "controller", "leader"))
        by_id = {n.node_id: n for n in self.view.nodes}
        if choice == "controller":
            cid = self.view.controller_id()
            if cid in by_id:
                return "controller", by_id[cid]
        elif choice == "leader" and self.topics:
            topic, count = self.rng.choice(self.topics)
            partition = self.rng.randrange(count)
            lid = self.view.leader_of(topic, partition)
            if lid in by_id:
                return f"leader of {topic}/{partition}", by_id[lid]
        return "random", self.rng.choice(list(self.view.nodes))

    def start(self) -> FaultEvent:
        """Apply a fault of a randomly chosen kind; `heal` ends it."""
        assert self._current is None, "one fault at a time"
        # Kinds are drawn without replacement from a refilled bag, so even a short schedule
        # covers every kind.
        if not self._bag:
            self._bag = list(self.kinds)
            self.rng.shuffle(self._bag)
        kind = self._bag.pop()
        label, node = self._target()
        now = self.clock()
        detail: dict[str, object] = {}
        if kind is FaultKind.KILL:
            node.kill()

            def heal() -> dict[str, object]:
                node.start()
                return {}
        elif kind is FaultKind.PAUSE:
            node.pause()

            def heal() -> dict[str, object]:
                node.resume()
                return {}
        elif kind is FaultKind.DISK:
            node.kill()
            mode = self.rng.choice(list(DiskMode))
            dirs = partition_dirs(node.data_dir, [t for t, _ in self.topics])
            damage = None
            if dirs:
                directory = self.rng.choice(dirs)
                segment = newest_segment(directory)
                if segment is not None:
                    damage = damage_segment(segment, mode, self.rng)
            detail["damage"] = damage.to_dict() if damage is not None else None

            def heal() -> dict[str, object]:
                node.start()
                return {}
        elif kind is FaultKind.PARTITION:
            if self.proxies is None:
                raise FaultUnavailable("network partitions need the proxies (--peer-address)")
            ids = [n.node_id for n in self.view.nodes]
            mode = self.rng.choice(partition_modes(ids))
            pairs = partition_pairs(mode, ids, node.node_id, self.rng)
            self.proxies.block(pairs)
            detail.update(mode=mode, cut=[list(p) for p in pairs])
            proxies = self.proxies

            def heal() -> dict[str, object]:
                proxies.heal()
                return {}
        elif kind is FaultKind.CLOCK:
            jump = getattr(node, "jump_clock", None)
            if jump is None:
                raise FaultUnavailable("clock jumps need nodes the driver starts itself")
            # From a few election timeouts to a day: timers, leases and timestamps all jump.
            seconds = self.rng.choice((
                self.rng.randint(2, 10), self.rng.randint(30, 300), self.rng.randint(3600, 86400)))
            jump(seconds)
            detail["jump_s"] = seconds

            def heal() -> dict[str, object]:
                return {}  # a clock cannot be moved back (see the module docstring)
        else:
            raise FaultUnavailable(f"fault {kind.value} is not implemented")
        self._current = FaultEvent(kind, label, (node.node_id,), now, None, detail)
        self._heal = heal
        log.info("fault %s on node %s (%s) %s", kind.value, node.node_id, label, detail)
        return self._current

    def heal(self) -> FaultEvent | None:
        if self._current is None or self._heal is None:
            return None
        extra = self._heal()
        event = FaultEvent(self._current.kind, self._current.target, self._current.nodes,
                           self._current.start, self.clock(), {**self._current.detail, **extra})
        self.events.append(event)
        self._current, self._heal = None, None
        log.info("healed %s on node(s) %s", event.kind.value, event.nodes)
        return event

    def heal_everything(self) -> None:
        """The final heal: whatever state a fault left, every node runs and every link is open."""
        self.heal()
        if self.proxies is not None:
            self.proxies.heal()
        for node in self.view.nodes:
            node.resume()
            if not node.running():
                node.start()
