"""`GatewayConfig`: every knob of a gateway, with its default and why."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from headway.heads import DEFAULT_PREFIX


@dataclass
class GatewayConfig:
    """Settings of one gateway process (flags and HEADWAY_* env of `python -m gateway`)."""

    store: Path  # the checkpoint store (read here: heads, models, keys)
    trainer: str = "127.0.0.1:50052"  # address of the trainer
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_prefix: str = DEFAULT_PREFIX
    # True: every call needs `authorization: Bearer <key>` (keys from `headway keys create`).
    # False (local mode): every caller is the local team "" and an admin, so the gateway
    # refuses a non-loopback listen address unless `insecure`.
    auth: bool = False
    insecure: bool = False  # allow auth off on a non-loopback address (a trusted network)
    # Local mode's HTTP answers only requests whose Host names this machine (localhost,
    # loopback addresses, the listen host) or one of these (a DNS-rebinding defence); "*"
    # = any host. Auth on: not checked (a web page has no key).
    allowed_hosts: list[str] = field(default_factory=list)
    # The secret sent to the trainer and samplers, which believe the team metadata only
    # with it (see headway.internal_auth); "" = none (backends on loopback, no token).
    internal_token: str = field(default="", repr=False)
    http_listen: str = ""  # host:port of the OpenAI-compatible HTTP API; "" = off
    max_body_bytes: int = 32 * 1024 * 1024  # HTTP bodies over this are refused (413) unread
    trace_retention_seconds: float = 7 * 24 * 3600.0
    registry_cache_seconds: float = 0.25  # how long a replica listing is reused
    redis_max_connections: int = 256  # Redis connections of this gateway; more requests wait
    redis_pool_timeout: float = 20.0  # seconds a request waits for a free Redis connection
    # How often health statuses are re-checked against Redis, the trainer and the registry.
    health_interval_seconds: float = 1.0
