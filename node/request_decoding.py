"""Request bytes that do not decode are answered INVALID_ARGUMENT, not UNKNOWN.

grpc runs a handler's request deserializer before the servicer and answers any exception it
raises with UNKNOWN ("Unexpected <class ...>") and a traceback in the node's log: a client that
sent a malformed request (a foreign client, a version skew, a bug) cannot tell that from a node
failure. So the node registers its methods with no deserializer and decodes here instead: bytes
that are not the method's message get INVALID_ARGUMENT with a one-line reason, the servicer is
never called (nothing is stored), and the node serves on. An undecodable request has no
partitions or group to attach an error code to, so this is a transport-level answer, like
RESOURCE_EXHAUSTED for a request over max_request_bytes (DESIGN.md §6, §12).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import grpc
from google.protobuf.message import DecodeError

log = logging.getLogger(__name__)

Decoder = Callable[[bytes], Any]
UnaryBehavior = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]
StreamBehavior = Callable[[AsyncIterator[Any], grpc.aio.ServicerContext], AsyncIterator[Any]]

# What the decoders raise for bytes that are not their message: protobuf's parse error, and the
# hand-written decoders' ValueError (UnicodeDecodeError is one).
DECODE_ERRORS = (DecodeError, ValueError)


# A refused request is logged at most this often per service; the lines between are counted
# and reported with the next one, so a client that sends garbage in a loop cannot flood the log.
REFUSAL_LOG_INTERVAL_S = 10.0


class RefusalLog:
    """The warning lines of one service's refused requests, at most one per interval."""

    def __init__(self, interval_s: float = REFUSAL_LOG_INTERVAL_S, clock: Callable[[], float] = time.monotonic
                 ) -> None:
        self._interval_s = interval_s
        self._clock = clock
        self._next_at = float("-inf")
        self._suppressed = 0

    def refused(self, message_name: str, peer: str, reason: str) -> None:
        now = self._clock()
        if now < self._next_at:
            self._suppressed += 1
            return
        more = f" ({self._suppressed} more refused since the last such line)" if self._suppressed else ""
        log.warning("refused an undecodable %s from %s: %s%s", message_name, peer, reason, more)
        self._suppressed = 0
        self._next_at = now + self._interval_s


async def _refuse(context: grpc.aio.ServicerContext, message_name: str, exc: Exception,
                  refusals: RefusalLog) -> None:
    reason = str(exc)
    if isinstance(exc, DecodeError):  # "Error parsing message with type 'X': why" names X twice
        reason = reason.rsplit(": ", 1)[-1]
    reason = " ".join(reason.split()) or type(exc).__name__
    refusals.refused(message_name, context.peer(), reason)
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                        f"the request is not a valid {message_name}: {reason}")


def decoded_unary(behavior: UnaryBehavior, decode: Decoder, message_name: str, refusals: RefusalLog
                  ) -> UnaryBehavior:
    """``behavior`` taking raw request bytes: decoded with ``decode``, or INVALID_ARGUMENT."""

    async def handle(data: bytes, context: grpc.aio.ServicerContext) -> Any:
        try:
            request = decode(data)
        except DECODE_ERRORS as exc:
            await _refuse(context, message_name, exc, refusals)
        return await behavior(request, context)

    return handle


def decoded_stream(behavior: StreamBehavior, decode: Decoder, message_name: str, refusals: RefusalLog
                   ) -> StreamBehavior:
    """A stream-stream ``behavior`` taking raw request bytes: each decoded with ``decode``; the
    first that does not decode ends the call with INVALID_ARGUMENT (the servicer sees the
    abort come out of its request iterator)."""

    async def handle(data: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        async def requests() -> AsyncIterator[Any]:
            async for raw in data:
                try:
                    request = decode(raw)
                except DECODE_ERRORS as exc:
                    await _refuse(context, message_name, exc, refusals)
                yield request

        async for response in behavior(requests(), context):
            yield response

    return handle


def add_service(server: grpc.aio.Server, module: Any, service_name: str, servicer: Any,
                decoders: Mapping[str, Decoder] | None = None) -> None:
    """Register every method of ``service_name`` (a service of the generated ``module``) on
    ``servicer``, as the generated ``add_<Service>Servicer_to_server`` does, but decoding through
    this module; ``decoders`` replaces a method's protobuf parse (e.g. to keep records as views
    of the received bytes)."""
    service = module.DESCRIPTOR.services_by_name[service_name]
    refusals = RefusalLog()
    handlers = {}
    for method in service.methods:
        request_class = getattr(module, method.input_type.name)
        decode = (decoders or {}).get(method.name, request_class.FromString)
        encode = getattr(module, method.output_type.name).SerializeToString
        behavior = getattr(servicer, method.name)
        name = method.input_type.full_name
        if method.client_streaming and method.server_streaming:
            handlers[method.name] = grpc.stream_stream_rpc_method_handler(
                decoded_stream(behavior, decode, name, refusals), response_serializer=encode)
        elif not method.client_streaming and not method.server_streaming:
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                decoded_unary(behavior, decode, name, refusals), response_serializer=encode)
        else:  # pragma: no cover - tidelog's services have no such methods
            raise TypeError(f"{service.full_name}.{method.name}: only unary and bidirectional calls are supported")
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)
