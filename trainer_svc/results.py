"""What the trainer's calls return (before the servicers turn it into replies), and the
size of a reply kept for retries."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from headway.store import CheckpointRecord
from trainer_svc.datums import DatumArrays


@dataclass
class ForwardResult:
    """Result of ForwardBackward (and of ForwardCustom's forward half)."""

    logprobs: list[np.ndarray]
    metrics: dict[str, float]
    num_datums: int
    num_tokens: int
    datums: list[DatumArrays] = field(default_factory=list)
    forward_id: str = ""
    reference_logprobs: list[np.ndarray] | None = None  # ForwardCustom's, when asked for


@dataclass
class OptimResult:
    """Result of OptimStep (and of Step's second half): the new head. The SDK's
    `headway.StepResult` is another thing: a whole Step's reply.
    """

    checkpoint: CheckpointRecord
    sampler_path: str
    state_path: str


def reply_bytes(value: Any) -> int:
    """Payload bytes of a stored reply: its arrays, and a bound for metrics and records."""
    if isinstance(value, tuple):
        return sum(reply_bytes(v) for v in value)
    if isinstance(value, ForwardResult):
        return sum(lp.nbytes for lp in value.logprobs) + 96 * len(value.metrics)
    if isinstance(value, OptimResult):
        stats = value.checkpoint.stats or {}
        return 1024 + 96 * len(stats.get("metrics", {}))
    return 1024
