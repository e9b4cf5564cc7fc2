"""The tiny-arith task: addition problems `a+b=`, their fixed splits, the chat and the reward.

a, b are in 0..MAX_OPERAND. A fixed split (the same for every build seed) sets aside
held-out problems (reported accuracies) and validation problems (the build's early stop);
neither is ever trained on. No torch here: the SDK's demo taskset uses this module on a
machine without it.
"""

from __future__ import annotations

import random
import re
from functools import lru_cache

MAX_OPERAND = 99  # a, b in 0..MAX_OPERAND
HELD_OUT_SIZE = 200  # reported accuracies; never trained on, never used to stop training
VALIDATION_SIZE = 200  # the early stop's problems; never trained on either
_SPLIT_SEED = 20_240_601  # fixed: the split is the same for every build seed

_PROBLEM = re.compile(r"^\s*(\d+)\s*\+\s*(\d+)\s*=?\s*$")
_LEADING_INT = re.compile(r"^\s*([+-]?\d+)")


def problem_text(a: int, b: int) -> str:
    """The user message of the problem a + b."""
    return f"{a}+{b}="


def parse_problem(text: str) -> tuple[int, int]:
    """(a, b) of a problem text `"a+b="`; ValueError if it is not one."""
    match = _PROBLEM.match(text)
    if match is None:
        raise ValueError(f"not a tiny-arith problem: {text!r} (expected 'a+b=')")
    return int(match.group(1)), int(match.group(2))


def reward(problem_text: str, completion_text: str) -> float:
    """1.0 if the completion's leading integer is a + b of the problem, else 0.0.

    Leading whitespace is skipped; whatever follows the integer is ignored ("19" and
    "19 apples" both score for 12+7=, "119" and "1 9" do not).
    """
    a, b = parse_problem(problem_text)
    match = _LEADING_INT.match(completion_text)
    return 1.0 if match is not None and int(match.group(1)) == a + b else 0.0


def chat_messages(problem: str, answer: str | None = None) -> list[dict[str, str]]:
    """The chat of one problem (and its answer, as the assistant turn)."""
    messages = [{"role": "user", "content": problem}]
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    return messages


@lru_cache(maxsize=1)
def _splits() -> tuple[tuple[tuple[int, int], ...], ...]:
    """(held-out, validation, train) pairs: a fixed split, the same for every build seed."""
    n = MAX_OPERAND + 1
    picks = random.Random(_SPLIT_SEED).sample(range(n * n), HELD_OUT_SIZE + VALIDATION_SIZE)
    held_out = tuple(divmod(i, n) for i in picks[:HELD_OUT_SIZE])
    validation = tuple(divmod(i, n) for i in picks[HELD_OUT_SIZE:])
    excluded = set(held_out) | set(validation)
    train = tuple((a, b) for a in range(n) for b in range(n) if (a, b) not in excluded)
    return held_out, validation, train


def _held_out_pairs() -> tuple[tuple[int, int], ...]:
    return _splits()[0]


def _validation_pairs() -> tuple[tuple[int, int], ...]:
    return _splits()[1]


def _train_pairs() -> tuple[tuple[int, int], ...]:
    return _splits()[2]


def held_out_problems(n: int = HELD_OUT_SIZE) -> list[tuple[str, int]]:
    """The first `n` (≤ HELD_OUT_SIZE) held-out problems as (text, answer): never trained on."""
    if not 0 <= n <= HELD_OUT_SIZE:
        raise ValueError(f"n must be in 0..{HELD_OUT_SIZE}, got {n}")
    return [(problem_text(a, b), a + b) for a, b in _held_out_pairs()[:n]]


def train_problems(n: int, seed: int = 0) -> list[tuple[str, int]]:
    """`n` problems (text, answer) drawn uniformly, with replacement, from the training pairs.

    The training pairs are all a, b in 0..MAX_OPERAND except the held-out (and validation)
    ones, so a taskset built from these never scores on the held-out problems.
    """
    pairs = _train_pairs()
    rng = random.Random(seed)
    return [(problem_text(a, b), a + b) for a, b in (rng.choice(pairs) for _ in range(n))]
