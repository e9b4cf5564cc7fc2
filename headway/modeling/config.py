"""`ModelConfig`: the decoder's hyper-parameters, read from and written to HF `config.json`.

The registry (`families.py`) chooses each family's reader by `model_type`; a family with
more hyper-parameters reads them into a subclass (`qwen3_5/config.py`). This dataclass
covers the three dense families; the family differences are switches
(`qkv_bias`, `o_bias`, `qk_norm`, `tie_word_embeddings`) set from `model_type`, not copies
of the model. Both the transformers 4 layout (`rope_theta`, `rope_scaling`) and the
transformers 5 layout (`rope_parameters`) of the RoPE settings are read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from headway.modeling.errors import ModelError
from headway.modeling.families import FAMILIES, read_config

# Every registered family (families.py); this module's dataclass reads the dense three.
SUPPORTED_MODEL_TYPES = tuple(FAMILIES)
_DENSE_TYPES = ("llama", "qwen2", "qwen3")

# Fields without which the architecture is undefined; everything else has the family default.
_REQUIRED = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
)


@dataclass
class ModelConfig:
    """Architecture of a Llama/Qwen2/Qwen3 decoder (field names as in HF `config.json`)."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int = 0  # 0 → num_attention_heads (no GQA)
    head_dim: int = 0  # 0 → hidden_size // num_attention_heads
    max_position_embeddings: int = 2048  # the context: prompt + completion never exceeds it
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # Llama-3 style frequency scaling ({"rope_type": "llama3", "factor", ...}); None = plain RoPE.
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = False
    qkv_bias: bool = (
        False  # bias on q/k/v projections (Qwen2 always; Llama/Qwen3 if attention_bias)
    )
    o_bias: bool = False  # bias on the output projection (Llama/Qwen3 attention_bias)
    mlp_bias: bool = False  # Llama's mlp_bias
    qk_norm: bool = False  # per-head RMSNorm on q and k before RoPE (Qwen3)
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    # Keys of config.json we do not interpret, written back unchanged by `to_hf_dict`.
    extra: dict[str, Any] = field(default_factory=dict, repr=False)
    # The projections a LoRA fork adapts when it names none (PEFT's module names).
    lora_targets: ClassVar[tuple[str, ...]] = (
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    )

    def __post_init__(self) -> None:
        if self.num_key_value_heads <= 0:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim <= 0:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ModelError(
                f"config.json: num_attention_heads ({self.num_attention_heads}) must be a multiple"
                f" of num_key_value_heads ({self.num_key_value_heads})"
            )

    @property
    def max_context(self) -> int:
        """Longest sequence (prompt + completion) the model accepts."""
        return self.max_position_embeddings

    def our_weight_name(self, key: str) -> str | None:
        """Our name of the tensor stored as `key` in this layout's weight files; None for a
        tensor that is not ours to load. HF nests the body under `model.`; we keep it at the
        top level."""
        return key.removeprefix("model.")

    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any], source: str = "config.json") -> ModelConfig:
        """Build from a parsed HF `config.json` of any registered family (the subclass that
        family uses); `source` names the file in error messages."""
        return read_config(raw, source)

    @classmethod
    def from_dense_dict(cls, raw: dict[str, Any], source: str = "config.json") -> ModelConfig:
        """Build a Llama/Qwen2/Qwen3 config from a parsed HF `config.json`."""
        model_type = raw.get("model_type")
        if model_type not in _DENSE_TYPES:
            raise ModelError(
                f"{source}: model_type {model_type!r} is not a dense decoder; "
                f"use one of {', '.join(_DENSE_TYPES)}"
            )
        for name in _REQUIRED:
            if raw.get(name) is None:
                raise ModelError(
                    f"{source}: missing required field {name!r} for a {model_type} model"
                )
        if raw.get("use_sliding_window"):
            raise ModelError(
                f"{source}: use_sliding_window=true is not supported; set it to false "
                "(full attention on every layer)"
            )
        if raw.get("hidden_act", "silu") != "silu":
            raise ModelError(
                f"{source}: hidden_act {raw['hidden_act']!r} is not supported; use 'silu'"
            )

        rope_theta, rope_scaling = _read_rope(raw, source)
        attention_bias = bool(raw.get("attention_bias", False))
        known = set(_REQUIRED) | {
            "model_type",
            "num_key_value_heads",
            "head_dim",
            "max_position_embeddings",
            "rms_norm_eps",
            "rope_theta",
            "rope_scaling",
            "rope_parameters",
            "tie_word_embeddings",
            "attention_bias",
            "mlp_bias",
            "bos_token_id",
            "eos_token_id",
        }
        return cls(
            model_type=model_type,
            vocab_size=int(raw["vocab_size"]),
            hidden_size=int(raw["hidden_size"]),
            intermediate_size=int(raw["intermediate_size"]),
            num_hidden_layers=int(raw["num_hidden_layers"]),
            num_attention_heads=int(raw["num_attention_heads"]),
            num_key_value_heads=int(raw.get("num_key_value_heads") or 0),
            head_dim=int(raw.get("head_dim") or 0),
            max_position_embeddings=int(
                raw.get("max_position_embeddings") or cls.max_position_embeddings
            ),
            rms_norm_eps=float(raw.get("rms_norm_eps", cls.rms_norm_eps)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2" or attention_bias,
            o_bias=model_type != "qwen2" and attention_bias,
            mlp_bias=model_type == "llama" and bool(raw.get("mlp_bias", False)),
            qk_norm=model_type == "qwen3",
            bos_token_id=raw.get("bos_token_id"),
            eos_token_id=raw.get("eos_token_id"),
            extra={k: v for k, v in raw.items() if k not in known},
        )

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        """Read `config.json` at `path` (a file or a model directory)."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ModelError(
                f"{path}: not found; a model directory needs a Hugging Face config.json"
            )
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ModelError(f"{path}: not valid JSON ({e}); fix or re-save the file") from e
        return cls.from_hf_dict(raw, source=str(path))

    def hf_shape_fields(self) -> dict[str, Any]:
        """The `config.json` fields every family writes alike: sizes, norms, tokens."""
        return dict(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            max_position_embeddings=self.max_position_embeddings,
            rms_norm_eps=self.rms_norm_eps,
            tie_word_embeddings=self.tie_word_embeddings,
            hidden_act="silu",
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
        )

    def to_hf_dict(self) -> dict[str, Any]:
        """The `config.json` content transformers reads back as the same architecture."""
        out: dict[str, Any] = dict(self.extra)
        out.update(
            model_type=self.model_type,
            architectures=[_ARCHITECTURES[self.model_type]],
            **self.hf_shape_fields(),
            rope_theta=self.rope_theta,
            rope_scaling=self.rope_scaling,
        )
        if self.model_type != "qwen2":
            out["attention_bias"] = self.qkv_bias
        if self.model_type == "llama":
            out["mlp_bias"] = self.mlp_bias
        return out


def read_dense_config(raw: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """The registry's config reader for the llama, qwen2 and qwen3 families."""
    return ModelConfig.from_dense_dict(raw, source)


_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}


def _read_rope(raw: dict[str, Any], source: str) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, llama3 scaling or None) from either config layout."""
    params = raw.get("rope_parameters") or {}
    scaling = raw.get("rope_scaling") or None
    theta = float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))
    rope_type = (scaling or params).get("rope_type", (scaling or params).get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type != "llama3":
        raise ModelError(
            f"{source}: rope type {rope_type!r} is not supported; "
            "use default or llama3 rope scaling"
        )
    spec = dict(scaling or params)
    spec.pop("rope_theta", None)
    for key in (
        "factor",
        "low_freq_factor",
        "high_freq_factor",
        "original_max_position_embeddings",
    ):
        if key not in spec:
            raise ModelError(f"{source}: llama3 rope scaling is missing {key!r}")
    spec["rope_type"] = "llama3"
    spec.pop("type", None)
    return theta, spec
