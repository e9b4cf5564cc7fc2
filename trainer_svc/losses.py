"""Built-in losses, per token, summed (not averaged), as Tinker defines them.

Each loss sees the trained tokens of a batch flattened: lp (current policy logprob of the
target, with grad), q (sampling logprob), A (advantage), w (weight/mask). With
ratio = exp(lp − q):

    cross_entropy        −w·lp
    importance_sampling  −w·ratio·A
    ppo                  −w·min(ratio·A, clip(ratio, lo, hi)·A)
    cispo                −w·sg(clip(ratio, lo, hi))·A·lp
    dro                  −w·(A·lp − ½β(lp − q)²)

Normalisation is the caller's (through weights or advantages), so a loss over two calls
accumulates exactly as over one.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from headway.errors import InvalidArgument


@dataclass(frozen=True)
class ConfigKey:
    """One hyperparameter of a loss."""

    name: str
    default: float
    description: str


@dataclass(frozen=True)
class TokenInputs:
    """The trained tokens of a batch, flattened (all `[T]`)."""

    lp: torch.Tensor  # current policy logprob of each target (requires grad)
    w: torch.Tensor  # weight / mask
    q: torch.Tensor | None  # sampling logprob
    a: torch.Tensor | None  # advantage


LossFn = Callable[[TokenInputs, dict[str, float]], tuple[torch.Tensor, dict[str, float]]]


@dataclass(frozen=True)
class Loss:
    """A built-in loss: its function, config keys and whether it needs sampling inputs."""

    name: str
    description: str
    fn: LossFn
    config: tuple[ConfigKey, ...] = ()
    needs_sampling: bool = True  # sampling_logprobs and advantages required


def _ratio(t: TokenInputs) -> torch.Tensor:
    return torch.exp(t.lp - t.q)


def _bounds(cfg: dict[str, float]) -> tuple[float, float]:
    if "epsilon" in cfg:
        return 1.0 - cfg["epsilon"], 1.0 + cfg["epsilon"]
    return cfg["clip_low_threshold"], cfg["clip_high_threshold"]


def _clip_fraction(ratio: torch.Tensor, w: torch.Tensor, lo: float, hi: float) -> float:
    clipped = ((ratio < lo) | (ratio > hi)).float()
    return float((clipped * (w != 0)).sum() / (w != 0).sum().clamp(min=1))


def cross_entropy(t: TokenInputs, cfg: dict[str, float]) -> tuple[torch.Tensor, dict[str, float]]:
    return -(t.w * t.lp).sum(), {}


def importance_sampling(
    t: TokenInputs, cfg: dict[str, float]
) -> tuple[torch.Tensor, dict[str, float]]:
    return -(t.w * _ratio(t) * t.a).sum(), {}


def ppo(t: TokenInputs, cfg: dict[str, float]) -> tuple[torch.Tensor, dict[str, float]]:
    lo, hi = _bounds(cfg)
    ratio = _ratio(t)
    objective = torch.minimum(ratio * t.a, ratio.clamp(lo, hi) * t.a)
    return -(t.w * objective).sum(), {"clip/fraction": _clip_fraction(ratio, t.w, lo, hi)}


def cispo(t: TokenInputs, cfg: dict[str, float]) -> tuple[torch.Tensor, dict[str, float]]:
    lo, hi = _bounds(cfg)
    ratio = _ratio(t)
    weight = ratio.clamp(lo, hi).detach()  # stop-gradient: the ratio only scales
    loss = -(t.w * weight * t.a * t.lp).sum()
    return loss, {"clip/fraction": _clip_fraction(ratio, t.w, lo, hi)}


def dro(t: TokenInputs, cfg: dict[str, float]) -> tuple[torch.Tensor, dict[str, float]]:
    beta = cfg["beta"]
    return -(t.w * (t.a * t.lp - 0.5 * beta * (t.lp - t.q) ** 2)).sum(), {}


_CLIP = (
    ConfigKey("clip_low_threshold", 0.8, "lower bound of the ratio clip (lo)"),
    ConfigKey("clip_high_threshold", 1.2, "upper bound of the ratio clip (hi)"),
    ConfigKey("epsilon", 0.2, "symmetric clip: lo = 1 − ε, hi = 1 + ε (instead of the two)"),
)

LOSSES: dict[str, Loss] = {
    loss.name: loss
    for loss in (
        Loss(
            "cross_entropy",
            "−w·logp: supervised next-token loss",
            cross_entropy,
            needs_sampling=False,
        ),
        Loss("importance_sampling", "−ratio·A: off-policy policy gradient", importance_sampling),
        Loss("ppo", "−min(ratio·A, clip(ratio, lo, hi)·A): clipped surrogate", ppo, _CLIP),
        Loss("cispo", "−sg(clip(ratio, lo, hi))·A·logp: clipped IS weight", cispo, _CLIP),
        Loss(
            "dro",
            "−(A·logp − ½β(logp − q)²): direct reward optimisation",
            dro,
            (ConfigKey("beta", 0.05, "weight of the quadratic penalty"),),
        ),
    )
}


def resolve(name: str, config: dict[str, float]) -> tuple[Loss, dict[str, float]]:
    """The loss called `name` and its full config (defaults filled); InvalidArgument if bad."""
    if name not in LOSSES:
        raise InvalidArgument(
            f"unknown loss_fn {name!r}; choose one of {', '.join(LOSSES)} "
            "(or use ForwardCustom/BackwardCustom for your own)"
        )
    loss = LOSSES[name]
    keys = {k.name: k for k in loss.config}
    unknown = sorted(set(config) - set(keys))
    if unknown:
        allowed = ", ".join(keys) if keys else "none"
        raise InvalidArgument(
            f"loss_fn_config key(s) {', '.join(unknown)} not accepted by {name} "
            f"(accepted: {allowed})"
        )
    for key, value in config.items():
        if not math.isfinite(value):
            raise InvalidArgument(f"loss_fn_config[{key!r}] = {value} is not finite")
    if "epsilon" in config and {"clip_low_threshold", "clip_high_threshold"} & set(config):
        raise InvalidArgument("give either epsilon or the clip thresholds, not both")
    full = {k.name: config.get(k.name, k.default) for k in loss.config if k.name != "epsilon"}
    if "epsilon" in config:
        full["epsilon"] = config["epsilon"]
    if "clip_low_threshold" in full:
        lo, hi = _bounds(full)
        if not 0 <= lo <= 1 <= hi:
            raise InvalidArgument(f"clip bounds must satisfy 0 ≤ lo ≤ 1 ≤ hi; got {lo}, {hi}")
    if "beta" in full and full["beta"] < 0:
        raise InvalidArgument(f"beta must be ≥ 0; got {full['beta']}")
    return loss, full
