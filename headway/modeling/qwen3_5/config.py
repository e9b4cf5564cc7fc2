"""`Qwen35Config`: a Qwen3.5 language model's hyper-parameters, from either layout of `config.json`.

A text-only directory (`model_type: qwen3_5_text`) has the fields at the top level; the
released multimodal snapshot (`model_type: qwen3_5`) nests them in `text_config`, keeps its
language weights under `model.language_model.` and a vision tower (`model.visual.`) and
multi-token-prediction head (`mtp.`) beside them, which we do not load. Defaults are those
of transformers' `Qwen3_5TextConfig`, so a directory that omits a field means the same
architecture to both. Export always writes the text-only layout. No torch here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from headway.modeling.config import ModelConfig
from headway.modeling.errors import ModelError

LINEAR, FULL = "linear_attention", "full_attention"
_REQUIRED = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
)
_SKIPPED_WEIGHTS = ("model.visual.", "mtp.")  # vision tower, multi-token prediction
_MULTIMODAL_PREFIX = "model.language_model."


@dataclass
class Qwen35Config(ModelConfig):
    """A Qwen3.5 decoder: `ModelConfig`'s fields plus the linear-attention ones."""

    # Per layer, "linear_attention" (Gated DeltaNet) or "full_attention" (gated softmax).
    layer_types: list[str] = field(default_factory=list)
    linear_conv_kernel_dim: int = 4  # width of the causal depthwise conv over q/k/v
    linear_key_head_dim: int = 128
    linear_value_head_dim: int = 128
    linear_num_key_heads: int = 16  # q/k heads; each serves value_heads // key_heads v heads
    linear_num_value_heads: int = 32
    partial_rotary_factor: float = 0.25  # RoPE rotates the first head_dim * factor dims only
    multimodal: bool = False  # read from the multimodal snapshot (weights nested deeper)
    # Attention and MLP, and the linear-attention layers' main projections. in_proj_b and
    # in_proj_a (one output per value head: a rank bound of linear_num_value_heads) are
    # adapted only when asked for.
    lora_targets: ClassVar[tuple[str, ...]] = (
        *ModelConfig.lora_targets,
        "in_proj_qkv",
        "in_proj_z",
        "out_proj",
    )

    @property
    def rotary_dim(self) -> int:
        """How many leading dims of each full-attention head RoPE rotates."""
        return int(self.head_dim * self.partial_rotary_factor)

    def our_weight_name(self, key: str) -> str | None:
        """Our name for `key`; None for the vision tower and multi-token-prediction weights."""
        if key.startswith(_SKIPPED_WEIGHTS):
            return None
        if self.multimodal and key.startswith(_MULTIMODAL_PREFIX):
            return key.removeprefix(_MULTIMODAL_PREFIX)
        return key.removeprefix("model.")

    def to_hf_dict(self) -> dict[str, Any]:
        """A text-only `config.json` (`Qwen3_5ForCausalLM`) transformers reads back."""
        out: dict[str, Any] = dict(self.extra)
        rope = dict(out.pop("rope_parameters", None) or {})
        rope.update(
            rope_type="default",
            rope_theta=self.rope_theta,
            partial_rotary_factor=self.partial_rotary_factor,
        )
        out.update(
            model_type="qwen3_5_text",
            architectures=["Qwen3_5ForCausalLM"],
            **self.hf_shape_fields(),
            rope_parameters=rope,
            attention_bias=self.qkv_bias,
            layer_types=list(self.layer_types),
            linear_conv_kernel_dim=self.linear_conv_kernel_dim,
            linear_key_head_dim=self.linear_key_head_dim,
            linear_value_head_dim=self.linear_value_head_dim,
            linear_num_key_heads=self.linear_num_key_heads,
            linear_num_value_heads=self.linear_num_value_heads,
        )
        return out


