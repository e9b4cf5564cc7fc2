"""`python -m sampler_svc`: run a sampler replica (flags, or HEADWAY_* environment variables)."""

from __future__ import annotations

import os

# How long torch's OpenMP workers wait for the next parallel region before sleeping, set
# before torch loads libgomp (which reads its environment once); a value given is kept.
# The replica decodes on its engine thread, not the process's first thread; libgomp counts
# the first thread among those it manages, so the engine's team (one thread per core) makes
# one more than the cores, and libgomp then lets workers spin only ~1000 rounds before
# sleeping: each of the ~100 parallel regions of a decode step waits for workers to wake.
# Measured, 2-core EPYC at load ~4.5, b8 bf16 step, engine on its own thread: median
# 105-124 ms by default, 17-22 ms with 1M spins (10M no better; the same engine on the
# first thread: 15-21 ms either way). An idle replica's workers spin that long, then sleep.
os.environ.setdefault("GOMP_SPINCOUNT", "1000000")

import argparse
import asyncio
import sys

from headway.modeling.placement import settle
from headway.server.auth import UnsafeConfig
from headway.server.defaults import SAMPLER_ADDRESS
from headway.server.flags import (
    Flag,
    add_common_flags,
    add_config_flags,
    add_env_flag,
    build_config,
    setup_logging,
)
from sampler_svc.compiled import MODES
from sampler_svc.config import SamplerConfig
from sampler_svc.server import serve

# Each sets the SamplerConfig field of its name (documented there), defaulting to its value;
# `--max-batch` or $HEADWAY_MAX_BATCH sets max_batch.
FLAGS = (
    Flag(
        "advertise",
        "address gateways dial, if not the listen address",
        env="HEADWAY_SAMPLER_ADVERTISE",
    ),
    Flag("replica_id", "this replica's id in the registry ('' = a random one)"),
    Flag(
        "bases",
        "comma-separated bases whose heads this replica preloads (none = all)",
        env="HEADWAY_SAMPLER_BASES",
    ),
    Flag("max_batch", "decode rows per engine"),
    Flag("max_seq_len", "prompt + completion tokens per row"),
    Flag("adapter_slots", "LoRA adapters resident per engine"),
    Flag("max_lora_rank", "largest adapter rank the slots hold"),
    Flag("device", "where the engines compute: cpu, cuda or cuda:N ('' = cuda if available)"),
    Flag(
        "dtype",
        "engine weights and compute: fp32 or bf16 (logprobs in fp32 either way); '' = bf16 "
        "on a GPU, fp32 on a CPU",
    ),
    Flag(
        "compile",
        "decode steps compiled: auto (where measured faster), on or off",
    ),
    Flag(
        "stream_interval_ms",
        "a stream's tokens leave at most this often (the first and the end at once; 0 = "
        "every decode step)",
    ),
    Flag("max_stop_strings", "stop strings per request"),
    Flag("max_stop_string_chars", "characters per stop string"),
    Flag("max_prompt_text_chars", "characters of a prompt_text, refused before tokenizing"),
    Flag("max_logprobs_tokens", "tokens per ComputeLogprobs call"),
    Flag("logprobs_chunk_tokens", "ComputeLogprobs tokens run between two decode steps"),
)


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m sampler_svc", description=__doc__)
    add_env_flag(
        p, "--listen", "HEADWAY_SAMPLER_LISTEN", SAMPLER_ADDRESS, help="address to serve gRPC on"
    )
    add_common_flags(p, SamplerConfig)
    add_config_flags(p, SamplerConfig, FLAGS)
    args = p.parse_args()
    setup_logging(args, "sampler")
    try:
        config = build_config(SamplerConfig, args, FLAGS)
        # The device must exist and the dtype be known before anything is loaded.
        config.device, config.dtype = settle(config.device, config.dtype)
        if config.compile not in MODES:
            raise ValueError(f"--compile {config.compile!r}: choose among {', '.join(MODES)}")
    except ValueError as e:  # UnsafeConfig is one
        p.error(str(e))
    try:
        code = asyncio.run(serve(config, args.listen))
    except UnsafeConfig as e:
        p.error(str(e))
    sys.exit(code)


if __name__ == "__main__":
    main()
