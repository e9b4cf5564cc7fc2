"""`python -m sampler_svc`: run a sampler replica (flags, or HEADWAY_* environment variables)."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

from headway.server.auth import UnsafeConfig, load_token
from headway.server.flags import add_common_flags, setup_process
from sampler_svc.config import SamplerConfig
from sampler_svc.server import serve


def main() -> None:
    env = os.environ.get
    p = argparse.ArgumentParser(prog="python -m sampler_svc", description=__doc__)
    p.add_argument(
        "--listen",
        default=env("HEADWAY_SAMPLER_LISTEN", "127.0.0.1:50053"),
        help="address to serve gRPC on (HEADWAY_SAMPLER_LISTEN)",
    )
    p.add_argument(
        "--advertise",
        default=env("HEADWAY_SAMPLER_ADVERTISE", ""),
        help="address gateways dial, if not the listen address",
    )
    p.add_argument("--replica-id", default=env("HEADWAY_REPLICA_ID", ""))
    p.add_argument(
        "--bases",
        default=env("HEADWAY_SAMPLER_BASES", ""),
        help="comma-separated bases whose heads this replica preloads (default all)",
    )
    p.add_argument("--max-batch", type=int, default=int(env("HEADWAY_MAX_BATCH", "32")))
    p.add_argument("--max-seq-len", type=int, default=int(env("HEADWAY_MAX_SEQ_LEN", "2048")))
    p.add_argument("--adapter-slots", type=int, default=int(env("HEADWAY_ADAPTER_SLOTS", "8")))
    p.add_argument("--max-lora-rank", type=int, default=int(env("HEADWAY_MAX_LORA_RANK", "64")))
    limits = {  # flag: (config field, help); defaults and env twins follow SamplerConfig
        "--max-stop-strings": ("max_stop_strings", "stop strings per request"),
        "--max-stop-string-chars": ("max_stop_string_chars", "characters per stop string"),
        "--max-prompt-text-chars": (
            "max_prompt_text_chars",
            "characters of a prompt_text, refused before tokenizing",
        ),
        "--max-logprobs-tokens": ("max_logprobs_tokens", "tokens per ComputeLogprobs call"),
        "--logprobs-chunk-tokens": (
            "logprobs_chunk_tokens",
            "ComputeLogprobs tokens run between two decode steps",
        ),
    }
    for flag, (name, what) in limits.items():
        var = f"HEADWAY_{name.upper()}"
        default = getattr(SamplerConfig, name)
        p.add_argument(flag, type=int, default=int(env(var, str(default))), help=f"{what} ({var})")
    add_common_flags(p, torch_threads=True)
    args = p.parse_args()
    setup_process(args)
    try:
        config = SamplerConfig(
            store=Path(args.store),
            redis_url=args.redis,
            redis_prefix=args.redis_prefix,
            replica_id=args.replica_id,
            advertise=args.advertise,
            bases=[b for b in args.bases.split(",") if b],
            max_batch=args.max_batch,
            max_seq_len=args.max_seq_len,
            adapter_slots=args.adapter_slots,
            max_lora_rank=args.max_lora_rank,
            internal_token=load_token(args.internal_token_file),
            **{name: getattr(args, name) for name, _ in limits.values()},
        )
        code = asyncio.run(serve(config, args.listen))
    except UnsafeConfig as e:
        p.error(str(e))
    sys.exit(code)


if __name__ == "__main__":
    main()
