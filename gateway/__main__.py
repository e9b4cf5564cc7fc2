"""`python -m gateway`: run a gateway (flags, or HEADWAY_* environment variables)."""

from __future__ import annotations

import argparse
import asyncio
import os
from pathlib import Path

from gateway.config import GatewayConfig
from gateway.server import serve
from headway.service_flags import add_common_flags, setup_process


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
        choices=("on", "off"),
        default=env("HEADWAY_AUTH", "off"),
        help="on: every call needs an API key (headway keys create)",
    )
    p.add_argument(
        "--trace-retention-hours",
        type=float,
        default=float(env("HEADWAY_TRACE_RETENTION_HOURS", "168")),
    )
    add_common_flags(p)
    args = p.parse_args()
    setup_process(args)
    config = GatewayConfig(
        store=Path(args.store),
        trainer=args.trainer,
        redis_url=args.redis,
        redis_prefix=args.redis_prefix,
        auth=args.auth == "on",
        http_listen=args.http,
        trace_retention_seconds=args.trace_retention_hours * 3600,
    )
    asyncio.run(serve(config, args.listen))


if __name__ == "__main__":
    main()
