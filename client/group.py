"""Consumer-group membership on the client side (KIP-848's consumer protocol, DESIGN.md §7).

`GroupCoordinatorClient` finds a group's coordinator (FindCoordinator to any node) and sends it
calls, finding it again after NOT_COORDINATOR, COORDINATOR_NOT_AVAILABLE,
COORDINATOR_LOAD_IN_PROGRESS or a transport failure. The admin client uses it as it is.

`GroupMembership` is one consumer's membership: a background task heartbeats at the interval the
coordinator returns, carrying the subscription and the partitions the consumer owns, and
reconciles the consumer with each assignment it receives:

1. revoke first: the partitions owned but no longer assigned are handed to the consumer's
   `revoke_partitions` (it stops fetching them, commits their positions when auto-commit is on,
   calls on_revoke), and only then reported gone, by their absence from the next heartbeat,
   which is sent at once;
2. then assign: the newly assigned partitions go to `assign_partitions` (committed offsets are
   fetched, on_assign is called).

The coordinator hands a partition to a new member only after its previous owner reported it
gone, so no partition is consumed by two members at once. A member that is fenced
(UNKNOWN_MEMBER_ID, FENCED_MEMBER_EPOCH) has lost its partitions: they are revoked as lost (no
commit, since a commit would be refused and another member may already own them) and the
member rejoins with epoch 0. A member that has not heard from its coordinator for a whole
session timeout gives its partitions up the same way, because by then the coordinator has
given them to someone else; a lost membership stops delivering every partition at once, before
its on_revoke (which may wait for the application) runs. A member whose application has not
been in `poll` for the poll timeout (max_poll_interval_ms, Kafka's KIP-62 poll timer) leaves
with epoch -1, its partitions lost, and joins again at the next poll.
"""

from __future__ import annotations

import asyncio
import contextvars
import enum
import inspect
import logging
import re
import time
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Callable, Iterable, Mapping, Protocol

import grpc

from tidelog.client._loop import wait_event
from tidelog.client.connection import (
    ClusterUnreachableError,
    Connections,
    Metadata,
    describe_rpc_error,
    is_retriable_rpc_error,
)
from tidelog.client.types import TopicPartition
from tidelog.proto import api_pb2, api_pb2_grpc, common_pb2
from tidelog.proto.common_pb2 import ErrorCode
from tidelog.proto.errors import TidelogError, is_retriable

log = logging.getLogger(__name__)

JOIN_EPOCH = 0
LEAVE_EPOCH = -1
STATIC_LEAVE_EPOCH = -2

# Answers after which the coordinator must be found again (it moved, or is still loading).
COORDINATOR_ERRORS = frozenset(
    {
        ErrorCode.NOT_COORDINATOR,
        ErrorCode.COORDINATOR_NOT_AVAILABLE,
        ErrorCode.COORDINATOR_LOAD_IN_PROGRESS,
    }
)
# Answers that mean this member is no longer in the group: its partitions are lost.
FENCED_ERRORS = frozenset({ErrorCode.UNKNOWN_MEMBER_ID, ErrorCode.FENCED_MEMBER_EPOCH})

_MAX_BACKOFF = 1.0


class MemberState(enum.Enum):
    UNSUBSCRIBED = "unsubscribed"  # not in the group (before subscribe, after unsubscribe)
    JOINING = "joining"  # sending epoch 0 until the coordinator admits the member
    STABLE = "stable"  # owns exactly its assignment
    RECONCILING = "reconciling"  # revoking/assigning toward a new assignment
    FENCED = "fenced"  # lost its partitions; rejoins next
    LEAVING = "leaving"  # sending the leave heartbeat
    FATAL = "fatal"  # an error the member cannot recover from (e.g. FENCED_INSTANCE_ID)


