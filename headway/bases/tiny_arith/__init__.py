"""`tiny-arith`: the base Headway builds itself, a small Qwen3 that adds two numbers sometimes.

No weights can be downloaded, so the default base is made here, deterministically from a
seed, in about a minute on two CPU cores. One module per role:

- `task`: the problems `a+b=` (a, b in 0..99), their fixed held-out / validation /
  training split, the chat of a problem and the `reward`. No torch, so the SDK's demo
  taskset reuses it on a machine without it.
- `tokenizer`: the character-level tokenizer and its chat template.
- `recipe`: the build's name, its `Recipe` (architecture and optimisation) and version.
- `evaluate`: completions and accuracy, decoded as the sampler does.
- `build`: pretraining until the model is right sometimes (an early stop on validation
  accuracy), so that GRPO groups carry reward spread; the result saved as a Hugging Face
  directory with the measured stats in `headway_base.json`.
- `cache`: the build cached under `headway.bases.default_cache_dir()`, published whole.

The build measures the held-out greedy accuracy and the accuracy sampled at T=1; the
figures measured across seeds, and what GRPO on this base does to them, are in the
README ("The base model: `tiny-arith`"). Importing this package imports no torch; a build
imports it when it runs.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

# The `name as name` imports: internals the tests reach for (training rows, the split).
from headway.bases.tiny_arith.build import _encode_examples as _encode_examples
from headway.bases.tiny_arith.build import build_tiny_arith
from headway.bases.tiny_arith.cache import ensure_cached
from headway.bases.tiny_arith.evaluate import accuracy, complete
from headway.bases.tiny_arith.recipe import BUILD_INFO, NAME, RECIPE_VERSION, Recipe
from headway.bases.tiny_arith.task import (
    HELD_OUT_SIZE,
    MAX_OPERAND,
    VALIDATION_SIZE,
    chat_messages,
    held_out_problems,
    parse_problem,
    problem_text,
    reward,
    train_problems,
)
from headway.bases.tiny_arith.task import _train_pairs as _train_pairs
from headway.bases.tiny_arith.task import _validation_pairs as _validation_pairs
from headway.bases.tiny_arith.tokenizer import (
    ALPHABET,
    ASSISTANT,
    CHAT_TEMPLATE,
    END,
    PAD,
    SPECIAL_TOKENS,
    SYSTEM,
    UNK,
    USER,
    build_tokenizer,
)


def ensure_tiny_arith(
    cache_dir: Path | None = None,
    progress: Callable[[int, int, float], None] | None = None,
) -> Path:
    """`cache_dir/tiny-arith`, built first if it is missing or of an older recipe.

    The build goes into a temp directory beside it and is renamed into place once complete,
    so an interrupted build leaves no half-written base; if another process publishes the
    base first, its build is kept. `cache_dir` defaults to `headway.bases.default_cache_dir()`.
    `progress(step, steps, loss)` is called as the build trains.
    """
    # `build_tiny_arith` is looked up in this module when called, so replacing it here
    # (a shorter build in the CLI's and the cache's tests) reaches the cache too.
    return ensure_cached(cache_dir, lambda out: build_tiny_arith(out, progress=progress))


__all__ = [
    "ALPHABET",
    "ASSISTANT",
    "BUILD_INFO",
    "CHAT_TEMPLATE",
    "END",
    "HELD_OUT_SIZE",
    "MAX_OPERAND",
    "NAME",
    "PAD",
    "RECIPE_VERSION",
    "SPECIAL_TOKENS",
    "SYSTEM",
    "UNK",
    "USER",
    "VALIDATION_SIZE",
    "Recipe",
    "accuracy",
    "build_tiny_arith",
    "build_tokenizer",
    "chat_messages",
    "complete",
    "ensure_tiny_arith",
    "held_out_problems",
    "parse_problem",
    "problem_text",
    "reward",
    "train_problems",
]
