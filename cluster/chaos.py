"""`tidelog cluster chaos`: a Jepsen-style run against real nodes (issue 8, item 1).

One run:

1. a cluster: the local one in ``--data-dir`` (started with `tidelog cluster up`, left running
   afterwards), or three nodes the driver starts itself in ``--work-dir`` (stopped afterwards;
   with the partition fault their peer traffic goes through `tidelog.cluster.faults.ProxyNet`);
2. fresh topics (``--topics`` × ``--partitions``, replication factor 3);
3. producer threads (acks=all, with retries: the producer is not idempotent yet) sending unique
   values ``p<process>-<n>`` to random partitions, and consumer threads that assign every
   partition, seek, poll and now and then seek back, every operation recorded in the history;
4. faults for ``--duration`` seconds, one at a time on a schedule drawn from ``--seed``;
5. heal everything, wait for recovery (a produce succeeds on every partition), drain every
   partition from its log start to its high watermark (the final read), check the history with
   `tidelog.cluster.checker` and print the verdict (one JSON object on the last line with
   ``--output json``); exit 1 on any anomaly not named by ``--allow``, 2 if the run itself
   failed (the cluster did not come up or did not recover).

``--allow duplicate`` exists because without idempotence a retry after a lost answer writes a
record twice; allowed anomalies are listed under ``allowed_anomalies`` and do not fail the run.
Every request loop is bounded in count and time; every node process started is stopped in a
``finally`` and at exit.
"""

from __future__ import annotations

import argparse
import atexit
import concurrent.futures
import itertools
import json
import logging
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tidelog.client import AdminClient, Consumer, Producer, TidelogError, TopicPartition
from tidelog.cluster import launcher
from tidelog.cluster.checker import AnomalyKind, Verdict, check_file
from tidelog.cluster.faults import (
    LOOPBACK,
    ChaosNode,
    FaultKind,
    FaultUnavailable,
    Nemesis,
    OwnedNode,
    ProxyNet,
    faketime_library,
)
from tidelog.cluster.history import (
    ConsumerEventKind,
    CommitOp,
    ConsumerEventOp,
    FinalReadOp,
    HistoryWriter,
    Outcome,
    PollOp,
    SendOp,
)

log = logging.getLogger("tidelog.chaos")

RECOVERY_TIMEOUT_S = 90.0
FINAL_READ_TIMEOUT_S = 60.0
START_TIMEOUT_S = 60.0
PORT_ATTEMPTS = 3  # placements of an owned cluster whose port was taken before a node bound it
PRODUCER_WINDOW = 32  # sends in flight per producer thread
DELIVERY_TIMEOUT_MS = 30000
# A send still without an outcome this long after delivery_timeout_ms is recorded as unknown
# and counted as stuck (a client defect: the future should have failed by then).
STUCK_GRACE_S = 10.0
RECOVERY_PROCESS = 0  # the process id of the recovery probes' sends
ANOMALY_LIMIT = 20


@dataclass(frozen=True, slots=True)
class ChaosConfig:
    duration_s: float
    seed: int
    faults: tuple[FaultKind, ...]
    history: Path
    data_dir: Path | None = None  # an existing `cluster up` cluster; None: start our own
    work_dir: Path | None = None
    nodes: int = 3
    topics: int = 2
    partitions: int = 3
    producers: int = 3
    consumers: int = 2
    group_members: int = 2  # members of one consumer group reading every topic
    rate: float = 100.0  # records per second per producer
    allow: frozenset[AnomalyKind] = frozenset()
    quiet_s: tuple[float, float] = (2.0, 6.0)  # gap between faults
    election_timeout_ms: int = 1000
    segment_bytes: int = 262144
    keep: bool = False


@dataclass
class RunReport:
    config: ChaosConfig
    topics: list[str] = field(default_factory=list)
    faults: list[dict[str, Any]] = field(default_factory=list)
    unavailable: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    recovery_s: float | None = None
    # Client-side oddities that are not anomalies of the history: sends whose future outlived
    # delivery_timeout_ms (recorded as unknown), errors that ended a worker.
    stuck_sends: int = 0
    worker_errors: list[str] = field(default_factory=list)
    verdict: Verdict | None = None
    work_dir: str | None = None
    code: str | None = None  # the source tree the nodes and clients ran (git describe --dirty)

    def failing_kinds(self) -> list[str]:
        if self.verdict is None:
            return []
        return sorted(k.value for k in self.verdict.anomaly_kinds - self.config.allow)

    @property
    def valid(self) -> bool:
        return self.verdict is not None and not self.failing_kinds() and not self.problems

    def to_dict(self, limit: int = ANOMALY_LIMIT) -> dict[str, Any]:
        checker = self.verdict.to_dict(limit) if self.verdict is not None else None
        allowed: dict[str, Any] = {}
        if checker is not None:
            for kind in sorted(self.config.allow):
                if kind.value in checker["anomalies"]:
                    allowed[kind.value] = checker["anomalies"].pop(kind.value)
        return {
            "valid": self.valid,
            "failing_kinds": self.failing_kinds(),
            "allowed": sorted(k.value for k in self.config.allow),
            "seed": self.config.seed,
            "code": self.code,
            "duration_s": self.config.duration_s,
            "fault_kinds": [k.value for k in self.config.faults],
            "unavailable_faults": self.unavailable,
            "history": str(self.config.history),
            "work_dir": self.work_dir,
            "topics": self.topics,
            "faults": self.faults,
            "recovery_s": self.recovery_s,
            "problems": self.problems,
            "stuck_sends": self.stuck_sends,
            "worker_errors": self.worker_errors[:limit],
            "checker": checker,
            "allowed_anomalies": allowed,
        }