_S = MemberState
# The moves a membership may make; `_move` raises at once on any other (a client bug, not input).
MEMBER_TRANSITIONS: Mapping[MemberState, frozenset[MemberState]] = MappingProxyType(
    {
        _S.UNSUBSCRIBED: frozenset({_S.JOINING, _S.UNSUBSCRIBED}),
        _S.JOINING: frozenset({_S.STABLE, _S.RECONCILING, _S.FENCED, _S.LEAVING, _S.FATAL, _S.UNSUBSCRIBED}),
        _S.STABLE: frozenset({_S.RECONCILING, _S.FENCED, _S.LEAVING, _S.FATAL, _S.JOINING}),
        _S.RECONCILING: frozenset({_S.STABLE, _S.FENCED, _S.LEAVING, _S.FATAL, _S.JOINING}),
        _S.FENCED: frozenset({_S.JOINING, _S.LEAVING, _S.FATAL, _S.UNSUBSCRIBED}),
        _S.LEAVING: frozenset({_S.UNSUBSCRIBED}),
        _S.FATAL: frozenset({_S.UNSUBSCRIBED, _S.FATAL}),
    }
)


class IllegalMemberTransition(RuntimeError):
    """The membership tried a move MEMBER_TRANSITIONS forbids."""


def compile_pattern(pattern: str | re.Pattern[str]) -> re.Pattern[str]:
    """A subscription pattern: a compiled regex as given, or a string compiled (ValueError if
    it is not a valid regex)."""
    if isinstance(pattern, re.Pattern):
        return pattern
    if not isinstance(pattern, str):
        raise TypeError(f"pattern must be a str or re.Pattern, not {type(pattern).__name__}")
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"invalid subscription pattern {pattern!r}: {exc}") from None


def topics_matching(pattern: re.Pattern[str], topics: Iterable[str]) -> tuple[str, ...]:
    """The topics a pattern subscription covers: whole-name matches, as Java's
    ``Pattern.matcher(topic).matches()`` and KIP-848's SubscribedTopicRegex, leaving out the
    internal ``__`` topics (Kafka's exclude.internal.topics)."""
    return tuple(sorted(t for t in topics if not t.startswith("__") and pattern.fullmatch(t)))


class MembershipHost(Protocol):
    """What the membership needs from its consumer."""

    async def revoke_partitions(self, partitions: frozenset[TopicPartition], lost: bool) -> None:
        """Stop fetching ``partitions``; unless ``lost``, commit their positions (auto-commit);
        then call on_revoke. Must not raise."""

    async def assign_partitions(self, partitions: frozenset[TopicPartition]) -> None:
        """Start fetching ``partitions`` from their committed offsets; call on_assign."""

    def halt_partitions(self) -> None:
        """The membership is lost: stop fetching and delivering every partition now, before
        the revocation (as lost) that follows, which may wait behind a pending callback."""

    @property
    def callbacks_running(self) -> int:
        """How many application callbacks (on_assign, on_revoke, or the application's return
        to poll before a revocation) are running or waiting to run now."""


@dataclass(frozen=True, slots=True)
class Coordinator:
    node_id: int
    address: str
    partition: int  # the `__consumer_offsets` partition that holds the group


def _tp(tp: TopicPartition) -> common_pb2.TopicPartition:
    return common_pb2.TopicPartition(topic=tp.topic, partition=tp.partition)


