"""`SamplerConfig`: every knob of a sampler replica, with its default and why."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from headway.heads import DEFAULT_PREFIX


@dataclass
class SamplerConfig:
    """Settings of one sampler process (flags and HEADWAY_* env of `python -m sampler_svc`)."""

    store: Path  # the checkpoint store shared with the trainer (read only here)
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_prefix: str = DEFAULT_PREFIX
    replica_id: str = ""  # "" → a random id
    advertise: str = ""  # address the gateway should dial; "" → the listen address
    bases: list[str] = field(default_factory=list)  # bases whose heads it preloads; [] = all
    max_batch: int = 32  # decode rows per engine (sequences decoded together)
    max_seq_len: int = 2048  # prompt + completion per row (also capped by the model's context)
    max_n: int = 32  # completions per request
    max_queue: int = 256  # requests waiting for rows before RESOURCE_EXHAUSTED
    adapter_slots: int = 8  # LoRA adapters resident per engine (LRU of idle ones)
    max_lora_rank: int = 64  # largest adapter rank the slots hold
    max_engines: int = 4  # weight sets resident (bases, full checkpoints), LRU of idle ones
    heartbeat_seconds: float = 1.0  # registry refresh interval
    heartbeat_ttl: float = 5.0  # a replica missing this long drops out of the registry
    # The secret gateways send (see headway.internal_auth); "" = none: the replica listens
    # on loopback only and believes the team any local caller claims.
    internal_token: str = field(default="", repr=False)
