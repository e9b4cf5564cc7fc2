"""Bad input to the trainer: a precise status, a message that says what to fix, nothing changed.

Each case runs against a model holding an accumulated gradient; afterwards the gradient,
the head and the checkpoint tree must be exactly as before.
"""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import torch

from headway.tensors import to_tensor
from headway.v1 import common_pb2, model_pb2, training_pb2
from tests.conftest import VOCAB
from tests.helpers_training import adam, batch, items, rl_datum
from tests.stack import TrainerStack


def _datum(**changes) -> common_pb2.Datum:
    d = rl_datum(0)
    for name, value in changes.items():
        getattr(d, name).CopyFrom(value)
    return d


def _undecodable(n: int) -> common_pb2.Datum:
    """A datum of n positions whose weights cannot be decoded (no dtype): a request refused
    for its size rather than for this datum was refused before anything was decoded."""
    d = rl_datum(7, n=n)
    d.weights.dtype = common_pb2.DTYPE_UNSPECIFIED
    return d


def _fb(data, loss_fn="importance_sampling", **kw):
    return training_pb2.ForwardBackwardRequest(model="m", data=data, loss_fn=loss_fn, **kw)


TRAIN_CASES = {
    "token id over vocab": (
        lambda: _fb(items(_datum(input_tokens=to_tensor(np.r_[np.arange(11), VOCAB + 3])))),
        "INVALID_ARGUMENT",
        f"token id {VOCAB + 3}",
    ),
    "ragged per-position tensors": (
        lambda: _fb(items(_datum(weights=to_tensor(np.ones(5, np.float32))))),
        "INVALID_ARGUMENT",
        "has 5 values but input_tokens has 12",
    ),
    "wrong dtype": (
        lambda: _fb(items(_datum(advantages=to_tensor(np.zeros(12, np.int32))))),
        "INVALID_ARGUMENT",
        "advantages",
    ),
    "NaN advantage": (
        lambda: _fb(
            items(
                _datum(
                    advantages=to_tensor(np.r_[np.zeros(6), np.nan, np.zeros(5)].astype(np.float32))
                )
            )
        ),
        "INVALID_ARGUMENT",
        "NaN at position 6",
    ),
    "inf sampling logprob": (
        lambda: _fb(
            items(
                _datum(
                    sampling_logprobs=to_tensor(
                        np.r_[np.zeros(8), -np.inf, np.zeros(3)].astype(np.float32)
                    )
                )
            )
        ),
        "INVALID_ARGUMENT",
        "position 8",
    ),
    "unknown loss": (
        lambda: _fb(batch(), loss_fn="reinforce"),
        "INVALID_ARGUMENT",
        "unknown loss_fn 'reinforce'",
    ),
    "unknown config key": (
        lambda: _fb(batch(), loss_fn="ppo", loss_fn_config={"clip": 0.2}),
        "INVALID_ARGUMENT",
        "clip not accepted by ppo",
    ),
    "config key of another loss": (
        lambda: _fb(batch(), loss_fn="importance_sampling", loss_fn_config={"beta": 0.1}),
        "INVALID_ARGUMENT",
        "(accepted: none)",
    ),
    "empty batch": (lambda: _fb([]), "INVALID_ARGUMENT", "data is empty"),
    "missing sampling inputs": (
        lambda: _fb(
            items(common_pb2.Datum(input_tokens=to_tensor([1, 2]), target_tokens=to_tensor([2, 3])))
        ),
        "INVALID_ARGUMENT",
        "needs (use cross_entropy",
    ),
    "trace id sent to the trainer": (
        lambda: _fb([common_pb2.TrainingItem(trace_id="t-1")]),
        "INVALID_ARGUMENT",
        "gateway",
    ),
    "sequence over the context": (
        lambda: _fb(items(rl_datum(1, n=300))),
        "RESOURCE_EXHAUSTED",
        "over the model's context of 256",
    ),
    "batch over the token limit, refused before decoding": (
        lambda: _fb(items(*(rl_datum(i, n=200) for i in range(5)), _undecodable(200))),
        "RESOURCE_EXHAUSTED",
        "limit of 1000",
    ),
    "datum over the context, refused before decoding": (
        lambda: _fb(items(_undecodable(300))),
        "RESOURCE_EXHAUSTED",
        "over the model's context of 256",
    ),
    "unknown model": (
        lambda: training_pb2.ForwardBackwardRequest(model="nope", data=batch(), loss_fn="ppo"),
        "NOT_FOUND",
        "model 'nope' not found",
    ),
    "training a base": (
        lambda: training_pb2.ForwardBackwardRequest(model="tiny", data=batch(), loss_fn="ppo"),
        "FAILED_PRECONDITION",
        "fork it",
    ),
}

