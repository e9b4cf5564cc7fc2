"""`python -m gateway`: run a gateway (flags, or HEADWAY_* environment variables)."""

from __future__ import annotations

import argparse
import asyncio
import os

from gateway.config import MIB, GatewayConfig
from gateway.server import serve
from headway.server.auth import UnsafeConfig
from headway.server.defaults import GATEWAY_ADDRESS, GATEWAY_HTTP_ADDRESS
from headway.server.flags import (
    Flag,
    add_common_flags,
    add_config_flags,
    add_env_flag,
    build_config,
    setup_logging,
)

# Each sets the GatewayConfig field it names (documented there), defaulting to its value
# (in the flag's unit); `--max-turn-mb` or $HEADWAY_MAX_TURN_MB sets max_turn_bytes.
FLAGS = (
    Flag(
        "http_listen",
        "OpenAI-compatible HTTP address; '' = off",
        name="--http",
        env="HEADWAY_HTTP_LISTEN",
        # On for a gateway process; GatewayConfig's own default (off) suits embedding.
        default=GATEWAY_HTTP_ADDRESS,
    ),
    Flag("trainer", "address of the trainer"),
    Flag(
        "auth",
        "on: every call needs an API key (headway keys create); off: local mode, every "
        "caller is the local admin",
    ),
    Flag(
        "allowed_hosts",
        "comma-separated Host names the HTTP API answers besides localhost and the listen "
        "host, when auth is off ('*' = any)",
    ),
    Flag(
        "trace_retention_seconds",
        "hours a trace is kept",
        name="--trace-retention-hours",
        unit=3600,
    ),
    # Limits against one team exhausting the gateway or Redis.
    Flag("max_calls_per_team", "calls one team may have in flight (0 = no limit)"),
    Flag(
        "max_training_request_bytes",
        "MiB of a TrainingService request",
        name="--max-training-request-mb",
        unit=MIB,
    ),
    Flag(
        "max_sampling_request_bytes",
        "MiB of a SamplingService request",
        name="--max-sampling-request-mb",
        unit=MIB,
    ),
    Flag(
        "max_trace_request_bytes",
        "MiB of a TraceService request",
        name="--max-trace-request-mb",
        unit=MIB,
    ),
    Flag(
        "max_model_request_bytes",
        "MiB of a ModelService request",
        name="--max-model-request-mb",
        unit=MIB,
    ),
    Flag("max_turn_bytes", "MiB of one recorded turn", name="--max-turn-mb", unit=MIB),
    Flag("max_trace_turns", "turns of one trace"),
    Flag(
        "max_team_redis_bytes",
        "MiB a team holds in Redis (0 = no limit)",
        name="--max-team-redis-mb",
        unit=MIB,
    ),
    Flag(
        "max_stored_reply_bytes",
        "MiB of an HTTP reply kept for Idempotency-Key replays",
        name="--max-stored-reply-mb",
        unit=MIB,
    ),
    Flag("http_worker_threads", "threads that parse, render and encode HTTP bodies"),
)


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m gateway", description=__doc__)
    add_env_flag(p, "--listen", "HEADWAY_GATEWAY_LISTEN", GATEWAY_ADDRESS, help="gRPC address")
    p.add_argument(
        "--insecure",
        action="store_true",
        default=os.environ.get("HEADWAY_INSECURE", "") == "1",
        help="allow auth off on a non-loopback address (HEADWAY_INSECURE=1): every machine "
        "that reaches the gateway is trusted",
    )
    add_common_flags(p, GatewayConfig)
    add_config_flags(p, GatewayConfig, FLAGS)
    args = p.parse_args()
    setup_logging(args, "gateway")
    try:
        config = build_config(GatewayConfig, args, FLAGS, insecure=args.insecure)
        asyncio.run(serve(config, args.listen))
    except UnsafeConfig as e:
        p.error(str(e))


if __name__ == "__main__":
    main()
