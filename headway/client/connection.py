"""`Connection`: a grpc.aio channel to the gateway, with auth metadata, retries and the
mapping of a failed call's status to a `HeadwayError`.

Retries never apply a call twice: only requests that are safe to send again are retried
(reads, and writes whose request id makes the server apply them at most once; see
`headway.client.rpcs`), and the same request object is sent on every attempt.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, TypeVar

import grpc

from headway.channels import CHANNEL_OPTIONS
from headway.client.rpcs import Call
from headway.client.settings import ClientSettings, retry_delay
from headway.errors import HeadwayError, from_rpc_error, pushback_ms

__all__ = ["Connection", "error_from_rpc"]

T = TypeVar("T")


def error_from_rpc(e: grpc.RpcError) -> HeadwayError:
    """The `HeadwayError` subclass of a failed call's status, with the server's message
    (`headway.errors.from_rpc_error`)."""
    return from_rpc_error(e)


class Connection:
    """A grpc.aio channel to the gateway, with auth metadata, retries and error mapping.

    grpc.aio channels belong to the event loop they were created on, so the channel is
    made lazily inside the running loop and remade when a later call runs on another loop
    (e.g. two `asyncio.run`s in one script).
    """

    def __init__(self, settings: ClientSettings) -> None:
        self.settings = settings
        self._loop: asyncio.AbstractEventLoop | None = None
        self._channel: grpc.aio.Channel | None = None
        self._stubs: dict[type, Any] = {}

    def stub(self, cls: type[T]) -> T:
        """The `cls` stub on this loop's channel (opening the channel if needed)."""
        loop = asyncio.get_running_loop()
        if self._channel is None or self._loop is not loop:
            target, secure = self.settings.target
            kwargs: dict[str, Any] = {
                "options": CHANNEL_OPTIONS,
                "interceptors": list(self.settings.interceptors) or None,
            }
            if secure:
                channel = grpc.aio.secure_channel(target, grpc.ssl_channel_credentials(), **kwargs)
            else:
                channel = grpc.aio.insecure_channel(target, **kwargs)
            # A channel of a previous loop cannot be closed from this one; it is dropped.
            self._channel, self._loop, self._stubs = channel, loop, {}
        if cls not in self._stubs:
            self._stubs[cls] = cls(self._channel)
        return self._stubs[cls]

    async def call(self, call: Call, *, retry: bool = True) -> Any:
        """Make `call`, retrying UNAVAILABLE, raising `HeadwayError`.

        Only requests that are safe to send twice may be retried: reads, and writes whose
        request_id makes the server apply them at most once. The request object (and so
        its request_id) is the same on every attempt. Retries stop `retry_timeout` seconds
        after the first attempt (and after `max_retries` retries, if set).
        """
        s = self.settings
        attempt = 0
        give_up = time.monotonic() + s.retry_timeout
        while True:
            try:
                rpc = getattr(self.stub(call.stub), call.method)
                return await rpc(call.request, metadata=s.metadata, timeout=s.timeout)
            except grpc.aio.AioRpcError as e:
                # A server at capacity refused the call before doing anything (it says
                # when to come back): always safe to send again.
                pushback = (
                    pushback_ms(e) if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED else None
                )
                retryable = pushback is not None or (
                    retry and e.code() == grpc.StatusCode.UNAVAILABLE
                )
                left = give_up - time.monotonic()
                if s.max_retries is not None and attempt >= s.max_retries:
                    left = 0.0
                if retryable and left > 0:
                    at_least = pushback / 1000 if pushback is not None else 0.0
                    await asyncio.sleep(min(retry_delay(attempt, s.retry_backoff, at_least), left))
                    attempt += 1
                    continue
                raise error_from_rpc(e) from e

    async def close(self) -> None:
        """Close the channel (a later call opens a new one)."""
        if self._channel is not None and self._loop is asyncio.get_running_loop():
            await self._channel.close()
        self._channel, self._loop, self._stubs = None, None, {}
