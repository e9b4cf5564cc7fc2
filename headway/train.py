"""Custom losses, client side: the tensors a loss function gets, and turning its loss into
the per-token weights `BackwardCustom` takes.

The service runs the policy forward (`ForwardCustom`) and returns, per datum, the policy's
logprobs with everything a loss needs (`DatumTensors`). The user's function computes a
scalar torch loss from them; we differentiate it with respect to the logprobs only and
send `w = -d loss / d logprob` back. The service backpropagates `-sum(w * logprob)` through
its kept forward graph, whose gradient with respect to the weights is exactly the
gradient of the user's loss, so the loss never needs the model on the client.

torch is imported inside `compute_weights` only: `import headway.train` (for the type
`DatumTensors`) costs nothing, and the built-in losses need no torch at all.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from headway.errors import InvalidArgument
from headway.tensors import floats, is_set, tokens
from headway.v1 import training_pb2

if TYPE_CHECKING:
    import torch

__all__ = ["DatumTensors", "CustomLossFn", "compute_weights", "datum_tensors"]


@dataclass
class DatumTensors:
    """One datum of a custom-loss forward, as numpy arrays (all of length N).

    `torch.tensor(datum.mask)` etc. work as is (the arrays are writable copies). Position
    i is the prediction of `target_tokens[i]`:

    - `logprobs`: the current policy's logprob of each target token (float32); the same
      values, with `requires_grad`, are passed to the loss as its second argument.
    - `target_tokens`: the target token ids (int64).
    - `sampling_logprobs`: the logprobs of the policy that sampled the tokens (float32;
      0 at prompt positions). None for a datum that had none.
    - `mask`: 1 at completion positions, 0 at prompt positions (the datum's weights).
    - `advantages`: the per-position advantage (float32; 0 at prompt positions), None when
      the datum had none.
    - `reward`: the run's reward; `advantage`: its scalar (GRPO) advantage;
      `group_index`: its group within the call.
    - `reference_logprobs`: the reference policy's logprob of each target token (float32)
      when the forward named a reference, else None.
    """

    logprobs: np.ndarray
    target_tokens: np.ndarray
    sampling_logprobs: np.ndarray | None
    mask: np.ndarray
    advantages: np.ndarray | None
    reward: float
    advantage: float
    group_index: int
    reference_logprobs: np.ndarray | None = None


CustomLossFn = Callable[
    [list[DatumTensors], "list[torch.Tensor]"], "tuple[torch.Tensor, Mapping[str, Any]]"
]


def datum_tensors(msg: training_pb2.DatumTensors, index: int) -> DatumTensors:
    """Decode one `DatumTensors` message of a ForwardCustom reply."""
    what = f"data[{index}]"

    def optional(name: str) -> np.ndarray | None:
        return floats(getattr(msg, name), f"{what}.{name}") if is_set(msg, name) else None

    return DatumTensors(
        logprobs=floats(msg.logprobs, f"{what}.logprobs"),
        target_tokens=tokens(msg.target_tokens, f"{what}.target_tokens"),
        sampling_logprobs=optional("sampling_logprobs"),
        mask=floats(msg.mask, f"{what}.mask"),
        advantages=optional("advantages"),
        reward=float(msg.reward),
        advantage=float(msg.advantage),
        group_index=int(msg.group_index),
        reference_logprobs=optional("reference_logprobs"),
    )


def _metric(name: str, value: Any) -> float:
    try:
        number = float(value.item() if hasattr(value, "item") else value)
    except (TypeError, ValueError):
        raise InvalidArgument(
            f"custom loss metric {name!r} is {value!r}: metrics must be numbers"
        ) from None
    if not math.isfinite(number):
        raise InvalidArgument(f"custom loss metric {name!r} is {number}: metrics must be finite")
    return number


def require_torch() -> None:
    """ImportError saying what to install when torch is missing (before any call is made)."""
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        raise ImportError(
            "custom losses are computed in your own torch, which is not installed: "
            "pip install 'headway[train]' (the built-in losses need no torch)"
        )


def compute_weights(
    data: list[DatumTensors], loss_fn: CustomLossFn
) -> tuple[list[np.ndarray], float, dict[str, float]]:
    """Run `loss_fn` and return (per-datum weights -d loss/d logprob, loss, metrics).

    The loss must be a scalar torch tensor; positions it does not depend on get weight 0.
    "loss:sum" is added to the metrics (unless the function reports it) so that the
    checkpoint's stats carry the loss, as for the built-in losses.
    """
    import torch

    logprobs = [torch.tensor(d.logprobs, dtype=torch.float32, requires_grad=True) for d in data]
    out = loss_fn(data, logprobs)
    if not (isinstance(out, tuple) and len(out) == 2):
        raise InvalidArgument(
            "a custom loss function returns (loss, metrics): a scalar torch tensor and a dict"
        )
    loss, user_metrics = out
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise InvalidArgument(
            f"a custom loss function returns a scalar torch tensor as its loss, got {loss!r}"
        )
    if loss.requires_grad:
        grads = torch.autograd.grad(loss.reshape(()), logprobs, allow_unused=True)
    else:  # the loss does not depend on the policy: no gradient anywhere
        grads = (None,) * len(logprobs)
    weights = [
        np.zeros(len(d.logprobs), dtype=np.float32)
        if g is None
        else (-g.detach().to(torch.float32)).numpy().copy()
        for d, g in zip(data, grads, strict=True)
    ]
    value = float(loss.detach())
    if not math.isfinite(value):
        raise InvalidArgument(f"the custom loss is {value}: it must be finite")
    for i, w in enumerate(weights):
        if not np.all(np.isfinite(w)):
            raise InvalidArgument(
                f"the custom loss's gradient for datum {i} is not finite: check the loss "
                "for exp overflow or division by zero"
            )
    metrics = {str(k): _metric(str(k), v) for k, v in dict(user_metrics or {}).items()}
    metrics.setdefault("loss:sum", value)
    return weights, value, metrics
