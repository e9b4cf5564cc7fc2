"""A training call's batch: bounded before anything is decoded, then assembled off the loop.

Two steps, in this order, so that a request's size costs nothing before it is accepted:

1. `check_size` reads only counts and byte lengths (`declared_lengths`): items per call,
   turns per call, each datum against the model's context, the batch's tokens. It walks
   the items and turns once (bounded by the counts it checks first) and decodes nothing,
   so a request of millions of tiny datums is refused for its count, never decoded.
2. `assemble` decodes and validates (`assemble_batch`), checks the vocabulary and the
   exact lengths. It is CPU work proportional to the request, so the trainer runs it in
   a worker thread: the event loop keeps serving every other model meanwhile.

Errors are RESOURCE_EXHAUSTED naming the limit and how to split the call, or the
INVALID_ARGUMENT of the first malformed field.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from headway.errors import ResourceExhausted
from headway.v1 import common_pb2
from trainer_svc.datums import Batch, assemble_batch, check_vocab, declared_lengths

SPLIT_HINT = "split it over several calls (the SDK's num_substeps does)"


@dataclass(frozen=True)
class BatchLimits:
    """What one training call may carry (see TrainerConfig)."""

    max_items: int  # datums + trajectories
    max_turns: int  # turns over all trajectories
    max_tokens: int  # positions over all datums the batch becomes


def check_size(items: Sequence[common_pb2.TrainingItem], limits: BatchLimits, context: int) -> None:
    """ResourceExhausted for a request over a limit, judged on counts and byte lengths.

    O(items + turns) and both are checked against their limits before the walk that
    measures tokens, so the walk itself is bounded.
    """
    if len(items) > limits.max_items:
        raise ResourceExhausted(
            f"data has {len(items)} items, over the trainer's limit of {limits.max_items} "
            f"per call; {SPLIT_HINT}"
        )
    turns = sum(len(item.trajectory.turns) for item in items if item.HasField("trajectory"))
    if turns > limits.max_turns:
        raise ResourceExhausted(
            f"data has {turns} trajectory turns, over the trainer's limit of "
            f"{limits.max_turns} per call; {SPLIT_HINT}"
        )
    total = 0
    for i, item in enumerate(items):
        for length in declared_lengths(item):
            if length > context:
                raise ResourceExhausted(
                    f"data[{i}] makes a datum of {length} tokens, over the model's context "
                    f"of {context}; shorten it"
                )
            total += length
    _check_total(total, limits)


def assemble(
    items: Sequence[common_pb2.TrainingItem],
    *,
    limits: BatchLimits,
    vocab_size: int,
    context: int,
    group_size: int,
    normalize_std: bool,
) -> Batch:
    """`check_size`, then decode and validate the batch (CPU work: run it in a thread)."""
    check_size(items, limits, context)
    batch = assemble_batch(items, group_size=group_size, normalize_std=normalize_std)
    check_vocab(batch.datums, vocab_size)
    # The exact lengths: `declared_lengths` may undercount a trajectory whose turns mix
    # token dtypes, never overcount.
    for j, d in enumerate(batch.datums):
        if len(d.input_tokens) > context:
            raise ResourceExhausted(
                f"datum {j} ({d.source}) has {len(d.input_tokens)} tokens, over the model's "
                f"context of {context}; shorten it"
            )
    _check_total(sum(len(d.input_tokens) for d in batch.datums), limits)
    return batch


def _check_total(total: int, limits: BatchLimits) -> None:
    if total > limits.max_tokens:
        raise ResourceExhausted(
            f"batch of {total} tokens is over the trainer's limit of {limits.max_tokens}; "
            f"{SPLIT_HINT}"
        )
