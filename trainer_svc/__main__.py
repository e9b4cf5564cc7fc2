"""`python -m trainer_svc`: run the trainer (flags, or HEADWAY_* environment variables)."""

from __future__ import annotations

import argparse
import asyncio
import os
from pathlib import Path

import torch

from headway.modeling.placement import settle
from headway.server.auth import UnsafeConfig
from headway.server.defaults import TRAINER_ADDRESS
from headway.server.flags import (
    Flag,
    add_common_flags,
    add_config_flags,
    add_env_flag,
    build_config,
    setup_logging,
)
from trainer_svc import ranks
from trainer_svc.config import TrainerConfig
from trainer_svc.server import serve

# Each sets the TrainerConfig field of its name (documented there), defaulting to its value;
# `--max-batch-items` or $HEADWAY_MAX_BATCH_ITEMS sets max_batch_items.
FLAGS = (
    Flag("device", "where training computes: cpu, cuda or cuda:N ('' = cuda if available)"),
    Flag(
        "dtype",
        "training compute: fp32 (exact) or bf16 (over fp32 master weights); '' = bf16 on a "
        "GPU, fp32 on a CPU",
    ),
    Flag("max_loaded_models", "training states kept in memory (LRU of idle ones)"),
    Flag("max_batch_tokens", "tokens one training call may carry"),
    Flag("max_batch_items", "datums + trajectories one training call may carry"),
    Flag("max_batch_turns", "trajectory turns one training call may carry"),
    Flag("max_pending_forwards", "ForwardCustom forwards awaiting BackwardCustom, per model"),
    Flag("max_pending_forward_bytes", "bytes those forwards may hold, per model"),
    Flag("max_total_pending_forward_bytes", "bytes pending forwards may hold over all models"),
    Flag("reply_cache_model_bytes", "bytes of idempotency replies kept per model"),
    Flag("reply_cache_bytes", "bytes of idempotency replies kept over all models"),
    Flag("max_pinned_per_team", "models a team may hold un-applied work on (0 = half the slots)"),
    Flag("max_lora_rank", "largest LoRA rank of a fork (keep it the samplers' --max-lora-rank)"),
    Flag(
        "sync_saves",
        "write and fsync every checkpoint, optimizer state included, before the OptimStep "
        "replies (no acknowledged step lost to a crash or power loss)",
    ),
    Flag("defer_state_bytes", "optimizer states this large are written after the reply"),
    Flag("spare_min_bytes", "checkpoint files this large may go over pages allocated ahead"),
    Flag(
        "direct_state_bytes",
        "optimizer states this large are written around the page cache (O_DIRECT; 0 = never)",
    ),
    Flag("max_pending_syncs", "checkpoints written ahead of their background fsync"),
)


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m trainer_svc", description=__doc__)
    add_env_flag(
        p, "--listen", "HEADWAY_TRAINER_LISTEN", TRAINER_ADDRESS, help="address to serve gRPC on"
    )
    p.add_argument(
        "--base-root",
        action="append",
        help="a directory under which admin keys may register bases; repeatable (default "
        "HEADWAY_BASE_ROOTS, colon-separated). None: only local mode (auth off) may",
    )
    add_common_flags(p, TrainerConfig)
    add_config_flags(p, TrainerConfig, FLAGS)
    args = p.parse_args()
    setup_logging(args, "trainer")
    roots = args.base_root or os.environ.get("HEADWAY_BASE_ROOTS", "").split(":")
    try:
        config = build_config(TrainerConfig, args, FLAGS, base_roots=[Path(r) for r in roots if r])
        # The device must exist and the dtype be known before anything is loaded.
        config.device, config.dtype = settle(config.device, config.dtype)
    except ValueError as e:  # UnsafeConfig is one
        p.error(str(e))
    # Under torchrun: rank 0 serves, the other ranks follow it (trainer_svc/ranks.py).
    group = ranks.join(config.device)
    if group is not None:
        config.device = group.device
        if group.rank != 0:
            if config.threads > 0:
                torch.set_num_threads(config.threads)
            ranks.follow(group, config)
            return
    try:
        asyncio.run(serve(config, args.listen, group))
    except UnsafeConfig as e:
        p.error(str(e))


if __name__ == "__main__":
    main()