STEP_CASES = {
    "zero learning rate": (0.0, {}, "learning_rate must be a finite number > 0"),
    "negative learning rate": (-1e-3, {}, "learning_rate"),
    "NaN learning rate": (float("nan"), {}, "got nan"),
    "beta1 of 1": (1e-3, {"beta1": 1.0}, "beta1 must lie in [0, 1)"),
    "negative weight decay": (1e-3, {"weight_decay": -0.1}, "weight_decay"),
}


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    """A model with a gradient accumulated, shared by the cases (each must change nothing)."""
    from tests.stack import make_tiny_base

    root = tmp_path_factory.mktemp("errors")
    stack = TrainerStack(root / "store", max_batch_tokens=1000)
    stack.add_base(make_tiny_base(root / "base"), "tiny")
    stack.fork("m")
    stack.train.ForwardBackward(_fb(batch(seed=1)))
    yield stack
    stack.stop()


def _snapshot(stack: TrainerStack):
    state = stack.trainer._states["m"]
    grads = {n: p.grad.clone() for n, p in state.params.items() if p.grad is not None}
    weights = {n: p.detach().clone() for n, p in state.params.items()}
    tree = stack.models.ListCheckpoints(model_pb2.ListCheckpointsRequest(model="m"))
    return grads, weights, tree, (state.acc.num_datums, state.acc.num_tokens)


def _assert_unchanged(stack: TrainerStack, before) -> None:
    grads, weights, tree, acc = _snapshot(stack)
    assert grads.keys() == before[0].keys() and grads
    assert all(torch.equal(grads[k], before[0][k]) for k in grads), "the gradient changed"
    assert all(torch.equal(weights[k], before[1][k]) for k in weights), "the weights changed"
    assert tree == before[2], "the checkpoint tree or head changed"
    assert acc == before[3], "the accumulated statistics changed"


def _expect(call, code: str, fragment: str) -> None:
    with pytest.raises(grpc.RpcError) as err:
        call()
    assert err.value.code().name == code, err.value.details()
    assert fragment in err.value.details(), err.value.details()


@pytest.mark.parametrize("case", sorted(TRAIN_CASES))
def test_bad_forward_backward_is_refused_and_changes_nothing(loaded, case):
    make, code, fragment = TRAIN_CASES[case]
    before = _snapshot(loaded)
    _expect(lambda: loaded.train.ForwardBackward(make()), code, fragment)
    # Step validates the whole request before applying any of it.
    req = make()
    step = training_pb2.StepRequest(
        model=req.model,
        data=req.data,
        loss_fn=req.loss_fn,
        loss_fn_config=req.loss_fn_config,
        adam=adam(),
    )
    _expect(lambda: loaded.train.Step(step), code, fragment)
    _assert_unchanged(loaded, before)


@pytest.mark.parametrize("case", sorted(STEP_CASES))
def test_bad_adam_params_are_refused_and_keep_the_gradient(loaded, case):
    lr, extra, fragment = STEP_CASES[case]
    before = _snapshot(loaded)
    req = training_pb2.OptimStepRequest(model="m", adam=adam(lr, **extra))
    _expect(lambda: loaded.train.OptimStep(req), "INVALID_ARGUMENT", fragment)
    step = training_pb2.StepRequest(
        model="m", data=batch(seed=2), loss_fn="ppo", adam=adam(lr, **extra)
    )
    _expect(lambda: loaded.train.Step(step), "INVALID_ARGUMENT", fragment)
    _assert_unchanged(loaded, before)


