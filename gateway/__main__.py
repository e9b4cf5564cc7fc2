"""`python -m gateway`: run a gateway (flags, or HEADWAY_* environment variables)."""

from __future__ import annotations

import argparse
import asyncio
import os
from pathlib import Path

from gateway.config import MIB, GatewayConfig
from gateway.server import serve
from headway.server.auth import UnsafeConfig, load_token
from headway.server.flags import add_common_flags, on_off, setup_process


def main() -> None:
    env = os.environ.get
    p = argparse.ArgumentParser(prog="python -m gateway", description=__doc__)
    p.add_argument(
        "--listen",
        default=env("HEADWAY_GATEWAY_LISTEN", "127.0.0.1:50051"),
        help="gRPC address (HEADWAY_GATEWAY_LISTEN)",
    )
    p.add_argument(
        "--http",
        default=env("HEADWAY_HTTP_LISTEN", "127.0.0.1:8000"),
        help="OpenAI-compatible HTTP address; '' = off (HEADWAY_HTTP_LISTEN)",
    )
    p.add_argument("--trainer", default=env("HEADWAY_TRAINER", "127.0.0.1:50052"))
    p.add_argument(
        "--auth",
        type=on_off,  # applied to the environment's value too (argparse converts defaults)
        default=env("HEADWAY_AUTH", "off"),
        metavar="on|off",
        help="on: every call needs an API key (headway keys create); off: local mode, "
        "every caller is the local admin (HEADWAY_AUTH)",
    )
    p.add_argument(
        "--insecure",
        action="store_true",
        default=env("HEADWAY_INSECURE", "") == "1",
        help="allow auth off on a non-loopback address (HEADWAY_INSECURE=1): every machine "
        "that reaches the gateway is trusted",
    )
    p.add_argument(
        "--allowed-hosts",
        default=env("HEADWAY_ALLOWED_HOSTS", ""),
        help="comma-separated Host names the HTTP API answers besides localhost and the listen "
        "host, when auth is off ('*' = any; HEADWAY_ALLOWED_HOSTS)",
    )
    p.add_argument(
        "--trace-retention-hours",
        type=float,
        default=float(env("HEADWAY_TRACE_RETENTION_HOURS", "168")),
    )
    add_common_flags(p)
    _add_limit_flags(p)
    args = p.parse_args()
    setup_process(args)
    try:
        config = GatewayConfig(
            store=Path(args.store),
            trainer=args.trainer,
            redis_url=args.redis,
            redis_prefix=args.redis_prefix,
            auth=args.auth,
            insecure=args.insecure,
            allowed_hosts=[h.strip() for h in args.allowed_hosts.split(",") if h.strip()],
            http_listen=args.http,
            trace_retention_seconds=args.trace_retention_hours * 3600,
            internal_token=load_token(args.internal_token_file),
            **_limits(args),
        )
        asyncio.run(serve(config, args.listen))
    except UnsafeConfig as e:
        p.error(str(e))


# ---- Limits against one team exhausting the gateway or Redis (GatewayConfig documents each):
# (flag, GatewayConfig field, unit: bytes per flag unit, or 1 for counts).
_LIMIT_FLAGS = (
    ("--max-calls-per-team", "max_calls_per_team", 1),
    ("--max-training-request-mb", "max_training_request_bytes", MIB),
    ("--max-sampling-request-mb", "max_sampling_request_bytes", MIB),
    ("--max-trace-request-mb", "max_trace_request_bytes", MIB),
    ("--max-model-request-mb", "max_model_request_bytes", MIB),
    ("--max-turn-mb", "max_turn_bytes", MIB),
    ("--max-trace-turns", "max_trace_turns", 1),
    ("--max-team-redis-mb", "max_team_redis_bytes", MIB),
    ("--max-stored-reply-mb", "max_stored_reply_bytes", MIB),
    ("--http-worker-threads", "http_worker_threads", 1),
)


def _env_name(flag: str) -> str:
    return "HEADWAY_" + flag.removeprefix("--").replace("-", "_").upper()


def _add_limit_flags(p: argparse.ArgumentParser) -> None:
    for flag, field, unit in _LIMIT_FLAGS:
        default = getattr(GatewayConfig, field) / unit
        env = os.environ.get(_env_name(flag))
        p.add_argument(
            flag,
            type=float if unit > 1 else int,
            default=(float if unit > 1 else int)(env) if env else default,
            help=f"GatewayConfig.{field}{' in MiB' if unit > 1 else ''} ({_env_name(flag)})",
        )


def _limits(args: argparse.Namespace) -> dict[str, int]:
    out = {}
    for flag, field, unit in _LIMIT_FLAGS:
        out[field] = int(getattr(args, flag.removeprefix("--").replace("-", "_")) * unit)
    return out


if __name__ == "__main__":
    main()
