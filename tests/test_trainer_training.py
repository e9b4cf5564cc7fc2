"""Training over gRPC: losses, custom losses, AdamW, rollback, idempotency, head events."""

from __future__ import annotations

import json

import numpy as np
import pytest
import redis
import torch
from safetensors.torch import load_file

from headway.server.heads import channel, mirror_key
from headway.v1 import model_pb2, training_pb2
from tests.helpers_training import (
    LOSS_CONFIGS,
    adam,
    batch,
    checkpoint_tensors,
    reference_loss,
    reference_module,
    rel_err,
    trainer_grads,
)
from tests.stack import REDIS_URL, TrainerStack, wait_until


@pytest.mark.parametrize("loss_fn", sorted(LOSS_CONFIGS))
@pytest.mark.parametrize("full", [False, True], ids=["lora", "full"])
def test_builtin_loss_gradient_equals_the_formula(trainer_stack, loss_fn, full):
    stack = trainer_stack
    stack.fork("m", full=full)
    data, cfg = batch(seed=1), LOSS_CONFIGS[loss_fn]
    reply = stack.train.ForwardBackward(
        training_pb2.ForwardBackwardRequest(
            model="m", data=data, loss_fn=loss_fn, loss_fn_config=cfg
        )
    )
    module = reference_module(stack, "m")
    loss, ref_lps = reference_loss(module, data, loss_fn, cfg)
    loss.backward()
    assert reply.metrics["loss:sum"] == pytest.approx(float(loss.detach()), rel=1e-5, abs=1e-5)
    for got, expected in zip(reply.logprobs, ref_lps, strict=True):
        got = np.frombuffer(got.data, np.float32)
        np.testing.assert_allclose(got, expected.numpy(), atol=1e-5)
    grads = trainer_grads(stack, "m")
    ref = {n: p.grad for n, p in module.named_parameters() if p.grad is not None}
    assert set(grads) == set(ref) and grads
    for name in ref:
        assert rel_err(grads[name], ref[name]) < 1e-4, name
    assert reply.num_datums == 3 and reply.num_tokens == sum(4 + 3 * i for i in range(3))
    if loss_fn in ("ppo", "cispo"):
        assert 0 < reply.metrics["clip/fraction"] < 1
    if loss_fn != "cross_entropy":
        assert {"ratio/mean", "kl/sampler_trainer", "entropy/mean"} <= set(reply.metrics)


def test_gradients_accumulate_across_calls_until_optim_step(trainer_stack):
    stack = trainer_stack
    stack.fork("m")
    data = batch(seed=2)
    stack.train.ForwardBackward(
        training_pb2.ForwardBackwardRequest(model="m", data=data[:1], loss_fn="importance_sampling")
    )
    stack.train.ForwardBackward(
        training_pb2.ForwardBackwardRequest(model="m", data=data[1:], loss_fn="importance_sampling")
    )
    split = trainer_grads(stack, "m")
    module = reference_module(stack, "m")
    reference_loss(module, data, "importance_sampling", {})[0].backward()
    for name, p in module.named_parameters():
        if p.grad is not None:
            assert rel_err(split[name], p.grad) < 1e-4


def custom_is_weights(fwd: training_pb2.ForwardCustomResponse) -> list:
    """The client's side of a custom loss, as the SDK runs it: importance sampling written
    in torch on ForwardCustom's tensors; the -dloss/dlogp per token BackwardCustom takes."""
    from headway.tensors import to_tensor

    weights = []
    for d in fwd.data:
        lp = torch.tensor(np.frombuffer(d.logprobs.data, np.float32), requires_grad=True)
        q = torch.tensor(np.frombuffer(d.sampling_logprobs.data, np.float32))
        a = torch.tensor(np.frombuffer(d.advantages.data, np.float32))
        mask = torch.tensor(np.frombuffer(d.mask.data, np.float32))
        (grad,) = torch.autograd.grad(-(torch.exp(lp - q) * a * mask).sum(), lp)
        weights.append(to_tensor(-grad.numpy()))
    return weights


