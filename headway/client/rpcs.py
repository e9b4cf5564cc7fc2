"""One builder per RPC the SDK makes: which service, which method, and the request.

Each function returns a `Call` that `Connection.call` sends as is (retries included), so
a request message is built in exactly one place. Every write carries a fresh request id
(`request_id()`), the idempotency key its retries share: the trainer answers a repeated
id with its first reply instead of applying the call again.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from headway.tensors import to_tensor
from headway.v1 import (
    common_pb2,
    model_pb2,
    model_pb2_grpc,
    sampling_pb2,
    sampling_pb2_grpc,
    trace_pb2,
    trace_pb2_grpc,
    training_pb2,
    training_pb2_grpc,
)

_TRAINING = training_pb2_grpc.TrainingServiceStub
_MODELS = model_pb2_grpc.ModelServiceStub
_SAMPLING = sampling_pb2_grpc.SamplingServiceStub
_TRACES = trace_pb2_grpc.TraceServiceStub


@dataclass(frozen=True)
class Call:
    """One RPC ready to send: the stub class, its method's name and the request."""

    stub: type
    method: str
    request: Any


def request_id() -> str:
    """A fresh idempotency key for one logical call (shared by its retries)."""
    return f"sdk-{uuid.uuid4().hex}"


def adam(
    learning_rate: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    grad_clip_norm: float,
) -> common_pb2.AdamParams:
    """The AdamW hyperparameters of an OptimStep or Step."""
    return common_pb2.AdamParams(
        learning_rate=learning_rate,
        beta1=beta1,
        beta2=beta2,
        eps=eps,
        weight_decay=weight_decay,
        grad_clip_norm=grad_clip_norm,
    )


# ------------------------------------------------------------------ TrainingService


def kl_penalty(coef: float, reference: str | None) -> training_pb2.KlPenalty | None:
    """The KlPenalty to send: none when the coefficient is 0 and no reference is named
    (naming one with coefficient 0 reports kl/reference without penalising)."""
    if not coef and reference is None:
        return None
    return training_pb2.KlPenalty(coef=coef, reference=reference or "")


def _loss_batch(
    model: str,
    items: Sequence[common_pb2.TrainingItem],
    loss_fn: str,
    loss_fn_config: Mapping[str, float] | None,
    group_size: int,
    normalize_std: bool,
    kl: training_pb2.KlPenalty | None,
) -> dict[str, Any]:
    """The fields ForwardBackwardRequest and StepRequest share: a batch and its built-in
    loss (with its KL penalty, if any)."""
    return {
        "model": model,
        "data": items,
        "loss_fn": loss_fn,
        "loss_fn_config": dict(loss_fn_config or {}),
        "group_size": group_size,
        "normalize_std": normalize_std,
        "kl_penalty": kl,
    }


def forward_backward(
    model: str,
    items: Sequence[common_pb2.TrainingItem],
    loss_fn: str,
    loss_fn_config: Mapping[str, float] | None,
    group_size: int,
    normalize_std: bool,
    kl: training_pb2.KlPenalty | None = None,
) -> Call:
    """ForwardBackward: accumulate a built-in loss's gradient over `items`."""
    batch = _loss_batch(model, items, loss_fn, loss_fn_config, group_size, normalize_std, kl)
    return Call(
        _TRAINING,
        "ForwardBackward",
        training_pb2.ForwardBackwardRequest(**batch, request_id=request_id()),
    )


def optim_step(model: str, adam_params: common_pb2.AdamParams) -> Call:
    """OptimStep: apply the accumulated gradient, checkpoint, promote to head."""
    return Call(
        _TRAINING,
        "OptimStep",
        training_pb2.OptimStepRequest(model=model, adam=adam_params, request_id=request_id()),
    )


