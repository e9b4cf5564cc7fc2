"""Building training requests and reading checkpoints back, for the trainer's tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from headway.modeling import LoraConfig, apply_lora, build_model, load_adapter
from headway.store.weights import adapter_dir, base_config, full_state
from headway.tensors import to_tensor
from headway.v1 import common_pb2
from tests.conftest import VOCAB
from trainer_svc.datums import assemble_batch


def rl_datum(seed: int, n: int = 12, prompt: int = 4) -> common_pb2.Datum:
    """A random RL datum: prompt positions masked, sampling logprobs and advantages set."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, VOCAB, n + 1)
    weights = np.r_[np.zeros(prompt), np.ones(n - prompt)].astype(np.float32)
    q = (-rng.uniform(2.0, 6.0, n)).astype(np.float32) * weights
    adv = (rng.normal(size=n).astype(np.float32)) * weights
    return common_pb2.Datum(
        input_tokens=to_tensor(tokens[:-1]),
        target_tokens=to_tensor(tokens[1:]),
        weights=to_tensor(weights),
        sampling_logprobs=to_tensor(q),
        advantages=to_tensor(adv),
        reward=float(rng.integers(0, 2)),
    )


def items(*datums: common_pb2.Datum) -> list[common_pb2.TrainingItem]:
    return [common_pb2.TrainingItem(datum=d) for d in datums]


def batch(seed: int = 0, size: int = 3) -> list[common_pb2.TrainingItem]:
    return items(*(rl_datum(seed * 100 + i, n=8 + 3 * i) for i in range(size)))


def adam(lr: float = 1e-3, **kw: float) -> common_pb2.AdamParams:
    return common_pb2.AdamParams(learning_rate=lr, **kw)


def checkpoint_tensors(store: Path, sampler_path: str) -> dict[str, torch.Tensor]:
    """The weights a checkpoint holds (adapter or full), as saved."""
    path = store / sampler_path
    if path.is_dir():
        return load_file(str(path / "adapter_model.safetensors"))
    return load_file(str(path))


def reference_module(stack: Any, slug: str, checkpoint: str = "") -> torch.nn.Module:
    """The model at a checkpoint (default its head), rebuilt from the store outside the
    services."""
    store = stack.trainer.store
    record, head = store.get_model(slug), checkpoint or store.head(slug)
    config = base_config(store, slug)
    if record.lora:
        frozen = full_state(store, record.frozen.model, record.frozen.checkpoint)
        module = build_model(config, frozen)
        apply_lora(module, LoraConfig(**record.lora))
        load_adapter(module, adapter_dir(store, slug, head))
    else:
        module = build_model(
            config, {k: v.clone() for k, v in full_state(store, slug, head).items()}
        )
        for p in module.parameters():
            p.requires_grad_(True)
    return module


@torch.inference_mode()
def greedy_reference(module: torch.nn.Module, prompt: list[int], steps: int) -> list[int]:
    """Greedy tokens by full forwards (no cache): what temperature 0 must produce."""
    seq = list(prompt)
    for _ in range(steps):
        seq.append(int(module(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt) :]


def scored_group(sample: Any, step: int) -> list[common_pb2.Trajectory]:
    """A `SampleResult`'s completions as one GRPO group of trajectories, with rewards that
    differ (alternating 0/1, shifted by `step`) so that the group has a signal."""
    prompt = to_tensor(sample.prompt_tokens, common_pb2.DTYPE_INT32)
    return [
        common_pb2.Trajectory(
            turns=[
                common_pb2.Turn(
                    prompt_tokens=prompt,
                    completion_tokens=to_tensor(seq.tokens, common_pb2.DTYPE_INT32),
                    completion_logprobs=to_tensor(seq.logprobs, common_pb2.DTYPE_FLOAT32),
                    checkpoint=sample.checkpoint,
                )
            ],
            reward=float((i + step) % 2),
        )
        for i, seq in enumerate(sample.sequences)
    ]


LOSS_CONFIGS = {
    "cross_entropy": {},
    "importance_sampling": {},
    "ppo": {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1},
    "cispo": {"epsilon": 0.1},
    "dro": {"beta": 0.3},
}


def reference_loss(module, data, loss_fn, cfg):
    """The loss of the issue's formulas, computed datum by datum with log_softmax."""
    total, lps = 0.0, []
    for d in assemble_batch(data, group_size=0, normalize_std=False).datums:
        ids = torch.from_numpy(d.input_tokens)[None]
        logits = module(ids)[0]
        lp = (
            torch.log_softmax(logits.double(), -1)
            .gather(-1, torch.from_numpy(d.target_tokens)[:, None])[:, 0]
            .float()
        )
        w = torch.from_numpy(d.weights)
        lps.append(lp.detach())
        if loss_fn == "cross_entropy":
            total = total - (w * lp).sum()
            continue
        q, a = torch.from_numpy(d.sampling_logprobs), torch.from_numpy(d.advantages)
        ratio = torch.exp(lp - q)
        if loss_fn == "importance_sampling":
            term = ratio * a
        elif loss_fn == "ppo":
            lo, hi = cfg["clip_low_threshold"], cfg["clip_high_threshold"]
            term = torch.minimum(ratio * a, ratio.clamp(lo, hi) * a)
        elif loss_fn == "cispo":
            eps = cfg["epsilon"]
            term = ratio.clamp(1 - eps, 1 + eps).detach() * a * lp
        else:  # dro
            term = a * lp - 0.5 * cfg["beta"] * (lp - q) ** 2
        total = total - (w * term).sum()
    return total, lps


def trainer_grads(stack: Any, slug: str) -> dict[str, torch.Tensor]:
    state = stack.trainer._states[slug]
    return {n: p.grad.clone() for n, p in state.params.items() if p.grad is not None}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def train_steps(stack: Any, model: str, n: int) -> list[str]:
    """`n` cross-entropy Steps of `model` (seeds 0..n-1); the new checkpoint ids."""
    from headway.v1 import training_pb2

    return [
        stack.train.Step(
            training_pb2.StepRequest(
                model=model, data=batch(seed=k), loss_fn="cross_entropy", adam=adam()
            )
        ).optim_step.checkpoint
        for k in range(n)
    ]
