"""The fused vocabulary head (`trainer_svc.head`): the same numbers as the unfused ops."""

from __future__ import annotations

import pytest
import torch

from headway.modeling import entropy, token_logprobs
from trainer_svc import head
from trainer_svc.head import head_logprobs


def _inputs(k: int = 37, hidden: int = 16, vocab: int = 301, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(k, hidden, generator=gen)
    w = torch.randn(vocab, hidden, generator=gen) * 0.5
    targets = torch.randint(0, vocab, (k,), generator=gen)
    g = torch.randn(k, generator=gen)
    return h, w, targets, g


def _reference(h, w, targets, g):
    h, w = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    logits = h @ w.t()
    lp = token_logprobs(logits, targets)
    (lp * g).sum().backward()
    return lp.detach(), entropy(logits.detach()), h.grad, w.grad


@pytest.mark.parametrize("block_bytes", [1, 4 * 301 * 5, 2**30], ids=["row", "rows", "all"])
def test_fused_head_equals_the_unfused_ops(monkeypatch, block_bytes):
    monkeypatch.setattr(head, "BLOCK_BYTES", block_bytes)  # any row blocking, same numbers
    h, w, targets, g = _inputs()
    ref_lp, ref_ent, ref_gh, ref_gw = _reference(h, w, targets, g)
    hh, ww = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    lp, ent = head_logprobs(hh, ww, targets)
    (lp * g).sum().backward()
    # The logprobs are the sampler's, bit for bit: the trainer↔sampler agreement rests on it.
    assert torch.equal(lp.detach(), ref_lp)
    torch.testing.assert_close(ent, ref_ent, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(hh.grad, ref_gh, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ww.grad, ref_gw, atol=1e-6, rtol=1e-5)


def test_frozen_weight_gets_no_gradient_and_no_graph_means_no_softmax():
    h, w, targets, g = _inputs(seed=1)
    hh = h.clone().requires_grad_(True)
    lp, ent = head_logprobs(hh, w, targets)  # w frozen, as under LoRA
    (lp * g).sum().backward()
    assert w.grad is None and hh.grad is not None and ent is not None
    with torch.no_grad():
        lp2, ent2 = head_logprobs(h, w, targets)
    assert torch.equal(lp2, lp.detach()) and ent2 is None


def test_a_second_backward_through_the_fused_head_is_refused():
    h, w, targets, g = _inputs(seed=2)
    hh = h.clone().requires_grad_(True)
    lp, _ = head_logprobs(hh, w, targets)
    (lp * g).sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward pass"):
        (lp * g).sum().backward()


@pytest.mark.parametrize(
    "zero_rows",
    [[0, 1, 2, 10, 11, 20], list(range(0, 37, 2)), list(range(37)), [36]],
    ids=["prompt-runs", "every-other", "all", "last"],
)
def test_rows_without_gradient_are_skipped_with_the_same_gradients(zero_rows):
    h, w, targets, g = _inputs(seed=3)
    g[zero_rows] = 0  # prompt positions of a custom loss, datums of a no-signal group
    ref_lp, _, ref_gh, ref_gw = _reference(h, w, targets, g)
    hh, ww = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    lp, _ = head_logprobs(hh, ww, targets)
    (lp * g).sum().backward()
    assert torch.equal(lp.detach(), ref_lp)
    torch.testing.assert_close(hh.grad, ref_gh, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ww.grad, ref_gw, atol=1e-6, rtol=1e-5)
