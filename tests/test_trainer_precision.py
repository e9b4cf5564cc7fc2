"""`--dtype bf16` training: bf16 compute over fp32 master weights, checkpoints in fp32."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from headway.modeling.dtypes import dtype_name as canonical
from headway.tensors import to_tensor
from headway.v1 import training_pb2
from tests.helpers_training import adam, batch, checkpoint_tensors
from tests.stack import TrainerStack
from trainer_svc.compute import ComputeMode
from trainer_svc.precision import BF16, FP32, decide


def test_dtype_names_are_checked():
    assert canonical("fp32") == canonical("float32") == "fp32"
    assert canonical("BF16") == canonical("bfloat16") == "bf16"
    with pytest.raises(ValueError, match="fp32, bf16"):
        canonical("fp16")


def test_bf16_compute_is_chosen_only_where_measured_faster():
    assert decide(fp32_s=1.0, bf16_s=0.25)  # bf16 units (AVX-512 BF16, AMX, GPUs)
    assert not decide(fp32_s=1.0, bf16_s=0.9)  # a small edge is lost in the casts
    assert not decide(fp32_s=1.0, bf16_s=3.0)  # emulated bf16


def _logprobs(reply) -> np.ndarray:
    return np.concatenate([np.frombuffer(t.data, np.float32) for t in reply.logprobs])


def _grads(stack: TrainerStack, slug: str) -> dict[str, torch.Tensor]:
    state = stack.trainer._states[slug]
    return {n: p.grad.clone() for n, p in state.params.items() if p.grad is not None}


@pytest.fixture
def bf16_stack(tmp_path, tiny_base):
    # Forced to bf16 compute whatever this CPU measures, so the bf16 path is what is tested.
    stack = TrainerStack(tmp_path / "store", dtype="bf16")
    stack.trainer.mode = ComputeMode(BF16, stack.trainer.mode.kernels)
    stack.add_base(tiny_base, "tiny")
    yield stack
    stack.stop()


@pytest.mark.parametrize("full", [False, True], ids=["lora", "full"])
def test_bf16_training_stays_near_fp32_and_keeps_fp32_state(bf16_stack, full):
    stack, data = bf16_stack, batch(seed=7)
    stack.fork("m", full=full)
    replies, grads = {}, {}
    for precision in (FP32, BF16):  # the same weights, the same batch
        stack.trainer.mode = ComputeMode(precision, stack.trainer.mode.kernels)
        replies[precision.name] = stack.train.ForwardBackward(
            training_pb2.ForwardBackwardRequest(model="m", data=data, loss_fn="importance_sampling")
        )
        grads[precision.name] = _grads(stack, "m")
        if precision is FP32:
            stack.trainer._states["m"].reset_accumulation()
    diff = np.abs(_logprobs(replies["bf16"]) - _logprobs(replies["fp32"]))
    assert 0 < diff.max() < 0.1 and diff.mean() < 0.02  # bf16 did run, and close
    for name, g in grads["fp32"].items():
        got = grads["bf16"][name]
        assert got.dtype == torch.float32, name  # master gradients are fp32
        assert float((got - g).norm()) <= 0.1 * float(g.norm()) + 1e-6, name  # lora_A: 0

    reply = stack.train.OptimStep(training_pb2.OptimStepRequest(model="m", adam=adam(1e-3)))
    saved = checkpoint_tensors(stack.trainer.store.root, reply.sampler_path)
    assert saved and all(t.dtype == torch.float32 for t in saved.values())
    optimizer = load_file(str(stack.trainer.store.root / reply.state_path))
    assert all(t.dtype == torch.float32 for t in optimizer.values())
    state = stack.trainer._states["m"]
    assert all(p.dtype == torch.float32 for p in state.params.values())


@pytest.mark.parametrize("keep_graph_tokens", [16384, 0], ids=["kept-graph", "recompute"])
def test_bf16_custom_loss_gives_the_bf16_builtin_gradients(bf16_stack, keep_graph_tokens):
    stack, data = bf16_stack, batch(seed=8)
    stack.trainer.config.keep_graph_tokens = keep_graph_tokens
    stack.fork("m")
    stack.train.ForwardBackward(
        training_pb2.ForwardBackwardRequest(model="m", data=data, loss_fn="importance_sampling")
    )
    builtin = _grads(stack, "m")
    stack.trainer._states["m"].reset_accumulation()
    fwd = stack.train.ForwardCustom(training_pb2.ForwardCustomRequest(model="m", data=data))
    weights = []
    for d in fwd.data:
        lp, q, a, mask = (
            np.frombuffer(t.data, np.float32)
            for t in (d.logprobs, d.sampling_logprobs, d.advantages, d.mask)
        )
        weights.append(to_tensor((mask * np.exp(lp - q) * a).astype(np.float32)))
    stack.train.BackwardCustom(
        training_pb2.BackwardCustomRequest(model="m", forward_id=fwd.forward_id, weights=weights)
    )
    custom = _grads(stack, "m")
    assert set(custom) == set(builtin)
    for name, g in builtin.items():
        # Same bf16 forward; only the head's rows differ (all positions vs trained ones).
        assert float((custom[name] - g).norm()) <= 1e-2 * float(g.norm()) + 1e-6, name
