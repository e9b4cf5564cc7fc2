"""What the trainer's training calls take: one object per call, built from its request.

The servicer turns each request into its call (`forward_backward(request, team)`, ...)
and hands the trainer that one object: no call passes a row of loose positional fields,
and ForwardBackward and Step read their batch and loss the same way. The batch stays
protobuf (`TrainingItem`s): it is bounded and decoded later, off the event loop
(`trainer_svc.batches`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from headway.errors import InvalidArgument
from headway.v1 import common_pb2, training_pb2
from trainer_svc import compute
from trainer_svc.reference import check_coef


@dataclass
class AdamArgs:
    """AdamParams with defaults applied (these are the contract's documented defaults)."""

    learning_rate: float
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip_norm: float = 0.0

    @classmethod
    def from_pb(cls, params: common_pb2.AdamParams) -> AdamArgs:
        """The defaults above for unset optional fields."""
        return cls(
            learning_rate=params.learning_rate,
            beta1=params.beta1 if params.HasField("beta1") else cls.beta1,
            beta2=params.beta2 if params.HasField("beta2") else cls.beta2,
            eps=params.eps if params.HasField("eps") else cls.eps,
            weight_decay=params.weight_decay,
            grad_clip_norm=params.grad_clip_norm,
        )

    def check(self) -> None:
        compute.check_adam(
            self.learning_rate,
            self.beta1,
            self.beta2,
            self.eps,
            self.weight_decay,
            self.grad_clip_norm,
        )


@dataclass(frozen=True)
class BatchArgs:
    """A training batch as sent: its items, and how trajectories form GRPO groups."""

    items: Sequence[common_pb2.TrainingItem]
    group_size: int = 0
    normalize_std: bool = False


@dataclass(frozen=True)
class LossArgs:
    """A built-in loss by name, with its config keys."""

    name: str
    config: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class Call:
    """What every training call has: its model, the caller's team, an idempotency key."""

    model: str
    team: str
    request_id: str = ""


@dataclass(frozen=True)
class KlArgs:
    """A KlPenalty as sent: its coefficient and reference (a checkpoint id, "" = root)."""

    coef: float
    reference: str = ""


@dataclass(frozen=True, kw_only=True)
class ForwardBackwardCall(Call):
    batch: BatchArgs
    loss: LossArgs
    kl: KlArgs | None = None


@dataclass(frozen=True, kw_only=True)
class ForwardCustomCall(Call):
    batch: BatchArgs
    reference: str | None = None  # a checkpoint whose logprobs to return ("" = root)


@dataclass(frozen=True, kw_only=True)
class BackwardCustomCall(Call):
    forward_id: str
    # The client's per-token weights, checked against the forward, then decoded off the loop.
    weights: Sequence[common_pb2.Tensor]
    client_metrics: Mapping[str, float]  # bounded before anything is copied


@dataclass(frozen=True, kw_only=True)
class OptimStepCall(Call):
    adam: AdamArgs


@dataclass(frozen=True, kw_only=True)
class StepCall(ForwardBackwardCall):
    adam: AdamArgs


def required_model(value: str, name: str = "model") -> str:
    """`value`, or InvalidArgument when it is empty."""
    if not value:
        raise InvalidArgument(f"{name} is empty: give the model's slug")
    return value


def forward_backward(
    request: training_pb2.ForwardBackwardRequest | training_pb2.StepRequest, team: str
) -> ForwardBackwardCall:
    return ForwardBackwardCall(
        model=required_model(request.model),
        team=team,
        request_id=request.request_id,
        batch=_batch(request),
        loss=LossArgs(request.loss_fn, dict(request.loss_fn_config)),
        kl=_kl(request),
    )


def forward_custom(request: training_pb2.ForwardCustomRequest, team: str) -> ForwardCustomCall:
    return ForwardCustomCall(
        model=required_model(request.model),
        team=team,
        request_id=request.request_id,
        batch=_batch(request),
        reference=request.reference if request.HasField("reference") else None,
    )


def backward_custom(request: training_pb2.BackwardCustomRequest, team: str) -> BackwardCustomCall:
    if not request.forward_id:
        raise InvalidArgument("forward_id is empty: pass ForwardCustomResponse.forward_id")
    return BackwardCustomCall(
        model=required_model(request.model),
        team=team,
        request_id=request.request_id,
        forward_id=request.forward_id,
        weights=request.weights,
        client_metrics=request.metrics,
    )


def optim_step(request: training_pb2.OptimStepRequest, team: str) -> OptimStepCall:
    return OptimStepCall(
        model=required_model(request.model),
        team=team,
        request_id=request.request_id,
        adam=AdamArgs.from_pb(request.adam),
    )


def step(request: training_pb2.StepRequest, team: str) -> StepCall:
    fb = forward_backward(request, team)
    return StepCall(
        model=fb.model,
        team=team,
        request_id=fb.request_id,
        batch=fb.batch,
        loss=fb.loss,
        kl=fb.kl,
        adam=AdamArgs.from_pb(request.adam),
    )


def _batch(
    request: training_pb2.ForwardBackwardRequest
    | training_pb2.ForwardCustomRequest
    | training_pb2.StepRequest,
) -> BatchArgs:
    return BatchArgs(request.data, request.group_size, request.normalize_std)


def _kl(
    request: training_pb2.ForwardBackwardRequest | training_pb2.StepRequest,
) -> KlArgs | None:
    """The request's KL penalty (None when unset); its coefficient checked."""
    if not request.HasField("kl_penalty"):
        return None
    kl = request.kl_penalty
    check_coef(kl.coef)
    return KlArgs(kl.coef, kl.reference)
