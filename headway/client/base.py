"""What every async client shares: its `ClientSettings`, its `Connection`, closing, and
(for the model-bound ones) the model slug."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc

from headway.client.connection import Connection
from headway.client.rpcs import Call
from headway.client.settings import (
    DEFAULT_RETRY_BACKOFF,
    DEFAULT_RETRY_TIMEOUT,
    ClientSettings,
)
from headway.errors import InvalidArgument


class Client:
    """Connection plumbing shared by the async clients (built from a `ClientSettings`)."""

    def __init__(self, settings: ClientSettings) -> None:
        self._conn = Connection(settings)

    @property
    def settings(self) -> ClientSettings:
        """The client's connection settings (address and key resolved)."""
        return self._conn.settings

    @property
    def url(self) -> str:
        """The gateway address the client talks to."""
        return self._conn.settings.url

    async def _call(self, call: Call) -> Any:
        return await self._conn.call(call)

    async def close(self) -> None:
        """Close the channel (a later call opens a new one)."""
        await self._conn.close()

    async def __aenter__(self) -> Any:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class GatewayClient(Client):
    """A client of the gateway's services: its settings resolved from the arguments (the
    gateway address `HEADWAY_URL`, the key `HEADWAY_API_KEY`, retries, a deadline)."""

    def __init__(
        self,
        url: str | None = None,
        api_key: str | None = None,
        *,
        max_retries: int | None = None,
        retry_backoff: float = DEFAULT_RETRY_BACKOFF,
        retry_timeout: float = DEFAULT_RETRY_TIMEOUT,
        timeout: float | None = None,
        interceptors: Sequence[grpc.aio.ClientInterceptor] | None = None,
    ) -> None:
        super().__init__(
            ClientSettings.resolve(
                url,
                api_key,
                max_retries=max_retries,
                retry_backoff=retry_backoff,
                retry_timeout=retry_timeout,
                timeout=timeout,
                interceptors=interceptors,
            )
        )


class BoundClient(GatewayClient):
    """A client bound to one model slug."""

    _purpose = "use"  # finishes "give the slug of the model to ..." in the error

    def __init__(
        self,
        model: str,
        *,
        url: str | None = None,
        api_key: str | None = None,
        max_retries: int | None = None,
        retry_backoff: float = DEFAULT_RETRY_BACKOFF,
        retry_timeout: float = DEFAULT_RETRY_TIMEOUT,
        timeout: float | None = None,
        interceptors: Sequence[grpc.aio.ClientInterceptor] | None = None,
    ) -> None:
        if not model:
            raise InvalidArgument(f"model is empty: give the slug of the model to {self._purpose}")
        super().__init__(
            url,
            api_key,
            max_retries=max_retries,
            retry_backoff=retry_backoff,
            retry_timeout=retry_timeout,
            timeout=timeout,
            interceptors=interceptors,
        )
        self.model = model