@pytest.mark.parametrize("keep_graph_tokens", [16384, 0], ids=["kept-graph", "recompute"])
def test_custom_importance_sampling_gives_builtin_gradients(tmp_path, tiny_base, keep_graph_tokens):
    stack = TrainerStack(tmp_path / "store", keep_graph_tokens=keep_graph_tokens)
    try:
        stack.add_base(tiny_base, "tiny")
        stack.fork("m")
        data = batch(seed=3)
        stack.train.ForwardBackward(
            training_pb2.ForwardBackwardRequest(model="m", data=data, loss_fn="importance_sampling")
        )
        builtin = trainer_grads(stack, "m")
        stack.trainer._states["m"].reset_accumulation()

        fwd = stack.train.ForwardCustom(training_pb2.ForwardCustomRequest(model="m", data=data))
        weights = custom_is_weights(fwd)
        stack.train.BackwardCustom(
            training_pb2.BackwardCustomRequest(
                model="m", forward_id=fwd.forward_id, weights=weights
            )
        )
        custom = trainer_grads(stack, "m")
        assert set(custom) == set(builtin)
        for name in builtin:
            assert rel_err(custom[name], builtin[name]) <= 1e-6, name
        # A forward id is consumed by its backward.
        with pytest.raises(Exception) as err:
            stack.train.BackwardCustom(
                training_pb2.BackwardCustomRequest(
                    model="m", forward_id=fwd.forward_id, weights=weights
                )
            )
        assert err.value.code().name == "NOT_FOUND"
    finally:
        stack.stop()


def test_optim_step_equals_torch_adamw_on_the_same_gradients(trainer_stack):
    stack = trainer_stack
    stack.fork("m", full=True)
    hyper = dict(lr=1e-2, betas=(0.8, 0.9), eps=1e-6, weight_decay=0.1)
    module = reference_module(stack, "m")
    params = dict(module.named_parameters())
    ref_opt = torch.optim.AdamW(params.values(), fused=True, **hyper)
    for seed in (4, 5):  # two steps: the second uses the moments of the first
        data = batch(seed=seed)
        stack.train.ForwardBackward(
            training_pb2.ForwardBackwardRequest(model="m", data=data, loss_fn="importance_sampling")
        )
        got = trainer_grads(stack, "m")
        for name, p in params.items():  # the exact gradients the trainer holds
            p.grad = got[name].clone()
        ref_opt.step()
        ref_opt.zero_grad()
        reply = stack.train.OptimStep(
            training_pb2.OptimStepRequest(
                model="m", adam=adam(1e-2, beta1=0.8, beta2=0.9, eps=1e-6, weight_decay=0.1)
            )
        )
        saved = checkpoint_tensors(stack.trainer.store.root, reply.sampler_path)
        for name, p in params.items():
            key = name if name == "lm_head.weight" else f"model.{name}"
            assert torch.equal(saved[key], p.detach()), name


def test_grad_clip_norm_bounds_the_update(trainer_stack):
    stack = trainer_stack
    stack.fork("m", full=True)
    module = reference_module(stack, "m")
    stack.train.ForwardBackward(
        training_pb2.ForwardBackwardRequest(model="m", data=batch(seed=6), loss_fn="cross_entropy")
    )
    grads = trainer_grads(stack, "m")
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads.values()))
    params = dict(module.named_parameters())
    for name, p in params.items():
        p.grad = grads[name] * float(0.5 / norm)
    ref = torch.optim.AdamW(
        params.values(), lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0, fused=True
    )
    ref.step()
    reply = stack.train.OptimStep(
        training_pb2.OptimStepRequest(model="m", adam=adam(1e-2, grad_clip_norm=0.5))
    )
    assert reply.checkpoint_info.stats.metrics["grad/norm"] == pytest.approx(float(norm), rel=1e-5)
    saved = checkpoint_tensors(stack.trainer.store.root, reply.sampler_path)
    for name, p in params.items():
        key = name if name == "lm_head.weight" else f"model.{name}"
        torch.testing.assert_close(saved[key], p.detach(), atol=1e-7, rtol=1e-5)


def _step(stack, data, **kw):
    return stack.train.Step(
        training_pb2.StepRequest(
            model="m", data=data, loss_fn="importance_sampling", adam=adam(1e-2), **kw
        )
    ).optim_step


def _files(stack, reply) -> dict[str, torch.Tensor]:
    root = stack.trainer.store.root
    out = dict(checkpoint_tensors(root, reply.sampler_path))
    out.update({f"opt.{k}": v for k, v in load_file(str(root / reply.state_path)).items()})
    return out


