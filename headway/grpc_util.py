"""gRPC plumbing every server shares: message limits, error mapping, the caller's team.

Servicer methods stay thin: they call domain code and let `maps_errors` turn a
`HeadwayError` (or a model-format `ValueError`) into the status it names, with its message.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc

from headway.errors import HeadwayError

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 256 * 1024 * 1024  # training batches and logprob tensors are large
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]
# Servers refuse a port another process holds (gRPC's default, SO_REUSEPORT, would let two
# trainers on one port silently split the traffic).
SERVER_OPTIONS = [*CHANNEL_OPTIONS, ("grpc.so_reuseport", 0)]
# Set by the gateway after it authenticated the caller's key; services behind it trust it.
TEAM_HEADER = "x-headway-team"

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def team_of(context: grpc.aio.ServicerContext) -> str:
    """The caller's team ("" in local mode, where auth is off)."""
    for key, value in context.invocation_metadata() or ():
        if key == TEAM_HEADER:
            return value
    return ""


def maps_errors(method: F) -> F:
    """Abort with a `HeadwayError`'s status; ValueError (bad model input) → INVALID_ARGUMENT."""

    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await method(self, request, context)
        except HeadwayError as e:
            await context.abort(getattr(grpc.StatusCode, e.code), e.message)
        except ValueError as e:  # ModelError and friends: a bad model directory or input
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))

    return wrapper  # type: ignore[return-value]
