"""`python -m gateway`: run a gateway (flags, or HEADWAY_* environment variables)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
from pathlib import Path

from gateway.config import GatewayConfig
from gateway.server import serve


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
    p.add_argument("--store", default=env("HEADWAY_STORE", "./headway-store"))
    p.add_argument("--trainer", default=env("HEADWAY_TRAINER", "127.0.0.1:50052"))
    p.add_argument("--redis", default=env("HEADWAY_REDIS_URL", "redis://127.0.0.1:6379/0"))
    p.add_argument("--redis-prefix", default=env("HEADWAY_REDIS_PREFIX", "headway:"))
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
    p.add_argument("--log-level", default=env("HEADWAY_LOG_LEVEL", "INFO"))
    args = p.parse_args()
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
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
