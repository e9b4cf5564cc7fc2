"""Bad input on every service, over gRPC and HTTP: the exact status, a message that says
what to fix, and nothing changed.

One table covers every RPC of the contract (through the gateway, and straight at the
backends for the internal token) and every route of the OpenAI-compatible HTTP API. Each
case runs against one deployment with history (tests/helpers_bad_input.py: auth on, two
teams, a fork with two trained steps, a gradient and a forward in progress, traces), and
must leave all of it as it was: every model's head and checkpoint tree, the fork's
gradient, weights, statistics and pending forwards, every trace and every Redis key.
The other error tests go deeper on one service each; this is the one place that checks
them all side by side.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
import pytest

from headway.tensors import to_tensor
from headway.v1 import (
    common_pb2,
    model_pb2,
    sampling_pb2,
    trace_pb2,
    training_pb2,
)
from tests.conftest import VOCAB
from tests.helpers_bad_input import (
    BLUE_FORK,
    CHAT,
    FORK,
    World,
    build_world,
    call_grpc,
    call_http,
    changes,
    snapshot,
)
from tests.helpers_training import adam, batch, items, rl_datum

Code = grpc.StatusCode
I32, F32 = common_pb2.DTYPE_INT32, common_pb2.DTYPE_FLOAT32
PROMPT = [5, 17, 33, 8, 41, 12]
GARBAGE = b"\xff\xff\xff\xff"  # not a protobuf message of any type
SERVER_STREAMING = {"ModelService.ExportCheckpoint"}  # besides the *Stream methods


@dataclass(frozen=True)
class Case:
    """One bad request: where it goes, what it is, and the answer it must get.

    `service` is "Service.Method" (gRPC) or "METHOD /path" (HTTP); `request` builds the
    message (or raw bytes) or the JSON body (a dict, or raw bytes) from the world; `who`
    is the caller (see `World.metadata`); `via` the gRPC server called; `status` a gRPC
    status or an HTTP status; `message` a regex the error message must match, naming the
    field or limit and what to do.
    """

    name: str
    surface: str  # "grpc" | "http"
    service: str
    request: Callable[[World], Any]
    status: Code | int
    message: str
    who: str = "red"
    via: str = "gateway"
    headers: dict[str, str] = field(default_factory=dict)


def rpc(name: str, service: str, request: Callable[[World], Any], status: Code, message: str,
        **kw: Any) -> Case:  # fmt: skip
    return Case(name, "grpc", service, request, status, message, **kw)


def http(name: str, route: str, body: Callable[[World], Any], status: int, message: str,
         **kw: Any) -> Case:  # fmt: skip
    return Case(name, "http", route, body, status, message, **kw)


# ------------------------------------------------------------------------ builders


def tokens(ids: list[int]) -> common_pb2.Tensor:
    return to_tensor(ids, I32)


def trajectory(prompt: list[int], completion: list[int], reward: float = 1.0):
    turn = common_pb2.Turn(
        prompt_tokens=tokens(prompt),
        completion_tokens=tokens(completion),
        completion_logprobs=to_tensor(np.full(len(completion), -1.0, np.float32)),
    )
    return common_pb2.TrainingItem(trajectory=common_pb2.Trajectory(turns=[turn], reward=reward))


def fb(data: Any = None, model: str = FORK, **kw: Any) -> training_pb2.ForwardBackwardRequest:
    kw.setdefault("loss_fn", "importance_sampling")
    return training_pb2.ForwardBackwardRequest(
        model=model, data=batch(seed=9) if data is None else data, **kw
    )


def step(data: Any = None, lr: float = 1e-3, model: str = FORK, **kw: Any):
    return training_pb2.StepRequest(
        model=model,
        data=batch(seed=9) if data is None else data,
        loss_fn="importance_sampling",
        adam=adam(lr, **kw),
    )


def datum(**changed: common_pb2.Tensor) -> common_pb2.Datum:
    d = rl_datum(3)
    for name, value in changed.items():
        getattr(d, name).CopyFrom(value)
    return d


def backward(w: World, weights: list[common_pb2.Tensor] | None = None, **kw: Any):
    if weights is None:
        weights = [to_tensor(np.ones(n, np.float32)) for n in w.forward_lengths]
    kw.setdefault("forward_id", w.forward_id)
    return training_pb2.BackwardCustomRequest(model=FORK, weights=weights, **kw)


def sample(model: str = FORK, prompt: common_pb2.Tensor | None = None, checkpoint: str = "",
           **params: Any) -> sampling_pb2.SampleRequest:  # fmt: skip
    params.setdefault("max_tokens", 2)
    request = sampling_pb2.SampleRequest(
        model=model, checkpoint=checkpoint, params=common_pb2.SamplingParams(**params)
    )
    if prompt is not None:
        request.prompt_tokens.CopyFrom(prompt)
    return request


def logprobs(*sequences: common_pb2.Tensor, model: str = FORK):
    return sampling_pb2.ComputeLogprobsRequest(model=model, sequences=sequences)


def turn(completion_logprobs: int = 1) -> common_pb2.Turn:
    return common_pb2.Turn(
        prompt_tokens=tokens(PROMPT),
        completion_tokens=tokens([7]),
        completion_logprobs=to_tensor(np.zeros(completion_logprobs, np.float32)),
    )


def body(**changed: Any) -> dict[str, Any]:
    return {"model": FORK, **CHAT, **changed}


# --------------------------------------------------------------------------- table

MODEL_CASES = [
    rpc("no API key", "ModelService.ListModels", lambda w: model_pb2.ListModelsRequest(),
        Code.UNAUTHENTICATED, r"missing API key: send 'authorization: Bearer <key>'",
        who="nobody"),
    rpc("an unknown API key", "ModelService.GetModel",
        lambda w: model_pb2.GetModelRequest(model=FORK), Code.UNAUTHENTICATED,
        r"unknown API key: .*headway keys create", who="stranger"),
    rpc("no model", "ModelService.GetModel", lambda w: model_pb2.GetModelRequest(),
        Code.INVALID_ARGUMENT, r"model is empty: give the model's slug"),
    rpc("a model name of 100,000 characters", "ModelService.GetModel",
        lambda w: model_pb2.GetModelRequest(model="x" * 100_000), Code.NOT_FOUND,
        r"^model 'x+ \[\.\.\. \d+ characters cut \.\.\.\] x+' not found$"),
    rpc("another team's model", "ModelService.GetModel",
        lambda w: model_pb2.GetModelRequest(model=FORK), Code.NOT_FOUND,
        rf"model '{FORK}' not found", who="blue"),
    rpc("garbage instead of a message", "ModelService.GetModel", lambda w: GARBAGE,
        Code.INVALID_ARGUMENT, r"GetModel: the request is not a valid message"),
    rpc("a name that is not a slug", "ModelService.ForkModel",
        lambda w: model_pb2.ForkModelRequest(source="tiny", name="no spaces!"),
        Code.INVALID_ARGUMENT, r"model name 'no spaces!' is not valid: use 1-64 characters"),
    rpc("a name that is taken", "ModelService.ForkModel",
        lambda w: model_pb2.ForkModelRequest(source="tiny", name=BLUE_FORK),
        Code.ALREADY_EXISTS, rf"model name '{BLUE_FORK}' is taken; choose another name"),
    rpc("a LoRA rank over the limit", "ModelService.ForkModel",
        lambda w: model_pb2.ForkModelRequest(
            source="tiny", name="big", lora=common_pb2.LoraConfig(rank=4096)),
        Code.INVALID_ARGUMENT, r"lora.rank 4096 is over the trainer's limit of 64 .*"
        r"choose a rank <= 64"),
    rpc("forking from a checkpoint the source does not have", "ModelService.ForkModel",
        lambda w: model_pb2.ForkModelRequest(source=FORK, name="branch", checkpoint="nope"),
        Code.NOT_FOUND, r"checkpoint 'nope' of model .* not found"),
    rpc("continuing an optimizer state into a new adapter", "ModelService.ForkModel",
        lambda w: model_pb2.ForkModelRequest(source="tiny", name="branch",
                                             with_optimizer=True),
        Code.INVALID_ARGUMENT, r"with_optimizer continues the source's optimizer state, so "
        r"the fork must train the same weights"),
    rpc("forking another team's model", "ModelService.ForkModel",
        lambda w: model_pb2.ForkModelRequest(source=FORK, name="stolen"), Code.NOT_FOUND,
        rf"model '{FORK}' not found", who="blue"),
    rpc("registering a base without an admin key", "ModelService.AddBase",
        lambda w: model_pb2.AddBaseRequest(path=str(w.stack.base), name="mine"),
        Code.PERMISSION_DENIED, r"admin action: use an admin key"),
    rpc("a base outside the base roots", "ModelService.AddBase",
        lambda w: model_pb2.AddBaseRequest(path=str(w.store), name="mine"),
        Code.PERMISSION_DENIED, r"outside this trainer's base roots .*put the model under one",
        who="admin"),
    rpc("a relative base path", "ModelService.AddBase",
        lambda w: model_pb2.AddBaseRequest(path="tiny-base", name="mine"),
        Code.INVALID_ARGUMENT, r"base path 'tiny-base' is relative: give an absolute path",
        who="admin"),
    rpc("the tree of an unknown model", "ModelService.ListCheckpoints",
        lambda w: model_pb2.ListCheckpointsRequest(model="nope"), Code.NOT_FOUND,
        r"model 'nope' not found"),
    rpc("the head of no model", "ModelService.GetHead", lambda w: model_pb2.GetHeadRequest(),
        Code.INVALID_ARGUMENT, r"model is empty: give the model's slug"),
    rpc("a head from another model's tree", "ModelService.SetHead",
        lambda w: model_pb2.SetHeadRequest(model=FORK, checkpoint=w.blue_checkpoint),
        Code.NOT_FOUND, rf"checkpoint '.+' of model '{FORK}' not found"),
    rpc("moving a base's head", "ModelService.SetHead",
        lambda w: model_pb2.SetHeadRequest(model="tiny", checkpoint="base"),
        Code.FAILED_PRECONDITION, r"'tiny' is a base and is read-only: fork it"),
    rpc("no checkpoint", "ModelService.SetHead",
        lambda w: model_pb2.SetHeadRequest(model=FORK), Code.INVALID_ARGUMENT,
        r"checkpoint is empty: give the id of a checkpoint of the model"),
    rpc("deleting another team's model", "ModelService.DeleteModel",
        lambda w: model_pb2.DeleteModelRequest(model=FORK), Code.NOT_FOUND,
        rf"model '{FORK}' not found", who="blue"),
    rpc("deleting a base", "ModelService.DeleteModel",
        lambda w: model_pb2.DeleteModelRequest(model="tiny"), Code.FAILED_PRECONDITION,
        r"'tiny' is a base: bases are read-only"),
    rpc("a tag shaped like a checkpoint id", "ModelService.TagCheckpoint",
        lambda w: model_pb2.TagCheckpointRequest(
            model=FORK, checkpoint=w.first_checkpoint, tag="s000001-best"),
        Code.INVALID_ARGUMENT, r"tag 's000001-best' is not a tag name: .* not shaped like"),
    rpc("tagging another team's model", "ModelService.TagCheckpoint",
        lambda w: model_pb2.TagCheckpointRequest(
            model=FORK, checkpoint=w.first_checkpoint, tag="mine"),
        Code.NOT_FOUND, rf"model '{FORK}' not found", who="blue"),
    rpc("deleting the head checkpoint", "ModelService.DeleteCheckpoint",
        lambda w: model_pb2.DeleteCheckpointRequest(
            model=FORK, checkpoint=w.stack.trainer.trainer.store.head(FORK)),
        Code.FAILED_PRECONDITION, r"cannot be deleted: it is the model's head \(move the head"),
    rpc("deleting the root checkpoint", "ModelService.DeleteCheckpoint",
        lambda w: model_pb2.DeleteCheckpointRequest(model=FORK, checkpoint=w.first_checkpoint),
        Code.FAILED_PRECONDITION, r"it is the model's root, .* \(delete the model instead\)"),
    rpc("pruning by no rule", "ModelService.PruneCheckpoints",
        lambda w: model_pb2.PruneCheckpointsRequest(model=FORK),
        Code.INVALID_ARGUMENT, r"no retention rule to prune '.+' by: give keep_last"),
    rpc("a negative retention rule", "ModelService.SetRetention",
        lambda w: model_pb2.SetRetentionRequest(
            model=FORK, policy=common_pb2.RetentionPolicy(keep_last=-3)),
        Code.INVALID_ARGUMENT, r"retention keep_last must be >= 0 \(0 = off\); got -3"),
    rpc("an eval result that is not a number", "ModelService.RecordEval",
        lambda w: model_pb2.RecordEvalRequest(
            model=FORK, checkpoint=w.first_checkpoint, metrics={"arith/reward": float("inf")}),
        Code.INVALID_ARGUMENT, r"metrics\['arith/reward'\] = inf is not finite"),
    rpc("an unknown export format", "ModelService.ExportCheckpoint",
        lambda w: model_pb2.ExportCheckpointRequest(model=FORK, format="onnx"),
        Code.INVALID_ARGUMENT, r"export format 'onnx': choose peft \(LoRA models\) or hf"),
    rpc("exporting another team's model", "ModelService.ExportCheckpoint",
        lambda w: model_pb2.ExportCheckpointRequest(model=FORK, format="peft"),
        Code.NOT_FOUND, rf"model '{FORK}' not found", who="blue"),
]  # fmt: skip

TRAINING_CASES = [
    rpc("an unknown loss", "TrainingService.ForwardBackward",
        lambda w: fb(loss_fn="reinforce"), Code.INVALID_ARGUMENT,
        r"unknown loss_fn 'reinforce'; choose one of"),
    rpc("a non-finite loss config", "TrainingService.ForwardBackward",
        lambda w: fb(loss_fn="dro", loss_fn_config={"beta": float("nan")}),
        Code.INVALID_ARGUMENT, r"loss_fn_config\['beta'\] = nan is not finite"),
    rpc("a token outside the vocabulary", "TrainingService.ForwardBackward",
        lambda w: fb([trajectory(PROMPT, [7, VOCAB])]), Code.INVALID_ARGUMENT,
        rf"target_tokens\[6\] is token id {VOCAB}, outside the vocabulary: valid ids are "
        rf"0 <= id < {VOCAB}"),
    rpc("a group size that does not divide", "TrainingService.ForwardBackward",
        lambda w: fb([trajectory(PROMPT, [7])] * 3, group_size=2), Code.INVALID_ARGUMENT,
        r"group_size is 2 but the request has 3 trajectories .*multiple of group_size"),
    rpc("a trace with no reward", "TrainingService.ForwardBackward",
        lambda w: fb([common_pb2.TrainingItem(trace_id=w.unrewarded)]),
        Code.FAILED_PRECONDITION, r"has no reward yet: attach one with SetReward"),
    rpc("another team's trace", "TrainingService.ForwardBackward",
        lambda w: fb([common_pb2.TrainingItem(trace_id=w.traces[0])], model=BLUE_FORK),
        Code.NOT_FOUND, r"trace 'tr-\w+' not found: .*start a new trace", who="blue"),
    rpc("a datum over the context", "TrainingService.ForwardBackward",
        lambda w: fb(items(rl_datum(1, n=300))), Code.RESOURCE_EXHAUSTED,
        r"datum of 300 tokens, over the model's context of 256; shorten it"),
    rpc("training a base", "TrainingService.ForwardBackward", lambda w: fb(model="tiny"),
        Code.FAILED_PRECONDITION, r"'tiny' is a base and is read-only: fork it"),
    rpc("a request id over the limit", "TrainingService.ForwardBackward",
        lambda w: fb(request_id="r" * 300), Code.INVALID_ARGUMENT,
        r"request_id has 300 characters, over the limit of 256"),
    rpc("training another team's model", "TrainingService.ForwardBackward", lambda w: fb(),
        Code.NOT_FOUND, rf"model '{FORK}' not found", who="blue"),
    rpc("garbage instead of a batch", "TrainingService.ForwardBackward", lambda w: GARBAGE,
        Code.INVALID_ARGUMENT, r"ForwardBackward: the request is not a valid message"),
    rpc("no data", "TrainingService.ForwardCustom",
        lambda w: training_pb2.ForwardCustomRequest(model=FORK), Code.INVALID_ARGUMENT,
        r"data is empty: send at least one datum, trajectory or trace id"),
    rpc("ragged per-position tensors", "TrainingService.ForwardCustom",
        lambda w: training_pb2.ForwardCustomRequest(
            model=FORK, data=items(datum(weights=to_tensor(np.ones(5, np.float32))))),
        Code.INVALID_ARGUMENT, r"data\[0\].datum.weights has 5 values but input_tokens has "
        r"12: every per-position tensor"),
    rpc("a tensor whose bytes do not match its shape", "TrainingService.ForwardCustom",
        lambda w: training_pb2.ForwardCustomRequest(model=FORK, data=items(datum(
            input_tokens=common_pb2.Tensor(data=b"\0" * 8, dtype=I32, shape=[12])))),
        Code.INVALID_ARGUMENT, r"input_tokens: data has 8 bytes but shape \[12\] of "
        r"DTYPE_INT32 needs 48 .*pack product\(shape\) elements"),
    rpc("an unknown forward", "TrainingService.BackwardCustom",
        lambda w: backward(w, forward_id="fwd-nope"), Code.NOT_FOUND,
        r"forward_id 'fwd-nope' not found .*run ForwardCustom again"),
    rpc("no forward id", "TrainingService.BackwardCustom",
        lambda w: backward(w, forward_id=""), Code.INVALID_ARGUMENT,
        r"forward_id is empty: pass ForwardCustomResponse.forward_id"),
    rpc("weights for fewer datums", "TrainingService.BackwardCustom",
        lambda w: backward(w, [to_tensor([1.0])]), Code.INVALID_ARGUMENT,
        r"weights has 1 tensors but the forward had 3 datums; send one per datum"),
    rpc("weights of the wrong length", "TrainingService.BackwardCustom",
        lambda w: backward(w, [to_tensor([1.0, 1.0])] * 3), Code.INVALID_ARGUMENT,
        r"weights\[0\] has 2 values but datum 0 has \d+ positions"),
    rpc("a NaN weight", "TrainingService.BackwardCustom",
        lambda w: backward(w, [to_tensor(np.full(n, np.nan, np.float32))
                               for n in w.forward_lengths]),
        Code.INVALID_ARGUMENT, r"weights\[0\]: NaN at position 0: values must be finite"),
    rpc("a non-finite client metric", "TrainingService.BackwardCustom",
        lambda w: backward(w, metrics={"loss:sum": float("inf")}), Code.INVALID_ARGUMENT,
        r"metrics\['loss:sum'\] = inf is not finite"),
    rpc("another team's forward", "TrainingService.BackwardCustom", lambda w: backward(w),
        Code.NOT_FOUND, rf"model '{FORK}' not found", who="blue"),
    rpc("a NaN learning rate", "TrainingService.OptimStep",
        lambda w: training_pb2.OptimStepRequest(model=FORK, adam=adam(float("nan"))),
        Code.INVALID_ARGUMENT, r"learning_rate must be a finite number > 0"),
    rpc("beta1 of 1", "TrainingService.OptimStep",
        lambda w: training_pb2.OptimStepRequest(model=FORK, adam=adam(beta1=1.0)),
        Code.INVALID_ARGUMENT, r"beta1 must lie in \[0, 1\)"),
    rpc("stepping another team's model", "TrainingService.OptimStep",
        lambda w: training_pb2.OptimStepRequest(model=FORK, adam=adam()), Code.NOT_FOUND,
        rf"model '{FORK}' not found", who="blue"),
    rpc("garbage instead of a step", "TrainingService.OptimStep", lambda w: GARBAGE,
        Code.INVALID_ARGUMENT, r"OptimStep: the request is not a valid message"),
    rpc("good data with a bad learning rate", "TrainingService.Step", lambda w: step(lr=-1.0),
        Code.INVALID_ARGUMENT, r"learning_rate must be a finite number > 0"),
    rpc("bad data with good Adam parameters", "TrainingService.Step",
        lambda w: step([trajectory([VOCAB + 5], [7])]), Code.INVALID_ARGUMENT,
        rf"input_tokens\[0\] is token id {VOCAB + 5}, outside the vocabulary"),
    rpc("losses of an unknown model", "TrainingService.AvailableLosses",
        lambda w: training_pb2.AvailableLossesRequest(model="nope"), Code.NOT_FOUND,
        r"model 'nope' not found"),
    rpc("losses of another team's model", "TrainingService.AvailableLosses",
        lambda w: training_pb2.AvailableLossesRequest(model=FORK), Code.NOT_FOUND,
        rf"model '{FORK}' not found", who="blue"),
]  # fmt: skip

SAMPLING_CASES = [
    rpc("no prompt", "SamplingService.Sample", lambda w: sample(), Code.INVALID_ARGUMENT,
        r"the prompt is empty: give prompt_tokens or prompt_text"),
    rpc("a prompt token outside the vocabulary", "SamplingService.Sample",
        lambda w: sample(prompt=tokens([5, 500])), Code.INVALID_ARGUMENT,
        rf"prompt_tokens\[1\] is token id 500, outside the vocabulary \(valid ids are "
        rf"0..{VOCAB - 1}\)"),
    rpc("float token ids", "SamplingService.Sample",
        lambda w: sample(prompt=to_tensor([1.0, 2.0], F32)), Code.INVALID_ARGUMENT,
        r"prompt_tokens: token ids must be DTYPE_INT32 or DTYPE_INT64, got DTYPE_FLOAT32"),
    rpc("a 2-D prompt", "SamplingService.Sample",
        lambda w: sample(prompt=to_tensor(np.ones((2, 3), np.int32))), Code.INVALID_ARGUMENT,
        r"prompt_tokens: token ids must be 1-D \(shape \[N\]\), got shape \[2, 3\]"),
    rpc("a negative temperature", "SamplingService.Sample",
        lambda w: sample(prompt=tokens(PROMPT), temperature=-1.0), Code.INVALID_ARGUMENT,
        r"temperature must be ≥ 0 \(0 = greedy\); got -1"),
    rpc("n over the limit", "SamplingService.Sample",
        lambda w: sample(prompt=tokens(PROMPT), n=1000), Code.RESOURCE_EXHAUSTED,
        r"n = 1000 is over this sampler's limit of 32"),
    rpc("a prompt and max_tokens over the context", "SamplingService.Sample",
        lambda w: sample(prompt=tokens(PROMPT), max_tokens=1000), Code.RESOURCE_EXHAUSTED,
        r"prompt \(6 tokens\) \+ max_tokens \(1000\) is over the context of 256 tokens; "
        r"shorten the prompt or lower max_tokens"),
    rpc("an unknown checkpoint", "SamplingService.Sample",
        lambda w: sample(prompt=tokens(PROMPT), checkpoint="nope"), Code.NOT_FOUND,
        rf"checkpoint 'nope' of model '{FORK}' not found"),
    rpc("a checkpoint id longer than any file name", "SamplingService.Sample",
        lambda w: sample(prompt=tokens(PROMPT), checkpoint="c" * 100_000), Code.NOT_FOUND,
        rf"^checkpoint 'c+ \[\.\.\. \d+ characters cut \.\.\.\] c+' of model '{FORK}' not "
        r"found$"),
    rpc("sampling another team's model", "SamplingService.Sample",
        lambda w: sample(prompt=tokens(PROMPT)), Code.NOT_FOUND, rf"model '{FORK}' not found",
        who="blue"),
    rpc("a top_p of 0", "SamplingService.SampleStream",
        lambda w: sample(prompt=tokens(PROMPT), top_p=0.0), Code.INVALID_ARGUMENT,
        r"top_p must lie in \(0, 1\]; got 0"),
    rpc("too many stop strings", "SamplingService.SampleStream",
        lambda w: sample(prompt=tokens(PROMPT), stop=["x"] * 40), Code.INVALID_ARGUMENT,
        r"stop has 40 strings; at most 32 are allowed"),
    rpc("no max_tokens", "SamplingService.SampleStream",
        lambda w: sample(prompt=tokens(PROMPT), max_tokens=0), Code.INVALID_ARGUMENT,
        r"max_tokens must be ≥ 1; got 0"),
    rpc("no sequences", "SamplingService.ComputeLogprobs", lambda w: logprobs(),
        Code.INVALID_ARGUMENT, r"sequences is empty: give at least one token sequence"),
    rpc("a sequence of one token", "SamplingService.ComputeLogprobs",
        lambda w: logprobs(tokens([5])), Code.INVALID_ARGUMENT,
        r"sequences\[0\] has 1 tokens; logprobs need ≥ 2"),
    rpc("a sequence over the context", "SamplingService.ComputeLogprobs",
        lambda w: logprobs(tokens([5] * 300)), Code.RESOURCE_EXHAUSTED,
        r"sequences\[0\] has 300 tokens, over the context of 256"),
    rpc("a negative dimension", "SamplingService.ComputeLogprobs",
        lambda w: logprobs(common_pb2.Tensor(dtype=I32, shape=[-2])), Code.INVALID_ARGUMENT,
        r"sequences\[0\]: shape \[-2\] has negative dimension -2 at index 0: every "
        r"dimension must be >= 0"),
    rpc("an empty tensor no array can hold", "SamplingService.ComputeLogprobs",
        lambda w: logprobs(common_pb2.Tensor(dtype=I32, shape=[0, 2**62])),
        Code.INVALID_ARGUMENT, r"sequences\[0\]: shape \[0, 4611686018427387904\] holds no "
        r"elements, but its other dimensions multiply past .*give an empty array shape \[0\]"),
    rpc("a hundred thousand dimensions", "SamplingService.Sample",
        lambda w: sample(prompt=common_pb2.Tensor(dtype=I32, shape=[1] * 100_000)),
        Code.INVALID_ARGUMENT, r"^prompt_tokens: shape \[1, 1, 1, 1, 1, 1, 1, 1, \.\.\. "
        r"\(100000 dimensions\)\] has more than 32 dimensions: token and float arrays are "
        r"1-D \(shape \[N\]\)$"),
]  # fmt: skip

TRACE_CASES = [
    rpc("a turn without a turn", "TraceService.RecordTurn",
        lambda w: trace_pb2.RecordTurnRequest(model=FORK), Code.INVALID_ARGUMENT,
        r"turn is required: prompt_tokens, completion_tokens and completion_logprobs"),
    rpc("one logprob too many", "TraceService.RecordTurn",
        lambda w: trace_pb2.RecordTurnRequest(model=FORK, turn=turn(2)), Code.INVALID_ARGUMENT,
        r"completion_logprobs has 2 values but .*completion_tokens has 1: send one logprob "
        r"per completion token"),
    rpc("a new trace without a model", "TraceService.RecordTurn",
        lambda w: trace_pb2.RecordTurnRequest(turn=turn()), Code.INVALID_ARGUMENT,
        r"model is empty: name the model that sampled the turn"),
    rpc("appending to another team's trace", "TraceService.RecordTurn",
        lambda w: trace_pb2.RecordTurnRequest(trace_id=w.traces[0], turn=turn()),
        Code.NOT_FOUND, r"trace 'tr-\w+' not found: .*start a new trace", who="blue"),
    rpc("a turn of another model", "TraceService.RecordTurn",
        lambda w: trace_pb2.RecordTurnRequest(trace_id=w.traces[0], model="tiny", turn=turn()),
        Code.INVALID_ARGUMENT, rf"model 'tiny' is not the model of trace 'tr-\w+', which is "
        rf"'{FORK}': .*leave model empty or start a new trace"),
    rpc("a NaN reward", "TraceService.SetReward",
        lambda w: trace_pb2.SetRewardRequest(trace_id=w.traces[0], reward=float("nan")),
        Code.INVALID_ARGUMENT, r"reward is nan: it must be finite"),
    rpc("rewarding another team's trace", "TraceService.SetReward",
        lambda w: trace_pb2.SetRewardRequest(trace_id=w.traces[0], reward=1.0),
        Code.NOT_FOUND, r"trace 'tr-\w+' not found", who="blue"),
    rpc("no trace id", "TraceService.GetTrace", lambda w: trace_pb2.GetTraceRequest(),
        Code.INVALID_ARGUMENT, r"trace_id is empty: give the id RecordTurn returned"),
    rpc("reading another team's trace", "TraceService.GetTrace",
        lambda w: trace_pb2.GetTraceRequest(trace_id=w.blue_trace), Code.NOT_FOUND,
        r"trace 'tr-\w+' not found"),
]  # fmt: skip

BACKEND_CASES = [
    rpc("a trainer called without the internal token", "ModelService.GetModel",
        lambda w: model_pb2.GetModelRequest(model=FORK), Code.UNAUTHENTICATED,
        r"missing internal token: call the gateway", via="trainer", who="claims-red"),
    rpc("a trainer called with a forged token", "ModelService.DeleteModel",
        lambda w: model_pb2.DeleteModelRequest(model=FORK), Code.UNAUTHENTICATED,
        r"invalid internal token: this service trusts only gateways", via="trainer",
        who="forged"),
    rpc("a sampler called without the internal token", "SamplingService.Sample",
        lambda w: sample(prompt=tokens(PROMPT)), Code.UNAUTHENTICATED,
        r"missing internal token: call the gateway", via="sampler", who="claims-red"),
    rpc("garbage sent to a sampler", "SamplingService.Sample", lambda w: GARBAGE,
        Code.INVALID_ARGUMENT, r"Sample: the request is not a valid message", via="sampler",
        who="token-red"),
]  # fmt: skip

CHAT_ROUTE, TEXT_ROUTE, MODELS_ROUTE = (
    "POST /v1/chat/completions",
    "POST /v1/completions",
    "GET /v1/models",
)

HTTP_CASES = [
    http("no model", CHAT_ROUTE, lambda w: {**CHAT}, 400, r"model is required \(a string\)"),
    http("an unknown model", CHAT_ROUTE, lambda w: body(model="nope"), 404,
         r"model 'nope' not found"),
    http("another team's model", CHAT_ROUTE, lambda w: body(), 404,
         rf"model '{FORK}' not found", who="blue"),
    http("no messages", CHAT_ROUTE, lambda w: body(messages=[]), 400,
         r"messages must be a non-empty list"),
    http("max_tokens of 0", CHAT_ROUTE, lambda w: body(max_tokens=0), 400,
         r"max_tokens must be between 1 and 2147483647; got 0"),
    http("a negative temperature", CHAT_ROUTE, lambda w: body(temperature=-1), 400,
         r"temperature must be ≥ 0 \(0 = greedy\)"),
    http("n over the limit", CHAT_ROUTE, lambda w: body(n=1000), 400,
         r"n = 1000 is over this sampler's limit of 32"),
    http("a NaN in the body", CHAT_ROUTE,
         lambda w: b'{"model": "red-m", "temperature": NaN, "messages": []}', 400,
         r"the body contains NaN: JSON numbers must be finite"),
    http("a body that is not JSON", CHAT_ROUTE, lambda w: b"{model: red-m", 400,
         r"request body is not valid JSON"),
    http("a body that is a list", CHAT_ROUTE, lambda w: [body()], 400,
         r"request body must be a JSON object"),
    http("an unknown checkpoint", CHAT_ROUTE, lambda w: body(checkpoint="nope"), 404,
         rf"checkpoint 'nope' of model '{FORK}' not found"),
    http("a checkpoint id longer than any file name", CHAT_ROUTE,
         lambda w: body(checkpoint="c" * 100_000), 404,
         rf"^checkpoint 'c{{100000}}' of model '{FORK}' not found$"),
    http("a streamed request with a negative temperature", CHAT_ROUTE,
         lambda w: body(stream=True, temperature=-1), 400,
         r"temperature must be ≥ 0 \(0 = greedy\)"),
    http("a streamed request for an unknown checkpoint", TEXT_ROUTE,
         lambda w: {"model": FORK, "prompt": "hi", "stream": True, "checkpoint": "nope"}, 404,
         rf"checkpoint 'nope' of model '{FORK}' not found"),
    http("continuing another team's trace", CHAT_ROUTE,
         lambda w: body(return_token_ids=True, trace_id=w.blue_trace), 404,
         r"trace 'tr-\w+' not found: .*start a new trace with an empty trace_id"),
    http("a trace continued by two choices", CHAT_ROUTE,
         lambda w: body(return_token_ids=True, trace_id=w.traces[0], n=2), 400,
         r"trace_id continues one trajectory: use it with n = 1"),
    http("no API key", CHAT_ROUTE, lambda w: body(), 401, r"missing API key", who="nobody"),
    http("a body that is not declared JSON", CHAT_ROUTE, lambda w: body(), 415,
         r"Content-Type must be application/json, not text/plain",
         headers={"Content-Type": "text/plain"}),
    http("an idempotency key on a stream", CHAT_ROUTE,
         lambda w: body(return_token_ids=True, stream=True), 400,
         r"Idempotency-Key is supported on non-streaming requests: drop stream, or the key",
         headers={"Idempotency-Key": "k-1"}),
    http("a numeric prompt", TEXT_ROUTE, lambda w: {"model": FORK, "prompt": 7}, 400,
         r"prompt must be a string, a list of token ids, or a list of several of either"),
    http("prompt ids outside the vocabulary", TEXT_ROUTE,
         lambda w: {"model": FORK, "prompt": [5, VOCAB], "max_tokens": 2}, 400,
         rf"prompt_tokens\[1\] is token id {VOCAB}, outside the vocabulary"),
    http("a prompt longer than the context can hold", TEXT_ROUTE,
         lambda w: {"model": FORK, "prompt": "what is 1 plus 2? " * 2000}, 400,
         r"the prompt is \d+ characters: more than the model's context of 256 tokens can "
         r"hold, whatever they are; shorten it"),
    http("too many stop strings", TEXT_ROUTE,
         lambda w: {"model": FORK, "prompt": "hi", "stop": ["x"] * 40}, 400,
         r"stop has 40 strings; at most 32 are allowed"),
    http("an unknown API key", MODELS_ROUTE, lambda w: None, 401,
         r"unknown API key: .*headway keys create", who="stranger"),
    http("a route that does not exist", "GET /v1/nope", lambda w: None, 404,
         r"no route GET /v1/nope: this API serves POST /v1/chat/completions, "
         r"POST /v1/completions, GET /v1/models and the Tinker API under /api/v1/"),
    http("the wrong method", "GET /v1/chat/completions", lambda w: None, 405,
         r"GET is not allowed on /v1/chat/completions: use POST"),
]  # fmt: skip

CASES = [*MODEL_CASES, *TRAINING_CASES, *SAMPLING_CASES, *TRACE_CASES, *BACKEND_CASES,
         *HTTP_CASES]  # fmt: skip


# --------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory):
    world = build_world(tmp_path_factory.mktemp("bad-input"))
    yield world
    world.stack.stop()


def _answer(world: World, case: Case) -> tuple[Code | int, str]:
    """Send the case; (its status, its error message). A success is a failed case."""
    request = case.request(world)
    if case.surface == "http":
        status, reply = call_http(world, case.service, request, case.who, case.headers)
        error = reply.get("error")
        assert isinstance(error, dict) and error.get("status"), f"not OpenAI's shape: {reply}"
        return status, error.get("message", "")
    streaming = case.service.endswith("Stream") or case.service in SERVER_STREAMING
    with pytest.raises(grpc.RpcError) as err:
        call_grpc(world, case.via, case.service, request, case.who, streaming)
    return err.value.code(), err.value.details() or ""


@pytest.mark.parametrize("case", CASES, ids=[f"{c.service} {c.name}" for c in CASES])
def test_bad_input_gets_its_status_a_message_that_says_what_to_fix_and_changes_nothing(
    world: World, case: Case
) -> None:
    before = snapshot(world)
    status, message = _answer(world, case)
    assert status == case.status, f"{status}: {message}"
    assert re.search(case.message, message), message
    assert not changes(before, snapshot(world))
    assert world.stack.sampler.sampler.live_rows == 0


def test_the_table_covers_every_rpc_and_every_http_route() -> None:
    rpcs = {
        f"{service.name}.{method}"
        for module in (model_pb2, training_pb2, sampling_pb2, trace_pb2)
        for service in module.DESCRIPTOR.services_by_name.values()
        for method in service.methods_by_name
    }
    covered = {c.service for c in CASES}
    assert rpcs <= covered, sorted(rpcs - covered)
    assert {CHAT_ROUTE, TEXT_ROUTE, MODELS_ROUTE} <= covered
    assert len(CASES) >= 40 and len({c.name for c in CASES if c.surface == "http"}) >= 10


def test_the_snapshot_sees_every_change_a_request_could_make(world: World) -> None:
    """The check above is only as good as the snapshot: each kind of change a request
    could make shows up in it. Runs last: it changes the world for real."""
    red = world.stack.md("red")
    gw = world.stack.gateway
    before = snapshot(world)
    gw.traces.SetReward(
        trace_pb2.SetRewardRequest(trace_id=world.traces[0], reward=5.0), metadata=red
    )
    assert changes(before, after := snapshot(world)) == ["the traces", "the Redis keys"]
    gw.traces.RecordTurn(trace_pb2.RecordTurnRequest(model=FORK, turn=turn()), metadata=red)
    assert changes(after, after := snapshot(world)) == ["the Redis keys"]
    gw.train.ForwardBackward(fb(), metadata=red)
    assert changes(after, after := snapshot(world)) == [
        "the fork's gradient",
        "the fork's accumulated statistics",
    ]
    gw.train.OptimStep(training_pb2.OptimStepRequest(model=FORK, adam=adam()), metadata=red)
    assert changes(after, snapshot(world)) == [
        "models (head, checkpoints)",
        "the fork's tree over gRPC",
        "the fork's gradient",
        "the fork's weights",
        "the fork's accumulated statistics",
        "the fork's pending forwards",
        "the Redis keys",
    ]
