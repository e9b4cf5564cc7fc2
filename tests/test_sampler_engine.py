"""The sampler's engine on its own (no services): the few-rows matmul layout of decode
steps against the model's own path, adapter slots reloaded in place, and the draw."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import sampler_svc.engine as engine_mod
from headway.modeling import LoraConfig, ModelConfig, Transformer
from sampler_svc.engine import Engine, Job
from sampler_svc.multilora import AdapterBank, rows_linear
from sampler_svc.requests import row_generator
from sampler_svc.sampling import DrawParams

VOCAB = 96
FAMILIES = {
    "qwen3": dict(model_type="qwen3", qk_norm=True, tie_word_embeddings=True),
    "qwen2": dict(model_type="qwen2", qkv_bias=True, tie_word_embeddings=False),
}


def tiny_model(family: str, seed: int = 0) -> Transformer:
    config = ModelConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        **FAMILIES[family],
    )
    model = Transformer(config)
    model.init_weights(std=0.1, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # nonzero biases, so that the bias path is exercised
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model.eval()


def adapter(bank: AdapterBank, rank: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for key, A in bank.A.items():
        out_f, in_f = bank.B[key].shape[1], A.shape[2]
        tensors[f"{key}.lora_A"] = torch.randn(rank, in_f, generator=gen) * 0.1
        tensors[f"{key}.lora_B"] = torch.randn(out_f, rank, generator=gen) * 0.1
    return tensors


def make_engine(family: str) -> Engine:
    model = tiny_model(family)
    bank = AdapterBank(model, slots=2, max_rank=8)
    bank.load(1, LoraConfig(rank=4, alpha=8), adapter(bank, 4, seed=7))
    return Engine(model, bank, max_batch=8, max_seq_len=128)


def run(
    engine: Engine, prompt: list[int], n: int, slot: int, draws: list[DrawParams], max_tokens=24
):
    """Admit one job and step it to the end: per row (tokens, logprobs)."""
    out: dict[int, list[tuple[int, float]]] = {i: [] for i in range(n)}

    def emit(kind, row, payload):
        if kind == "token":
            out[row].append(payload)

    job = Job(prompt, n, max_tokens, frozenset(), draws, slot=slot, emit=emit)
    engine.admit(job)
    while job.live_rows:
        engine.step()
    return [([t for t, _ in out[i]], np.array([lp for _, lp in out[i]])) for i in range(n)]


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(1, 64), (2, 64), (5, 64), (3, 1, 64), (1, 7, 64)])
def test_rows_linear_is_f_linear(shape, bias):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen)
    w = torch.randn(48, 64, generator=gen)
    b = torch.randn(48, generator=gen) if bias else None
    got, want = rows_linear(x, w, b), F.linear(x, w, b)
    assert got.shape == want.shape and got.is_contiguous()
    assert (got - want).abs().max() <= 1e-5


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_decode_in_the_rows_layout_matches_the_model_path(family, monkeypatch):
    """Decode steps as (W @ xᵀ)ᵀ (one live row duplicated to two) give the tokens and, within
    1e-5, the logprobs of the model's own F.linear path, with and without an adapter."""
    prompt = [5, 17, 33, 8, 41, 12]
    jobs = [  # (n, slot, temperature)
        (1, 0, 0.0),
        (1, 1, 0.0),
        (3, 0, 1.0),
        (3, 1, 1.0),
    ]
    results = {}
    for layout_max in (engine_mod.ROWS_LAYOUT_MAX, 0):  # 0: every forward by the model path
        monkeypatch.setattr(engine_mod, "ROWS_LAYOUT_MAX", layout_max)
        engine = make_engine(family)
        for n, slot, temp in jobs:
            draws = [DrawParams(temp, 1.0, 0, row_generator(3, i)) for i in range(n)]
            results[layout_max, n, slot] = run(engine, prompt, n, slot, draws)
    for n, slot, _ in jobs:
        fast, model_path = results[engine_mod.ROWS_LAYOUT_MAX, n, slot], results[0, n, slot]
        for (tf, lf), (tm, lm) in zip(fast, model_path, strict=True):
            assert tf == tm
            assert np.abs(lf - lm).max() <= 1e-5


def test_a_slot_reloaded_with_a_smaller_adapter_holds_only_it():
    """Only the columns beyond the new rank that an earlier adapter wrote are cleared: the
    slot ends up exactly as if the small adapter had been loaded into a fresh bank."""
    model = tiny_model("qwen3")
    bank = AdapterBank(model, slots=2, max_rank=8)
    small = adapter(bank, 2, seed=2)
    bank.load(1, LoraConfig(rank=8, alpha=8), adapter(bank, 8, seed=1))
    bank.load(1, LoraConfig(rank=2, alpha=4), small)
    # An adapter that leaves out a projection clears that projection's columns too.
    partial = {k: v for k, v in adapter(bank, 3, seed=3).items() if "q_proj" not in k}
    bank.load(2, LoraConfig(rank=8, alpha=8), adapter(bank, 8, seed=4))
    bank.load(2, LoraConfig(rank=3, alpha=3), partial)
    fresh = AdapterBank(tiny_model("qwen3"), slots=2, max_rank=8)
    fresh.load(1, LoraConfig(rank=2, alpha=4), small)
    fresh.load(2, LoraConfig(rank=3, alpha=3), partial)
    for key in bank.A:
        assert torch.equal(bank.A[key], fresh.A[key]) and torch.equal(bank.B[key], fresh.B[key])
    assert bank.scaling_values == fresh.scaling_values == [0.0, 2.0, 1.0]
    assert torch.equal(bank.scaling, fresh.scaling)
