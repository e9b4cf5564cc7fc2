"""`python -m trainer_svc`: run the trainer (flags, or HEADWAY_* environment variables)."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
from pathlib import Path

from headway.server.auth import UnsafeConfig, load_token
from headway.server.flags import add_common_flags, setup_process
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
        "--max-loaded-models", type=int, default=int(env("HEADWAY_MAX_LOADED_MODELS", "8"))
    )
    p.add_argument(
        "--base-root",
        action="append",
        help="a directory under which admin keys may register bases; repeatable (default "
        "HEADWAY_BASE_ROOTS, colon-separated). None: only local mode (auth off) may",
    )
    add_common_flags(p, torch_threads=True)
    add_limit_flags(p)
    args = p.parse_args()
    setup_process(args)
    roots = args.base_root or env("HEADWAY_BASE_ROOTS", "").split(":")
    try:
        config = TrainerConfig(
            store=Path(args.store),
            redis_url=args.redis,
            redis_prefix=args.redis_prefix,
            max_loaded_models=args.max_loaded_models,
            base_roots=[Path(r) for r in roots if r],
            internal_token=load_token(args.internal_token_file),
            **{name: getattr(args, name) for name in LIMITS},
        )
        asyncio.run(serve(config, args.listen))
    except UnsafeConfig as e:
        p.error(str(e))


# ---- Resource bounds (documented on TrainerConfig): --max-batch-items or HEADWAY_MAX_BATCH_ITEMS
LIMITS = {
    "max_batch_tokens": "tokens one training call may carry",
    "max_batch_items": "datums + trajectories one training call may carry",
    "max_batch_turns": "trajectory turns one training call may carry",
    "max_pending_forwards": "ForwardCustom forwards awaiting BackwardCustom, per model",
    "max_pending_forward_bytes": "bytes those forwards may hold, per model",
    "max_total_pending_forward_bytes": "bytes pending forwards may hold over all models",
    "reply_cache_model_bytes": "bytes of idempotency replies kept per model",
    "reply_cache_bytes": "bytes of idempotency replies kept over all models",
    "max_pinned_per_team": "models a team may hold un-applied work on (0 = half the slots)",
    "max_lora_rank": "largest LoRA rank of a fork (keep it the samplers' --max-lora-rank)",
}


def add_limit_flags(parser: argparse.ArgumentParser) -> None:
    """One integer flag per resource bound, defaulting to TrainerConfig's value."""
    defaults = {f.name: f.default for f in dataclasses.fields(TrainerConfig)}
    for name, help in LIMITS.items():
        env = f"HEADWAY_{name.upper()}"
        parser.add_argument(
            f"--{name.replace('_', '-')}",
            type=int,
            default=int(os.environ.get(env, defaults[name])),
            help=f"{help} ({env}; default {defaults[name]})",
        )


if __name__ == "__main__":
    main()