def step(
    model: str,
    items: Sequence[common_pb2.TrainingItem],
    loss_fn: str,
    loss_fn_config: Mapping[str, float] | None,
    group_size: int,
    normalize_std: bool,
    adam_params: common_pb2.AdamParams,
    kl: training_pb2.KlPenalty | None = None,
) -> Call:
    """Step: ForwardBackward over `items` then OptimStep, in one call."""
    batch = _loss_batch(model, items, loss_fn, loss_fn_config, group_size, normalize_std, kl)
    return Call(
        _TRAINING,
        "Step",
        training_pb2.StepRequest(**batch, adam=adam_params, request_id=request_id()),
    )


def forward_custom(
    model: str,
    items: Sequence[common_pb2.TrainingItem],
    group_size: int,
    normalize_std: bool,
    reference: str | None = None,
) -> Call:
    """ForwardCustom: the first half of a custom loss (the policy's logprobs, and the
    `reference` checkpoint's when one is named: "" = the model's root)."""
    return Call(
        _TRAINING,
        "ForwardCustom",
        training_pb2.ForwardCustomRequest(
            model=model,
            data=items,
            group_size=group_size,
            normalize_std=normalize_std,
            request_id=request_id(),
            reference=reference,
        ),
    )


def backward_custom(
    model: str, forward_id: str, weights: Sequence[Any], metrics: Mapping[str, float]
) -> Call:
    """BackwardCustom: backpropagate sum(weights * logprobs) of a ForwardCustom."""
    return Call(
        _TRAINING,
        "BackwardCustom",
        training_pb2.BackwardCustomRequest(
            model=model,
            forward_id=forward_id,
            weights=[to_tensor(w, common_pb2.DTYPE_FLOAT32) for w in weights],
            metrics=metrics,
            request_id=request_id(),
        ),
    )


def available_losses(model: str) -> Call:
    """AvailableLosses: the built-in losses `model` accepts."""
    return Call(_TRAINING, "AvailableLosses", training_pb2.AvailableLossesRequest(model=model))


# --------------------------------------------------------------------- ModelService


def list_models(with_size: bool = False) -> Call:
    """ListModels: the models the caller can see (with their bytes in the store)."""
    return Call(_MODELS, "ListModels", model_pb2.ListModelsRequest(with_size=with_size))


def get_model(model: str) -> Call:
    """GetModel: one model of the catalogue."""
    return Call(_MODELS, "GetModel", model_pb2.GetModelRequest(model=model))


def fork_model(
    source: str, name: str, lora_rank: int, full: bool, checkpoint: str, with_optimizer: bool
) -> Call:
    """ForkModel: a trainable model from a base or one of the caller's models."""
    request = model_pb2.ForkModelRequest(
        source=source, name=name, checkpoint=checkpoint, with_optimizer=with_optimizer
    )
    if full:
        request.full = True
    if lora_rank:
        request.lora.CopyFrom(common_pb2.LoraConfig(rank=lora_rank))
    return Call(_MODELS, "ForkModel", request)


def add_base(path: str, name: str) -> Call:
    """AddBase: register a Hugging Face directory of the servers as a base."""
    return Call(_MODELS, "AddBase", model_pb2.AddBaseRequest(path=path, name=name))


def delete_model(model: str) -> Call:
    """DeleteModel: one of the caller's models, its checkpoints with it."""
    return Call(_MODELS, "DeleteModel", model_pb2.DeleteModelRequest(model=model))


def list_checkpoints(model: str) -> Call:
    """ListCheckpoints: the model's checkpoint tree."""
    return Call(_MODELS, "ListCheckpoints", model_pb2.ListCheckpointsRequest(model=model))


def get_head(model: str) -> Call:
    """GetHead: the model's head checkpoint."""
    return Call(_MODELS, "GetHead", model_pb2.GetHeadRequest(model=model))


def set_head(model: str, checkpoint: str) -> Call:
    """SetHead: move the model's head to `checkpoint`."""
    return Call(_MODELS, "SetHead", model_pb2.SetHeadRequest(model=model, checkpoint=checkpoint))


def tag(model: str, checkpoint: str, name: str, remove: bool = False) -> Call:
    """TagCheckpoint: name `checkpoint` of `model` `name` (or remove the tag)."""
    request = model_pb2.TagCheckpointRequest(
        model=model, checkpoint=checkpoint, tag=name, remove=remove
    )
    return Call(_MODELS, "TagCheckpoint", request)


