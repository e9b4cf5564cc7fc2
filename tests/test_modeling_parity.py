"""Our decoder is Hugging Face's: same weights, same logits, for every supported family."""

from __future__ import annotations

import torch

from headway.modeling import load_model, save_model, token_logprobs
from tests.conftest import VOCAB

LENGTHS = (17, 9, 1, 30)  # a ragged batch, right-padded


def _ragged_batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (len(LENGTHS), max(LENGTHS)), generator=gen)
    mask = torch.arange(max(LENGTHS))[None] < torch.tensor(LENGTHS)[:, None]
    return ids.masked_fill(~mask, 0), mask


def test_logits_match_transformers_on_a_ragged_batch(hf_dir):
    hf, path = hf_dir
    ours, _ = load_model(path, dtype=torch.float32)
    ids, mask = _ragged_batch()
    with torch.no_grad():
        expected = hf(ids, attention_mask=mask.long()).logits
        got = ours(ids)
    assert got.shape == (len(LENGTHS), max(LENGTHS), VOCAB)
    diff = (expected - got).abs()[mask]  # padded positions are undefined in both
    assert diff.max().item() <= 1e-4, f"max abs diff {diff.max().item():.2e}"


def test_logits_are_not_trivially_equal_across_families(hf_dir):
    # Guards the parity test: a different model gives different logits.
    hf, path = hf_dir
    ours, _ = load_model(path)
    with torch.no_grad():
        ours.layers[0].mlp.up_proj.weight.mul_(1.5)
        ids, mask = _ragged_batch()
        diff = (hf(ids).logits - ours(ids)).abs()[mask]
    assert diff.max().item() > 1e-3


def test_saved_model_loads_in_transformers_with_same_logits(hf_dir, tmp_path):
    import transformers

    _, path = hf_dir
    ours, _ = load_model(path)
    save_model(ours, None, tmp_path / "out")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids, mask = _ragged_batch(seed=2)
    with torch.no_grad():
        diff = (reloaded(ids).logits - ours(ids)).abs()[mask]
    assert diff.max().item() <= 1e-4


def test_sharded_checkpoint_loads_like_single_file(hf_dir, tmp_path):
    hf, _ = hf_dir
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    ours, _ = load_model(tmp_path / "sharded")
    ids, mask = _ragged_batch()
    with torch.no_grad():
        diff = (hf(ids).logits - ours(ids)).abs()[mask]
    assert diff.max().item() <= 1e-4


def test_bfloat16_load_casts_every_weight(hf_dir):
    _, path = hf_dir
    ours, _ = load_model(path, dtype=torch.bfloat16)
    assert {p.dtype for p in ours.parameters()} == {torch.bfloat16}
    ids, _ = _ragged_batch()
    with torch.no_grad():
        assert torch.isfinite(ours(ids).float()).all()


def test_token_logprobs_equal_log_softmax_gather():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 50, generator=gen) * 4
    targets = torch.randint(0, 50, (3, 7), generator=gen)
    expected = torch.log_softmax(logits, -1).gather(-1, targets[..., None])[..., 0]
    torch.testing.assert_close(token_logprobs(logits, targets), expected, atol=1e-5, rtol=0)
