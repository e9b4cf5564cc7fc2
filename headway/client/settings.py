"""How an SDK client reaches the gateway: `ClientSettings`, and the retry timing.

One frozen dataclass holds everything a gRPC client is configured with (address, API
key, retries, per-attempt deadline, interceptors); its defaults are written here and
nowhere else. `ClientSettings.resolve` fills the address and key from the environment
(`HEADWAY_URL`, `HEADWAY_API_KEY`) as every client and `headway models` do. The backoff
rule (`retry_delay`) is shared with the agents, which retry the HTTP API the same way.

No grpc here: `headway.agents` imports this module and stays free of it.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, fields
from typing import Any

from headway.channels import GATEWAY_ADDRESS

DEFAULT_URL = GATEWAY_ADDRESS  # the gateway `headway serve` starts
# How long a call failing with UNAVAILABLE is retried by default: long enough for a
# service restarted by its supervisor (`headway serve`) to come back.
DEFAULT_RETRY_TIMEOUT = 60.0
DEFAULT_RETRY_BACKOFF = 0.25  # the first delay between attempts, in seconds
MAX_RETRY_DELAY = 10.0  # the exponential backoff between attempts stops growing here

# URL schemes a gateway address may carry, and whether each means TLS.
_SCHEMES = (("grpcs://", True), ("https://", True), ("grpc://", False), ("http://", False))


def api_key_from_env() -> str:
    """The API key of `HEADWAY_API_KEY` ("" when unset: local mode needs none)."""
    return os.environ.get("HEADWAY_API_KEY", "")


def retry_delay(attempt: int, backoff: float, at_least: float = 0.0) -> float:
    """Seconds to wait before retry number `attempt` + 1 (0-based `attempt`).

    Doubles from `backoff` up to `MAX_RETRY_DELAY`, is raised to `at_least` (a server's
    pushback), then jittered to 50-100 %: jitter keeps many clients from retrying a
    restarted server in lockstep.
    """
    delay = max(min(backoff * 2**attempt, MAX_RETRY_DELAY), at_least)
    return delay * (0.5 + random.random() / 2)


@dataclass(frozen=True)
class ClientSettings:
    """The connection settings of a gRPC client (see `TrainingClient` for their meaning)."""

    url: str = DEFAULT_URL
    """Gateway address: "host:port", or with a scheme ("grpcs://" and "https://" = TLS)."""
    api_key: str = ""
    """Sent as a bearer token; "" sends none (local mode)."""
    max_retries: int | None = None
    """Caps the retries of one call (None: only `retry_timeout` bounds them)."""
    retry_backoff: float = DEFAULT_RETRY_BACKOFF
    """The first delay between attempts, doubling up to `MAX_RETRY_DELAY`."""
    retry_timeout: float = DEFAULT_RETRY_TIMEOUT
    """Seconds after a call's first attempt when retrying stops."""
    timeout: float | None = None
    """Per-attempt deadline in seconds (None: none)."""
    interceptors: tuple[Any, ...] = ()
    """grpc.aio client interceptors (tracing, fault injection in tests)."""

    @classmethod
    def resolve(
        cls,
        url: str | None = None,
        api_key: str | None = None,
        *,
        interceptors: Any = None,
        **options: Any,
    ) -> ClientSettings:
        """Settings from a client's arguments: an empty `url` is `HEADWAY_URL` (else
        `DEFAULT_URL`), a None `api_key` is `HEADWAY_API_KEY`; `options` are the other
        fields."""
        return cls(
            url=url or os.environ.get("HEADWAY_URL") or DEFAULT_URL,
            api_key=api_key if api_key is not None else api_key_from_env(),
            interceptors=tuple(interceptors or ()),
            **options,
        )

    def options(self) -> dict[str, Any]:
        """The settings as client constructor keywords (to build a twin of a client)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @property
    def metadata(self) -> list[tuple[str, str]]:
        """The call metadata carrying the API key (none without a key)."""
        return [("authorization", f"Bearer {self.api_key}")] if self.api_key else []

    @property
    def target(self) -> tuple[str, bool]:
        """(host:port, use TLS) from "host:port", "grpc://...", "grpcs://..." or "https://..."."""
        for prefix, secure in _SCHEMES:
            if self.url.startswith(prefix):
                return self.url[len(prefix) :].rstrip("/"), secure
        return self.url, False
