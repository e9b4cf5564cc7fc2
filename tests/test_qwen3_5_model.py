"""Our Qwen3.5 (text) is transformers': same weights, same logits and gradients, both layouts.

The reference models are transformers' own (`Qwen3_5ForCausalLM` for a text-only directory,
`Qwen3_5ForConditionalGeneration` with a tiny vision tower for the released multimodal
layout), every parameter randomised so that a missed gate, norm offset or decay shows up.
Sequences are longer than one delta-rule chunk (64), with a shorter last chunk.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from headway.modeling import ModelConfig, ModelError, load_model, save_model
from headway.modeling.qwen3_5.delta_rule import (
    chunked_gated_delta_rule,
    recurrent_gated_delta_rule,
)

VOCAB = 96
LENGTHS = (80, 33, 1)  # a ragged, right-padded batch crossing a chunk boundary

# Several head counts (GQA in both mixers, equal and grouped linear heads), conv kernel
# sizes 2-4, odd layer counts, explicit layer_types, bias and tied embeddings.
SHAPES = {
    "gqa-k3-5layers": dict(
        num_hidden_layers=5,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        linear_conv_kernel_dim=3,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=8,
        linear_value_head_dim=12,
        full_attention_interval=2,
    ),
    "mqa-k4-3layers-tied": dict(
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        linear_conv_kernel_dim=4,
        linear_num_key_heads=1,
        linear_num_value_heads=1,
        linear_key_head_dim=16,
        linear_value_head_dim=16,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "partial_rotary_factor": 0.5},
    ),
    "mha-k2-bias-layer-types": dict(
        num_hidden_layers=3,
        num_attention_heads=8,
        num_key_value_heads=8,
        head_dim=8,
        linear_conv_kernel_dim=2,
        linear_num_key_heads=2,
        linear_num_value_heads=6,
        linear_key_head_dim=4,
        linear_value_head_dim=4,
        attention_bias=True,
        layer_types=["full_attention", "linear_attention", "full_attention"],
    ),
}


def text_config(shape: str):
    from transformers import Qwen3_5TextConfig

    return Qwen3_5TextConfig(
        vocab_size=VOCAB,
        hidden_size=48,
        intermediate_size=80,
        max_position_embeddings=256,
        **SHAPES[shape],
    )


def _randomise(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter random; norms near their identity; decays in a useful range."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("linear_attn.norm.weight"):  # plain-weight gated norm
                p.copy_(1 + 0.1 * noise)
            elif name.endswith("norm.weight"):  # zero-centred norms: (1 + w)
                p.copy_(0.1 * noise)
            elif name.endswith("A_log"):
                p.copy_(torch.rand(p.shape, generator=gen) * 2 - 1)
            elif name.endswith("dt_bias"):
                p.copy_(0.5 * noise)
            else:
                p.copy_(0.08 * noise)
    return model.eval()


def build_text(shape: str, seed: int = 0) -> torch.nn.Module:
    from transformers import Qwen3_5ForCausalLM

    torch.manual_seed(seed)
    return _randomise(Qwen3_5ForCausalLM(text_config(shape)), seed)


def build_multimodal(shape: str, seed: int = 0) -> torch.nn.Module:
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration

    text = text_config(shape)
    vision = dict(
        depth=1,
        hidden_size=16,
        intermediate_size=32,
        num_heads=2,
        out_hidden_size=text.hidden_size,
        patch_size=4,
        num_position_embeddings=16,
    )
    config = Qwen3_5Config(
        text_config=text.to_dict(),
        vision_config=vision,
        tie_word_embeddings=text.tie_word_embeddings,
    )
    torch.manual_seed(seed)
    return _randomise(Qwen3_5ForConditionalGeneration(config), seed)


def _add_mtp_weights(path: Path) -> None:
    """Put multi-token-prediction tensors beside the weights, as the released snapshots do."""
    from safetensors.torch import load_file, save_file

    file = path / "model.safetensors"
    tensors = load_file(str(file))
    tensors["mtp.fc.weight"] = torch.zeros(4, 4)
    tensors["mtp.layers.0.mlp.up_proj.weight"] = torch.zeros(4, 4)
    save_file(tensors, str(file), metadata={"format": "pt"})


def _ragged_batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (len(LENGTHS), max(LENGTHS)), generator=gen)
    mask = torch.arange(max(LENGTHS))[None] < torch.tensor(LENGTHS)[:, None]
    return ids.masked_fill(~mask, 0), mask


def _max_diff(expected: torch.Tensor, got: torch.Tensor, mask: torch.Tensor) -> float:
    assert got.shape == expected.shape
    return (expected - got).abs()[mask].max().item()


@pytest.fixture(params=sorted(SHAPES))
def shape(request: pytest.FixtureRequest) -> str:
    return request.param


def test_text_layout_logits_match_transformers(shape, tmp_path):
    hf = build_text(shape)
    hf.save_pretrained(tmp_path)
    ours, _ = load_model(tmp_path)
    ids, mask = _ragged_batch()
    with torch.no_grad():
        # Rows one at a time for the reference (no padding inside it), ours batched.
        expected = torch.zeros(*ids.shape, VOCAB)
        for row, n in enumerate(LENGTHS):
            expected[row, :n] = hf(ids[row : row + 1, :n], use_cache=False).logits[0]
        got = ours(ids)
    assert _max_diff(expected, got, mask) <= 1e-4


def test_multimodal_layout_loads_its_language_model(shape, tmp_path):
    hf = build_multimodal(shape, seed=3)
    hf.save_pretrained(tmp_path)
    _add_mtp_weights(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    assert raw["model_type"] == "qwen3_5" and "text_config" in raw
    ours, _ = load_model(tmp_path)
    assert not any("visual" in name or "mtp" in name for name in ours.state_dict())
    ids, mask = _ragged_batch(seed=4)
    with torch.no_grad():
        expected = hf(
            input_ids=ids, use_cache=False
        ).logits  # causal: right padding leaves real positions alone
        got = ours(ids)
    assert _max_diff(expected, got, mask) <= 1e-4


def test_parity_is_not_trivial(tmp_path):
    # Guards the parity tests: a changed decay gives different logits.
    hf = build_text("gqa-k3-5layers")
    hf.save_pretrained(tmp_path)
    ours, _ = load_model(tmp_path)
    with torch.no_grad():
        ours.layers[0].linear_attn.A_log.add_(1.0)
        ids, mask = _ragged_batch()
        assert _max_diff(hf(ids, use_cache=False).logits, ours(ids), mask) > 1e-3


def test_gradients_match_transformers(tmp_path):
    hf = build_text("gqa-k3-5layers", seed=5)
    hf.save_pretrained(tmp_path)
    ours, _ = load_model(tmp_path)
    ids = torch.randint(0, VOCAB, (2, 70), generator=torch.Generator().manual_seed(6))
    for model, logits in ((hf, lambda: hf(ids, use_cache=False).logits), (ours, lambda: ours(ids))):
        model.zero_grad()
        torch.log_softmax(logits(), -1)[:, :-1].gather(-1, ids[:, 1:, None]).sum().backward()
    theirs = {n.removeprefix("model."): p.grad for n, p in hf.named_parameters()}
    for name, p in ours.named_parameters():
        scale = theirs[name].abs().max().item() + 1e-6
        assert (p.grad - theirs[name]).abs().max().item() <= 1e-4 * max(1.0, scale), name


@pytest.mark.parametrize("source", ["text", "multimodal"])
def test_saved_model_loads_in_transformers_with_same_logits(source, tmp_path):
    import transformers

    hf = (build_text if source == "text" else build_multimodal)("mqa-k4-3layers-tied", seed=7)
    hf.save_pretrained(tmp_path / "in")
    ours, _ = load_model(tmp_path / "in")
    save_model(ours, None, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == (
        "qwen3_5_text"
    )
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids, mask = _ragged_batch(seed=8)
    with torch.no_grad():
        assert _max_diff(reloaded(ids, use_cache=False).logits, ours(ids), mask) <= 1e-4
    again, _ = load_model(tmp_path / "out")  # and our own loader reads the export back
    with torch.no_grad():
        assert _max_diff(again(ids), ours(ids), mask) == 0.0


def _delta_inputs(heads: int = 3, length: int = 45, dk: int = 8, dv: int = 5, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(2, heads, length, dk, generator=gen) for _ in range(2))
    q, k = (
        torch.nn.functional.normalize(q, dim=-1) * dk**-0.5,
        torch.nn.functional.normalize(k, dim=-1),
    )
    v = torch.randn(2, heads, length, dv, generator=gen)
    g = -torch.rand(2, heads, length, generator=gen) * 2  # log decays, some strong
    beta = torch.rand(2, heads, length, generator=gen)
    state = torch.randn(2, heads, dk, dv, generator=gen)
    return [t.requires_grad_() for t in (q, k, v, g, beta, state)]


@pytest.mark.parametrize("chunk_size", [1, 8, 16, 45, 64])
def test_chunked_delta_rule_equals_recurrent_forward_and_backward(chunk_size):
    inputs = _delta_inputs()
    out_r, state_r = recurrent_gated_delta_rule(*inputs)
    out_c, state_c = chunked_gated_delta_rule(*inputs, chunk_size=chunk_size)
    assert (out_r - out_c).abs().max().item() <= 1e-5
    assert (state_r - state_c).abs().max().item() <= 1e-5
    weights = torch.randn_like(out_r), torch.randn_like(state_r)
    grads_r = torch.autograd.grad((out_r * weights[0]).sum() + (state_r * weights[1]).sum(), inputs)
    grads_c = torch.autograd.grad((out_c * weights[0]).sum() + (state_c * weights[1]).sum(), inputs)
    for name, a, b in zip(("q", "k", "v", "g", "beta", "state"), grads_r, grads_c, strict=True):
        assert (a - b).abs().max().item() <= 1e-4 * max(1.0, a.abs().max().item()), name


def test_chunked_delta_rule_carries_state_across_calls():
    q, k, v, g, beta, _ = (t.detach() for t in _delta_inputs(length=30))
    whole, final = chunked_gated_delta_rule(q, k, v, g, beta, chunk_size=8)
    first, mid = chunked_gated_delta_rule(*(t[:, :, :13] for t in (q, k, v, g, beta)))
    second, end = chunked_gated_delta_rule(*(t[:, :, 13:] for t in (q, k, v, g, beta)), state=mid)
    assert torch.allclose(torch.cat((first, second), 2), whole, atol=1e-5)
    assert torch.allclose(end, final, atol=1e-5)


def _text_raw(**overrides: object) -> dict:
    raw = text_config("gqa-k3-5layers").to_dict()
    raw.update(overrides)
    return raw


def test_config_reads_both_layouts_alike():
    text = ModelConfig.from_hf_dict(_text_raw())
    nested = ModelConfig.from_hf_dict({"model_type": "qwen3_5", "text_config": _text_raw()})
    assert (
        text.layer_types
        == nested.layer_types
        == ["linear_attention", "full_attention"] * 2 + ["linear_attention"]
    )
    assert (text.rotary_dim, text.multimodal, nested.multimodal) == (4, False, True)
    assert nested.our_weight_name("model.language_model.layers.0.mlp.up_proj.weight") == (
        "layers.0.mlp.up_proj.weight"
    )
    assert nested.our_weight_name("model.visual.blocks.0.attn.qkv.weight") is None
    assert text.our_weight_name("mtp.fc.weight") is None


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"model_type": "qwen3_5_moe"}, "mixture-of-experts variants are not supported"),
        ({"model_type": "qwen3_5_vision"}, "vision encoder alone is not a language model"),
        ({"model_type": "qwen3_5"}, "needs a 'text_config'"),
        (
            {"model_type": "qwen3_5", "text_config": _text_raw(model_type="qwen3_5_moe_text")},
            "text_config: model_type 'qwen3_5_moe_text' is not supported",
        ),
        (_text_raw(layer_types=["linear_attention"]), "layer_types must list one type per layer"),
        (
            _text_raw(layer_types=["linear_attention", "sliding"] * 2 + ["full_attention"]),
            "sliding",
        ),
        (_text_raw(linear_num_value_heads=3), "multiple of linear_num_key_heads"),
        (_text_raw(hidden_size=None), "missing required field 'hidden_size'"),
        (
            _text_raw(rope_parameters={"rope_type": "yarn", "factor": 2.0}),
            "rope_type 'yarn' is not supported",
        ),
    ],
)
def test_malformed_or_unsupported_configs_name_the_field(raw, message):
    with pytest.raises(ModelError, match=message):
        ModelConfig.from_hf_dict(raw)


@pytest.mark.parametrize("source", ["text", "multimodal"])
def test_lora_on_every_projection_exports_a_peft_adapter_with_the_same_logits(source, tmp_path):
    from peft import PeftModel

    from headway.modeling import LoraConfig, apply_lora, merge_lora, save_adapter
    from headway.modeling.lora import KNOWN_TARGETS

    build = build_text if source == "text" else build_multimodal
    build("gqa-k3-5layers", seed=9).save_pretrained(tmp_path / "base")
    ours, _ = load_model(tmp_path / "base")
    apply_lora(ours, LoraConfig(rank=4, alpha=8, target_modules=KNOWN_TARGETS), seed=0)
    adapted = {n.rsplit(".", 2)[-2] for n, _ in ours.named_parameters() if "lora_B" in n}
    assert adapted == set(KNOWN_TARGETS)  # the linear-attention projections included
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if name.endswith("lora_B"):
                p.copy_(0.05 * torch.randn_like(p))
    save_adapter(ours, tmp_path / "adapter")
    # transformers' causal-LM class reads either layout as the text model PEFT adapts.
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    peft = PeftModel.from_pretrained(hf, tmp_path / "adapter")
    ids, mask = _ragged_batch(seed=10)
    with torch.no_grad():
        expected = peft.eval()(ids, use_cache=False).logits
        got = ours(ids)
        assert _max_diff(expected, got, mask) <= 1e-4
        merge_lora(ours)
        assert _max_diff(expected, ours(ids), mask) <= 1e-4


def test_default_lora_targets_cover_linear_attention():
    config = ModelConfig.from_hf_dict(_text_raw())
    assert {"in_proj_qkv", "in_proj_z", "out_proj", "q_proj", "down_proj"} <= set(
        config.lora_targets
    )
    assert (
        "in_proj_qkv"
        not in ModelConfig.from_hf_dict({**_text_raw(), "model_type": "qwen3"}).lora_targets
    )


def test_delta_rule_stays_fp32_under_bf16_autocast():
    # The trainer's bf16 mode runs the forward under autocast; the recurrence must not.
    inputs = [t.detach() for t in _delta_inputs()]
    expected, _ = chunked_gated_delta_rule(*inputs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, state = chunked_gated_delta_rule(*inputs)
    assert got.dtype == state.dtype == torch.float32
    assert torch.equal(got, expected)
