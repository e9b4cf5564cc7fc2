"""Custom-loss forwards between ForwardCustom and BackwardCustom: their bounds, and the
checks of what BackwardCustom brings back.

A kept forward holds its datums, padded chunk tensors, logprobs and, when it fits, its
autograd graph (activations: the largest part). Per model at most `per_model` forwards
and `model_bytes` bytes, and at most `total_bytes` over every model. The graph is what
gives way first: a forward whose graph does not fit keeps only its inputs and its
BackwardCustom recomputes the forward (same numbers, one more forward pass). A forward
whose inputs alone do not fit is refused, RESOURCE_EXHAUSTED, before it runs.

BackwardCustom's weights are checked against the forward's datums on their byte lengths
before any is decoded, and its client metrics are bounded in count and key length.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from headway.errors import InvalidArgument, ResourceExhausted
from headway.tensors import declared_size, floats
from headway.v1 import common_pb2
from trainer_svc.compute import KeptForward
from trainer_svc.datums import DatumArrays

# Bytes a forward's inputs take per token before it runs (datum arrays ~28, padded chunk
# tensors ~29, logprobs 4): the estimate its admission is checked with.
INPUT_BYTES_PER_TOKEN = 64

_HOW = "run BackwardCustom on a pending forward_id (or optim_step, which discards them) first"


@dataclass(frozen=True)
class ForwardLimits:
    """What pending forwards may hold (see TrainerConfig)."""

    per_model: int
    model_bytes: int
    total_bytes: int

    def check_room(
        self, slug: str, pending: Iterable[KeptForward], total: int, tokens: int
    ) -> None:
        """Before a ForwardCustom of `tokens` positions on `slug`, whose pending forwards
        are `pending`, with `total` bytes pending over all models: refuse what cannot fit."""
        pending = list(pending)
        if len(pending) >= self.per_model:
            raise ResourceExhausted(
                f"model {slug!r} has {len(pending)} custom-loss forwards awaiting "
                f"BackwardCustom, the trainer's limit per model; {_HOW}"
            )
        model = sum(k.nbytes for k in pending)
        self._check_bytes(slug, model, total, tokens * INPUT_BYTES_PER_TOKEN)

    def admit(
        self, slug: str, kept: KeptForward, pending: Iterable[KeptForward], total: int
    ) -> None:
        """After the forward ran: drop its graph if that does not fit, refuse it if even
        its inputs do not (other forwards were admitted meanwhile)."""
        model = sum(k.nbytes for k in pending)
        if model + kept.nbytes > self.model_bytes or total + kept.nbytes > self.total_bytes:
            kept.drop_graphs()
        self._check_bytes(slug, model, total, kept.nbytes)

    def _check_bytes(self, slug: str, model: int, total: int, new: int) -> None:
        if model + new > self.model_bytes:
            raise ResourceExhausted(
                f"model {slug!r}'s pending custom-loss forwards would hold {model + new} "
                f"bytes, over the trainer's limit of {self.model_bytes} per model; {_HOW}, "
                "or send a smaller batch"
            )
        if total + new > self.total_bytes:
            raise ResourceExhausted(
                f"pending custom-loss forwards would hold {total + new} bytes over all "
                f"models, over the trainer's limit of {self.total_bytes}; {_HOW}, "
                "or send a smaller batch"
            )


def check_weight_sizes(weights: Sequence[common_pb2.Tensor], datums: list[DatumArrays]) -> None:
    """The custom-loss weights match the forward's datums, judged on byte lengths."""
    if len(weights) != len(datums):
        raise InvalidArgument(
            f"weights has {len(weights)} tensors but the forward had {len(datums)} datums; "
            "send one per datum, in order"
        )
    for i, (w, d) in enumerate(zip(weights, datums, strict=True)):
        if declared_size(w) != len(d.input_tokens):
            raise InvalidArgument(
                f"weights[{i}] has {declared_size(w)} values but datum {i} has "
                f"{len(d.input_tokens)} positions"
            )


def decode_weights(
    weights: Sequence[common_pb2.Tensor], datums: list[DatumArrays]
) -> list[np.ndarray]:
    """The weights as float32 arrays (finite), one per datum of the forward."""
    decoded = [floats(w, f"weights[{i}]") for i, w in enumerate(weights)]
    for i, (w, d) in enumerate(zip(decoded, datums, strict=True)):
        if len(w) != len(d.input_tokens):  # a shape that disagrees with the bytes
            raise InvalidArgument(
                f"weights[{i}] has {len(w)} values but datum {i} has "
                f"{len(d.input_tokens)} positions"
            )
    return decoded


def check_client_metrics(metrics: Mapping[str, float], limit: int, chars: int) -> None:
    """InvalidArgument for client metrics over the count or key-length limits, or
    not finite: they are stored in the checkpoint's stats."""
    if len(metrics) > limit:
        raise InvalidArgument(
            f"metrics has {len(metrics)} keys, over the trainer's limit of {limit}; "
            "send fewer (aggregate them client-side)"
        )
    for key, value in metrics.items():
        if len(key) > chars:
            raise InvalidArgument(
                f"metrics key {key[:40]!r}... has {len(key)} characters, over the "
                f"trainer's limit of {chars}; use a shorter name"
            )
        if not math.isfinite(value):
            raise InvalidArgument(f"metrics[{key!r}] = {value} is not finite")
