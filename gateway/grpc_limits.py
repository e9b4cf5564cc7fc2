"""Admission on the gateway's gRPC port: request size per service, a slot of the caller's
team, and Redis failures as UNAVAILABLE.

gRPC Python has one receive limit per server, and training needs 256 MiB; sampling,
traces and models do not. One server interceptor wraps every method so that it receives
the raw request bytes, and before anything parses them:

1. refuses a request over its service's limit (RESOURCE_EXHAUSTED naming the limit and
   the config field that sets it; `GatewayConfig.max_*_request_bytes`);
2. for the contract's services, takes a slot of the caller's team (`gateway.team_slots`)
   for the whole call, stream included (a team at its limit: RESOURCE_EXHAUSTED with a
   retry pushback), after authenticating it (UNAUTHENTICATED as before);
3. parses the request with the method's own deserializer (INVALID_ARGUMENT if it is not
   one), then runs the servicer.

A Redis failure anywhere below becomes UNAVAILABLE (`gateway.redis_errors`). Health and
reflection get the size check only: load balancers call them without a key.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import grpc

from gateway.redis_errors import REDIS_ERRORS, RedisFailures
from gateway.team_slots import TeamSlots
from headway.errors import ResourceExhausted
from headway.server.grpc import MAPPED_ERRORS, abort_for, parse_request, streamed

Ctx = grpc.aio.ServicerContext
Metadata = Sequence[tuple[str, str]]


@dataclass(frozen=True)
class SizeLimit:
    """The largest request of a service, and the config field that sets it (for messages)."""

    bytes: int
    field: str


class CallLimits(grpc.aio.ServerInterceptor):
    """The interceptor (see the module doc).

    `limits`: per full service name ("headway.v1.SamplingService"); these services are
    per-team. `other`: the limit of every other service (health, reflection).
    `team_of(metadata)` authenticates the caller and names its team.
    """

    def __init__(
        self,
        limits: dict[str, SizeLimit],
        other: SizeLimit,
        team_of: Callable[[Metadata], str],
        slots: TeamSlots,
        failures: RedisFailures,
    ) -> None:
        self.limits, self.other, self.team_of, self.slots = limits, other, team_of, slots
        self.failures = failures
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}  # by method: built once

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = details.method  # "/headway.v1.SamplingService/Sample"
        if method in self._wrapped:
            return self._wrapped[method]
        handler = await continuation(details)
        if handler is None:
            return None
        self._wrapped[method] = self._wrap(handler, method)
        return self._wrapped[method]

    def _wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        service = method.lstrip("/").partition("/")[0]
        limit = self.limits.get(service, self.other)
        per_team = service in self.limits
        parse = handler.request_deserializer or (lambda raw: raw)
        if handler.request_streaming:  # reflection: each message is checked as it comes
            return handler._replace(request_deserializer=_capped(parse, limit, method))
        if handler.response_streaming:
            behavior = self._streaming(handler.unary_stream, parse, limit, method, per_team)
            return handler._replace(request_deserializer=None, unary_stream=behavior)
        behavior = self._unary(handler.unary_unary, parse, limit, method, per_team)
        return handler._replace(request_deserializer=None, unary_unary=behavior)

    @contextmanager
    def _slot(self, context: Ctx, per_team: bool) -> Iterator[None]:
        if not per_team:
            yield
            return
        with self.slots.hold(self.team_of(context.invocation_metadata())):
            yield

    def _unary(
        self, inner: Any, parse: Callable[[bytes], Any], limit: SizeLimit, method: str, team: bool
    ) -> Callable[[bytes, Ctx], Awaitable[Any]]:
        async def behavior(raw: bytes, context: Ctx) -> Any:
            try:
                _check_size(raw, limit, method)
                with self._slot(context, team):
                    return await inner(parse_request(parse, raw, method), context)
            except REDIS_ERRORS as e:
                await abort_for(context, self.failures.unavailable(e))
            except MAPPED_ERRORS as e:
                await abort_for(context, e)

        return behavior

    def _streaming(
        self, inner: Any, parse: Callable[[bytes], Any], limit: SizeLimit, method: str, team: bool
    ) -> Callable[[bytes, Ctx], AsyncIterator[Any]]:
        async def behavior(raw: bytes, context: Ctx) -> AsyncIterator[Any]:
            try:
                _check_size(raw, limit, method)
                with self._slot(context, team):
                    out = inner(parse_request(parse, raw, method), context)
                    async for item in streamed(out):
                        yield item
            except REDIS_ERRORS as e:
                await abort_for(context, self.failures.unavailable(e))
            except MAPPED_ERRORS as e:
                await abort_for(context, e)

        return behavior


def _too_big(size: int, limit: SizeLimit, method: str) -> ResourceExhausted:
    return ResourceExhausted(
        f"{method} request is {size} bytes, over this gateway's limit of {limit.bytes} bytes "
        f"for the service ({limit.field}): send smaller requests (split the batch)"
    )


def _check_size(raw: bytes, limit: SizeLimit, method: str) -> None:
    if len(raw) > limit.bytes:
        raise _too_big(len(raw), limit, method)


def _capped(parse: Callable[[bytes], Any], limit: SizeLimit, method: str) -> Callable:
    def deserialize(raw: bytes) -> Any:
        if len(raw) > limit.bytes:
            raise _too_big(len(raw), limit, method)
        return parse(raw)

    return deserialize
