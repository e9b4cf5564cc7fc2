"""`GatewayConfig`: every knob of a gateway, with its default and why."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from headway.server.defaults import REDIS_URL, TRAINER_ADDRESS
from headway.server.heads import DEFAULT_PREFIX

MIB = 1024 * 1024


@dataclass
class GatewayConfig:
    """Settings of one gateway process (flags and HEADWAY_* env of `python -m gateway`)."""

    store: Path  # the checkpoint store (read here: heads, models, keys)
    trainer: str = TRAINER_ADDRESS  # address of the trainer
    redis_url: str = REDIS_URL
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
    # with it (see headway.server.auth); "" = none (backends on loopback, no token).
    internal_token: str = field(default="", repr=False)
    http_listen: str = ""  # host:port of the OpenAI-compatible HTTP API; "" = off
    max_body_bytes: int = 32 * 1024 * 1024  # HTTP bodies over this are refused (413) unread
    trace_retention_seconds: float = 7 * 24 * 3600.0
    registry_cache_seconds: float = 0.25  # how long a replica listing is reused
    redis_max_connections: int = 256  # Redis connections of this gateway; more requests wait
    redis_pool_timeout: float = 20.0  # seconds a request waits for a free Redis connection
    # How often health statuses are re-checked against Redis, the trainer and the registry.
    health_interval_seconds: float = 1.0

    # ---- Limits: one team cannot exhaust the gateway or its Redis -----------------------
    # Largest request accepted per service of the gRPC port, checked on the raw bytes before
    # anything parses them (RESOURCE_EXHAUSTED naming the limit). gRPC Python has no
    # per-method receive limit, so the server receives up to the largest of these and each
    # call is checked against its own. Training batches are large; the rest are not.
    max_training_request_bytes: int = 256 * MIB  # TrainingService
    max_sampling_request_bytes: int = 16 * MIB  # SamplingService (prompts, logprob sequences)
    max_trace_request_bytes: int = 16 * MIB  # TraceService (one turn per call)
    max_model_request_bytes: int = 1 * MIB  # ModelService, and health and reflection
    # Calls one team may have in flight on this gateway, gRPC and HTTP together. One more
    # is refused at once, RESOURCE_EXHAUSTED with a retry pushback (HTTP 429), so a team's
    # flood cannot take every slot of a gateway shared with others. 0 = no limit.
    max_calls_per_team: int = 512
    # Redis caps on what a team stores (gateway.traces, gateway.replies, gateway.quota).
    max_turn_bytes: int = 8 * MIB  # one recorded turn, serialized
    max_trace_turns: int = 1024  # turns of one trace
    # Bytes a team holds in Redis across its live traces and stored HTTP replies (counted
    # until they expire; 0 = no limit). Size Redis' maxmemory above teams x this.
    max_team_redis_bytes: int = 4 * 1024 * MIB
    # Largest HTTP reply kept for Idempotency-Key replays; a larger one is answered but not
    # kept (a retry of its key is told so, with its trace ids, instead of a replay).
    max_stored_reply_bytes: int = 8 * MIB
    # Threads that parse HTTP bodies, render chat templates, tokenize and encode replies,
    # off the event loop that serves gRPC. Each team uses at most half of them at a time.
    http_worker_threads: int = 4
    # host:port where Prometheus scrapes this process (GET /metrics; port 0 = any free
    # one); "" = no metrics endpoint. See headway.server.metrics and the README.
    metrics: str = ""