def read_config(raw: dict[str, Any], source: str = "config.json") -> Qwen35Config:
    """The registry's reader for `qwen3_5` (multimodal snapshot) and `qwen3_5_text`."""
    multimodal = raw.get("model_type") == "qwen3_5"
    text, where = raw, source
    if multimodal:
        text = raw.get("text_config")
        where = f"{source} text_config"
        if not isinstance(text, dict):
            raise ModelError(
                f"{source}: a qwen3_5 (multimodal) config needs a 'text_config' object "
                "describing its language model"
            )
        if text.get("model_type", "qwen3_5_text") != "qwen3_5_text":
            raise ModelError(
                f"{where}: model_type {text['model_type']!r} is not supported; "
                "the language model of a qwen3_5 snapshot must be qwen3_5_text"
            )
    for name in _REQUIRED:
        if text.get(name) is None:
            raise ModelError(f"{where}: missing required field {name!r} for a Qwen3.5 model")
    if text.get("hidden_act", "silu") != "silu":
        raise ModelError(f"{where}: hidden_act {text['hidden_act']!r} is not supported; use 'silu'")

    rope = text.get("rope_parameters") or {}
    if not isinstance(rope, dict):
        raise ModelError(f"{where}: rope_parameters must be an object")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ModelError(
            f"{where}: rope_parameters.rope_type {rope_type!r} is not supported for Qwen3.5; "
            "use 'default'"
        )
    layers = int(text["num_hidden_layers"])
    layer_types = text.get("layer_types")
    if layer_types is None:
        interval = int(text.get("full_attention_interval", 4))
        if interval < 1:
            raise ModelError(f"{where}: full_attention_interval must be ≥ 1, got {interval}")
        layer_types = [FULL if (i + 1) % interval == 0 else LINEAR for i in range(layers)]
    if not isinstance(layer_types, list) or len(layer_types) != layers:
        raise ModelError(
            f"{where}: layer_types must list one type per layer ({layers}, num_hidden_layers)"
        )
    bad = sorted({t for t in layer_types if t not in (LINEAR, FULL)}, key=str)
    if bad:
        raise ModelError(
            f"{where}: layer_types has {bad[0]!r}; each entry is {LINEAR!r} or {FULL!r}"
        )

    attention_bias = bool(text.get("attention_bias", False))
    known = set(_REQUIRED) | {
        "model_type",
        "architectures",
        "num_key_value_heads",
        "head_dim",
        "max_position_embeddings",
        "rms_norm_eps",
        "rope_theta",
        "partial_rotary_factor",
        "attention_bias",
        "tie_word_embeddings",
        "hidden_act",
        "layer_types",
        "full_attention_interval",
        "linear_conv_kernel_dim",
        "linear_key_head_dim",
        "linear_value_head_dim",
        "linear_num_key_heads",
        "linear_num_value_heads",
        "bos_token_id",
        "eos_token_id",
    }
    # The snapshot's tie is the outer config's (transformers ties by the top-level model's config).
    tie = raw.get("tie_word_embeddings", False) if multimodal else text.get("tie_word_embeddings")
    config = Qwen35Config(
        model_type=raw["model_type"],  # qwen3_5 (multimodal) or qwen3_5_text: one family
        vocab_size=int(text["vocab_size"]),
        hidden_size=int(text["hidden_size"]),
        intermediate_size=int(text["intermediate_size"]),
        num_hidden_layers=layers,
        num_attention_heads=int(text["num_attention_heads"]),
        num_key_value_heads=int(text.get("num_key_value_heads", 4)),
        head_dim=int(text.get("head_dim", 256)),
        max_position_embeddings=int(text.get("max_position_embeddings", 32768)),
        rms_norm_eps=float(text.get("rms_norm_eps", 1e-6)),
        rope_theta=float(rope.get("rope_theta", text.get("rope_theta", 10000.0))),
        tie_word_embeddings=bool(tie),
        qkv_bias=attention_bias,
        o_bias=attention_bias,
        qk_norm=True,
        bos_token_id=text.get("bos_token_id", raw.get("bos_token_id")),
        eos_token_id=text.get("eos_token_id", raw.get("eos_token_id")),
        extra={k: v for k, v in text.items() if k not in known},
        layer_types=list(layer_types),
        linear_conv_kernel_dim=int(text.get("linear_conv_kernel_dim", 4)),
        linear_key_head_dim=int(text.get("linear_key_head_dim", 128)),
        linear_value_head_dim=int(text.get("linear_value_head_dim", 128)),
        linear_num_key_heads=int(text.get("linear_num_key_heads", 16)),
        linear_num_value_heads=int(text.get("linear_num_value_heads", 32)),
        partial_rotary_factor=float(
            rope.get("partial_rotary_factor", text.get("partial_rotary_factor", 0.25))
        ),
        multimodal=multimodal,
    )
    if config.linear_num_value_heads % config.linear_num_key_heads:
        raise ModelError(
            f"{where}: linear_num_value_heads ({config.linear_num_value_heads}) must be a "
            f"multiple of linear_num_key_heads ({config.linear_num_key_heads})"
        )
    if config.rotary_dim % 2 or not 0 < config.rotary_dim <= config.head_dim:
        raise ModelError(
            f"{where}: partial_rotary_factor {config.partial_rotary_factor} gives "
            f"{config.rotary_dim} rotary dims of head_dim {config.head_dim}; it needs an even "
            "number between 2 and head_dim"
        )
    return config