def record_eval(model: str, checkpoint: str, metrics: Mapping[str, float]) -> Call:
    """RecordEval: evaluation results onto a checkpoint."""
    request = model_pb2.RecordEvalRequest(model=model, checkpoint=checkpoint, metrics=metrics)
    return Call(_MODELS, "RecordEval", request)


def delete_checkpoint(model: str, checkpoint: str) -> Call:
    """DeleteCheckpoint: remove one checkpoint of `model`."""
    request = model_pb2.DeleteCheckpointRequest(model=model, checkpoint=checkpoint)
    return Call(_MODELS, "DeleteCheckpoint", request)


def retention_policy(keep_last: int, keep_every: int, keep_lineage: int) -> Any:
    """A RetentionPolicy message."""
    return common_pb2.RetentionPolicy(
        keep_last=keep_last, keep_every=keep_every, keep_lineage=keep_lineage
    )


def prune(model: str, policy: Any | None, dry_run: bool) -> Call:
    """PruneCheckpoints: delete what `policy` (None: the model's own) does not keep."""
    request = model_pb2.PruneCheckpointsRequest(model=model, policy=policy, dry_run=dry_run)
    return Call(_MODELS, "PruneCheckpoints", request)


def set_retention(model: str, policy: Any) -> Call:
    """SetRetention: the model's policy, applied after each optim step."""
    return Call(_MODELS, "SetRetention", model_pb2.SetRetentionRequest(model=model, policy=policy))


# ------------------------------------------------------------------ SamplingService


def sample(
    model: str,
    prompt: str | Sequence[int],
    *,
    n: int,
    max_tokens: int,
    temperature: float,
    top_p: float,
    top_k: int,
    stop: str | Sequence[str] | None,
    seed: int | None,
    checkpoint: str | None,
    stop_token_ids: Sequence[int] | None,
    ignore_eos: bool,
    top_logprobs: int = 0,
    prompt_logprobs: bool = False,
) -> Call:
    """Sample: `n` completions of `prompt` (text, or token ids sent as an int32 tensor)."""
    params = common_pb2.SamplingParams(
        max_tokens=max_tokens,
        n=n,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        stop=[stop] if isinstance(stop, str) else list(stop or []),
        stop_token_ids=list(stop_token_ids or []),
        ignore_eos=ignore_eos,
        top_logprobs=top_logprobs,
    )
    if seed is not None:
        params.seed = seed
    request = sampling_pb2.SampleRequest(
        model=model,
        params=params,
        checkpoint=checkpoint or "",
        include_prompt_logprobs=prompt_logprobs,
    )
    if isinstance(prompt, str):
        request.prompt_text = prompt
    else:
        ids = np.asarray(list(prompt), dtype=np.int64)
        request.prompt_tokens.CopyFrom(to_tensor(ids, common_pb2.DTYPE_INT32))
    return Call(_SAMPLING, "Sample", request)


def compute_logprobs(
    model: str, sequences: Sequence[Sequence[int]], checkpoint: str | None
) -> Call:
    """ComputeLogprobs: each sequence's per-token logprobs (int32 tensors on the wire)."""
    request = sampling_pb2.ComputeLogprobsRequest(
        model=model,
        checkpoint=checkpoint or "",
        sequences=[
            to_tensor(np.asarray(list(s), dtype=np.int64), common_pb2.DTYPE_INT32)
            for s in sequences
        ],  # fmt: skip
    )
    return Call(_SAMPLING, "ComputeLogprobs", request)


# --------------------------------------------------------------------- TraceService


def set_reward(trace_id: str, reward: float) -> Call:
    """SetReward: attach `reward` to a trace."""
    return Call(
        _TRACES, "SetReward", trace_pb2.SetRewardRequest(trace_id=trace_id, reward=float(reward))
    )


def get_trace(trace_id: str) -> Call:
    """GetTrace: a stored trace."""
    return Call(_TRACES, "GetTrace", trace_pb2.GetTraceRequest(trace_id=trace_id))