@pytest.mark.parametrize("full", [False, True], ids=["lora", "full"])
def test_training_after_set_head_reproduces_the_branch_bit_for_bit(trainer_stack, full):
    stack = trainer_stack
    stack.fork("m", full=full)
    c1 = _step(stack, batch(seed=7))
    c2 = _step(stack, batch(seed=8))
    c3 = _step(stack, batch(seed=9))
    stack.models.SetHead(model_pb2.SetHeadRequest(model="m", checkpoint=c1.checkpoint))
    assert stack.models.GetHead(model_pb2.GetHeadRequest(model="m")).id == c1.checkpoint
    c2b = _step(stack, batch(seed=8))
    c3b = _step(stack, batch(seed=9))
    assert c2b.checkpoint != c2.checkpoint and c2b.checkpoint_info.parent_id == c1.checkpoint
    for old, new in ((c2, c2b), (c3, c3b)):
        a, b = _files(stack, old), _files(stack, new)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), "the branch diverged from the original"
    tree = stack.models.ListCheckpoints(model_pb2.ListCheckpointsRequest(model="m"))
    children_of_c1 = [c.id for c in tree.checkpoints if c.parent_id == c1.checkpoint]
    assert sorted(children_of_c1) == sorted([c2.checkpoint, c2b.checkpoint])
    assert tree.head == c3b.checkpoint and [c.is_head for c in tree.checkpoints].count(True) == 1


def test_repeated_request_ids_apply_once(trainer_stack, tmp_path):
    stack = trainer_stack
    stack.fork("m")
    req = training_pb2.ForwardBackwardRequest(
        model="m", data=batch(seed=10), loss_fn="importance_sampling", request_id="fb-1"
    )
    first = stack.train.ForwardBackward(req)
    grads = trainer_grads(stack, "m")
    again = stack.train.ForwardBackward(req)
    assert again == first
    after = trainer_grads(stack, "m")
    assert all(torch.equal(grads[k], after[k]) for k in grads), "a retry accumulated twice"

    step_req = training_pb2.OptimStepRequest(model="m", adam=adam(), request_id="opt-1")
    s1 = stack.train.OptimStep(step_req)
    s2 = stack.train.OptimStep(step_req)
    assert s1 == s2 and s1.checkpoint_info.stats.num_datums == 3
    listed = stack.models.ListCheckpoints(model_pb2.ListCheckpointsRequest(model="m")).checkpoints
    assert [c.step for c in listed] == [0, 1]

    # The same id for another kind of call is a client bug, said so.
    with pytest.raises(Exception) as err:
        stack.train.ForwardBackward(
            training_pb2.ForwardBackwardRequest(
                model="m", data=batch(seed=10), loss_fn="importance_sampling", request_id="opt-1"
            )
        )
    assert err.value.code().name == "INVALID_ARGUMENT"

    # Durable: a new trainer process on the same store still knows the OptimStep id.
    other = TrainerStack(stack.config.store)
    try:
        s3 = other.train.OptimStep(step_req)
        assert s3.checkpoint == s1.checkpoint
        again_listed = other.models.ListCheckpoints(model_pb2.ListCheckpointsRequest(model="m"))
        assert len(again_listed.checkpoints) == 2
    finally:
        other.stop()


def test_optim_step_publishes_the_head_and_mirrors_it(trainer_stack):
    stack = trainer_stack
    stack.fork("m")
    client = redis.Redis.from_url(REDIS_URL)
    sub = client.pubsub()
    sub.subscribe(channel(stack.prefix))
    subscribed = wait_until(lambda: sub.get_message(timeout=1), what="the subscription")
    assert subscribed["type"] == "subscribe"
    stack.train.ForwardBackward(
        training_pb2.ForwardBackwardRequest(
            model="m", data=batch(seed=11), loss_fn="importance_sampling"
        )
    )
    reply = stack.train.OptimStep(training_pb2.OptimStepRequest(model="m", adam=adam()))
    message = wait_until(lambda: sub.get_message(timeout=1), what="the head event on Redis")
    event = json.loads(message["data"])
    assert event == {"model": "m", "checkpoint": reply.checkpoint, "step": 1}
    assert json.loads(client.get(mirror_key("m", stack.prefix))) == event
    # The reply came after the head was durable: the store already says so.
    assert (stack.trainer.store.model_dir("m") / "HEAD").read_text().strip() == reply.checkpoint
    sub.close()
    client.delete(*client.keys(f"{stack.prefix}*"))