# --- clusters ------------------------------------------------------------------------------


def peer_address_supported() -> bool:
    """Whether the node takes ``--peer-address`` (the hook network partitions need)."""
    try:
        out = subprocess.run([sys.executable, "-m", "tidelog.node.main", "--help"],
                             capture_output=True, text=True, timeout=30, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "--peer-address" in out


class _LeaderCache:
    """Controller and partition leaders as a running node reports them, refreshed at most once
    a second (the nemesis asks before every fault)."""

    def __init__(self, nodes: Callable[[], Sequence[ChaosNode]]) -> None:
        self._nodes = nodes
        self._at = -1e9
        self._controller: int | None = None
        self._leaders: dict[tuple[str, int], int] = {}

    def _refresh(self) -> None:
        if time.monotonic() - self._at < 1.0:
            return
        self._at = time.monotonic()
        for node in self._nodes():
            if not node.running() or getattr(node, "paused", False):
                continue
            answer = launcher.metadata(node.address, timeout=1.0)
            if answer is None:
                continue
            self._controller = answer.controller_id if answer.controller_id >= 0 else None
            self._leaders = {(t.name, p.partition): p.leader_id
                             for t in answer.topics for p in t.partitions if p.leader_id >= 0}
            return

    def controller_id(self) -> int | None:
        self._refresh()
        return self._controller

    def leader_of(self, topic: str, partition: int) -> int | None:
        self._refresh()
        return self._leaders.get((topic, partition))


class _Cluster:
    """What the nemesis and the workload need of a cluster, whoever started its nodes."""

    nodes: Sequence[Any]
    _leaders: _LeaderCache

    @property
    def bootstrap(self) -> str:
        return ",".join(n.address for n in self.nodes)

    def start(self) -> None:
        for node in self.nodes:
            node.start()

    def controller_id(self) -> int | None:
        return self._leaders.controller_id()

    def leader_of(self, topic: str, partition: int) -> int | None:
        return self._leaders.leader_of(topic, partition)


class OwnedCluster(_Cluster):
    """Nodes the driver starts (and always stops) itself."""

    def __init__(self, work_dir: Path, count: int, *, proxies: bool, election_timeout_ms: int,
                 segment_bytes: int, faketime: Path | None = None) -> None:
        self._work_dir = work_dir
        self._count = count
        self._want_proxies = proxies
        self._config: dict[str, object] = {
            "election_timeout_ms": election_timeout_ms,
            "flush": "always",
            "topic_defaults": {"segment.bytes": str(segment_bytes)},
        }
        self._faketime = faketime
        self.proxies: ProxyNet | None = None
        self.nodes: list[OwnedNode] = []
        self._place()
        self._leaders = _LeaderCache(lambda: self.nodes)
        atexit.register(self.close)

    def _place(self) -> None:
        """Nodes (and proxies) on ports free right now."""
        ports = launcher.free_ports(self._count, LOOPBACK)
        ids = list(range(1, self._count + 1))
        self.proxies = ProxyNet(dict(zip(ids, ports))) if self._want_proxies else None
        voters = ",".join(f"{i}@{LOOPBACK}:{p}" for i, p in zip(ids, ports))
        self.nodes = []
        for node_id, port in zip(ids, ports):
            data_dir = self._work_dir / f"node-{node_id}"
            node_config = {"node_id": node_id, "listen": f"{LOOPBACK}:{port}", "data_dir": str(data_dir),
                           "controller_voters": voters, **self._config}
            extra = self.proxies.peer_args(node_id) if self.proxies is not None else []
            self.nodes.append(OwnedNode(node_id, port, data_dir, node_config, extra, faketime=self._faketime))

    def start_serving(self, timeout: float) -> list[str]:
        """Start the nodes and wait until they serve (see `wait_serving`). A port picked free can
        be taken by another process before the node binds it (a machine running tests beside the
        harness): then the fresh cluster is thrown away and placed again on other ports."""
        for attempt in range(PORT_ATTEMPTS):
            self.start()
            problems = wait_serving(self.nodes, timeout, give_up=self._port_taken)
            if not problems or not self._port_taken() or attempt == PORT_ATTEMPTS - 1:
                return problems
            log.warning("a node's port was taken before it could listen; starting the cluster on other ports")
            self._shut()
            for node in self.nodes:
                shutil.rmtree(node.data_dir, ignore_errors=True)
            self._place()
        raise AssertionError("unreachable")

    def _port_taken(self) -> bool:
        for node in self.nodes:
            if not node.running():
                try:
                    if "cannot listen" in node.log_path.read_text(errors="replace"):
                        return True
                except OSError:
                    pass
        return False

    def _shut(self) -> None:
        for node in self.nodes:
            node.resume()
        for node in self.nodes:
            node.stop()
        if self.proxies is not None:
            self.proxies.close()
            self.proxies = None

    def close(self) -> None:
        self._shut()
        atexit.unregister(self.close)


@dataclass(eq=False)
class LauncherNode:
    """A node of a `tidelog cluster up` cluster, found by its PID file."""

    local: launcher.LocalNode
    voters: str
    paused: bool = False

    @property
    def node_id(self) -> int:  # type: ignore[override]
        return self.local.node_id

    @property
    def address(self) -> str:
        return self.local.address

    @property
    def data_dir(self) -> Path:
        return self.local.data_dir

    @property
    def log_path(self) -> Path:
        return self.local.log_path

    def running(self) -> bool:
        return self.local.pid() is not None

    def _signal(self, signum: int) -> None:
        pid = self.local.pid()
        if pid is not None:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        pid = self.local.pid()
        launcher.kill(self.local)
        deadline = time.monotonic() + 10
        while pid is not None and self.local.pid() is not None and time.monotonic() < deadline:
            time.sleep(0.05)
        self.paused = False

    def start(self) -> None:
        if not self.running():
            launcher.spawn(self.local, self.voters)
        self.paused = False

    def stop(self) -> None:
        self.resume()
        launcher.stop(self.local)

    def pause(self) -> None:
        self._signal(19)  # SIGSTOP
        self.paused = True

    def resume(self) -> None:
        self._signal(18)  # SIGCONT
        self.paused = False


class LauncherCluster(_Cluster):
    """The cluster in a launcher data dir; left running after the run."""

    proxies: ProxyNet | None = None

    def __init__(self, data_dir: Path) -> None:
        locals_ = launcher.load_nodes(data_dir.resolve())
        voters = launcher.voters_of(locals_)
        self.nodes = [LauncherNode(n, voters) for n in locals_]
        self._leaders = _LeaderCache(lambda: self.nodes)

    def close(self) -> None:
        for node in self.nodes:
            node.resume()
            node.start()  # leave the operator's cluster as we found it: running


def wait_serving(nodes: Sequence[Any], timeout: float, give_up: Callable[[], bool] = lambda: False
                 ) -> list[str]:
    """Wait until every node answers DescribeCluster with a controller and every node
    registered; returns what is still wrong at the deadline, or as soon as ``give_up()``
    (empty when all is well)."""
    deadline = time.monotonic() + timeout
    ids = {n.node_id for n in nodes}
    while True:
        problems = []
        for node in nodes:
            if not node.running():
                problems.append(f"node {node.node_id} is not running (see {node.log_path})")
                continue
            answer = launcher.describe(node.address, timeout=1.0)
            if answer is None or answer.controller_id < 0 or \
                    not {n.node_id for n in answer.nodes} >= ids:
                problems.append(f"node {node.node_id} does not serve yet")
        if not problems or time.monotonic() > deadline or give_up():
            return problems
        time.sleep(0.2)


# --- the workload --------------------------------------------------------------------------


def _send_outcome(exc: BaseException) -> Outcome:
    if isinstance(exc, TidelogError) and not exc.retriable:
        return Outcome.FAILED
    return Outcome.UNKNOWN  # timed out or gave up retrying: it may still have been written


class ProducerWorker(threading.Thread):
    def __init__(self, process: int, bootstrap: str, topics: Sequence[tuple[str, int]],
                 history: HistoryWriter, rng: random.Random, rate: float, stop: threading.Event,
                 t0: float) -> None:
        super().__init__(name=f"chaos-producer-{process}", daemon=True)
        self.process, self.bootstrap, self.topics = process, bootstrap, topics
        self.history, self.rng, self.rate, self.stop_event, self.t0 = history, rng, rate, stop, t0
        self.sent = 0
        self.stuck = 0  # sends without an outcome long after delivery_timeout_ms
        self.error: BaseException | None = None

    def _record(self, topic: str, partition: int, value: str, future: concurrent.futures.Future[Any],
                definite: bool = False) -> None:
        now = time.monotonic() - self.t0
        if not future.done():
            self.history.record(SendOp(self.process, topic, value, Outcome.UNKNOWN, partition,
                                       None, now, error="no outcome (delivery_timeout_ms passed "
                                                        "or the producer closed)"))
            return
        exc = future.exception()
        if exc is None:
            meta = future.result()
            self.history.record(SendOp(self.process, topic, value, Outcome.OK, meta.partition,
                                       meta.offset, now))
        else:
            self.history.record(SendOp(self.process, topic, value, _send_outcome(exc), partition,
                                       None, now, definite=definite, error=repr(exc)[:200]))

    def run(self) -> None:
        try:
            producer = Producer(self.bootstrap, acks="all", linger_ms=5, request_timeout_ms=5000,
                                delivery_timeout_ms=DELIVERY_TIMEOUT_MS, max_block_ms=5000)
        except BaseException as exc:  # the run reports it; the history stays valid
            self.error = exc
            return
        # Outcomes are recorded in completion order (the checker keys sends by value), so one
        # stuck partition does not stall the sends to the others.
        pending: dict[concurrent.futures.Future[Any], tuple[str, int, str, float]] = {}
        interval = 1.0 / self.rate
        next_at = time.monotonic()
        try:
            while not self.stop_event.is_set():
                self._collect(pending, block=len(pending) >= PRODUCER_WINDOW)
                now = time.monotonic()
                if now < next_at:
                    self.stop_event.wait(next_at - now)
                    continue
                if len(pending) >= PRODUCER_WINDOW:
                    continue
                next_at = max(next_at + interval, now - 1.0)
                topic, count = self.rng.choice(self.topics)
                partition = self.rng.randrange(count)
                self.sent += 1
                value = f"p{self.process}-{self.sent}"
                future = producer.send(topic, value.encode(), partition=partition)
                if future.done() and future.exception() is not None:
                    # Failed inside send(), before the record reached the accumulator.
                    self._record(topic, partition, value, future, definite=True)
                else:
                    pending[future] = (topic, partition, value, time.monotonic())
            try:
                producer.flush(timeout=DELIVERY_TIMEOUT_MS / 1000 + 10)
            except Exception:  # outcomes still pending are recorded as unknown below
                pass
            self._collect(pending, block=False)
        except BaseException as exc:
            self.error = exc
        finally:
            for future, (topic, partition, value, _) in pending.items():
                self._record(topic, partition, value, future)
            pending.clear()
            try:
                producer.close(timeout=5)
            except Exception:
                pass

    def _collect(self, pending: dict[concurrent.futures.Future[Any], tuple[str, int, str, float]],
                 block: bool) -> None:
        if block and pending:
            concurrent.futures.wait(list(pending), timeout=0.5,
                                    return_when=concurrent.futures.FIRST_COMPLETED)
        overdue_at = time.monotonic() - (DELIVERY_TIMEOUT_MS / 1000 + STUCK_GRACE_S)
        for future in [f for f, (_, _, _, sent) in pending.items() if f.done() or sent < overdue_at]:
            topic, partition, value, sent = pending.pop(future)
            if not future.done():
                self.stuck += 1
                log.warning("send of %s to %s/%d has no outcome %.0fs after send(), beyond "
                            "delivery_timeout_ms; recorded as unknown", value, topic, partition,
                            time.monotonic() - sent)
            self._record(topic, partition, value, future)


class _PollingWorker(threading.Thread):
    """What both kinds of consumer worker share: polling and recording what each poll returned."""

    def __init__(self, name: str, process: int, history: HistoryWriter, rng: random.Random,
                 stop: threading.Event, t0: float) -> None:
        super().__init__(name=name, daemon=True)
        self.process, self.history, self.rng, self.stop_event, self.t0 = process, history, rng, stop, t0
        self.polled = 0
        self.errors: list[str] = []
        self.generation = 0

    def _now(self) -> float:
        return time.monotonic() - self.t0

    def _error(self, exc: BaseException) -> None:
        self.errors.append(repr(exc)[:200])
        if len(self.errors) > 1000:
            del self.errors[:500]

    def _poll(self, consumer: Consumer, name: str, group: str | None = None
              ) -> dict[TopicPartition, list[tuple[int, str]]]:
        """One poll, recorded as one op per partition; {} after an error (noted, then a pause)."""
        try:
            records = consumer.poll(timeout_ms=300)
        except TidelogError as exc:
            self._error(exc)
            self.stop_event.wait(0.2)
            return {}
        by_tp: dict[TopicPartition, list[tuple[int, str]]] = {}
        for r in records:
            value = r.value.decode() if isinstance(r.value, bytes) else str(r.value)
            by_tp.setdefault(TopicPartition(r.topic, r.partition), []).append((r.offset, value))
        now = self._now()
        for tp, got in by_tp.items():
            self.history.record(PollOp(self.process, name, tp.topic, tp.partition, tuple(got),
                                       group=group, time=now))
            self.polled += len(got)
        return by_tp


class ConsumerWorker(_PollingWorker):
    """Assigns every partition, seeks to the start, polls; now and then seeks one partition back
    or starts over as a new consumer (a new name, as the history format asks)."""

    def __init__(self, process: int, bootstrap: str, topics: Sequence[tuple[str, int]],
                 history: HistoryWriter, rng: random.Random, stop: threading.Event, t0: float
                 ) -> None:
        super().__init__(f"chaos-consumer-{process}", process, history, rng, stop, t0)
        self.bootstrap, self.topics = bootstrap, topics

    def _session(self) -> None:
        self.generation += 1
        name = f"c{self.process}.{self.generation}"
        tps = [TopicPartition(t, p) for t, n in self.topics for p in range(n)]
        consumer = Consumer(self.bootstrap, auto_offset_reset="earliest", request_timeout_ms=5000,
                            fetch_max_wait_ms=200, max_poll_records=200)
        try:
            self.history.record(ConsumerEventOp(ConsumerEventKind.ASSIGN, self.process, name,
                                                tuple((tp.topic, tp.partition) for tp in tps),
                                                None, time=self._now()))
            consumer.assign(tps)
            self.history.record(ConsumerEventOp(ConsumerEventKind.SEEK, self.process, name,
                                                tuple((tp.topic, tp.partition) for tp in tps), 0,
                                                time=self._now()))
            for tp in tps:
                consumer.seek(tp, 0)
            last: dict[TopicPartition, int] = {}
            polls_left = self.rng.randint(50, 400)
            while not self.stop_event.is_set() and polls_left > 0:
                polls_left -= 1
                for tp, got in self._poll(consumer, name).items():
                    last[tp] = got[-1][0]
                if last and self.rng.random() < 0.02:
                    tp = self.rng.choice(sorted(last))
                    back_to = self.rng.randint(0, last[tp])
                    self.history.record(ConsumerEventOp(ConsumerEventKind.SEEK, self.process,
                                                        name, ((tp.topic, tp.partition),), back_to,
                                                        time=self._now()))
                    consumer.seek(tp, back_to)
                    del last[tp]
        finally:
            consumer.close()

    def run(self) -> None:
        while not self.stop_event.is_set():
            try:
                self._session()
            except Exception as exc:  # a broken consumer is replaced by a new one
                self._error(exc)
                self.stop_event.wait(0.5)


class GroupConsumerWorker(_PollingWorker):
    """A member of consumer group ``group``: subscribes to every topic, records each rebalance
    (the partitions gained or given up), polls, and commits what it polled after every poll; now
    and then it leaves and a new member (a new name) joins in its place."""

    def __init__(self, process: int, group: str, bootstrap: str,
                 topics: Sequence[tuple[str, int]], history: HistoryWriter, rng: random.Random,
                 stop: threading.Event, t0: float) -> None:
        super().__init__(f"chaos-member-{process}", process, history, rng, stop, t0)
        self.group, self.bootstrap, self.topics = group, bootstrap, topics
        self.commits = 0

    def _session(self) -> None:
        self.generation += 1
        name = f"m{self.process}.{self.generation}"

        def rebalanced(partitions: set[TopicPartition]) -> None:
            # Gained or given up, either way the next poll of these partitions may restart
            # from the committed offset: a rebalance event, as the history format has it.
            self.history.record(ConsumerEventOp(
                ConsumerEventKind.REBALANCE, self.process, name,
                tuple(sorted((tp.topic, tp.partition) for tp in partitions)), None,
                group=self.group, time=self._now()))

        consumer = Consumer(self.bootstrap, group_id=self.group, enable_auto_commit=False,
                            auto_offset_reset="earliest", request_timeout_ms=5000,
                            fetch_max_wait_ms=200, max_poll_records=200)
        try:
            consumer.subscribe([t for t, _ in self.topics], on_assign=rebalanced,
                               on_revoke=rebalanced)
            polls_left = self.rng.randint(100, 600)
            while not self.stop_event.is_set() and polls_left > 0:
                polls_left -= 1
                by_tp = self._poll(consumer, name, self.group)
                owned = consumer.assignment()
                offsets = {tp: got[-1][0] + 1 for tp, got in by_tp.items() if tp in owned}
                if offsets:
                    self._commit(consumer, name, offsets)
        finally:
            consumer.close()

    def _commit(self, consumer: Consumer, name: str, offsets: dict[TopicPartition, int]) -> None:
        outcome = Outcome.OK
        try:
            consumer.commit(offsets)
        except Exception as exc:
            # A commit without an answer may still take effect, so it is not ordered.
            self._error(exc)
            outcome = Outcome.UNKNOWN
        self.commits += 1
        now = self._now()
        for tp, offset in sorted(offsets.items()):
            self.history.record(CommitOp(self.group, tp.topic, tp.partition, offset, outcome,
                                         process=self.process, consumer=name, time=now))

    def run(self) -> None:
        while not self.stop_event.is_set():
            try:
                self._session()
            except Exception as exc:  # a broken member is replaced by a new one
                self._error(exc)
                self.stop_event.wait(0.5)


def wait_recovery(bootstrap: str, topics: Sequence[tuple[str, int]], history: HistoryWriter,
                  t0: float, timeout: float, numbers: Iterator[int]) -> tuple[bool, list[str]]:
    """A produce (acks=all) succeeds on every partition; each probe is a recorded send whose
    value takes the next of ``numbers`` (shared by every probe of the run: values are unique)."""
    deadline = time.monotonic() + timeout
    remaining = {(t, p) for t, n in topics for p in range(n)}
    problems: list[str] = []
    try:
        producer = Producer(bootstrap, acks="all", request_timeout_ms=5000,
                            delivery_timeout_ms=15000, max_block_ms=5000)
    except Exception as exc:
        return False, [f"recovery producer: {exc!r}"]
    try:
        while remaining and time.monotonic() < deadline:
            futures = []
            for topic, partition in sorted(remaining):
                value = f"p{RECOVERY_PROCESS}-{next(numbers)}"
                futures.append((topic, partition, value,
                                producer.send(topic, value.encode(), partition=partition)))
            for topic, partition, value, future in futures:
                try:
                    meta = future.result(timeout=max(1.0, deadline - time.monotonic()) + 20)
                except concurrent.futures.TimeoutError:
                    history.record(SendOp(RECOVERY_PROCESS, topic, value, Outcome.UNKNOWN,
                                          partition, None, time.monotonic() - t0,
                                          error="timed out"))
                    continue
                except Exception as exc:
                    history.record(SendOp(RECOVERY_PROCESS, topic, value, _send_outcome(exc),
                                          partition, None, time.monotonic() - t0,
                                          error=repr(exc)[:200]))
                    continue
                history.record(SendOp(RECOVERY_PROCESS, topic, value, Outcome.OK, meta.partition,
                                      meta.offset, time.monotonic() - t0))
                remaining.discard((topic, partition))
    finally:
        try:
            producer.close(timeout=5)
        except Exception:
            pass
    if remaining:
        problems.append(f"no produce succeeded within {timeout:.0f}s on "
                        + ", ".join(f"{t}/{p}" for t, p in sorted(remaining)))
    return not remaining, problems


def final_read(bootstrap: str, topics: Sequence[tuple[str, int]], history: HistoryWriter,
               t0: float, timeout: float) -> list[str]:
    """Read every partition from its log start to its high watermark, as one op each."""
    problems = []
    consumer = Consumer(bootstrap, auto_offset_reset="earliest", request_timeout_ms=5000,
                        fetch_max_wait_ms=200, max_poll_records=1000)
    try:
        for topic, count in topics:
            for partition in range(count):
                tp = TopicPartition(topic, partition)
                deadline = time.monotonic() + timeout
                records: list[tuple[int, str]] = []
                complete = False
                try:
                    start = consumer.beginning_offsets([tp], timeout=20)[tp]
                    end = consumer.end_offsets([tp], timeout=20)[tp]
                    consumer.assign([tp])
                    consumer.seek(tp, start)
                    position = start
                    while position < end and time.monotonic() < deadline:
                        for r in consumer.poll(timeout_ms=500):
                            if r.topic_partition != tp:
                                continue
                            value = r.value.decode() if isinstance(r.value, bytes) else str(r.value)
                            records.append((r.offset, value))
                            position = r.offset + 1
                    complete = position >= end
                    if not complete:
                        problems.append(f"final read of {topic}/{partition} stopped at {position} "
                                        f"of {end}")
                except Exception as exc:
                    problems.append(f"final read of {topic}/{partition}: {exc!r}")
                history.record(FinalReadOp(topic, partition, tuple(records), complete,
                                           time.monotonic() - t0))
    finally:
        consumer.close()
    return problems


# --- the run -------------------------------------------------------------------------------


def source_version() -> str | None:
    """``git describe --always --dirty`` of the tree this package runs from, if it is one: an
    editable install runs whatever the working tree holds when a process starts."""
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True,
                             text=True, timeout=10, cwd=Path(__file__).resolve().parent,
                             check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def run_chaos(config: ChaosConfig) -> RunReport:
    report = RunReport(config)
    report.code = source_version()
    rng = random.Random(config.seed)
    own = config.data_dir is None
    work_dir = config.work_dir
    made_work_dir = False
    if own and work_dir is None:
        work_dir = Path(tempfile.mkdtemp(prefix="tidelog-chaos-"))
        made_work_dir = True
    report.work_dir = str(work_dir) if own else str(config.data_dir)

    kinds = list(config.faults)
    faketime = faketime_library() if FaultKind.CLOCK in kinds and own else None
    if FaultKind.CLOCK in kinds and faketime is None:
        kinds.remove(FaultKind.CLOCK)
        report.unavailable["clock"] = (
            "needs nodes the driver starts itself, under libfaketime (Debian package "
            "libfaketime); stepping the host clock would hit every process on the machine"
            if own else "needs nodes the driver starts itself (under libfaketime)")
    want_proxies = FaultKind.PARTITION in kinds
    if want_proxies and not own:
        kinds.remove(FaultKind.PARTITION)
        want_proxies = False
        report.unavailable["partition"] = (
            "needs nodes the driver starts itself (their peer traffic must go through its proxies)")
    if want_proxies and not peer_address_supported():
        kinds.remove(FaultKind.PARTITION)
        want_proxies = False
        report.unavailable["partition"] = (
            "the node has no --peer-address option yet, so its peer traffic cannot be routed "
            "through the fault-injecting proxies")

    cluster: OwnedCluster | LauncherCluster
    if own:
        assert work_dir is not None
        work_dir.mkdir(parents=True, exist_ok=True)
        cluster = OwnedCluster(work_dir, config.nodes, proxies=want_proxies,
                               election_timeout_ms=config.election_timeout_ms,
                               segment_bytes=config.segment_bytes, faketime=faketime)
    else:
        assert config.data_dir is not None
        cluster = LauncherCluster(config.data_dir)
    config.history.parent.mkdir(parents=True, exist_ok=True)
    if config.history.exists():
        config.history.unlink()
    history = HistoryWriter(config.history)
    stop_workload = threading.Event()
    stop_consumers = threading.Event()
    workers: list[threading.Thread] = []
    try:
        if isinstance(cluster, OwnedCluster):
            problems = cluster.start_serving(START_TIMEOUT_S)
        else:
            cluster.start()
            problems = wait_serving(cluster.nodes, START_TIMEOUT_S)
        if problems:
            report.problems += ["cluster did not start: " + p for p in problems]
            return report
        run_id = f"{config.seed}-{int(time.time()) % 100000}"
        topics = [(f"chaos-{run_id}-{i}", config.partitions) for i in range(config.topics)]
        report.topics = [t for t, _ in topics]
        with AdminClient(cluster.bootstrap) as admin:
            for topic, count in topics:
                # The history's contract: nothing under test is trimmed by retention (a clock
                # jump of a day would otherwise make 7-day retention plausible).
                admin.create_topic(topic, num_partitions=count,
                                   replication_factor=min(3, len(cluster.nodes)),
                                   configs={"retention.ms": "-1", "retention.bytes": "-1"})
        t0 = time.monotonic()
        probe_numbers = itertools.count(1)
        ok, problems = wait_recovery(cluster.bootstrap, topics, history, t0, RECOVERY_TIMEOUT_S,
                                     probe_numbers)
        if not ok:
            report.problems += ["topics never became writable: " + p for p in problems]
            return report
        for i in range(config.producers):
            workers.append(ProducerWorker(i + 1, cluster.bootstrap, topics, history,
                                          random.Random(rng.random()), config.rate, stop_workload,
                                          t0))
        consumers: list[ConsumerWorker | GroupConsumerWorker] = [
            ConsumerWorker(100 + i + 1, cluster.bootstrap, topics, history,
                           random.Random(rng.random()), stop_consumers, t0)
            for i in range(config.consumers)]
        consumers += [GroupConsumerWorker(200 + i + 1, f"chaos-{run_id}-group", cluster.bootstrap,
                                          topics, history, random.Random(rng.random()),
                                          stop_consumers, t0)
                      for i in range(config.group_members)]
        for worker in [*workers, *consumers]:
            worker.start()

        nemesis = Nemesis(cluster, [k for k in kinds], random.Random(rng.random()), topics,
                          proxies=cluster.proxies,
                          election_timeout_s=config.election_timeout_ms / 1000.0,
                          clock=lambda: time.monotonic() - t0)
        end_at = t0 + config.duration_s
        while kinds and time.monotonic() < end_at:
            if stop_workload.wait(min(nemesis.rng.uniform(*config.quiet_s),
                                      max(0.0, end_at - time.monotonic()))):
                break
            if time.monotonic() >= end_at:
                break
            try:
                event = nemesis.start()
            except FaultUnavailable as exc:
                report.unavailable[str(exc)] = str(exc)
                continue
            hold = nemesis.fault_duration(event.kind)
            time.sleep(max(0.0, min(hold, end_at - time.monotonic() + 1.0)))
            nemesis.heal()
        if not kinds:
            stop_workload.wait(max(0.0, end_at - time.monotonic()))

        # Heal: every node running, every link open; then let the producers finish.
        nemesis.heal_everything()
        report.faults = [e.to_dict() for e in nemesis.events]
        heal_at = time.monotonic()
        problems = wait_serving(cluster.nodes, START_TIMEOUT_S)
        report.problems += ["after healing: " + p for p in problems]
        # Recovery is timed from the heal while the workload still runs, so a producer still
        # draining its sends does not count against the cluster.
        ok, problems = wait_recovery(cluster.bootstrap, topics, history, t0, RECOVERY_TIMEOUT_S,
                                     probe_numbers)
        report.recovery_s = round(time.monotonic() - heal_at, 2)
        report.problems += problems
        stop_workload.set()
        for worker in workers:
            worker.join(DELIVERY_TIMEOUT_MS / 1000 + 60)
            if worker.is_alive():
                report.problems.append(f"{worker.name} did not finish")
        report.stuck_sends = sum(w.stuck for w in workers)
        report.worker_errors += [f"{w.name}: {w.error!r}" for w in workers if w.error is not None]
        stop_consumers.set()
        for worker in consumers:
            worker.join(30)
            report.worker_errors += [f"{worker.name}: {e}" for e in worker.errors[-3:]]
        report.problems += final_read(cluster.bootstrap, topics, history, t0,
                                      FINAL_READ_TIMEOUT_S)
    finally:
        stop_workload.set()
        stop_consumers.set()
        history.close()
        cluster.close()
    if history.failed is not None:
        # A verdict over a history with holes would be fiction: report the harness's failure.
        report.problems.append(f"the history could not be written ({history.failed}); no verdict "
                               "can be drawn from it")
        return report
    report.verdict = check_file(config.history)
    if own and made_work_dir and report.valid and not config.keep:
        shutil.rmtree(work_dir, ignore_errors=True)  # type: ignore[arg-type]
    return report


# --- the command ---------------------------------------------------------------------------


def _parse_faults(text: str) -> tuple[FaultKind, ...]:
    kinds = []
    for name in filter(None, (s.strip() for s in text.split(","))):
        try:
            kinds.append(FaultKind(name))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"unknown fault {name!r}; choose from {', '.join(k.value for k in FaultKind)}"
            ) from None
    return tuple(kinds)


