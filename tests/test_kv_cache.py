"""The static KV cache: prefill of ragged prompts, then per-row decode, equals the full forward."""

from __future__ import annotations

import torch

from headway.modeling import load_model, round_up
from tests.conftest import VOCAB


def test_cached_decode_matches_full_forward_at_every_step(hf_dir):
    _, path = hf_dir
    model, _ = load_model(path)
    prompt_lens = torch.tensor([5, 11, 1, 8])
    B, steps = len(prompt_lens), 12
    gen = torch.Generator().manual_seed(3)
    # Each row's full sequence; row b's prompt is its first prompt_lens[b] tokens.
    seqs = torch.randint(0, VOCAB, (B, int(prompt_lens.max()) + steps), generator=gen)
    caches = model.new_caches(B, round_up(int(prompt_lens.max()) + steps))
    assert caches[0].k.shape == (B, model.config.num_key_value_heads, 24, model.config.head_dim)

    with torch.no_grad():
        T = int(prompt_lens.max())
        prompts = seqs[:, :T].clone()
        positions = torch.arange(T).expand(B, T)
        prefill = model(prompts, positions, caches=caches, output_index=prompt_lens - 1)
        full = model(seqs)
        rows = torch.arange(B)
        torch.testing.assert_close(prefill[:, 0], full[rows, prompt_lens - 1], atol=1e-4, rtol=0)
        pos = prompt_lens.clone()
        for _ in range(steps):
            step = model(seqs[rows, pos][:, None], pos[:, None], caches=caches, validate=False)
            expected = full[rows, pos]
            diff = (step[:, 0] - expected).abs().max().item()
            assert diff <= 1e-4, f"decode diverges from the full forward by {diff:.2e}"
            pos += 1


def test_cache_is_written_in_place_not_reallocated(hf_dir):
    _, path = hf_dir
    model, _ = load_model(path)
    caches = model.new_caches(2, 16)
    before = [c.k.data_ptr() for c in caches]
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3], [4, 5, 6]]), torch.arange(3).expand(2, 3), caches=caches)
        model(torch.tensor([[7], [8]]), torch.tensor([[3], [3]]), caches=caches)
    assert [c.k.data_ptr() for c in caches] == before
    assert caches[0].k[:, :, :4].abs().sum() > 0 and caches[0].k[:, :, 4:].abs().sum() == 0


def test_cached_greedy_generation_matches_transformers_generate(hf_dir):
    hf, path = hf_dir
    model, _ = load_model(path)
    prompt = torch.tensor([[3, 14, 15, 9, 26, 5]])
    new = 10
    with torch.no_grad():
        expected = hf.generate(
            prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0
        )[0, prompt.shape[1] :]
        caches = model.new_caches(1, round_up(prompt.shape[1] + new))
        T = prompt.shape[1]
        logits = model(
            prompt, torch.arange(T)[None], caches=caches, output_index=torch.tensor([T - 1])
        )
        out = []
        for i in range(new):
            token = logits[:, -1].argmax(-1)
            out.append(int(token))
            logits = model(token[:, None], torch.tensor([[T + i]]), caches=caches, validate=False)
    assert out == expected.tolist()


def test_a_cache_window_writes_the_whole_cache_and_reads_its_window():
    """`CacheWindow` (the compiled decode's window): the new keys and values land in the
    whole cache itself, at each row's position, and attention gets the first rows' first
    `length` positions: the same as a `KVCache.window` view's update."""
    from headway.modeling.kv_cache import CacheWindow, KVCache

    torch.manual_seed(0)
    caches = [KVCache(4, 2, 24, 8, torch.float32) for _ in range(2)]
    for c in caches:
        c.k.normal_(), c.v.normal_()
    caches[1].k.copy_(caches[0].k), caches[1].v.copy_(caches[0].v)
    k, v = torch.randn(2, 3, 2, 1, 8)
    positions = torch.tensor([[5], [9], [0]])
    window = CacheWindow(caches[0], 16)
    assert window.max_len == 16 and window.k is caches[0].k
    got = window.update(positions, k, v)
    want = caches[1].window(3, 16).update(positions, k, v)
    for g, w in zip(got, want, strict=True):
        assert g.shape == (3, 2, 16, 8) and torch.equal(g, w)
    assert torch.equal(caches[0].k, caches[1].k) and torch.equal(caches[0].v, caches[1].v)
    assert torch.equal(caches[0].k[1, :, 9], k[1, :, 0])