def test_lora_forks_share_one_copy_of_the_base(trainer_stack):
    stack = trainer_stack
    for name in ("a", "b"):
        stack.fork(name)
        stack.train.ForwardBackward(
            training_pb2.ForwardBackwardRequest(
                model=name, data=batch(seed=12), loss_fn="importance_sampling"
            )
        )
    states = stack.trainer._states
    wa = states["a"].module.layers[0].mlp.up_proj.weight
    wb = states["b"].module.layers[0].mlp.up_proj.weight
    assert wa.data_ptr() == wb.data_ptr() and len(stack.trainer.pool) == 1


def test_evicted_models_resume_exactly_from_their_heads(tmp_path, tiny_base):
    def train(stack: TrainerStack, name: str, seed: int) -> None:
        stack.train.Step(
            training_pb2.StepRequest(
                model=name, data=batch(seed=seed), loss_fn="ppo", adam=adam(1e-2)
            )
        )

    evicting = TrainerStack(tmp_path / "store", max_loaded_models=1)
    try:
        evicting.add_base(tiny_base, "tiny")
        evicting.fork("a")
        for name in ("b", "c"):  # inherit a's adapter: the same starting weights
            evicting.fork(name, source="a")
        for seed in (13, 14):
            for name in ("a", "b"):  # each switch evicts the other model
                train(evicting, name, seed)
                assert evicting.trainer.loaded == [name]
    finally:
        evicting.stop()
    keeping = TrainerStack(tmp_path / "store")  # c never leaves memory between its steps
    try:
        for seed in (13, 14):
            train(keeping, "c", seed)
        heads = {n: keeping.models.GetHead(model_pb2.GetHeadRequest(model=n)) for n in "abc"}
    finally:
        keeping.stop()
    a, b, c = (checkpoint_tensors(tmp_path / "store", heads[n].sampler_path) for n in "abc")
    assert all(torch.equal(a[k], b[k]) and torch.equal(a[k], c[k]) for k in a)


def test_concurrent_calls_on_one_model_are_serialized(trainer_stack):
    from concurrent.futures import ThreadPoolExecutor

    stack = trainer_stack
    stack.fork("m")
    data = batch(seed=15)
    request = training_pb2.ForwardBackwardRequest(model="m", data=data, loss_fn="cross_entropy")
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda _: stack.train.ForwardBackward(request), range(4)))
    state = stack.trainer._states["m"]
    assert state.acc.num_datums == 12  # no call was lost or interleaved
    module = reference_module(stack, "m")
    (4 * reference_loss(module, data, "cross_entropy", {})[0]).backward()
    grads = trainer_grads(stack, "m")
    for name, p in module.named_parameters():
        if p.grad is not None:
            assert rel_err(grads[name], p.grad) < 1e-4


def test_a_cancelled_call_holds_its_model_until_its_work_ends(trainer_stack):
    """A client that goes away mid-call does not stop the torch work, which runs on in a
    thread: the next call on the model waits for it (never overlapping it), and the
    cancelled call's retry (same request_id) gets its reply instead of applying it twice."""
    import threading

    stack = trainer_stack
    stack.fork("m")
    compute = stack.trainer.compute
    original = compute.forward_backward
    release, events = threading.Event(), []

    def held(state, datums, *args):  # the first call's work waits until released
        first = not events
        events.append("start")
        if first:
            release.wait()
        out = original(state, datums, *args)
        events.append("end")
        return out

    compute.forward_backward = held
    data = batch(seed=16)
    first = training_pb2.ForwardBackwardRequest(
        model="m", data=data, loss_fn="cross_entropy", request_id="r1"
    )
    call = stack.train.ForwardBackward.future(first)
    wait_until(lambda: events == ["start"], "the first call's work started")
    call.cancel()
    second = stack.train.ForwardBackward.future(
        training_pb2.ForwardBackwardRequest(model="m", data=data, loss_fn="cross_entropy")
    )
    lock = stack.trainer._lock("m")
    # The second call either queues on the model's lock (held by the cancelled call) or,
    # were the lock let go at the cancellation, starts its work beside the first's.
    wait_until(lambda: len(events) > 1 or lock._waiters, "the second call queued or started")
    assert events == ["start"], events
    release.set()
    second.result()
    assert events == ["start", "end", "start", "end"]
    retried = stack.train.ForwardBackward(first)  # the reply of the work already done
    assert events == ["start", "end", "start", "end"]
    assert retried.num_datums == 3
    assert stack.trainer._states["m"].acc.num_datums == 6  # two calls' datums, not three