def _parse_allow(text: str) -> frozenset[AnomalyKind]:
    kinds = set()
    for name in filter(None, (s.strip() for s in text.split(","))):
        try:
            kinds.add(AnomalyKind(name))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"unknown anomaly {name!r}; choose from {', '.join(k.value for k in AnomalyKind)}"
            ) from None
    return frozenset(kinds)


def add_chaos_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="run against the `tidelog cluster up` cluster in this directory "
                             "(default: start three nodes of our own in --work-dir)")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="where our own nodes keep their data and logs (default: a temporary "
                             "directory, removed after a valid run unless it holds the history "
                             "or --keep is given; its path is in the verdict)")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of faults (default 60)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the fault schedule and workload")
    parser.add_argument("--faults", type=_parse_faults,
                        default=_parse_faults("kill,pause,partition,disk,clock"),
                        help="comma-separated: kill,pause,partition,disk,clock (default: all; "
                             "those this setup cannot inject are listed as unavailable)")
    parser.add_argument("--history", type=Path, default=None,
                        help="write the history (JSON lines) here (default: history-SEED.jsonl in the "
                             "work dir, or in --data-dir)")
    parser.add_argument("--allow", type=_parse_allow, default=frozenset(),
                        help="anomaly kinds listed but not failing the run, e.g. duplicate "
                             "(expected while the producer is not idempotent)")
    parser.add_argument("--topics", type=int, default=2)
    parser.add_argument("--partitions", type=int, default=3)
    parser.add_argument("--producers", type=int, default=3)
    parser.add_argument("--consumers", type=int, default=2,
                        help="consumers that assign every partition and seek (default 2)")
    parser.add_argument("--group-members", type=int, default=2,
                        help="members of one consumer group that commit what they poll (default 2)")
    parser.add_argument("--rate", type=float, default=100.0, help="records/s per producer (default 100)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary work dir")
    parser.add_argument("--output", choices=("text", "json"), default="text")


