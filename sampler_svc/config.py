"""`SamplerConfig`: every knob of a sampler replica, with its default and why."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from headway.server.defaults import MAX_LORA_RANK, REDIS_URL
from headway.server.heads import DEFAULT_PREFIX


@dataclass
class SamplerConfig:
    """Settings of one sampler process (flags and HEADWAY_* env of `python -m sampler_svc`)."""

    store: Path  # the checkpoint store shared with the trainer (read only here)
    redis_url: str = REDIS_URL
    redis_prefix: str = DEFAULT_PREFIX
    replica_id: str = ""  # "" → a random id
    advertise: str = ""  # address the gateway should dial; "" → the listen address
    bases: list[str] = field(default_factory=list)  # bases whose heads it preloads; [] = all
    max_batch: int = 32  # decode rows per engine (sequences decoded together)
    max_seq_len: int = 2048  # prompt + completion per row (also capped by the model's context)
    max_n: int = 32  # completions per request
    max_queue: int = 256  # requests waiting for rows before RESOURCE_EXHAUSTED
    # Stop strings are searched in every new piece of text of every row, on the event loop:
    # their count and length bound that work (OpenAI allows 4 of any length; a few dozen
    # short markers cover real use). Over either is INVALID_ARGUMENT.
    max_stop_strings: int = 32  # stop strings per request
    max_stop_string_chars: int = 256  # characters per stop string
    max_stop_token_ids: int = 1024  # stop_token_ids per request
    # Most likely tokens reported per position (SamplingParams.top_logprobs): OpenAI's and
    # vLLM's limit; more is INVALID_ARGUMENT.
    max_top_logprobs: int = 20
    # A stream gets its tokens at most this often, the first ones and a sequence's end at
    # once: those drawn in between leave together, a chunk per sequence. Fewer wake-ups of
    # the event loop leave the engine more of the CPU and the GIL (vLLM's
    # --stream-interval, in time); 0 = every decode step. Each wake-up costs the engine
    # ~2 ms of a batch-8 step on a 2-core Xeon (the loop's and the client's work beside its
    # two matmul threads): a batch-8 fp32 stream decoded at 16.2 ms a step woken every
    # 20 ms, 14.0 every 50 (engine alone 13.5-13.8). 50 ms is 20 updates a second.
    stream_interval_ms: float = 50.0
    # A prompt_text longer than this is refused before it is tokenized (RESOURCE_EXHAUSTED):
    # ~32 characters per token of an 8K context, far above what real text needs.
    max_prompt_text_chars: int = 262_144
    # ComputeLogprobs: the tokens of one call (all sequences together), checked from the
    # request's byte sizes before anything is decoded (RESOURCE_EXHAUSTED over it) ...
    max_logprobs_tokens: int = 131_072
    # ... and run in pieces of at most this many tokens between two decode steps, so a large
    # call delays each decode step by one piece, never by the whole call.
    logprobs_chunk_tokens: int = 256
    adapter_slots: int = 8  # LoRA adapters resident per engine (LRU of idle ones)
    max_lora_rank: int = MAX_LORA_RANK  # largest adapter rank the slots hold
    max_engines: int = 4  # weight sets resident (bases, full checkpoints), LRU of idle ones
    # Where the engines compute: "cpu", "cuda" or "cuda:N" (headway.modeling.devices);
    # "" = cuda when torch sees a GPU, else cpu. Checked at start, before anything loads.
    device: str = ""
    # Weights, activations and KV cache of the engines: "fp32" (sampler and trainer logprobs
    # agree to 1e-4) or "bf16" (half the bytes per decode step, the CPU's bf16 units; falls
    # back to fp32, logged, on a CPU without them). Logprobs are computed in fp32 either way.
    # "" = by device: bf16 on a GPU, fp32 on a CPU.
    dtype: str = ""
    # Decode steps as one compiled graph (sampler_svc.compiled): "auto" = for the row counts
    # where it measures faster than eager on this machine (tens of seconds of compiling at
    # the first start, cached on disk), "on" = always, "off" = never. CPU only.
    compile: str = "auto"
    # torch CPU threads of the process, set when it starts serving (`serve`); 0 = torch's
    # default, one per core. Processes sharing a machine should split its cores.
    threads: int = 0
    # host:port where Prometheus scrapes this process (GET /metrics; port 0 = any free
    # one); "" = no metrics endpoint. See headway.server.metrics and the README.
    metrics: str = ""
    heartbeat_seconds: float = 1.0  # registry refresh interval
    heartbeat_ttl: float = 5.0  # a replica missing this long drops out of the registry
    # Longest pause between attempts to reach Redis again after losing it (the first is
    # 50 ms, doubling up to this): how long the replica may stay behind once Redis is
    # back, since each reconnection reconciles every head (see sampler_svc.watch).
    redis_retry_max_seconds: float = 0.25
    # The secret gateways send (see headway.server.auth); "" = none: the replica listens
    # on loopback only and believes the team any local caller claims.
    internal_token: str = field(default="", repr=False)
