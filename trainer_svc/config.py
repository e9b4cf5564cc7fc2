"""`TrainerConfig`: every knob of the trainer, with its default and why."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from headway.heads import DEFAULT_PREFIX


@dataclass
class TrainerConfig:
    """Settings of one trainer process (flags and HEADWAY_* env of `python -m trainer_svc`)."""

    store: Path  # root of the checkpoint store (shared with samplers and gateways)
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_prefix: str = DEFAULT_PREFIX  # namespace of every Redis key and channel
    # Training states kept in memory; the least recently used idle one is evicted and
    # restored from its head on next use (weights and optimizer state).
    max_loaded_models: int = 8
    # Tokens (padded rows × length) per forward/backward chunk: bounds activation memory.
    microbatch_tokens: int = 8192
    # Largest batch one training call accepts, in tokens (RESOURCE_EXHAUSTED above).
    max_batch_tokens: int = 262_144
    # A custom-loss forward keeps its autograd graph up to this many tokens; above, the
    # graph is dropped and BackwardCustom recomputes the forward (same numbers, more time).
    keep_graph_tokens: int = 16_384
    # Idempotency replies remembered per model (OptimStep replies are also on disk).
    request_cache: int = 4096
    dtype: str = "float32"  # training precision of weights and optimizer state
    # Directories under which admins may register bases (AddBase), symlinks resolved.
    # None configured: only local mode (auth off: the local caller) may register a
    # directory, anywhere; with auth on, AddBase is refused until roots are set.
    base_roots: list[Path] = field(default_factory=list)
    # The secret gateways send (see headway.internal_auth); "" = none: the trainer listens
    # on loopback only and believes the team any local caller claims.
    internal_token: str = field(default="", repr=False)
