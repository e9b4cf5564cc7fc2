"""`TrainerConfig`: every knob of the trainer, with its default and why."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from headway.server.defaults import MAX_LORA_RANK, REDIS_URL
from headway.server.heads import DEFAULT_PREFIX


@dataclass
class TrainerConfig:
    """Settings of one trainer process (flags and HEADWAY_* env of `python -m trainer_svc`)."""

    store: Path  # root of the checkpoint store (shared with samplers and gateways)
    redis_url: str = REDIS_URL
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
    # Where training computes: "cpu", "cuda" or "cuda:N" (headway.modeling.devices);
    # "" = cuda when torch sees a GPU, else cpu. Checked at start, before anything loads.
    # Weights, gradients and AdamW state live there; batches are built on the CPU and
    # moved once per microbatch, checkpoints are written from host copies.
    device: str = ""
    # Compute precision of training (see trainer_svc/precision.py): "fp32", exact, or
    # "bf16": matmuls in bf16 where this machine multiplies bf16 faster (measured at start,
    # else fp32), over fp32 weights, gradients, AdamW state and checkpoints. "" = by
    # device: bf16 on a GPU, fp32 on a CPU.
    dtype: str = ""
    # Checkpoint durability. False (default): an OptimStep replies once its checkpoint's
    # weights (or adapter) are written and renamed and HEAD moved, which survives a crash
    # of the trainer process (the bytes are in the kernel's page cache); an optimizer state
    # of at least `defer_state_bytes` (AdamW's moments are twice the trained weights: 19 MB
    # for a rank-32 adapter of a 40M model, 320 MB for its full fork) is written after the
    # reply, while the next rollout runs (a smaller one costs less to write than to
    # queue), and the fsyncs that make everything survive a power loss run in the
    # background, in order. A crash of the process before that write lands
    # rolls the head back to the step before. True: everything, optimizer state included,
    # is written and fsynced before the reply (no acknowledged step is ever lost; each
    # step waits for the disk).
    sync_saves: bool = False
    defer_state_bytes: int = 4 * 2**20
    # A checkpoint file (weights, adapter, optimizer state) of at least this many bytes may
    # be written over a spare file whose page-cache pages were allocated while the model
    # trained (headway.store.pages): where that allocation is most of a new file's write,
    # it leaves the OptimStep.
    # Each model times both ways on its own writes and keeps the faster (`SpareChoice`).
    spare_min_bytes: int = 8 * 2**20
    # An optimizer state of at least this many bytes is written around the page cache
    # (O_DIRECT, where the filesystem takes it): only a restore reads it back, and its
    # pages' allocation, writeback and fsync would take the CPU from the next step's
    # compute (headway.store.tensorfile.write_plan_direct). 0: always the page cache.
    direct_state_bytes: int = 8 * 2**20
    # Asynchronous saves: checkpoints written but not yet fsynced before a save waits for
    # the disk (bounds the dirty memory and what a power loss can take back).
    max_pending_syncs: int = 2
    # torch CPU threads of the process, set when it starts serving (`serve`); 0 = torch's
    # default, one per core. Processes sharing a machine should split its cores.
    threads: int = 0
    # host:port where Prometheus scrapes this process (GET /metrics; port 0 = any free
    # one); "" = no metrics endpoint. See headway.server.metrics and the README.
    metrics: str = ""

    # ---- Resource bounds: no team can stall or exhaust the trainer (issue 10) ----
    # Items (datums + trajectories) one training call accepts, and turns over all of its
    # trajectories: checked on counts before anything is decoded (RESOURCE_EXHAUSTED).
    max_batch_items: int = 65_536
    max_batch_turns: int = 65_536
    # Custom-loss forwards awaiting BackwardCustom: per model (count and bytes) and over
    # all models (bytes). A forward whose graph does not fit keeps only its inputs (the
    # backward recomputes); one whose inputs do not fit is refused. Keep
    # max_pinned_per_team × max_pending_forward_bytes under the total, so that one team
    # never holds all of it.
    max_pending_forwards: int = 4
    max_pending_forward_bytes: int = 512 * 2**20
    max_total_pending_forward_bytes: int = 4 * 2**30
    # Idempotency replies kept per model (in bytes; `request_cache` bounds their count)
    # and over all models, least recently used first (see trainer_svc/replies.py).
    reply_cache_model_bytes: int = 8 * 2**20
    reply_cache_bytes: int = 64 * 2**20
    # Models one team may hold un-applied work on (a gradient, pending forwards), which
    # pins them in memory; 0 = max(1, max_loaded_models // 2). See trainer_svc/loaded.py.
    max_pinned_per_team: int = 0
    # Largest LoRA rank a fork may ask for: the samplers' adapter slots hold ranks up to
    # their own max_lora_rank (the same default), so keep the two equal.
    max_lora_rank: int = MAX_LORA_RANK
    # Client metrics one BackwardCustom may record, and the length of each key.
    max_client_metrics: int = 64
    max_metric_key_chars: int = 128
    # Length of a request_id (an idempotency key, kept in memory and on disk).
    max_request_id_chars: int = 256

    # Directories under which admins may register bases (AddBase), symlinks resolved.
    # None configured: only local mode (auth off: the local caller) may register a
    # directory, anywhere; with auth on, AddBase is refused until roots are set.
    base_roots: list[Path] = field(default_factory=list)
    # The secret gateways send (see headway.server.auth); "" = none: the trainer listens
    # on loopback only and believes the team any local caller claims.
    internal_token: str = field(default="", repr=False)
