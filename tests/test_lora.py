"""LoRA adapters: a fresh one is a no-op, and ours are PEFT's, on disk and in the logits."""

from __future__ import annotations

import json

import pytest
import torch

from headway.modeling import (
    LoraConfig,
    ModelError,
    apply_lora,
    load_adapter,
    load_model,
    merge_lora,
    save_adapter,
)
from tests.conftest import VOCAB


def _ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 13), generator=torch.Generator().manual_seed(5))


def _randomise_adapter(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn_like(p))


def test_fresh_adapter_leaves_logits_exactly_unchanged(hf_dir):
    _, path = hf_dir
    model, _ = load_model(path)
    with torch.no_grad():
        base = model(_ids())
        apply_lora(model, LoraConfig(rank=4, alpha=8))
        assert torch.equal(model(_ids()), base)


def test_only_adapter_parameters_train_and_base_is_shared_not_copied(hf_dir):
    _, path = hf_dir
    model, _ = load_model(path)
    q_weight = model.layers[0].self_attn.q_proj.weight
    apply_lora(model, LoraConfig(rank=4))
    assert model.layers[0].self_attn.q_proj.weight is q_weight
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    # 7 default targets per layer, A and B each.
    assert len(trainable) == 2 * 7 * model.config.num_hidden_layers


def test_adapter_loads_in_peft_with_our_logits(hf_dir, tmp_path):
    from peft import PeftModel

    hf, path = hf_dir
    model, _ = load_model(path)
    apply_lora(
        model, LoraConfig(rank=4, alpha=16, target_modules=("q_proj", "v_proj", "down_proj"))
    )
    _randomise_adapter(model)
    save_adapter(model, tmp_path / "adapter", base_model=str(path))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 16

    peft_model = PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    with torch.no_grad():
        ours, theirs = model(_ids()), peft_model(_ids()).logits
    assert (ours - theirs).abs().max().item() <= 1e-4
    # The adapter matters: without it the logits differ.
    with torch.no_grad(), peft_model.disable_adapter():
        assert (peft_model(_ids()).logits - ours).abs().max().item() > 1e-3


def test_peft_saved_adapter_loads_into_ours(hf_dir, tmp_path):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    hf, path = hf_dir
    peft_model = get_peft_model(
        hf, PeftLoraConfig(r=8, lora_alpha=4, target_modules=["k_proj", "o_proj", "up_proj"])
    )
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn_like(p))
    peft_model.save_pretrained(tmp_path / "peft")
    model, _ = load_model(path)
    load_adapter(model, tmp_path / "peft")
    with torch.no_grad():
        diff = (model(_ids()) - peft_model(_ids()).logits).abs().max().item()
    assert diff <= 1e-4


def test_merge_folds_adapter_into_new_weights(hf_dir):
    _, path = hf_dir
    model, _ = load_model(path)
    original = model.layers[0].mlp.gate_proj.weight.detach().clone()
    apply_lora(model, LoraConfig(rank=4))
    _randomise_adapter(model)
    with torch.no_grad():
        with_adapter = model(_ids())
        merge_lora(model)
        merged = model(_ids())
    assert (with_adapter - merged).abs().max().item() <= 1e-5
    assert not any("lora" in n for n, _ in model.named_parameters())
    assert not torch.equal(model.layers[0].mlp.gate_proj.weight, original)


def test_bad_adapter_shapes_are_refused(hf_dir, tmp_path):
    _, path = hf_dir
    model, _ = load_model(path)
    with pytest.raises(ModelError, match="target_modules"):
        LoraConfig(rank=4, target_modules=("c_attn",))
    with pytest.raises(ModelError, match="rank"):
        LoraConfig(rank=0)
    apply_lora(model, LoraConfig(rank=4))
    save_adapter(model, tmp_path / "a")
    other, _ = load_model(path)
    apply_lora(other, LoraConfig(rank=8))
    with pytest.raises(ModelError, match="differs"):
        load_adapter(other, tmp_path / "a")
