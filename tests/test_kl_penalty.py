"""The KL penalty to a reference policy (issue 17 §1), against a live trainer.

Every built-in loss takes `kl_penalty {coef, reference}`: the gradient is that of the
loss plus coef·Σ|w|·k3 with k3 = exp(ref − lp) − (ref − lp) − 1, computed here from the
formula on modules rebuilt from the store, and the metric kl/reference is the mean k3
over the trained tokens. ForwardCustom returns the reference logprobs when asked. A LoRA
fork's root reference is its base with the adapters off (no weights copied), and a full
fork's reference is the frozen pool's copy, shared with LoRA forks of the same weights.
"""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import torch

from headway.tensors import from_tensor
from headway.v1 import training_pb2
from tests.helpers_training import (
    LOSS_CONFIGS,
    adam,
    batch,
    reference_loss,
    reference_module,
    rel_err,
    trainer_grads,
)
from trainer_svc.datums import assemble_batch

COEF = 0.7


def _k3(lp: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    d = ref - lp
    return torch.exp(d) - d - 1


def _moved(stack, slug: str, steps: int = 1) -> list[str]:
    """Train `slug` `steps` times with a large rate so its head is far from its root;
    the checkpoint ids, oldest first."""
    ids = []
    for k in range(steps):
        reply = stack.train.Step(
            training_pb2.StepRequest(
                model=slug, data=batch(seed=10 + k), loss_fn="cross_entropy", adam=adam(3e-2)
            )
        )
        ids.append(reply.optim_step.checkpoint)
    return ids


def _root(stack, slug: str) -> str:
    return stack.trainer.store.root_checkpoint(slug).id


@pytest.mark.parametrize("loss_fn", ["cross_entropy", "ppo", "importance_sampling"])
@pytest.mark.parametrize("full", [False, True], ids=["lora", "full"])
def test_kl_penalty_gradient_equals_the_formula(trainer_stack, loss_fn, full):
    stack = trainer_stack
    stack.fork("m", full=full)
    _moved(stack, "m")
    data, cfg = batch(seed=1), LOSS_CONFIGS[loss_fn]
    reply = stack.train.ForwardBackward(
        training_pb2.ForwardBackwardRequest(
            model="m",
            data=data,
            loss_fn=loss_fn,
            loss_fn_config=cfg,
            kl_penalty=training_pb2.KlPenalty(coef=COEF),
        )
    )
    policy = reference_module(stack, "m")
    root = reference_module(stack, "m", _root(stack, "m"))
    loss, lps = reference_loss(policy, data, loss_fn, cfg)
    _, ref_lps = reference_loss(root, data, "cross_entropy", {})
    kl_sum, trained = 0.0, 0
    penalty = 0.0
    for d, lp_detached, ref in zip(
        assemble_batch(data, group_size=0, normalize_std=False).datums, lps, ref_lps, strict=True
    ):
        del lp_detached
        w = torch.from_numpy(d.weights)
        mask = w != 0
        # The policy's logprobs again, with a graph, for the penalty's gradient.
        ids = torch.from_numpy(d.input_tokens)[None]
        lp = (
            torch.log_softmax(policy(ids)[0].double(), -1)
            .gather(-1, torch.from_numpy(d.target_tokens)[:, None])[:, 0]
            .float()
        )
        per = _k3(lp[mask], ref[mask])
        penalty = penalty + (w[mask].abs() * per).sum()
        kl_sum += float(per.detach().sum())
        trained += int(mask.sum())
    (loss + COEF * penalty).backward()
    assert kl_sum / trained > 1e-4  # the head moved: a penalty that is not zero
    assert reply.metrics["kl/reference"] == pytest.approx(kl_sum / trained, rel=1e-4)
    total = float(loss.detach() + COEF * penalty.detach())
    assert reply.metrics["loss:sum"] == pytest.approx(total, rel=1e-5, abs=1e-5)
    grads = trainer_grads(stack, "m")
    want = {n: p.grad for n, p in policy.named_parameters() if p.grad is not None}
    assert set(grads) == set(want) and grads
    for name in want:
        assert rel_err(grads[name], want[name]) < 1e-4, name


def test_the_reference_can_be_any_checkpoint_of_the_model(trainer_stack):
    stack = trainer_stack
    stack.fork("m")
    first, _second = _moved(stack, "m", steps=2)
    data = batch(seed=3)

    def kl(reference: str) -> float:
        reply = stack.train.ForwardBackward(
            training_pb2.ForwardBackwardRequest(
                model="m",
                data=data,
                loss_fn="cross_entropy",
                kl_penalty=training_pb2.KlPenalty(coef=0.0, reference=reference),
            )
        )
        return reply.metrics["kl/reference"]

    policy = reference_module(stack, "m")
    _, lps = reference_loss(policy, data, "cross_entropy", {})
    datums = assemble_batch(data, group_size=0, normalize_std=False).datums
    for reference in (first, ""):
        module = reference_module(stack, "m", reference or _root(stack, "m"))
        _, refs = reference_loss(module, data, "cross_entropy", {})
        per = [
            _k3(lp, ref)[torch.from_numpy(d.weights) != 0]
            for d, lp, ref in zip(datums, lps, refs, strict=True)
        ]
        want = float(torch.cat(per).mean())
        assert kl(reference) == pytest.approx(want, rel=1e-4), reference
    # The head itself as reference: the policies agree, the divergence is 0.
    assert kl(stack.trainer.store.head("m")) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("full", [False, True], ids=["lora", "full"])
def test_forward_custom_returns_the_reference_logprobs(trainer_stack, full):
    stack = trainer_stack
    stack.fork("m", full=full)
    _moved(stack, "m")
    data = batch(seed=4)
    fwd = stack.train.ForwardCustom(
        training_pb2.ForwardCustomRequest(model="m", data=data, reference="")
    )
    _, refs = reference_loss(
        reference_module(stack, "m", _root(stack, "m")), data, "cross_entropy", {}
    )
    _, lps = reference_loss(reference_module(stack, "m"), data, "cross_entropy", {})
    for d, ref, lp in zip(fwd.data, refs, lps, strict=True):
        got = from_tensor(d.reference_logprobs, "reference_logprobs")
        np.testing.assert_allclose(got, ref.numpy(), atol=1e-5)
        assert not np.allclose(got, lp.numpy(), atol=1e-3)  # not the policy's own
    # Not asked for: absent.
    plain = stack.train.ForwardCustom(training_pb2.ForwardCustomRequest(model="m", data=data))
    assert not any(d.HasField("reference_logprobs") for d in plain.data)


def test_root_references_cost_no_second_copy_of_the_weights(trainer_stack):
    stack = trainer_stack
    stack.fork("lora")
    stack.fork("full", full=True)
    for slug in ("lora", "full"):
        stack.train.ForwardBackward(
            training_pb2.ForwardBackwardRequest(
                model=slug,
                data=batch(seed=5),
                loss_fn="cross_entropy",
                kl_penalty=training_pb2.KlPenalty(coef=0.1),
            )
        )
    states = stack.trainer._states
    lora, full = states["lora"].reference, states["full"].reference
    # The LoRA fork's base: its adapters switched off, no tensor of its own.
    assert lora.lora_off and lora.tensors == {}
    # The full fork's root is the base, whose one copy the LoRA fork's frozen weights are.
    assert full.pool_ref == states["lora"].frozen_ref
    assert len(stack.trainer.pool) == 1
    assert all(
        full.tensors[name] is t for name, t in stack.trainer.pool.acquire(full.pool_ref).items()
    )
    stack.trainer.pool.release(full.pool_ref)


def test_bad_kl_penalties_are_refused_and_change_nothing(trainer_stack):
    stack = trainer_stack
    stack.fork("m")
    bad = {
        "coef": (training_pb2.KlPenalty(coef=-0.1), grpc.StatusCode.INVALID_ARGUMENT, "coef"),
        "nan": (
            training_pb2.KlPenalty(coef=float("nan")),
            grpc.StatusCode.INVALID_ARGUMENT,
            "coef",
        ),
        "reference": (
            training_pb2.KlPenalty(coef=0.1, reference="s000001-00000000"),
            grpc.StatusCode.NOT_FOUND,
            "KL reference 's000001-00000000'",
        ),
        "other model's": (
            training_pb2.KlPenalty(coef=0.1, reference=stack.trainer.store.head("tiny")),
            grpc.StatusCode.NOT_FOUND,
            "name a checkpoint of model 'm'",
        ),
    }
    for name, (kl, code, words) in bad.items():
        with pytest.raises(grpc.RpcError) as err:
            stack.train.ForwardBackward(
                training_pb2.ForwardBackwardRequest(
                    model="m", data=batch(seed=6), loss_fn="cross_entropy", kl_penalty=kl
                )
            )
        assert err.value.code() == code, name
        assert words in err.value.details(), (name, err.value.details())
        with pytest.raises(grpc.RpcError) as err:
            stack.train.Step(
                training_pb2.StepRequest(
                    model="m",
                    data=batch(seed=6),
                    loss_fn="cross_entropy",
                    adam=adam(),
                    kl_penalty=kl,
                )
            )
        assert err.value.code() == code, name
    with pytest.raises(grpc.RpcError) as err:
        stack.train.ForwardCustom(
            training_pb2.ForwardCustomRequest(model="m", data=batch(seed=6), reference="nope")
        )
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    # Nothing was accumulated, no checkpoint written.
    with pytest.raises(grpc.RpcError) as err:
        stack.train.OptimStep(training_pb2.OptimStepRequest(model="m", adam=adam()))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert len(stack.trainer.store.list_checkpoints("m")) == 1
