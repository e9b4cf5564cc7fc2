"""The LoRA settings a fork may ask for: what a sampler can serve and the model can hold.

- rank: 0 takes the default (32, lowered to the bounds below when they are smaller);
  otherwise 1 ≤ rank ≤ `max_rank` (the samplers' adapter slots hold ranks up to their
  own `max_lora_rank`) and ≤ min(in_features, out_features) of every targeted
  projection (a larger rank adds parameters and no expressiveness).
- alpha: 0 = the rank (scale 1); otherwise finite and > 0.
- target_modules: known projection names (duplicates collapse), at least one of which
  the model has.

Violations are INVALID_ARGUMENT naming the bound.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from headway.errors import InvalidArgument
from headway.modeling import LoraConfig, ModelConfig
from headway.modeling.load import empty_model
from headway.modeling.lora import KNOWN_TARGETS

DEFAULT_RANK = 32


@dataclass(frozen=True)
class LoraRequest:
    """The LoraConfig fields of a ForkModel request, as sent (0 / empty = default)."""

    rank: int = 0
    alpha: float = 0.0
    target_modules: tuple[str, ...] = ()


def lora_config(ask: LoraRequest, max_rank: int, model: ModelConfig) -> LoraConfig:
    """A valid `LoraConfig` for a fork of a model of architecture `model` (see above)."""
    rank, alpha = ask.rank, ask.alpha
    targets = tuple(dict.fromkeys(ask.target_modules)) or model.lora_targets
    unknown = [t for t in targets if t not in KNOWN_TARGETS]
    if unknown:
        raise InvalidArgument(
            f"lora.target_modules {unknown} are not projection names; choose among "
            f"{', '.join(KNOWN_TARGETS)}"
        )
    smallest = _smallest_dims(model, targets)
    if not smallest:
        raise InvalidArgument(
            f"lora.target_modules {list(targets)}: the model has none of these projections"
        )
    bound = min(max_rank, min(smallest.values()))
    if rank == 0:
        rank = min(DEFAULT_RANK, bound)
    if rank < 1:
        raise InvalidArgument(f"lora.rank is {rank}: it must be >= 1 (0 = the default)")
    if rank > max_rank:
        raise InvalidArgument(
            f"lora.rank {rank} is over the trainer's limit of {max_rank} (the largest rank "
            f"the samplers serve); choose a rank <= {max_rank}"
        )
    name, dim = min(smallest.items(), key=lambda kv: kv[1])
    if rank > dim:
        raise InvalidArgument(
            f"lora.rank {rank} is over min(in_features, out_features) = {dim} of {name}; "
            f"choose a rank <= {dim}"
        )
    if not math.isfinite(alpha) or alpha < 0:
        raise InvalidArgument(
            f"lora.alpha is {alpha}: it must be a finite number > 0 (0 = the rank, scale 1)"
        )
    return LoraConfig(rank, alpha, targets)


def _smallest_dims(model: ModelConfig, targets: tuple[str, ...]) -> dict[str, int]:
    """min(in_features, out_features) over the model's projections of each targeted name."""
    shell = empty_model(model)  # the family's model on the meta device: shapes only
    dims: dict[str, int] = {}
    for module in shell.modules():
        for name, child in module.named_children():
            if name in targets and isinstance(child, torch.nn.Linear):
                dim = min(child.in_features, child.out_features)
                dims[name] = min(dims.get(name, dim), dim)
    return dims


def lora_dict(lora: LoraConfig) -> dict[str, Any]:
    """`lora` as stored in model.json (ModelRecord.lora)."""
    return {"rank": lora.rank, "alpha": lora.alpha, "target_modules": list(lora.target_modules)}
