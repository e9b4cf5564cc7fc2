"""`python -m trainer_svc`: run the trainer (flags, or HEADWAY_* environment variables)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
from pathlib import Path

from trainer_svc.config import TrainerConfig
from trainer_svc.server import serve


def main() -> None:
    env = os.environ.get
    p = argparse.ArgumentParser(prog="python -m trainer_svc", description=__doc__)
    p.add_argument(
        "--listen",
        default=env("HEADWAY_TRAINER_LISTEN", "127.0.0.1:50052"),
        help="address to serve gRPC on (HEADWAY_TRAINER_LISTEN)",
    )
    p.add_argument(
        "--store",
        default=env("HEADWAY_STORE", "./headway-store"),
        help="checkpoint store directory (HEADWAY_STORE)",
    )
    p.add_argument(
        "--redis",
        default=env("HEADWAY_REDIS_URL", "redis://127.0.0.1:6379/0"),
        help="Redis URL for head events (HEADWAY_REDIS_URL)",
    )
    p.add_argument("--redis-prefix", default=env("HEADWAY_REDIS_PREFIX", "headway:"))
    p.add_argument(
        "--max-loaded-models", type=int, default=int(env("HEADWAY_MAX_LOADED_MODELS", "8"))
    )
    p.add_argument(
        "--threads",
        type=int,
        default=int(env("HEADWAY_TORCH_THREADS", "0")),
        help="torch CPU threads (HEADWAY_TORCH_THREADS; 0 = torch's default, one per core): "
        "give each process of a machine its share of the cores",
    )
    p.add_argument("--log-level", default=env("HEADWAY_LOG_LEVEL", "INFO"))
    args = p.parse_args()
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    config = TrainerConfig(
        store=Path(args.store),
        redis_url=args.redis,
        redis_prefix=args.redis_prefix,
        max_loaded_models=args.max_loaded_models,
    )
    if args.threads > 0:
        import torch

        torch.set_num_threads(args.threads)
    asyncio.run(serve(config, args.listen))


if __name__ == "__main__":
    main()
