"""The training matmul kernels (`trainer_svc.kernels`): every choice gives the same numbers."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from headway.modeling import ModelConfig, Transformer
from tests.stack import TINY_DIMS
from trainer_svc import compute, losses
from trainer_svc.datums import DatumArrays
from trainer_svc.kernels import KERNELS, Kernels, Linear

CHOICES = sorted(KERNELS)


def _module(seed: int = 0) -> torch.nn.Module:
    config = ModelConfig(model_type="qwen3", **TINY_DIMS, tie_word_embeddings=True, qk_norm=True)
    module = Transformer(config)
    module.init_weights(std=0.1, seed=seed)
    for p in module.parameters():
        p.requires_grad_(True)
    return module


def _datums(vocab: int, seed: int = 0) -> list[DatumArrays]:
    rng = np.random.default_rng(seed)
    out = []
    for n in (9, 14, 5):
        w = np.r_[np.zeros(2), np.ones(n - 2)].astype(np.float32)
        out.append(
            DatumArrays(
                input_tokens=rng.integers(0, vocab, n),
                target_tokens=rng.integers(0, vocab, n),
                weights=w,
                sampling_logprobs=(-rng.uniform(2, 6, n)).astype(np.float32) * w,
                advantages=rng.normal(size=n).astype(np.float32) * w,
                reward=0.0,
                advantage=0.0,
                group_index=0,
            )
        )
    return out


def _forward_backward(kernels: Kernels | None):
    module = _module()
    state = type("State", (), {"module": module})()
    loss, cfg = losses.resolve("importance_sampling", {})
    datums = _datums(module.config.vocab_size)
    mode = compute.ComputeMode(kernels=kernels)
    lps, metrics = compute.forward_backward(state, datums, loss, cfg, 8192, mode)
    grads = {n: p.grad.clone() for n, p in module.named_parameters()}
    return np.concatenate(lps), metrics, grads


@pytest.mark.parametrize("choice", CHOICES)
def test_every_kernel_choice_gives_torchs_logprobs_and_gradients(choice):
    ref_lp, ref_metrics, ref_grads = _forward_backward(None)  # torch's own matmuls
    lp, metrics, grads = _forward_backward(Kernels((choice,)))
    # The fp32 bound the sampler↔trainer agreement (1e-4) leaves room in, with margin.
    np.testing.assert_allclose(lp, ref_lp, atol=1e-5)
    assert metrics["loss:sum"] == pytest.approx(ref_metrics["loss:sum"], rel=1e-5, abs=1e-5)
    for name, g in ref_grads.items():
        assert float((grads[name] - g).norm()) <= 1e-5 * float(g.norm()) + 1e-7, name


def test_linear_with_bias_and_3d_input_matches_f_linear():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 7, generator=gen, requires_grad=True)
    w = torch.randn(3, 7, generator=gen, requires_grad=True)
    b = torch.randn(3, generator=gen, requires_grad=True)
    g = torch.randn(2, 5, 3, generator=gen)
    F.linear(x, w, b).backward(g)
    ref = [t.grad.clone() for t in (x, w, b)]
    for t in (x, w, b):
        t.grad = None
    for choice in CHOICES:
        y = Linear.apply(x, w, b, Kernels((choice,)))
        torch.testing.assert_close(y, F.linear(x, w, b), atol=1e-5, rtol=1e-5)
        y.backward(g)
        for t, r in zip((x, w, b), ref, strict=True):
            torch.testing.assert_close(t.grad, r, atol=1e-5, rtol=1e-5)
            t.grad = None


def test_the_measured_choice_is_one_candidate_and_is_kept():
    kernels = Kernels()
    a, w = torch.randn(33, 16), torch.randn(24, 16)
    out = kernels.linear(a, w)
    torch.testing.assert_close(out, a @ w.t(), atol=1e-5, rtol=1e-5)
    ((role, rows, k, n), name), *_ = kernels.chosen.items()
    assert (role, rows, k, n) == ("forward", 64, 16, 24) and name in KERNELS
    assert set(kernels.times[role, rows, k, n]) == set(kernels.candidates)
    kernels.linear(torch.randn(40, 16), w)  # same bucket: no new measurement
    assert len(kernels.chosen) == 1


def test_routing_is_thread_local_and_leaves_bf16_to_autocast():
    calls = []

    class Counting(Kernels):
        def mm(self, role, a, bt, shape):
            calls.append(threading.get_ident())
            return super().mm(role, a, bt, shape)

    kernels = Counting(("torch",) + tuple(c for c in CHOICES if c != "torch"))
    x, w = torch.randn(4, 8), torch.randn(6, 8)
    seen_elsewhere = []
    with kernels.active():
        F.linear(x, w)
        other = threading.Thread(target=lambda: seen_elsewhere.append(F.linear(x, w)))
        other.start()
        other.join()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert F.linear(x, w).dtype == torch.bfloat16
    assert calls == [threading.get_ident()]  # the other thread and autocast: torch's own


def test_a_new_trainer_takes_the_choice_an_earlier_one_cached(tmp_path, monkeypatch):
    if len(KERNELS) < 2:
        pytest.skip("one matmul kernel in this torch build: nothing is measured or cached")
    monkeypatch.setenv("HEADWAY_KERNEL_CACHE", str(tmp_path / "kernels.json"))
    first = Kernels()
    a, w = torch.randn(33, 16), torch.randn(24, 16)
    first.linear(a, w)
    (key, name), *_ = first.chosen.items()
    # Whatever the timing would say now, the second takes the cached choice, unmeasured.
    other = next(c for c in KERNELS if c != name)
    cache = json.loads((tmp_path / "kernels.json").read_text())
    assert [v["kernel"] for v in cache.values()] == [name]
    (entry,) = cache
    cache[entry]["kernel"] = other  # as if an earlier run had chosen the other one
    (tmp_path / "kernels.json").write_text(json.dumps(cache))
    second = Kernels()
    torch.testing.assert_close(second.linear(a, w), a @ w.t(), atol=1e-5, rtol=1e-5)
    assert second.chosen == {key: other} and not second.times
    # A cached name this process does not offer is measured afresh.
    cache[entry]["kernel"] = "no-such-kernel"
    (tmp_path / "kernels.json").write_text(json.dumps(cache))
    third = Kernels()
    third.linear(a, w)
    assert third.chosen[key] in KERNELS and set(third.times[key]) == set(third.candidates)