class GroupCoordinatorClient:
    """Calls to the coordinator of one group, found (and found again) with FindCoordinator."""

    def __init__(
        self,
        group_id: str,
        connections: Connections,
        metadata: Metadata,
        *,
        request_timeout: float,
        retry_backoff: float,
    ) -> None:
        self.group_id = group_id
        self.connections = connections
        self.metadata = metadata
        self.request_timeout = request_timeout
        self.retry_backoff = retry_backoff
        self.coordinator: Coordinator | None = None

    def forget(self) -> None:
        self.coordinator = None

    async def find(self, timeout: float | None = None) -> Coordinator:
        """The coordinator, asking any node once when it is not known; raises TidelogError.

        Within ``timeout`` seconds overall (default request_timeout per node asked): a caller
        with a deadline (a heartbeat bounded by the session, a close) must not wait out a
        request timeout on every node that hangs."""
        if self.coordinator is not None:
            return self.coordinator
        request = api_pb2.FindCoordinatorRequest(group_id=self.group_id)
        deadline = None if timeout is None else time.monotonic() + timeout

        async def ask(address: str) -> api_pb2.FindCoordinatorResponse:
            budget = self.request_timeout
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise ClusterUnreachableError(
                        f"no coordinator found for group {self.group_id!r} within {timeout:.1f} s")
                budget = min(budget, remaining)
            return await self.connections.groups(address).FindCoordinator(request, timeout=budget)

        response = await self.metadata.call_any(ask, what="find-coordinator request")
        if response.error != ErrorCode.NONE:
            raise TidelogError(
                response.error,
                response.error_message or f"no coordinator for group {self.group_id!r} yet",
            )
        self.coordinator = Coordinator(
            response.node_id, f"{response.host}:{response.port}", response.partition
        )
        return self.coordinator

    async def call_once(
        self,
        method: str,
        request: Any,
        error_of: Callable[[Any], int],
        *,
        timeout: float | None = None,
    ) -> Any:
        """One attempt at the coordinator: the answer, or a TidelogError (retriable ones for a
        coordinator that moved or did not answer, after which it is looked up again)."""
        budget = self.request_timeout if timeout is None else timeout
        deadline = time.monotonic() + budget
        coordinator = await self.find(budget)
        try:
            if method == "OffsetCommit":
                response = await self.connections.commit_stream(coordinator.address).commit(
                    request, max(0.05, deadline - time.monotonic()))
            else:
                response = await getattr(self.connections.groups(coordinator.address), method)(
                    request, timeout=max(0.05, deadline - time.monotonic())
                )
        except grpc.aio.AioRpcError as exc:
            self.forget()
            if not is_retriable_rpc_error(exc):
                raise TidelogError(
                    ErrorCode.UNKNOWN_SERVER_ERROR, describe_rpc_error(exc, coordinator.address)
                ) from None
            raise ClusterUnreachableError(describe_rpc_error(exc, coordinator.address)) from None
        code = error_of(response)
        if code in COORDINATOR_ERRORS:
            self.forget()
            raise TidelogError(code, getattr(response, "error_message", "") or f"group {self.group_id!r}")
        return response

    async def call(
        self,
        method: str,
        request: Any,
        error_of: Callable[[Any], int],
        timeout: float,
        *,
        retry_on: Callable[[Any], bool] | None = None,
    ) -> Any:
        """`call_once` again (with backoff) while the coordinator moves, is unreachable, or
        ``retry_on(answer)`` holds, until ``timeout`` seconds have passed."""
        deadline = time.monotonic() + timeout
        backoff = self.retry_backoff
        while True:
            try:
                response = await self.call_once(
                    method, request, error_of,
                    timeout=max(0.05, min(self.request_timeout, deadline - time.monotonic())),
                )
                if retry_on is None or not retry_on(response):
                    return response
                error: TidelogError = TidelogError(
                    error_of(response), getattr(response, "error_message", "")
                )
            except TidelogError as exc:
                if not exc.retriable:
                    raise
                error = exc
            if time.monotonic() + backoff >= deadline:
                raise error
            log.debug("group %s: %s; retrying in %.2f s", self.group_id, error, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, _MAX_BACKOFF)

    # --- offsets (used by members and by the admin client) -------------------------------------

    async def commit(
        self,
        offsets: Mapping[TopicPartition, int],
        member: Callable[[], tuple[str, int]],
        timeout: float,
        *,
        select: Callable[[Mapping[TopicPartition, int]], Mapping[TopicPartition, int]] | None = None,
    ) -> None:
        """OffsetCommit, fenced by the member's id and epoch as ``member()`` gives them at each
        attempt (("", -1) for an admin or a consumer outside the group's membership).

        STALE_MEMBER_EPOCH is retried: the member's epoch moved on between reading it and the
        coordinator's check, and the next heartbeat's answer brings the new one (as Kafka's
        consumer retries with the latest epoch). The coordinator fences by epoch only, so a
        retry with the newer epoch would also pass for a partition revoked meanwhile and
        already committed by its new owner: ``select(offsets)``, asked at each attempt, gives
        what may still be sent (a member's own partitions) or raises."""

        def build(member_id: str, epoch: int) -> api_pb2.OffsetCommitRequest | None:
            nonlocal offsets
            if select is not None:
                offsets = select(offsets)
            if not offsets:
                return None
            return api_pb2.OffsetCommitRequest(
                group_id=self.group_id,
                member_id=member_id,
                member_epoch=epoch,
                partitions=[
                    api_pb2.OffsetCommitPartition(
                        topic=tp.topic, partition=tp.partition, offset=offset, leader_epoch=-1
                    )
                    for tp, offset in sorted(offsets.items())
                ],
            )

        response = await self._call_fenced("OffsetCommit", build, member, timeout,
                                           f"committing offsets of group {self.group_id!r}")
        if response is None:
            return
        for result in response.partitions:
            if result.error != ErrorCode.NONE:
                raise TidelogError(result.error, f"committing {result.topic}-{result.partition}")

    async def _call_fenced(
        self,
        method: str,
        build: Callable[[str, int], Any],
        member: Callable[[], tuple[str, int]],
        timeout: float,
        what: str,
    ) -> Any:
        """Send ``build(member_id, epoch)`` (None: nothing to send, and None is returned) until
        the answer is not STALE_MEMBER_EPOCH, which is retried with the member's epoch as it is
        then, backing off, while ``timeout`` allows; an error answer raises."""
        deadline = time.monotonic() + timeout
        backoff = self.retry_backoff
        while True:
            request = build(*member())
            if request is None:
                return None
            response = await self.call(
                method, request, lambda r: r.error, max(0.05, deadline - time.monotonic()),
                retry_on=lambda r: is_retriable(r.error),
            )
            if response.error == ErrorCode.STALE_MEMBER_EPOCH and time.monotonic() + backoff < deadline:
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _MAX_BACKOFF)
                continue
            if response.error != ErrorCode.NONE:
                raise TidelogError(response.error, response.error_message or what)
            return response

    async def fetch_committed(
        self,
        partitions: Iterable[TopicPartition] | None,
        member: Callable[[], tuple[str, int]],
        timeout: float,
    ) -> dict[TopicPartition, int | None]:
        """OffsetFetch: the committed offset of each partition (None: nothing committed);
        ``partitions`` None asks for everything the group has committed."""
        wanted = None if partitions is None else sorted(set(partitions))
        response = await self._call_fenced(
            "OffsetFetch",
            lambda member_id, epoch: api_pb2.OffsetFetchRequest(
                group_id=self.group_id, member_id=member_id, member_epoch=epoch,
                partitions=[_tp(tp) for tp in wanted or ()]),
            member, timeout, f"fetching offsets of group {self.group_id!r}")
        result: dict[TopicPartition, int | None] = {tp: None for tp in wanted or ()}
        for entry in response.offsets:
            result[TopicPartition(entry.topic, entry.partition)] = (
                entry.offset if entry.offset >= 0 else None
            )
        return result