def test_batch_over_the_token_budget_is_resource_exhausted(loaded):
    before = _snapshot(loaded)
    big = items(*(rl_datum(i, n=200) for i in range(6)))  # 1200 tokens > 1000
    _expect(lambda: loaded.train.ForwardBackward(_fb(big)), "RESOURCE_EXHAUSTED", "limit of 1000")
    _assert_unchanged(loaded, before)


def test_unknown_forward_id_and_bad_custom_weights(loaded):
    before = _snapshot(loaded)
    req = training_pb2.BackwardCustomRequest(
        model="m", forward_id="fwd-nope", weights=[to_tensor([1.0])]
    )
    _expect(
        lambda: loaded.train.BackwardCustom(req), "NOT_FOUND", "forward_id 'fwd-nope' not found"
    )
    fwd = loaded.train.ForwardCustom(
        training_pb2.ForwardCustomRequest(model="m", data=batch(seed=3))
    )
    wrong_count = training_pb2.BackwardCustomRequest(
        model="m", forward_id=fwd.forward_id, weights=[to_tensor(np.ones(8, np.float32))]
    )
    _expect(
        lambda: loaded.train.BackwardCustom(wrong_count), "INVALID_ARGUMENT", "send one per datum"
    )
    nan = [
        to_tensor(np.full(len(np.frombuffer(d.logprobs.data, np.float32)), np.nan, np.float32))
        for d in fwd.data
    ]
    bad = training_pb2.BackwardCustomRequest(model="m", forward_id=fwd.forward_id, weights=nan)
    _expect(lambda: loaded.train.BackwardCustom(bad), "INVALID_ARGUMENT", "NaN")
    # The forward survives bad backwards: the client can fix its weights and retry.
    assert fwd.forward_id in loaded.trainer._states["m"].forwards
    loaded.trainer._states["m"].forwards.clear()
    _assert_unchanged(loaded, before)


def test_optim_step_without_gradient_is_failed_precondition(tmp_path, tiny_base):
    stack = TrainerStack(tmp_path / "store")
    try:
        stack.add_base(tiny_base, "tiny")
        stack.fork("m")
        req = training_pb2.OptimStepRequest(model="m", adam=adam())
        _expect(
            lambda: stack.train.OptimStep(req), "FAILED_PRECONDITION", "call forward_backward first"
        )
        tree = stack.models.ListCheckpoints(model_pb2.ListCheckpointsRequest(model="m"))
        assert len(tree.checkpoints) == 1
        base_req = training_pb2.OptimStepRequest(model="tiny", adam=adam())
        _expect(lambda: stack.train.OptimStep(base_req), "FAILED_PRECONDITION", "read-only")
    finally:
        stack.stop()


def test_client_metrics_beyond_the_bounds_are_refused_and_change_nothing(loaded):
    """BackwardCustom's metrics go into the checkpoint's stats: bounded in count (64) and
    key length (128) before the backward runs."""
    before = _snapshot(loaded)
    fwd = loaded.train.ForwardCustom(
        training_pb2.ForwardCustomRequest(model="m", data=batch(seed=4))
    )
    ones = [to_tensor(np.ones(d.logprobs.shape[0], np.float32)) for d in fwd.data]
    cases = {
        "over the trainer's limit of 64": {f"k{i}": 1.0 for i in range(65)},
        "over the trainer's limit of 128": {"x" * 129: 1.0},
    }
    for fragment, metrics in cases.items():
        req = training_pb2.BackwardCustomRequest(
            model="m", forward_id=fwd.forward_id, weights=ones, metrics=metrics
        )
        _expect(lambda req=req: loaded.train.BackwardCustom(req), "INVALID_ARGUMENT", fragment)
    assert list(loaded.trainer._states["m"].forwards) == [fwd.forward_id]
    loaded.trainer._states["m"].forwards.clear()
    _assert_unchanged(loaded, before)
