"""What a tiny-arith build is made of: its name, its recipe, and the recipe's version."""

from __future__ import annotations

from dataclasses import dataclass

NAME = "tiny-arith"
# Bump when anything that changes the built files changes: a cached build of another
# recipe is rebuilt by `ensure_tiny_arith`.
RECIPE_VERSION = 1
BUILD_INFO = "headway_base.json"  # the recipe and the measured stats, beside the weights


@dataclass(frozen=True)
class Recipe:
    """Architecture and optimisation of the build (the defaults are `tiny-arith`)."""

    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 256
    rope_theta: float = 10_000.0
    init_std: float = 0.02
    batch_size: int = 64
    learning_rate: float = 3e-3  # constant after a linear warmup
    warmup_steps: int = 50
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    grad_clip_norm: float = 1.0
    threads: int = 1  # fixed, so the floating-point reductions (and the bytes) never vary
    eval_samples: int = 4  # T=1 samples per held-out problem for the sampled accuracy
    # Early stop: every `eval_every` steps, greedy accuracy on the validation problems (never
    # trained on, disjoint from the held-out ones); training stops once it reaches
    # `target_accuracy`. When a seed "gets" addition varies by hundreds of steps, and the
    # accuracy then rises fast, so a fixed step count would land almost anywhere.
    target_accuracy: float = 0.4
    eval_every: int = 10