async def call_callback(callback: Callable[[set[TopicPartition]], Any] | None,
                        partitions: frozenset[TopicPartition], what: str) -> None:
    """Run a user's on_assign/on_revoke (a function or a coroutine function), logging what it
    raises: a failing callback must not leave the membership half-reconciled."""
    if callback is None:
        return
    try:
        result = callback(set(partitions))
        if inspect.isawaitable(result):
            await result
    except Exception:  # noqa: BLE001 - user code; reported, never fatal to the membership
        log.exception("the %s callback raised", what)


class GroupMembership:
    """One consumer's membership in a group; see the module docstring."""

    def __init__(
        self,
        coordinator: GroupCoordinatorClient,
        host: MembershipHost,
        *,
        instance_id: str | None,
        server_assignor: str | None,
        rebalance_timeout_ms: int,
        session_timeout_ms: int,
        client_id: str,
    ) -> None:
        self.coordinator = coordinator
        self.group_id = coordinator.group_id
        self.host = host
        self.instance_id = instance_id
        self.server_assignor = server_assignor
        self.rebalance_timeout_ms = rebalance_timeout_ms
        self.session_timeout = session_timeout_ms / 1000.0
        self.client_id = client_id
        self.state = MemberState.UNSUBSCRIBED
        self.member_id = ""
        self.member_epoch = JOIN_EPOCH
        self.owned: frozenset[TopicPartition] = frozenset()
        self.topics: tuple[str, ...] = ()
        self.heartbeat_interval = 1.0  # until the coordinator says
        self.fatal_error: TidelogError | None = None
        self._last_heartbeat_ok = time.monotonic()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # Reconciliation runs beside the heartbeats, so a slow commit or a slow on_revoke (or,
        # for the sync Consumer, an application between two polls) never stops the member from
        # heartbeating; the coordinator's rebalance timeout bounds how long it may take.
        self._target: frozenset[TopicPartition] | None = None
        self._reconciler: asyncio.Task[None] | None = None
        self._stopping = False
        # Set whenever the membership reaches STABLE (for tests and `wait_stable`).
        self._stable = asyncio.Event()
        # Kafka's max.poll.interval.ms (KIP-62): the heartbeats run on their own, so without
        # this an application stuck between polls would hold its partitions for ever.
        self.poll_timeout = rebalance_timeout_ms / 1000.0
        self.last_poll = time.monotonic()
        self._poll_expired = False
        # A leave heartbeat close sent without waiting for its answer (no time left).
        self._fired_leave: asyncio.Task[None] | None = None

    # --- state ---------------------------------------------------------------------------------

    def _move(self, new: MemberState) -> None:
        if new not in MEMBER_TRANSITIONS[self.state]:
            raise IllegalMemberTransition(f"{self.state.name} -> {new.name}")
        log.debug("group %s member %s: %s -> %s", self.group_id, self.member_id, self.state.name, new.name)
        self.state = new
        if new is MemberState.STABLE:
            self._stable.set()
        else:
            self._stable.clear()

    def member(self) -> tuple[str, int]:
        """The (member id, epoch) that fences this member's commits and offset fetches."""
        if self.member_id and self.state in (MemberState.STABLE, MemberState.RECONCILING):
            return self.member_id, self.member_epoch
        # Not (yet) a member: commit as a consumer outside the membership would.
        return "", -1

    # --- lifecycle -----------------------------------------------------------------------------

    def subscribe(self, topics: Iterable[str]) -> None:
        """Join (or change the subscription of) the group; heartbeats start at once."""
        self.topics = tuple(sorted(set(topics)))
        if self.state in (MemberState.UNSUBSCRIBED, MemberState.FENCED):
            self._move(MemberState.JOINING)
        self.wake()

    def start(self) -> None:
        """Start the heartbeat task (needs the running loop)."""
        if self._task is None or self._task.done():
            self._stopping = False
            self._task = asyncio.get_running_loop().create_task(self._run())

    def wake(self) -> None:
        self._wake.set()

    def note_poll(self) -> None:
        """The application polled: the poll timer starts again, and a member that left because
        it had not polled for the poll timeout joins again."""
        self.last_poll = time.monotonic()
        if self._poll_expired:
            self._poll_expired = False
            if self.state is MemberState.FENCED:
                self._move(MemberState.JOINING)
                self.wake()

    async def wait_stable(self, timeout: float) -> bool:
        return await wait_event(self._stable, timeout)

    async def leave(self, timeout: float) -> None:
        """Give up every partition (committing under auto-commit, on_revoke) and leave at once:
        epoch -1, or -2 for a static member, which keeps its assignment for its return.

        ``timeout`` seconds is one deadline for all of it but the application's callbacks (the
        host's commit keeps to its own, the consumer's close deadline): a reconciliation still
        waiting on the coordinator past it is cut off, and with no time left for the leave
        heartbeat it is still sent, but not waited for (`_fire_leave`)."""
        deadline = time.monotonic() + timeout
        task, self._task = self._task, None
        self._stopping = True
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        self._target = None
        await self._settle_reconciler(deadline)
        if self.owned:
            owned, self.owned = self.owned, frozenset()
            await self.host.revoke_partitions(owned, lost=False)
        if self.state in (MemberState.UNSUBSCRIBED, MemberState.FATAL) or not self.member_id:
            self._move(MemberState.UNSUBSCRIBED)
            return
        self._move(MemberState.LEAVING)
        remaining = deadline - time.monotonic()
        if remaining > 0:
            await self._send_leave(remaining)
        else:
            self._fire_leave()
        self._move(MemberState.UNSUBSCRIBED)
        self.member_epoch = JOIN_EPOCH
        if not self.instance_id:
            self.member_id = ""

    def _leave_request(self, *, for_good: bool = False) -> api_pb2.ConsumerGroupHeartbeatRequest:
        """The leave heartbeat: epoch -1, or -2 for a static member (its assignment waits for
        its return) unless ``for_good``."""
        epoch = STATIC_LEAVE_EPOCH if self.instance_id and not for_good else LEAVE_EPOCH
        return api_pb2.ConsumerGroupHeartbeatRequest(
            group_id=self.group_id,
            member_id=self.member_id,
            member_epoch=epoch,
            instance_id=self.instance_id or "",
            rebalance_timeout_ms=-1,
            client_id=self.client_id,
        )

    def _fire_leave(self) -> None:
        """Send the leave heartbeat without waiting for its answer (a close with no time left):
        otherwise the group waits a whole session timeout to move the partitions on. It goes on a channel of its own, in a task that is not the
        consumer's, since the consumer's channels and tasks end as its close returns; its
        answer is only logged. Without a known coordinator there is nowhere to send it."""
        coordinator = self.coordinator.coordinator
        if coordinator is None:
            log.info("group %s: no time left to find the coordinator; the session timeout will "
                     "remove the member", self.group_id)
            return
        self._fired_leave = asyncio.get_running_loop().create_task(
            self._send_fired_leave(coordinator.address, self._leave_request(), self._heartbeat_timeout()),
            context=contextvars.Context())

    async def _send_fired_leave(self, address: str, request: api_pb2.ConsumerGroupHeartbeatRequest,
                                timeout: float) -> None:
        channel = grpc.aio.insecure_channel(address)
        try:
            response = await api_pb2_grpc.GroupsStub(channel).ConsumerGroupHeartbeat(request, timeout=timeout)
            if response.error != ErrorCode.NONE:
                log.info("group %s: leaving answered %s; the session timeout will remove the member",
                         self.group_id, ErrorCode.Name(response.error))
        except grpc.aio.AioRpcError as exc:
            log.info("group %s: leaving failed (%s); the session timeout will remove the member",
                     self.group_id, describe_rpc_error(exc, address))
        finally:
            await channel.close()

    async def _send_leave(self, timeout: float, *, for_good: bool = False) -> None:
        try:
            await self.coordinator.call(
                "ConsumerGroupHeartbeat", self._leave_request(for_good=for_good), lambda r: r.error, timeout
            )
        except TidelogError as exc:
            # The session timeout removes the member anyway; leaving is only the fast path.
            log.info("group %s: leaving failed (%s); the session timeout will remove the member",
                     self.group_id, exc)

    async def _leave_for_poll_timeout(self) -> None:
        """The application has not polled for the poll timeout: leave now so the partitions
        move on (handed out no more, not committed: the application may not have handled
        what it was given), and join again at its next poll (`note_poll`)."""
        log.warning("group %s: no poll for %.1f s (max_poll_interval_ms); leaving the group until "
                    "the application polls again", self.group_id, self.poll_timeout)
        self._poll_expired = True
        self._target = None
        self.host.halt_partitions()
        # A static member too leaves with -1 (as Kafka's does): its partitions must move on.
        await self._send_leave(self._heartbeat_timeout(), for_good=True)
        # A pending callback (sync Consumer) runs when the application is back in poll.
        await self._settle_reconciler()
        self._move(MemberState.FENCED)
        await self._give_up_lost()
        self.member_epoch = JOIN_EPOCH
        self.member_id = ""
        if not self._poll_expired and self.state is MemberState.FENCED:
            self._move(MemberState.JOINING)  # polled meanwhile (on_revoke ran inside that poll)

    # --- the heartbeat loop --------------------------------------------------------------------

    def _heartbeat_request(self) -> api_pb2.ConsumerGroupHeartbeatRequest:
        joining = self.state is MemberState.JOINING
        return api_pb2.ConsumerGroupHeartbeatRequest(
            group_id=self.group_id,
            member_id=self.member_id,
            member_epoch=JOIN_EPOCH if joining else self.member_epoch,
            instance_id=self.instance_id or "",
            rebalance_timeout_ms=self.rebalance_timeout_ms,
            # A full heartbeat every time: a few topic names are cheap, and the owned
            # partitions must always be reported, since a revocation is acknowledged only by
            # their absence.
            has_subscription=True,
            subscribed_topics=list(self.topics),
            server_assignor=self.server_assignor or "",
            has_owned_partitions=True,
            owned_partitions=[_tp(tp) for tp in sorted(self.owned)],
            client_id=self.client_id,
        )

    def _heartbeat_timeout(self) -> float:
        # A heartbeat that hangs (a paused coordinator) must not outlast the session.
        return max(0.5, min(self.coordinator.request_timeout, self.session_timeout / 3))

    async def _run(self) -> None:
        try:
            await self._heartbeat_loop()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a client bug: surface it from poll rather than hang silently
            log.exception("group %s: the heartbeat loop failed", self.group_id)
            self.fatal_error = TidelogError(ErrorCode.UNKNOWN_SERVER_ERROR, f"group membership failed: {exc!r}")

    async def _heartbeat_loop(self) -> None:
        backoff = self.coordinator.retry_backoff
        while not self._stopping:
            if self.state not in (MemberState.JOINING, MemberState.STABLE, MemberState.RECONCILING):
                self._wake.clear()
                await self._wake.wait()
                continue
            self._wake.clear()
            started = time.monotonic()
            if (self.state in (MemberState.STABLE, MemberState.RECONCILING)
                    and started - self.last_poll > self.poll_timeout):
                await self._leave_for_poll_timeout()
                continue
            delay = self.heartbeat_interval
            try:
                response = await self.coordinator.call_once(
                    "ConsumerGroupHeartbeat", self._heartbeat_request(), lambda r: r.error,
                    timeout=self._heartbeat_timeout(),
                )
            except TidelogError as exc:
                if not exc.retriable:
                    await self._fail(exc)
                    continue
                log.debug("group %s: heartbeat failed: %s", self.group_id, exc)
                await self._check_session()
                delay = backoff
                backoff = min(backoff * 2, _MAX_BACKOFF)
            else:
                backoff = self.coordinator.retry_backoff
                delay = await self._handle(response, started)
            if self._stopping:
                return
            if delay > 0 and not self._wake.is_set():
                await wait_event(self._wake, delay)

    async def _check_session(self) -> None:
        """Without a heartbeat answer for a whole session timeout the coordinator has removed
        this member and given its partitions away: stop consuming them and rejoin."""
        if time.monotonic() - self._last_heartbeat_ok >= self.session_timeout and self.state in (
            MemberState.STABLE, MemberState.RECONCILING
        ):
            log.warning("group %s: no heartbeat answer for %.1f s; partitions %s are lost",
                        self.group_id, self.session_timeout, sorted(map(str, self.owned)))
            await self._lose_partitions()

    async def _settle_reconciler(self, deadline: float | None = None) -> None:
        """Let a reconciliation in progress finish (it stops at its next step once the target
        is gone) rather than cut it off between stopping a partition and committing it; only
        past ``deadline`` (a close's) is it cancelled (what it still owns is revoked after),
        and only while it waits on the coordinator: cancelled inside the application's
        callback, the callback was cut short and its partitions, still owned, were revoked
        again with the rest. Once its callback returns it ends (the target is gone)."""
        task = self._reconciler
        if task is not None and not task.done():
            await asyncio.wait({task}, timeout=None if deadline is None else max(0.0, deadline - time.monotonic()))
            if not task.done() and not self.host.callbacks_running:
                task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        self._reconciler = None

    async def _lose_partitions(self) -> None:
        self._target = None
        # Another member may own them already: nothing more is handed out from here on, even
        # while a reconciliation in progress (waiting for the application) finishes first.
        self.host.halt_partitions()
        await self._settle_reconciler()
        self._move(MemberState.FENCED)
        await self._give_up_lost()
        self.member_epoch = JOIN_EPOCH
        self._move(MemberState.JOINING)

    async def _give_up_lost(self) -> None:
        # `owned` changes only once they are revoked: `leave` cancels this task, maybe in the
        # middle of on_revoke, and then revokes whatever is still owned.
        if self.owned:
            await self.host.revoke_partitions(self.owned, lost=True)
        self.owned = frozenset()

    async def _fail(self, error: TidelogError) -> None:
        log.error("group %s: %s", self.group_id, error)
        self.fatal_error = error
        self._target = None
        self.host.halt_partitions()
        await self._settle_reconciler()
        await self._give_up_lost()
        self._move(MemberState.FATAL)

    async def _handle(self, response: api_pb2.ConsumerGroupHeartbeatResponse, sent_at: float) -> float:
        """Act on a heartbeat answer; returns how long to wait before the next heartbeat."""
        error = response.error
        if error == ErrorCode.NONE:
            self._last_heartbeat_ok = sent_at
            self.member_id = response.member_id or self.member_id
            self.member_epoch = response.member_epoch
            if response.heartbeat_interval_ms > 0:
                self.heartbeat_interval = response.heartbeat_interval_ms / 1000.0
            if self.state is MemberState.JOINING:
                self._move(MemberState.RECONCILING)
            if response.has_assignment:
                self._target = frozenset(TopicPartition(a.topic, a.partition) for a in response.assignment)
            if self._target is not None and (self._reconciler is None or self._reconciler.done()):
                self._reconciler = asyncio.get_running_loop().create_task(self._reconcile())
            return self.heartbeat_interval
        if error in FENCED_ERRORS:
            log.info("group %s: member %s fenced (%s); rejoining", self.group_id, self.member_id,
                     response.error_message or error)
            if self.state is MemberState.JOINING:
                self.member_epoch = JOIN_EPOCH
                return self.coordinator.retry_backoff
            await self._lose_partitions()
            return 0.0
        if error == ErrorCode.UNRELEASED_INSTANCE_ID:
            # The instance's previous process is still a member until its session times out.
            log.info("group %s: %s", self.group_id, response.error_message or "instance id still held")
            return max(self.heartbeat_interval, self.coordinator.retry_backoff)
        if is_retriable(error):
            # E.g. REQUEST_TIMED_OUT: the coordinator's records did not commit in time (they
            # may still). The member is still in the group until its session says otherwise.
            log.debug("group %s: heartbeat answered %s; retrying", self.group_id, ErrorCode.Name(error))
            await self._check_session()
            return max(self.heartbeat_interval, self.coordinator.retry_backoff)
        await self._fail(TidelogError(error, response.error_message or f"heartbeat to group {self.group_id!r}"))
        return 0.0

    async def _reconcile(self) -> None:
        try:
            await self._reconcile_steps()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a client bug: surface it from poll rather than hang silently
            log.exception("group %s: reconciliation failed", self.group_id)
            self.fatal_error = TidelogError(ErrorCode.UNKNOWN_SERVER_ERROR, f"group reconciliation failed: {exc!r}")

    async def _reconcile_steps(self) -> None:
        """Move the consumer to the latest target: revoke first (then tell the coordinator at
        once), then assign; again while the target moved meanwhile."""
        while True:
            target = self._target
            if target is None or self._stopping or self.state not in (
                MemberState.STABLE, MemberState.RECONCILING
            ):
                return
            revoked = self.owned - target
            added = target - self.owned
            if not revoked and not added:
                if self.state is MemberState.RECONCILING:
                    self._move(MemberState.STABLE)
                return
            if self.state is MemberState.STABLE:
                self._move(MemberState.RECONCILING)
            if revoked:
                await self.host.revoke_partitions(revoked, lost=False)
                self.owned = self.owned - revoked
                self.wake()  # the coordinator waits for this news to hand them on
                continue  # the target may have moved while revoking
            try:
                await self.host.assign_partitions(added)
            except TidelogError as exc:
                # Most likely fenced meanwhile; the next heartbeat says so, or brings the same
                # assignment and this is tried again.
                log.warning("group %s: could not take %s: %s", self.group_id,
                            ", ".join(map(str, sorted(added))), exc)
                return
            self.owned = self.owned | added
