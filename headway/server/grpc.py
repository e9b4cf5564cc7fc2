"""gRPC plumbing every server shares: server options, error mapping, request parsing, the
caller (the channel settings clients share too are in `headway.channels`).

Servicer methods stay thin: they call domain code and let `maps_errors` turn a
`HeadwayError` (or a model-format `ValueError`) into the status it names, with its message.
Requests are parsed inside the call (`ParsedRequests`, `parse_request`), so bytes that are
not the method's message are INVALID_ARGUMENT like any other bad input.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

from headway.channels import CHANNEL_OPTIONS
from headway.errors import PUSHBACK_KEY, HeadwayError, InvalidArgument, Overloaded, pushback_ms
from headway.server import logs
from headway.server.auth import Caller, caller_of

log = logging.getLogger(__name__)

# Servers refuse a port another process holds (gRPC's default, SO_REUSEPORT, would let two
# trainers on one port silently split the traffic).
SERVER_OPTIONS = [*CHANNEL_OPTIONS, ("grpc.so_reuseport", 0)]

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])
# A status message travels in gRPC's trailing metadata, percent-encoded, which a client
# refuses past 8-16 KiB ("Stream removed", RESOURCE_EXHAUSTED) instead of the real status;
# messages that echo a client's value (a name of megabytes) are cut to these many
# characters of their start and end, the parts that name the field and what to do.
MESSAGE_HEAD_CHARS, MESSAGE_TAIL_CHARS = 300, 150


def caller(context: grpc.aio.ServicerContext) -> Caller:
    """Who a backend's request acts for (team, admin), as the gateway said: backends check
    the gateway's internal token before any servicer runs (`internal_auth.TokenCheck`)."""
    who = caller_of(context.invocation_metadata())
    logs.bind(team=who.team)  # this call's log lines name it
    return who


def team_of(context: grpc.aio.ServicerContext) -> str:
    """The caller's team ("" in local mode, where auth is off)."""
    return caller(context).team


def pushback_of(error: BaseException) -> tuple[tuple[str, str], ...]:
    """The trailing metadata that marks an error as retryable after a pause (Overloaded)."""
    if isinstance(error, Overloaded):
        return ((PUSHBACK_KEY, str(error.retry_after_ms)),)
    ms = pushback_ms(error)  # an upstream error relayed as it came
    return ((PUSHBACK_KEY, str(ms)),) if ms is not None else ()


def bounded(message: str) -> str:
    """`message`, its middle cut when it is too long to travel as a status message."""
    if len(message) <= MESSAGE_HEAD_CHARS + MESSAGE_TAIL_CHARS:
        return message
    cut = len(message) - MESSAGE_HEAD_CHARS - MESSAGE_TAIL_CHARS
    head, tail = message[:MESSAGE_HEAD_CHARS], message[-MESSAGE_TAIL_CHARS:]
    return f"{head} [... {cut} characters cut ...] {tail}"


async def abort_for(context: grpc.aio.ServicerContext, error: BaseException) -> None:
    """Abort the call with the status `error` stands for, the one error → status mapping
    of every server: a `HeadwayError`'s own code and message (with the retry pushback of
    an Overloaded), an upstream RPC error relayed as it came, a ValueError (a bad model
    directory or input) as INVALID_ARGUMENT, each message `bounded`. Anything else is
    re-raised (a bug: UNKNOWN).
    """
    pushback = pushback_of(error)
    if isinstance(error, HeadwayError):
        code = getattr(grpc.StatusCode, error.code)
        await context.abort(code, bounded(error.message), pushback)
    if isinstance(error, grpc.aio.AioRpcError):
        await context.abort(error.code(), bounded(error.details() or ""), pushback)
    if isinstance(error, ValueError):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, bounded(str(error)))
    raise error


# What a servicer maps to a status; anything else is a bug and surfaces as UNKNOWN.
MAPPED_ERRORS = (HeadwayError, grpc.aio.AioRpcError, ValueError)


def maps_errors(method: F) -> F:
    """Abort with the status of a mapped error (see `abort_for`)."""

    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await method(self, request, context)
        except MAPPED_ERRORS as e:
            await abort_for(context, e)

    return wrapper  # type: ignore[return-value]


def parse_request(parse: Callable[[bytes], Any], raw: bytes, method: str) -> Any:
    """`parse(raw)`, or InvalidArgument naming `method` when the bytes are not its request
    message (protobuf's DecodeError, or any deserializer's own error)."""
    try:
        message = parse(raw)
    except Exception as e:
        raise InvalidArgument(
            f"{method}: the request is not a valid message: {e}; send the method's request "
            "message (protos/headway/v1), serialized"
        ) from None
    logs.bind(model=logs.model_of(message))  # this call's log lines name it
    return message


async def streamed(out: Any) -> AsyncIterator[Any]:
    """The messages of a response-streaming handler's result, whichever way it streams: an
    async iterator of messages, or a coroutine that writes them with `context.write`."""
    if hasattr(out, "__aiter__"):
        async for item in out:
            yield item
    else:
        await out


class ParsedRequests(grpc.aio.ServerInterceptor):
    """Parse each unary request inside its call, so that bytes which are not the method's
    message answer INVALID_ARGUMENT. grpc would parse them before any handler runs and end
    the call UNKNOWN ("Unexpected DecodeError"), a status that blames the server.
    Request-streaming methods (reflection) keep grpc's own parsing."""

    def __init__(self) -> None:
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}  # by method: built once

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = details.method
        if method not in self._wrapped:
            handler = await continuation(details)
            if handler is None or handler.request_streaming or not handler.request_deserializer:
                return handler
            self._wrapped[method] = _parsed(handler, method)
        return self._wrapped[method]


def _parsed(handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
    """`handler` receiving raw bytes and parsing them itself (see `ParsedRequests`)."""
    parse = handler.request_deserializer

    async def request(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
        try:
            return parse_request(parse, raw, method)
        except InvalidArgument as e:
            await abort_for(context, e)

    if handler.response_streaming:
        inner = handler.unary_stream

        async def stream(raw: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            async for item in streamed(inner(await request(raw, context), context)):
                yield item

        return handler._replace(request_deserializer=None, unary_stream=stream)
    unary = handler.unary_unary

    async def call(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
        return await unary(await request(raw, context), context)

    return handler._replace(request_deserializer=None, unary_unary=call)


async def add_health_and_reflection(server: grpc.aio.Server, services: tuple[str, ...]) -> Any:
    """Serve the standard health service (every service SERVING) and server reflection.

    Returns the health servicer, for a process whose health depends on others (the
    gateway's, see `gateway.health`) to update with `await servicer.set(name, status)`.
    """
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection

    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    for name in ("", *services):
        await servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        (*services, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    return servicer


def bind(server: grpc.aio.Server, address: str, what: str) -> int:
    """Bind `server` to `address`; the port, or OSError naming the service and address."""
    try:
        port = server.add_insecure_port(address)
    except RuntimeError as e:  # grpc raises this when the port is taken
        raise OSError(f"cannot bind the {what} to {address}: {e}") from None
    if port == 0:
        raise OSError(f"cannot bind the {what} to {address}")
    return port


async def until_signalled() -> None:
    """Return at the first SIGINT or SIGTERM (a service's graceful-stop point)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