def config_from_args(args: argparse.Namespace) -> ChaosConfig:
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    work_dir = args.work_dir
    if args.data_dir is None and work_dir is None and args.history is None:
        work_dir = Path(tempfile.mkdtemp(prefix="tidelog-chaos-"))
    history = args.history
    if history is None:
        base = work_dir if work_dir is not None else args.data_dir
        history = Path(base) / f"history-{seed}.jsonl"
    return ChaosConfig(duration_s=args.duration, seed=seed, faults=args.faults,
                       history=history, data_dir=args.data_dir, work_dir=work_dir,
                       topics=args.topics, partitions=args.partitions, producers=args.producers,
                       consumers=args.consumers, group_members=args.group_members, rate=args.rate, allow=args.allow,
                       keep=args.keep or work_dir is not None)


def _text(report: RunReport) -> str:
    data = report.to_dict()
    checker = data["checker"] or {}
    stats = checker.get("stats", {})
    lines = [
        f"seed {data['seed']}, {data['duration_s']:.0f}s of {', '.join(data['fault_kinds'])}: "
        f"{len(data['faults'])} faults",
        f"sends: {stats.get('acknowledged', 0)} acknowledged, {stats.get('unknown', 0)} unknown, "
        f"{stats.get('failed', 0)} failed; {stats.get('records_polled', 0)} records polled",
        f"anomalies: {checker.get('counts')}; sends stuck past delivery_timeout_ms: "
        f"{data['stuck_sends']}",
        f"history: {data['history']}",
    ]
    for name, why in data["unavailable_faults"].items():
        lines.append(f"fault {name} unavailable: {why}")
    for problem in data["problems"]:
        lines.append(f"problem: {problem}")
    lines.append("VALID" if data["valid"] else f"INVALID: {', '.join(data['failing_kinds']) or 'run problems'}")
    return "\n".join(lines)


def chaos_command(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = config_from_args(args)
    log.info("chaos run: seed %d, %.0fs, faults %s, history %s", config.seed, config.duration_s,
             ",".join(k.value for k in config.faults), config.history)
    report = run_chaos(config)
    if args.output == "json":
        print(json.dumps(report.to_dict(), ensure_ascii=False, separators=(",", ":")))
    else:
        print(_text(report))
    if report.failing_kinds():
        return 1
    return 2 if report.verdict is None or report.problems else 0


def register_chaos(cluster_subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add `tidelog cluster chaos` (called from tidelog.cluster.commands.register)."""
    parser = cluster_subparsers.add_parser(
        "chaos", help="run producers and consumers under injected faults and check the history",
        description=__doc__.split("\n\n")[0] if __doc__ else None)
    add_chaos_arguments(parser)
    parser.set_defaults(handler=chaos_command)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tidelog.cluster.chaos")
    add_chaos_arguments(parser)
    return chaos_command(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
